"""SortedDraft greedy drafting against transformers and a slow reference cascade."""

from __future__ import annotations

import random

import pytest
import torch

from python_tests.draft.helpers import (
    EXITS,
    MIXED_THRESHOLDS,
    VOCAB,
    ReferenceCascade,
    last_logits,
    left_pad,
    tiny_model,
)
from s2d_ext import SortedDraft
from s2d_ext.draft.sorted_draft import truncated_hf_model

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [8, 64, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def hf_greedy(model, context: list[int], k: int) -> list[int]:
    """k greedy tokens from a transformers forward (full recompute each token)."""
    context = list(context)
    out = []
    for _ in range(k):
        token = int(last_logits(model, context).argmax())
        out.append(token)
        context.append(token)
    return out


def run_steps(draft, reference_draft, prompts, *, steps=3, k=4, seed=0, thresholds=None):
    """Propose / check against ``reference_draft(context, k)`` / advance with random accepts."""
    rng = random.Random(seed)
    ids, mask = left_pad(prompts)
    state = draft.begin(ids, mask, max_length=64)
    contexts = [list(p) for p in prompts]
    seen_exits = set()
    for _ in range(steps):
        prop = draft.propose(state, k, torch.full((len(prompts),), k), thresholds=thresholds)
        assert prop.probs is None
        assert prop.num_draft.tolist() == [k] * len(prompts)
        for b, context in enumerate(contexts):
            ref = reference_draft(context, k)
            tokens, exits = (ref, None) if not isinstance(ref, tuple) else (ref[0], ref[1])
            assert prop.tokens[b].tolist() == tokens, f"row {b}"
            if exits is not None:
                assert prop.exits[b].tolist() == exits, f"row {b}"
                torch.testing.assert_close(prop.confidence[b], torch.tensor(ref[2]), rtol=1e-4, atol=1e-5)
            seen_exits.update(prop.exits[b].tolist())
        accepted = torch.tensor([rng.randint(0, k) for _ in prompts])
        emitted = torch.tensor([rng.randrange(1, VOCAB) for _ in prompts])
        draft.advance(state, accepted, emitted)
        for b in range(len(prompts)):
            contexts[b] += prop.tokens[b, : int(accepted[b])].tolist() + [int(emitted[b])]
            assert state.context(b).tolist() == contexts[b]
    return seen_exits


@pytest.mark.parametrize("kind", ["llama", "llama_hd", "qwen2", "mistral", "llama3_rope"])
def test_forced_last_exit_matches_transformers(kind):
    model = tiny_model(kind)
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(1.0, 1.0, 0.0))
    seen = run_steps(draft, lambda ctx, k: hf_greedy(model, ctx, k), PROMPTS)
    assert seen == {EXITS[-1]}


def test_forced_last_exit_matches_hf_generate():
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(1.0, 1.0, 0.0))
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=32)
    prop = draft.propose(state, 6, torch.full((3,), 6))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(prop.tokens, out[:, ids.shape[1] :])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_forced_first_exit_matches_truncated_model(kind):
    model = tiny_model(kind)
    first = truncated_hf_model(model, EXITS[0])
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(0.0, 0.0, 0.0))
    seen = run_steps(draft, lambda ctx, k: hf_greedy(first, ctx, k), PROMPTS)
    assert seen == {EXITS[0]}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_adaptive_exits_match_reference_cascade(kind):
    model = tiny_model(kind)
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=MIXED_THRESHOLDS)
    reference = ReferenceCascade(model, EXITS, MIXED_THRESHOLDS)
    seen = run_steps(draft, reference.draft, PROMPTS, steps=4)
    assert seen == set(EXITS), "the thresholds must send tokens to every exit"


def test_per_row_thresholds_match_reference_cascade():
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(1.0, 1.0, 0.0))
    per_row = [(0.16, 0.16, 0.0), (0.0, 1.0, 0.0), (1.0, 0.2, 0.0)]
    refs = [ReferenceCascade(model, EXITS, t) for t in per_row]
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=32)
    prop = draft.propose(state, 4, torch.full((3,), 4), thresholds=torch.tensor(per_row))
    for b, ref in enumerate(refs):
        tokens, exits, _ = ref.draft(PROMPTS[b], 4)
        assert prop.tokens[b].tolist() == tokens
        assert prop.exits[b].tolist() == exits


def test_thresholds_made_under_inference_mode_match_reference_cascade():
    """Regression (make demo on a fresh machine): thresholds made inside torch.inference_mode, as a driver
    under inference_mode makes them, have no version counter; propose failed with "Inference tensors do not
    track version counter" when it cached their host copy."""
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(1.0, 1.0, 0.0))
    per_row = [(0.16, 0.16, 0.0), (0.0, 1.0, 0.0), (1.0, 0.2, 0.0)]
    refs = [ReferenceCascade(model, EXITS, t) for t in per_row]
    ids, mask = left_pad(PROMPTS)
    with torch.inference_mode():
        state = draft.begin(ids, mask, max_length=32)
        tau = torch.tensor(per_row)
        for _ in range(2):  # the second call reads the same tensor again
            prop = draft.propose(state, 2, torch.full((3,), 2), thresholds=tau)
            draft.advance(state, prop.num_draft, prop.tokens[:, 0])
    state = draft.begin(ids, mask, max_length=32)
    with torch.inference_mode():
        prop = draft.propose(state, 4, torch.full((3,), 4), thresholds=torch.tensor(per_row))
    for b, ref in enumerate(refs):
        tokens, exits, _ = ref.draft(PROMPTS[b], 4)
        assert prop.tokens[b].tolist() == tokens
        assert prop.exits[b].tolist() == exits


def _check_kv_against_full_forward(draft, state, model):
    """Every filled slot of every layer holds the KV of a full forward over the row's context."""
    for b in range(state.batch_size):
        pad = int(state.pad[b])
        filled_tokens = state.tokens[b, pad : int(state.filled[0, b])]
        with torch.no_grad():
            out = model(filled_tokens[None], use_cache=True)
        for group, (lo, hi) in enumerate(zip((0, *draft.exits[:-1]), draft.exits, strict=True)):
            upto = int(state.filled[group, b])
            if upto <= pad:  # NOTE: a deeper group that has not run yet (begin prefills group 0 only)
                continue
            for layer in range(lo, hi):
                ref_k = out.past_key_values.layers[layer].keys[0, :, : upto - pad]
                ref_v = out.past_key_values.layers[layer].values[0, :, : upto - pad]
                torch.testing.assert_close(state.k_cache[layer][b, :, pad:upto], ref_k, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(state.v_cache[layer][b, :, pad:upto], ref_v, rtol=1e-4, atol=1e-5)


def test_deferred_kv_fill_matches_full_forward():
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(0.0, 0.0, 0.0))
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=40)
    for step in range(3):
        prop = draft.propose(state, 4, torch.full((3,), 4))
        assert set(prop.exits.flatten().tolist()) == {EXITS[0]}
        draft.advance(state, torch.tensor([4, 1, 0]), torch.tensor([3 + step, 4, 5]))
    # Every token exited at the first exit: the deeper groups lag behind ...
    assert bool((state.filled[1:] < state.filled[0]).all())
    _check_kv_against_full_forward(draft, state, model)
    # ... and a token drafted at the last exit runs every group over every deferred position: exactly the
    # KV of running every position through every layer.
    draft.propose(state, 1, thresholds=torch.tensor([1.0, 1.0, 0.0]))
    assert bool((state.filled == state.filled[0]).all())
    _check_kv_against_full_forward(draft, state, model)


def test_deferred_positions_are_filled_when_a_deeper_group_runs():
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=MIXED_THRESHOLDS)
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=48)
    rng = random.Random(1)
    for _ in range(4):
        prop = draft.propose(state, 5, torch.full((3,), 5))
        draft.advance(state, torch.tensor([rng.randint(0, 5) for _ in range(3)]), torch.tensor([1, 2, 3]))
        _check_kv_against_full_forward(draft, state, model)
    assert set(prop.exits.flatten().tolist()) >= {EXITS[0]}


def test_max_deferred_caps_the_lag():
    model = tiny_model("llama")
    # NOTE: thresholds just above 0: every token exits at the first exit, yet the deeper groups stay
    # reachable, so their deferred fill must keep up within max_deferred.
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(1e-6, 1e-6, 0.0), max_deferred=3)
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=40)
    for _ in range(3):
        prop = draft.propose(state, 4, torch.full((3,), 4))
        assert set(prop.exits.flatten().tolist()) == {EXITS[0]}
        draft.advance(state, torch.tensor([4, 4, 4]), torch.tensor([1, 2, 3]))
        lag = state.filled[:-1] - state.filled[1:]
        assert int(lag.max()) <= 3 + 1
    _check_kv_against_full_forward(draft, state, model)


def test_groups_past_an_exit_that_always_fires_never_run():
    """Threshold 0 at exit 1 for every row: the deeper groups are unreachable and do no work (not even the
    deferred fill); a later proposal that can reach them catches up, with the same KV as a full forward."""
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(0.0, 0.0, 0.0), max_deferred=3)
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=48)
    deep = state.filled[1:].clone()
    for _ in range(3):
        draft.propose(state, 4, torch.full((3,), 4))
        draft.advance(state, torch.tensor([4, 4, 4]), torch.tensor([1, 2, 3]))
    assert torch.equal(state.filled[1:], deep)
    # Exit 2 fixed (exit 1 turned off with threshold 1): group 1 runs, group 2 still does not.
    prop = draft.propose(state, 2, torch.full((3,), 2), thresholds=torch.tensor([1.0, 0.0, 0.0]))
    assert set(prop.exits.flatten().tolist()) == {EXITS[1]}
    assert torch.equal(state.filled[2], deep[1])
    prop = draft.propose(state, 2, torch.full((3,), 2), thresholds=torch.tensor([1.0, 1.0, 0.0]))
    assert set(prop.exits.flatten().tolist()) == {EXITS[2]}
    draft.advance(state, torch.tensor([2, 2, 2]), torch.tensor([1, 2, 3]))
    draft.propose(state, 1, thresholds=torch.tensor([1.0, 1.0, 0.0]))  # every group catches up
    _check_kv_against_full_forward(draft, state, model)


def test_begin_prefills_the_first_group_and_deeper_ones_catch_up():
    model = tiny_model("llama")
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(1.0, 1.0, 0.0))
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=40)
    assert torch.equal(state.filled[0], torch.full((3,), ids.shape[1] - 1))
    assert bool((state.filled[1:] == 0).all())
    reference = ReferenceCascade(model, EXITS, (1.0, 1.0, 0.0))
    prop = draft.propose(state, 3, torch.full((3,), 3))  # every token at the last exit: both catch up
    for b, prompt in enumerate(PROMPTS):
        assert prop.tokens[b].tolist() == reference.draft(prompt, 3)[0]
    assert torch.equal(state.filled[1], state.filled[0]) and torch.equal(state.filled[2], state.filled[0])
    _check_kv_against_full_forward(draft, state, model)
