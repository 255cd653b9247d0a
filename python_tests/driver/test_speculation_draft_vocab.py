"""Speculative decoding with a reduced draft vocabulary stays lossless: greedy output equals generate (also
when the target's tokens lie outside the subset), sampled output follows the target's distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import s2d_ext
from s2d_ext.draft.draft_vocab import most_frequent_tokens
from s2d_ext.draft.sorted_draft import SortedDraft

from .test_speculation_sampling import _exact_two_token_distribution
from .tiny_models import VOCAB, greedy_reference, left_padded, make_target

MAX_NEW = 24


@pytest.fixture(scope="module")
def target():
    return make_target("llama")


def test_greedy_with_a_subset_matches_generate(target):
    ids, mask = left_padded([9, 4, 12])
    ref = greedy_reference(target, ids, mask, MAX_NEW)
    # NOTE: the subset: the ids of the reference output itself plus a few, so the draft is useful.
    vocab = most_frequent_tokens(ref, VOCAB, 48)
    for final in ("draft", "full"):
        draft = SortedDraft.truncate(
            target, 2, exits=(1, 2), thresholds=(0.3, 0.0), draft_vocab=vocab, final_exit_vocab=final
        )
        out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=MAX_NEW, pad_token_id=0)
        assert torch.equal(out.sequences, ref)
        assert out.stats.mat > 1.0


def test_target_tokens_outside_the_subset_are_emitted(target):
    ids, mask = left_padded([7, 10])
    ref = greedy_reference(target, ids, mask, MAX_NEW)
    emitted = ref[:, ids.shape[1] :].unique()
    # The subset holds none of the tokens the target emits: every draft is rejected, and verification
    # emits each target token itself.
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[emitted] = False
    vocab = outside.nonzero().squeeze(1)
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.3, 0.0), draft_vocab=vocab)
    out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=MAX_NEW, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted_tokens == 0 and out.stats.draft_tokens > 0
    assert not bool(torch.isin(out.sequences[:, ids.shape[1] :], vocab).any())


def test_sampled_output_follows_the_target_distribution():
    """Chi-square over the first two tokens; the subset leaves out two of the target's likely tokens."""
    vocab_size, samples = 8, 3000
    target = make_target("llama", vocab=vocab_size, seed=5, damp=0.3)
    prompt = torch.tensor([[1, 4, 2, 7, 3]])
    exact = _exact_two_token_distribution(target, prompt, 1.0, 0, 1.0)
    first = exact.sum(-1)
    dropped = first.topk(2).indices  # the two most likely first tokens are not in the subset
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[dropped] = False
    draft = SortedDraft.truncate(
        target, 2, exits=(1, 2), thresholds=(0.4, 0.0), draft_vocab=keep.nonzero().squeeze(1)
    )
    out = s2d_ext.speculate(
        target, draft, prompt.expand(samples, -1), max_new_tokens=2, num_draft_tokens=3,
        draft_length="fixed", temperature=1.0, seed=list(range(samples)),
    )  # fmt: skip
    assert 0 < out.stats.accepted_tokens < out.stats.draft_tokens
    pairs = out.sequences[:, -2] * vocab_size + out.sequences[:, -1]
    observed = torch.bincount(pairs, minlength=vocab_size**2).double()
    expected = exact.flatten().double() * samples
    assert observed[expected == 0].sum() == 0
    big = expected >= 5
    obs, exp = observed[big], expected[big]
    if not bool(big.all()) and expected[~big].sum() > 0:
        obs = torch.cat([obs, observed[~big].sum()[None]])
        exp = torch.cat([exp, expected[~big].sum()[None]])
    result = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item())
    assert result.pvalue > 1e-3, result
    # The dropped tokens still come out at their target frequency (they are never drafted).
    first_tokens = torch.bincount(out.sequences[:, -2], minlength=vocab_size).double() / samples
    torch.testing.assert_close(first_tokens[dropped], first[dropped].double(), atol=0.04, rtol=0)
