"""SortedDraft.propose: batching, sampling, stops, idle rows, compile, save/load, truncate."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

from python_tests.draft.helpers import EXITS, MIXED_THRESHOLDS, VOCAB, left_pad, tiny_model
from s2d_ext import SortedDraft
from s2d_ext.draft.protocol import DraftModel
from s2d_ext.ops.exit_head_reference import exit_head_logits
from s2d_ext.ops.verify_reference import logit_threshold, processed_probs

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [8, 64, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [9]]


def test_sorted_draft_satisfies_the_protocol():
    draft = SortedDraft.from_pretrained(tiny_model("llama"), exits=EXITS)
    assert isinstance(draft, DraftModel)
    assert draft.vocab_size == VOCAB and draft.exits == EXITS and draft.thresholds == (0.5, 0.5, 0.0)
    assert draft.dtype == torch.float32 and draft.device == torch.device("cpu")
    assert draft.config.num_hidden_layers == 6 and draft.hf_model.config is draft.config


def test_batched_proposals_equal_per_row_proposals():
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=MIXED_THRESHOLDS)
    rng = random.Random(0)
    ids, mask = left_pad(PROMPTS)
    batch_state = draft.begin(ids, mask, max_length=40)
    row_states = [draft.begin(torch.tensor([p]), None, max_length=40) for p in PROMPTS]
    exits_seen = set()
    for _ in range(5):
        k = 4
        num_draft = torch.tensor([rng.randint(0, k) for _ in PROMPTS])
        batch = draft.propose(batch_state, k, num_draft)
        accepted = torch.tensor([rng.randint(0, int(n)) for n in num_draft])
        emitted = torch.tensor([rng.randrange(1, VOCAB) for _ in PROMPTS])
        for b, state in enumerate(row_states):
            row = draft.propose(state, k, num_draft[b : b + 1])
            n = int(num_draft[b])
            assert batch.num_draft[b] == n
            assert batch.tokens[b].tolist() == row.tokens[0].tolist()
            assert batch.exits[b].tolist() == row.exits[0].tolist()
            assert batch.exits[b, n:].eq(-1).all() and batch.tokens[b, n:].eq(0).all()
            torch.testing.assert_close(batch.confidence[b], row.confidence[0], rtol=1e-5, atol=1e-6)
            draft.advance(state, accepted[b : b + 1], emitted[b : b + 1])
            exits_seen.update(row.exits[0, :n].tolist())
        draft.advance(batch_state, accepted, emitted)
        for b, state in enumerate(row_states):
            assert batch_state.context(b).tolist() == state.context(0).tolist()
    assert exits_seen == set(EXITS)


def test_inactive_rows_are_left_unchanged_by_advance():
    draft = SortedDraft.from_pretrained(tiny_model("llama"), exits=EXITS, thresholds=MIXED_THRESHOLDS)
    ids, mask = left_pad(PROMPTS[:2])
    state = draft.begin(ids, mask, max_length=40)
    prop = draft.propose(state, 3, torch.tensor([3, 3]))
    before = state.context(1).tolist()
    draft.advance(state, torch.tensor([2, 3]), torch.tensor([7, 8]), active=torch.tensor([True, False]))
    assert state.context(1).tolist() == before
    assert state.context(0).tolist() == PROMPTS[0] + prop.tokens[0, :2].tolist() + [7]
    # The inactive row can still draft; its result equals a fresh row with the same context.
    again = draft.propose(state, 2, torch.tensor([0, 2]))
    fresh = draft.propose(draft.begin(torch.tensor([before]), None, 40), 2)
    assert again.tokens[1].tolist() == fresh.tokens[0].tolist()
    assert again.num_draft.tolist() == [0, 2]


def test_rows_with_no_drafts_cost_no_layer_work():
    draft = SortedDraft.from_pretrained(tiny_model("llama"), exits=EXITS, thresholds=(1.0, 1.0, 0.0))
    ids, mask = left_pad(PROMPTS[:2])
    state = draft.begin(ids, mask, max_length=40)
    filled = state.filled.clone()
    prop = draft.propose(state, 4, torch.tensor([0, 0]))
    assert prop.num_draft.tolist() == [0, 0] and prop.exits.eq(-1).all() and prop.confidence.eq(0).all()
    assert torch.equal(state.filled, filled)


def test_confidence_stop_cuts_after_the_first_unconfident_token():
    draft = SortedDraft.from_pretrained(tiny_model("llama"), exits=EXITS, thresholds=MIXED_THRESHOLDS)
    ids, mask = left_pad(PROMPTS)
    free = draft.propose(draft.begin(ids, mask, 40), 5, torch.full((4,), 5))
    stop = torch.tensor([0.0, 0.2, 0.3, 1.0])
    cut = draft.propose(draft.begin(ids, mask, 40), 5, torch.full((4,), 5), stop_threshold=stop)
    for b in range(4):
        below = (free.confidence[b] < stop[b]).nonzero()
        expected = int(below[0, 0]) + 1 if len(below) else 5
        assert int(cut.num_draft[b]) == expected
        assert cut.tokens[b, :expected].tolist() == free.tokens[b, :expected].tolist()
    assert cut.num_draft[3] == 1 and cut.num_draft[0] == 5


def _reference_q(draft, context: list[int], exit_layer: int, temperature, top_k, top_p) -> torch.Tensor:
    """q [V] of the next token at ``exit_layer``, from an HF forward with hidden states."""
    with torch.no_grad():
        out = draft.hf_model(torch.tensor([context]), output_hidden_states=True)
    model = draft.hf_model.model
    if exit_layer == draft.num_layers:
        logits = out.logits[0, -1:].float()
    else:
        hidden = out.hidden_states[exit_layer][0, -1:]
        logits = exit_head_logits(
            hidden, model.norm.weight, draft.hf_model.lm_head.weight, model.norm.variance_epsilon
        )
    logits = logits[None]
    t = torch.tensor([temperature])
    threshold = logit_threshold(logits, t, torch.tensor([top_k]), torch.tensor([top_p]))
    return processed_probs(logits, t, threshold)[0, 0]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (12, 0.9)])
def test_sampled_tokens_follow_the_returned_q(top_k, top_p):
    """Chi-square: tokens drawn for many seeds follow q; q equals the processed exit distribution."""
    draft = SortedDraft.from_pretrained(
        tiny_model("llama", vocab_size=16), exits=EXITS, thresholds=(0.3, 0.3, 0)
    )
    rows = 3000
    context = [3, 9, 4, 1, 7]
    state = draft.begin(torch.tensor([context] * rows), None, max_length=16)
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 11
    prop = draft.propose(
        state,
        1,
        torch.ones(rows, dtype=torch.int64),
        temperature=torch.full((rows,), 1.3),
        top_k=torch.full((rows,), top_k),
        top_p=torch.full((rows,), top_p),
        seeds=seeds,
        offsets=torch.full((rows,), 5),
    )
    q = prop.probs[:, 0]
    assert torch.allclose(q, q[:1].expand_as(q))  # one context -> one q
    assert prop.exits.unique().numel() == 1
    ref = _reference_q(draft, context, int(prop.exits[0, 0]), 1.3, top_k, top_p)
    torch.testing.assert_close(q[0], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(prop.confidence[:, 0], q.amax(-1))
    counts = torch.bincount(prop.tokens[:, 0], minlength=16).double()
    support = q[0] > 0
    assert counts[~support].sum() == 0
    expected = q[0][support].double() * rows
    _, p_value = chisquare(
        counts[support].numpy(), expected.numpy() * counts.sum().item() / expected.sum().item()
    )
    assert p_value > 1e-3
    # Same seeds / offsets -> same tokens; another offset -> other tokens.
    again = draft.propose(
        draft.begin(torch.tensor([context] * rows), None, 16),
        1,
        temperature=1.3,
        top_k=top_k,
        top_p=top_p,
        seeds=seeds,
        offsets=5,
    )
    other = draft.propose(
        draft.begin(torch.tensor([context] * rows), None, 16),
        1,
        temperature=1.3,
        top_k=top_k,
        top_p=top_p,
        seeds=seeds,
        offsets=6,
    )
    assert torch.equal(again.tokens, prop.tokens)
    assert not torch.equal(other.tokens, prop.tokens)


def test_mixed_greedy_and_sampled_rows():
    draft = SortedDraft.from_pretrained(tiny_model("llama"), exits=EXITS, thresholds=MIXED_THRESHOLDS)
    ids, mask = left_pad(PROMPTS)
    greedy = draft.propose(draft.begin(ids, mask, 40), 4)
    temperature = torch.tensor([0.0, 0.8, 0.0, 1.0])
    seeds = torch.tensor([1, 2, 3, 4])
    mixed = draft.propose(draft.begin(ids, mask, 40), 4, temperature=temperature, seeds=seeds, offsets=0)
    for b in (0, 2):  # greedy rows: same tokens and exits as an all-greedy batch, one-hot q
        assert mixed.tokens[b].tolist() == greedy.tokens[b].tolist()
        assert mixed.exits[b].tolist() == greedy.exits[b].tolist()
        torch.testing.assert_close(mixed.confidence[b], greedy.confidence[b])
        assert torch.equal(mixed.probs[b], torch.nn.functional.one_hot(greedy.tokens[b], VOCAB).float())
    for b in (1, 3):  # sampled rows: a distribution that contains the token
        torch.testing.assert_close(mixed.probs[b].sum(-1), torch.ones(4))
        assert (mixed.probs[b].gather(-1, mixed.tokens[b][:, None]) > 0).all()
        torch.testing.assert_close(mixed.confidence[b], mixed.probs[b].amax(-1))


def test_compiled_step_matches_eager():
    model = tiny_model("llama")
    eager = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=MIXED_THRESHOLDS)
    compiled = SortedDraft.from_pretrained(
        model, exits=EXITS, thresholds=MIXED_THRESHOLDS, compile=True, compile_backend="aot_eager"
    )
    ids, mask = left_pad(PROMPTS)
    states = [d.begin(ids, mask, 32) for d in (eager, compiled)]
    for _ in range(2):
        a = eager.propose(states[0], 3, torch.full((4,), 3))
        b = compiled.propose(states[1], 3, torch.full((4,), 3))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exits, b.exits)
        for d, s in zip((eager, compiled), states, strict=True):
            d.advance(s, torch.tensor([3, 1, 0, 2]), torch.tensor([1, 2, 3, 4]))


def test_save_pretrained_round_trip(tmp_path):
    draft = SortedDraft.from_pretrained(tiny_model("qwen2"), exits=EXITS, thresholds=(0.2, 0.3, 0.0))
    draft.save_pretrained(tmp_path)
    loaded = SortedDraft.from_pretrained(tmp_path)
    assert loaded.exits == EXITS and loaded.thresholds == (0.2, 0.3, 0.0)
    assert loaded.config.model_type == "qwen2"
    ids, mask = left_pad(PROMPTS)
    a = draft.propose(draft.begin(ids, mask, 32), 4)
    b = loaded.propose(loaded.begin(ids, mask, 32), 4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exits, b.exits)
    override = SortedDraft.from_pretrained(tmp_path, exits=(3, 6), thresholds=(0.1, 0.0))
    assert override.exits == (3, 6) and override.thresholds == (0.1, 0.0)
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "plain")
    default = SortedDraft.from_pretrained(tmp_path / "plain")
    assert default.exits == (6,) and default.thresholds == (0.0,)


@pytest.mark.parametrize("share", [False, True])
def test_truncate_copies_the_first_layers(share):
    big = tiny_model("llama", num_hidden_layers=8)
    draft = SortedDraft.truncate(big, 6, exits=EXITS, thresholds=MIXED_THRESHOLDS, share_embeddings=share)
    assert draft.num_layers == 6 and len(draft.hf_model.model.layers) == 6
    assert big.config.num_hidden_layers == 8 and len(big.model.layers) == 8
    for mine, theirs in zip(draft.hf_model.model.layers, big.model.layers[:6], strict=False):
        assert mine is not theirs
        assert torch.equal(mine.self_attn.q_proj.weight, theirs.self_attn.q_proj.weight)
        assert mine.self_attn.q_proj.weight.data_ptr() != theirs.self_attn.q_proj.weight.data_ptr()
    shared = draft.hf_model.lm_head.weight.data_ptr() == big.lm_head.weight.data_ptr()
    assert shared == share
    assert torch.equal(draft.hf_model.model.embed_tokens.weight, big.model.embed_tokens.weight)
    # The truncated model is the first 6 layers: same as the exit at 6 of the full one.
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = big(ids, output_hidden_states=True).hidden_states[6]
        mine = draft.hf_model.model(ids, output_hidden_states=True).hidden_states[6]
    # NOTE: HF's last hidden state is after the final norm; compare the normed ones.
    torch.testing.assert_close(big.model.norm(full), mine)


def test_bfloat16_draft_runs_and_mostly_agrees_with_float32():
    model = tiny_model("qwen2")
    fp32 = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(1.0, 1.0, 0.0))
    ids, mask = left_pad(PROMPTS)
    ref = fp32.propose(fp32.begin(ids, mask, 32), 4)
    bf16 = SortedDraft.from_pretrained(
        tiny_model("qwen2"), exits=EXITS, thresholds=(1.0, 1.0, 0.0), dtype=torch.bfloat16
    )
    assert bf16.dtype == torch.bfloat16
    state = bf16.begin(ids, mask, 32)
    assert state.k_cache[0].dtype == torch.bfloat16
    prop = bf16.propose(state, 4, temperature=torch.tensor([0.0, 1.0, 0.0, 1.0]), seeds=1, offsets=0)
    assert prop.probs.dtype == torch.float32 and bool(torch.isfinite(prop.probs).all())
    for b in (0, 2):  # greedy rows: the first token agrees with float32 (later ones may drift)
        assert prop.tokens[b, 0] == ref.tokens[b, 0]


def test_repeated_propose_without_advance_restarts_from_the_context():
    draft = SortedDraft.from_pretrained(tiny_model("llama"), exits=EXITS, thresholds=MIXED_THRESHOLDS)
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, 40)
    first = draft.propose(state, 4)
    second = draft.propose(state, 3, torch.tensor([3, 1, 0, 2]))
    for b, n in enumerate([3, 1, 0, 2]):
        assert second.tokens[b, :n].tolist() == first.tokens[b, :n].tolist()
        assert second.exits[b, :n].tolist() == first.exits[b, :n].tolist()
    draft.advance(state, torch.tensor([3, 1, 0, 2]), torch.tensor([1, 2, 3, 4]))
    for b, n in enumerate([3, 1, 0, 2]):
        assert state.context(b).tolist() == PROMPTS[b] + first.tokens[b, :n].tolist() + [b + 1]
