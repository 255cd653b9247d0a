"""Speculative sampling: reproducible per-row seeds, batch independence, and the target's distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import s2d_ext
from s2d_ext.draft.hf_draft import HFDraft
from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.ops.verify_reference import logit_threshold, processed_probs

from .tiny_models import left_padded, make_draft_model, make_target


@pytest.fixture(scope="module")
def pair():
    target = make_target("llama", seed=3)
    return target, make_draft_model(target)


def _new_tokens(out, row, prompt_width):
    n = out.stats.new_tokens[row]
    return out.sequences[row, prompt_width : prompt_width + n].tolist()


@pytest.mark.parametrize("draft_kind", ["sorted", "hf"])
def test_fixed_seed_reproducible(pair, draft_kind):
    target, draft_model = pair
    draft = draft_model if draft_kind == "sorted" else HFDraft(draft_model)
    ids, mask = left_padded([6, 3, 9])
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.95, eos_token_id=3, pad_token_id=0)
    a = s2d_ext.speculate(target, draft, ids, mask, seed=123, **kwargs)
    b = s2d_ext.speculate(target, draft, ids, mask, seed=123, **kwargs)
    c = s2d_ext.speculate(target, draft, ids, mask, seed=[123, 123, 123], **kwargs)
    d = s2d_ext.speculate(target, draft, ids, mask, seed=124, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, c.sequences)
    assert not torch.equal(a.sequences, d.sequences)


@pytest.mark.parametrize("draft_length", ["heuristic", "confidence"])
def test_row_independent_of_batch_composition(pair, draft_length):
    target, draft_model = pair
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    kwargs = dict(
        max_new_tokens=24, temperature=0.8, draft_length=draft_length, eos_token_id=5, pad_token_id=0
    )
    ids, mask = left_padded([5, 12, 2, 8], seed=7)
    seeds = [11, 22, 33, 44]
    together = s2d_ext.speculate(target, draft, ids, mask, seed=seeds, **kwargs)
    for row in range(4):
        n = int(mask[row].sum())
        alone_ids = ids[row : row + 1, ids.shape[1] - n :]
        alone = s2d_ext.speculate(target, draft, alone_ids, seed=[seeds[row]], **kwargs)
        assert _new_tokens(together, row, ids.shape[1]) == _new_tokens(alone, 0, n)
    # a different partner row leaves row 0 unchanged too
    swapped = ids.clone()
    swapped[1, -4:] = torch.tensor([9, 8, 7, 6])
    other = s2d_ext.speculate(target, draft, swapped, mask, seed=seeds, **kwargs)
    assert _new_tokens(other, 0, ids.shape[1]) == _new_tokens(together, 0, ids.shape[1])


def _exact_two_token_distribution(target, prompt, temperature, top_k, top_p):
    """p(t1, t2 | prompt) [V, V] of plain sampling with the given processing."""
    vocab = target.config.vocab_size

    def processed(logits):  # [N, V] -> [N, V]
        logits = logits[:, None, :].float()
        n = logits.shape[0]
        t = torch.full((n,), temperature)
        k = torch.full((n,), top_k, dtype=torch.int64)
        p = torch.full((n,), top_p)
        return processed_probs(logits, t, logit_threshold(logits, t, k, p))[:, 0]

    with torch.no_grad():
        first = processed(target(prompt).logits[:, -1])[0]  # [V]
        extended = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second = processed(target(extended).logits[:, -1])  # [V, V]
    return first[:, None] * second


@pytest.mark.parametrize(
    "temperature,top_k,top_p,draft_kind",
    [(1.0, 0, 1.0, "sorted"), (0.7, 5, 0.9, "hf")],
)
def test_first_tokens_follow_target_distribution(temperature, top_k, top_p, draft_kind):
    vocab, samples = 8, 3000
    target = make_target("llama", vocab=vocab, seed=5, damp=0.3)
    draft_model = make_draft_model(target)
    draft = SortedDraft.truncate(target, 2) if draft_kind == "sorted" else HFDraft(draft_model)
    prompt = torch.tensor([[1, 4, 2, 7, 3]])
    exact = _exact_two_token_distribution(target, prompt, temperature, top_k, top_p).flatten()
    out = s2d_ext.speculate(
        target,
        draft,
        prompt.expand(samples, -1),
        max_new_tokens=2,
        num_draft_tokens=3,
        draft_length="fixed",
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=list(range(samples)),
    )
    assert out.stats.accepted_tokens > 0 and out.stats.accepted_tokens < out.stats.draft_tokens
    pairs = out.sequences[:, -2] * vocab + out.sequences[:, -1]
    observed = torch.bincount(pairs, minlength=vocab * vocab).double()
    assert observed[exact == 0].sum() == 0  # filtered tokens never appear
    expected = exact.double() * samples
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    result = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item())
    assert result.pvalue > 1e-3, (result, obs, exp)
