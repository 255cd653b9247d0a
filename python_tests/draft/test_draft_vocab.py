"""The reduced draft vocabulary: building it, its file format, and SortedDraft drafting with it (greedy
against the slow reference cascade, sampled q zero outside the subset, chi-square of the draws)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare

from python_tests.draft.helpers import EXITS, MIXED_THRESHOLDS, VOCAB, ReferenceCascade, left_pad, tiny_model
from s2d_ext import SortedDraft
from s2d_ext.draft.draft_vocab import (
    DRAFT_VOCAB_FILE,
    check_draft_vocab,
    load_draft_vocab,
    most_frequent_tokens,
    save_draft_vocab,
)
from s2d_ext.ops.exit_head_reference import exit_head_logits

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [8, 64, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


# ---------------------------------------------------------------------------------------------- building
def test_most_frequent_tokens_counts_ids_and_breaks_ties_by_id():
    ids = torch.tensor([[5, 5, 5, 2, 2, 9], [9, 7, 7, 1, 0, 5]])  # 5:4, 2:2, 9:2, 7:2, 1, 0
    assert most_frequent_tokens(ids, 10, 1).tolist() == [5]
    # three ids tie at 2: the two smallest (2 and 7) win, returned sorted ascending
    assert most_frequent_tokens(ids, 10, 3).tolist() == [2, 5, 7]
    assert most_frequent_tokens(ids.flatten().tolist(), 10, 4).tolist() == [2, 5, 7, 9]
    # fewer distinct ids than n: unseen ids fill in, smallest first
    assert most_frequent_tokens(ids, 10, 8).tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    out = most_frequent_tokens(ids, 10, 10)
    assert out.dtype == torch.int64 and out.tolist() == list(range(10))


def test_most_frequent_tokens_from_counts():
    counts = torch.tensor([0.0, 3.0, 1.0, 3.0, 7.0])
    assert most_frequent_tokens(counts, 5, 2).tolist() == [1, 4]
    assert most_frequent_tokens({4: 2, 0: 9, 2: 2}, 5, 2).tolist() == [0, 2]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.tensor([1, 2]), 5, 0), ValueError, "n must be"),
        ((torch.tensor([1, 2]), 5, 6), ValueError, "n must be"),
        ((torch.tensor([1, 7]), 5, 2), ValueError, r"\[0, vocab_size=5\)"),
        ((torch.tensor([-1, 2]), 5, 2), ValueError, r"\[0, vocab_size=5\)"),
        ((torch.ones(4), 5, 2), ValueError, "counts must be a"),
        ((torch.tensor([1.0, -1.0, 0, 0, 0]), 5, 2), ValueError, ">= 0"),
        ((torch.tensor([True, False]), 5, 1), TypeError, "integer"),
        (({9: 1}, 5, 1), ValueError, "keys"),
        ((torch.tensor([1, 2]), 0, 1), ValueError, "vocab_size"),
        ((object(), 5, 1), TypeError, "token_ids_or_counts"),
    ],
)
def test_most_frequent_tokens_errors(args, error, match):
    with pytest.raises(error, match=match):
        most_frequent_tokens(*args)


# ------------------------------------------------------------------------------------------------ file
def test_file_format_and_round_trip(tmp_path):
    vocab = torch.tensor([0, 3, 17, 95])
    path = save_draft_vocab(tmp_path, vocab)
    assert path == tmp_path / DRAFT_VOCAB_FILE == tmp_path / "draft_vocab.safetensors"
    raw = load_file(str(path))
    assert list(raw) == ["draft_vocab"] and raw["draft_vocab"].dtype == torch.int64
    assert raw["draft_vocab"].tolist() == [0, 3, 17, 95]
    assert load_draft_vocab(tmp_path).tolist() == [0, 3, 17, 95]
    assert load_draft_vocab(tmp_path / "nothing here") is None


def test_bad_files_and_vocabularies_are_refused(tmp_path):
    save_file({"other": torch.tensor([1, 2])}, str(tmp_path / DRAFT_VOCAB_FILE))
    with pytest.raises(ValueError, match="no tensor named 'draft_vocab'"):
        load_draft_vocab(tmp_path)
    save_file({"draft_vocab": torch.tensor([4, 2])}, str(tmp_path / DRAFT_VOCAB_FILE))
    with pytest.raises(ValueError, match="sorted ascending"):
        load_draft_vocab(tmp_path)
    for bad, error in [([1, 1], ValueError), ([], ValueError), (torch.tensor([0.5]), TypeError)]:
        with pytest.raises(error, match="draft_vocab"):
            save_draft_vocab(tmp_path, bad)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_draft_vocab([3, 10], 10)


# ------------------------------------------------------------------------------------------- drafting
def subset(n=40, seed=3):
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:n].sort().values


@pytest.mark.parametrize("final_full", [False, True])
@pytest.mark.parametrize(
    "thresholds", [MIXED_THRESHOLDS, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.3, 1.0, 0.0)]
)
def test_greedy_cascade_equals_reference_cascade(final_full, thresholds):
    """The cheap exit decision (top probability within the subset) at forced and mixed thresholds: tokens,
    exits and confidences equal the slow cascade of truncated HF models on the subset's logits."""
    model = tiny_model("llama")
    vocab = subset()
    draft = SortedDraft.from_pretrained(
        model,
        exits=EXITS,
        thresholds=thresholds,
        draft_vocab=vocab,
        final_exit_vocab="full" if final_full else "draft",
    )
    reference = ReferenceCascade(model, EXITS, thresholds, vocab_ids=vocab, final_full=final_full)
    ids, mask = left_pad(PROMPTS)
    state = draft.begin(ids, mask, max_length=48)
    contexts = [list(p) for p in PROMPTS]
    seen = set()
    for _ in range(3):
        prop = draft.propose(state, 4, torch.full((3,), 4))
        for b, context in enumerate(contexts):
            tokens, exits, confs = reference.draft(context, 4)
            assert prop.tokens[b].tolist() == tokens, f"row {b}"
            assert prop.exits[b].tolist() == exits, f"row {b}"
            torch.testing.assert_close(prop.confidence[b], torch.tensor(confs), rtol=1e-4, atol=1e-5)
            seen.update(exits)
        draft.advance(state, torch.tensor([2, 4, 0]), torch.tensor([1, 2, 3]))
        for b in range(3):
            contexts[b] += prop.tokens[b, : [2, 4, 0][b]].tolist() + [b + 1]
    if not final_full:
        assert bool(torch.isin(prop.tokens, vocab).all())
    if thresholds == MIXED_THRESHOLDS:
        assert seen == set(EXITS)


def test_sampled_q_is_zero_outside_the_subset_and_draws_follow_it():
    model = tiny_model("llama", vocab_size=32)
    vocab = torch.tensor([0, 3, 4, 9, 12, 13, 20, 31])
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(0.3, 0.3, 0.0), draft_vocab=vocab)
    rows, context = 3000, [3, 9, 4, 1, 7]
    state = draft.begin(torch.tensor([context] * rows), None, max_length=16)
    prop = draft.propose(
        state, 1, temperature=1.2, top_k=6, top_p=0.95, seeds=torch.arange(rows) * 31 + 7, offsets=2
    )
    q = prop.probs[:, 0]
    outside = torch.ones(32, dtype=torch.bool)
    outside[vocab] = False
    assert bool((q[:, outside] == 0).all()) and bool(torch.isin(prop.tokens, vocab).all())
    torch.testing.assert_close(q.sum(-1), torch.ones(rows))
    torch.testing.assert_close(prop.confidence[:, 0], q.amax(-1))
    exit_layer = int(prop.exits[0, 0])
    assert bool((prop.exits == exit_layer).all())
    # q is the subset's processed distribution at that exit: softmax(logits[vocab] / T) after top-k / top-p.
    norm, head = draft.hf_model.model.norm, draft.hf_model.lm_head
    with torch.no_grad():
        hidden = draft.hf_model(torch.tensor([context]), output_hidden_states=True).hidden_states[exit_layer]
        if exit_layer == EXITS[-1]:  # NOTE: HF's last hidden state is already after the final norm
            logits = head(hidden[0, -1:])[0, vocab]
        else:
            logits = exit_head_logits(hidden[0, -1:], norm.weight, head.weight, 1e-6)[0, vocab]
    scores = logits / 1.2
    kth = scores.topk(6).values[-1]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    expected = torch.softmax(scores, -1)
    order = expected.sort(descending=True)
    before = order.values.cumsum(0) - order.values
    expected[order.indices[before >= 0.95]] = 0
    expected /= expected.sum()
    torch.testing.assert_close(q[0, vocab], expected, rtol=1e-4, atol=1e-6)
    counts = torch.bincount(prop.tokens[:, 0], minlength=32).double()[vocab]
    support = expected > 0
    # NOTE: normalised in float64: the float32 probabilities times rows missed the sum of the counts by
    # 4e-8 (relative), over scipy 1.17's tolerance of 1.5e-8 for chisquare's two sums
    want = expected[support].double()
    _, p_value = chisquare(counts[support].numpy(), (want / want.sum() * counts[support].sum()).numpy())
    assert p_value > 1e-3


def test_save_and_load_with_the_checkpoint(tmp_path):
    vocab = subset(24)
    draft = SortedDraft.from_pretrained(
        tiny_model("llama"), exits=EXITS, thresholds=MIXED_THRESHOLDS, draft_vocab=vocab
    )
    draft.save_pretrained(tmp_path)
    assert load_draft_vocab(tmp_path).tolist() == vocab.tolist()
    loaded = SortedDraft.from_pretrained(tmp_path)
    assert loaded.draft_vocab.tolist() == vocab.tolist() and "draft_vocab=24 ids" in repr(loaded)
    ids, mask = left_pad(PROMPTS)
    a = draft.propose(draft.begin(ids, mask, 32), 4)
    b = loaded.propose(loaded.begin(ids, mask, 32), 4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exits, b.exits)
    assert SortedDraft.from_pretrained(tmp_path, draft_vocab=False).draft_vocab is None
    other = SortedDraft.from_pretrained(tmp_path, draft_vocab=[1, 2, 3])
    assert other.draft_vocab.tolist() == [1, 2, 3]


def test_draft_vocab_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"draft_vocab must hold token ids in \[0, 96\)"):
        SortedDraft.from_pretrained(model, exits=EXITS, draft_vocab=[3, 96])
    with pytest.raises(ValueError, match="sorted ascending"):
        SortedDraft.from_pretrained(model, exits=EXITS, draft_vocab=[5, 3])
    with pytest.raises(ValueError, match="final_exit_vocab"):
        SortedDraft.from_pretrained(model, exits=EXITS, draft_vocab=[3], final_exit_vocab="some")
    with pytest.raises(ValueError, match="draft_vocab must be token ids"):
        SortedDraft.from_pretrained(model, exits=EXITS, draft_vocab=True)


def test_subset_head_follows_weight_updates():
    """The gathered subset head is refreshed when the lm_head changes in place (e.g. training)."""
    model = tiny_model("llama")
    vocab = subset(30)
    draft = SortedDraft.from_pretrained(model, exits=EXITS, thresholds=(0.0, 0.0, 0.0), draft_vocab=vocab)
    ids, mask = left_pad(PROMPTS)
    before = draft.propose(draft.begin(ids, mask, 32), 3)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # every argmax becomes an argmin
    after = draft.propose(draft.begin(ids, mask, 32), 3)
    assert not torch.equal(before.tokens[:, 0], after.tokens[:, 0])
    head, _ = draft._exit_head_rows(0)
    assert torch.equal(head, model.lm_head.weight[vocab])
