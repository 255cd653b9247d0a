"""Lossless logits processors: each one equals transformers' at every position, greedy output equals
generate() with the same processors, sampled output follows the processed target distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import s2d_ext
from s2d_ext.draft.hf_draft import HFDraft
from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import (
    BadWords,
    HFLogitsProcessor,
    RepetitionPenalty,
    TokenMask,
)
from s2d_ext.engine.filters import filtered_scores

from ..driver.tiny_models import greedy_reference, left_padded, make_draft_model, make_target


@pytest.fixture(scope="module")
def pair():
    target = make_target("llama", seed=3)
    return target, make_draft_model(target)


def _positions(seed=0, vocab=96, n_ctx=9, k=5):
    gen = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, 12, (n_ctx + k,), generator=gen)  # small ids: repeats and matches
    logits = torch.randn((k + 1, vocab), generator=gen) * 3
    return token_ids, [n_ctx + j for j in range(k + 1)], logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_processor_equals_transformers_at_every_position(seed):
    token_ids, prefixes, logits = _positions(seed)
    bad = [[3], [4, 5], [1, 2, 7], [token_ids[-2].item(), token_ids[-1].item()]]
    pairs = [
        (RepetitionPenalty(1.7), RepetitionPenaltyLogitsProcessor(1.7)),
        (RepetitionPenalty(0.6), RepetitionPenaltyLogitsProcessor(0.6)),
        (BadWords(bad), NoBadWordsLogitsProcessor(bad)),
    ]
    for ours, theirs in pairs:
        got = ours(token_ids, 4, prefixes, logits.clone())
        for j, end in enumerate(prefixes):
            want = theirs(token_ids[None, :end], logits[j : j + 1].clone())[0]
            torch.testing.assert_close(got[j], want, rtol=0, atol=0)
        adapted = HFLogitsProcessor(theirs)(token_ids, 4, prefixes, logits.clone())
        torch.testing.assert_close(adapted, got, rtol=0, atol=0)


def test_filters_equal_transformers_warpers():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn((7, 96), generator=gen) * 2
    ids = torch.zeros((7, 1), dtype=torch.int64)
    for t, k, p, m in [(0.7, 0, 1.0, 0.1), (1.3, 20, 0.8, 0.05), (1.0, 5, 0.5, 0.0), (0.9, 0, 0.95, 0.3)]:
        chain = [TemperatureLogitsWarper(t)]
        chain += [TopKLogitsWarper(k)] if k else []
        chain += [TopPLogitsWarper(p)] if p < 1 else []
        chain += [MinPLogitsWarper(m)] if m else []
        want = LogitsProcessorList(chain)(ids, logits.clone())
        torch.testing.assert_close(filtered_scores(logits, t, k, p, m), want)


def _allowed_parity(prompt_len):
    """A toy grammar: even ids at even positions, odd ids at odd positions (both ways of saying it)."""
    even, odd = list(range(0, 96, 2)), list(range(1, 96, 2))
    ours = TokenMask(lambda generated: even if len(generated) % 2 == 0 else odd)
    theirs = lambda batch_id, input_ids: even if (input_ids.shape[0] - prompt_len) % 2 == 0 else odd  # noqa: E731
    return ours, theirs


@pytest.mark.parametrize("draft_kind", ["sorted", "hf"])
def test_greedy_with_processors_equals_generate(pair, draft_kind):
    target, draft_model = pair
    draft = (
        SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
        if draft_kind == "sorted"
        else HFDraft(draft_model)
    )
    ids, mask = left_padded([7, 3, 10], seed=4)
    free = greedy_reference(target, ids, mask, 20)[:, ids.shape[1] :]
    bad = [[int(free[0, 3])], [int(free[1, 5]), int(free[1, 6])]]
    cases = [
        (dict(repetition_penalty=1.6), dict(repetition_penalty=1.6)),
        (dict(bad_words_ids=bad), dict(bad_words_ids=bad)),
        (dict(repetition_penalty=0.8, bad_words_ids=bad), dict(repetition_penalty=0.8, bad_words_ids=bad)),
        (
            dict(min_new_tokens=8, eos_token_id=int(free[0, 2])),
            dict(min_new_tokens=8, eos_token_id=int(free[0, 2])),
        ),
        (
            dict(logits_processors=[HFLogitsProcessor(RepetitionPenaltyLogitsProcessor(1.4))]),
            dict(repetition_penalty=1.4),
        ),
    ]
    for ours, theirs in cases:
        ref = greedy_reference(target, ids, mask, 20, **theirs)
        out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=20, pad_token_id=0, **ours)
        assert torch.equal(out.sequences, ref), ours
    assert not torch.equal(ref[:, ids.shape[1] :], free)


def test_allowed_tokens_and_token_mask_equal_generate_with_a_prefix_function(pair):
    target, draft_model = pair
    ids = torch.tensor([[5, 9, 17, 2, 40]])
    allowed = list(range(10, 40))
    ref = greedy_reference(target, ids, None, 16, prefix_allowed_tokens_fn=lambda b, x: allowed)
    out = s2d_ext.speculate(target, draft_model, ids, max_new_tokens=16, allowed_token_ids=allowed)
    assert torch.equal(out.sequences, ref)
    assert all(10 <= t < 40 for t in out.sequences[0, 5:].tolist())
    ours, theirs = _allowed_parity(ids.shape[1])
    ref = greedy_reference(target, ids, None, 16, prefix_allowed_tokens_fn=theirs)
    out = s2d_ext.speculate(target, draft_model, ids, max_new_tokens=16, logits_processors=[ours])
    assert torch.equal(out.sequences, ref)
    assert [t % 2 for t in out.sequences[0, 5:].tolist()] == [i % 2 for i in range(16)]


def _exact_two_token_distribution(target, prompt, chain):
    """p(t1, t2 | prompt) [V, V] of plain sampling through the transformers processors ``chain``."""
    vocab = target.config.vocab_size

    def probs(input_ids, logits):
        return torch.softmax(LogitsProcessorList(chain)(input_ids, logits.clone()), dim=-1)

    with torch.no_grad():
        first = probs(prompt, target(prompt).logits[:, -1])[0]  # [V]
        extended = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second = probs(extended, target(extended).logits[:, -1])  # [V, V]
    return first[:, None] * second


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0, repetition_penalty=2.0),
        dict(temperature=0.8, top_p=0.9, min_p=0.15),
        dict(temperature=1.0, bad_words_ids=[[2], [1, 6]], repetition_penalty=0.7),
    ],
    ids=["penalty", "min_p", "bad_words"],
)
def test_sampled_output_follows_the_processed_distribution(settings):
    vocab, samples = 8, 3000
    target = make_target("llama", vocab=vocab, seed=5, damp=0.3)
    draft = SortedDraft.truncate(target, 2)
    prompt = torch.tensor([[1, 4, 2, 7, 3]])
    chain = []
    if settings.get("repetition_penalty"):
        chain.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if settings.get("bad_words_ids"):
        chain.append(NoBadWordsLogitsProcessor(settings["bad_words_ids"]))
    chain.append(TemperatureLogitsWarper(settings["temperature"]))
    if settings.get("top_p"):
        chain.append(TopPLogitsWarper(settings["top_p"]))
    if settings.get("min_p"):
        chain.append(MinPLogitsWarper(settings["min_p"]))
    exact = _exact_two_token_distribution(target, prompt, chain).flatten()
    out = s2d_ext.speculate(
        target,
        draft,
        prompt.expand(samples, -1),
        max_new_tokens=2,
        num_draft_tokens=3,
        draft_length="fixed",
        seed=list(range(samples)),
        **settings,
    )
    assert out.stats.accepted_tokens > 0 and out.stats.accepted_tokens < out.stats.draft_tokens
    pairs = out.sequences[:, -2] * vocab + out.sequences[:, -1]
    observed = torch.bincount(pairs, minlength=vocab * vocab).double()
    assert observed[exact == 0].sum() == 0  # processed-away tokens never appear
    expected = exact.double() * samples
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    result = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item())
    assert result.pvalue > 1e-3, (result, obs, exp)
