"""presence / frequency penalties and logit_bias: OpenAI's formula at every verified position (generated
tokens only), greedy output equal to generate() with the same processor, sampled output following the
processed distribution, bad values refused."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import (
    Engine,
    FrequencyPresencePenalty,
    LogitBias,
    RequestError,
    SamplingParams,
)

from ..driver.tiny_models import make_target
from .helpers import run_alone


class OpenAIPenalties(LogitsProcessor):
    """The same rule as a transformers processor: counts over input_ids after the prompt."""

    def __init__(self, prompt_len, presence=0.0, frequency=0.0, bias=None):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency
        self.bias = bias or {}

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for token, bias in self.bias.items():
            scores[:, token] += bias
        for row in range(input_ids.shape[0]):
            for token, count in Counter(input_ids[row, self.prompt_len :].tolist()).items():
                scores[row, token] -= self.frequency * count + self.presence
        return scores


def test_penalties_count_generated_tokens_and_earlier_drafts_at_every_position():
    gen = torch.Generator().manual_seed(0)
    num_prompt, committed, k, vocab = 6, 11, 4, 32
    token_ids = torch.randint(0, 6, (committed + k,), generator=gen)  # small ids: many repeats
    prefixes = [committed + j for j in range(k + 1)]
    logits = torch.randn((k + 1, vocab), generator=gen)
    got = FrequencyPresencePenalty(presence=0.4, frequency=0.7)(token_ids, num_prompt, prefixes, logits)
    for j, end in enumerate(prefixes):
        want = logits[j].clone()
        for token, count in Counter(token_ids[num_prompt:end].tolist()).items():
            want[token] -= 0.7 * count + 0.4
        torch.testing.assert_close(got[j], want)
    # the prompt's tokens do not count: a token seen only in the prompt keeps its logit
    only_prompt = set(token_ids[:num_prompt].tolist()) - set(token_ids[num_prompt:].tolist())
    for token in only_prompt:
        torch.testing.assert_close(got[:, token], logits[:, token])
    biased = LogitBias({3: 5.0, 30: -100.0})(token_ids, num_prompt, prefixes, logits)
    want = logits.clone()
    want[:, 3] += 5.0
    want[:, 30] -= 100.0
    torch.testing.assert_close(biased, want)


@pytest.fixture(scope="module")
def tiny():
    target = make_target("llama", seed=3)
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    return target, draft


@pytest.mark.parametrize(
    "settings",
    [
        dict(presence_penalty=1.5),
        dict(frequency_penalty=0.9),
        dict(presence_penalty=-0.5, frequency_penalty=1.2, logit_bias={7: 3.0, 11: -100.0}),
    ],
    ids=["presence", "frequency", "both_and_bias"],
)
def test_greedy_with_penalties_equals_generate(tiny, settings):
    target, draft = tiny
    prompt = [5, 9, 17, 2, 5, 9]
    ours = run_alone(lambda: Engine(draft, target), prompt, SamplingParams(max_new_tokens=24, **settings))
    free = run_alone(lambda: Engine(draft, target), prompt, SamplingParams(max_new_tokens=24))
    processor = OpenAIPenalties(
        len(prompt),
        settings.get("presence_penalty", 0.0),
        settings.get("frequency_penalty", 0.0),
        settings.get("logit_bias"),
    )
    ref = target.generate(
        torch.tensor([prompt]),
        max_new_tokens=24,
        do_sample=False,
        logits_processor=LogitsProcessorList([processor]),
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert ours["tokens"] == ref
    assert ours["tokens"] != free["tokens"]  # the settings change this output
    if "logit_bias" in settings:
        assert 11 not in ours["tokens"]


def test_sampled_output_with_penalties_follows_the_processed_distribution():
    vocab, samples = 8, 3000
    target = make_target("llama", vocab=vocab, seed=5, damp=0.3)
    draft = SortedDraft.truncate(target, 2)
    prompt = [1, 4, 2, 7, 3]
    settings = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={6: 1.0})
    chain = LogitsProcessorList(
        [OpenAIPenalties(len(prompt), 0.5, 1.5, {6: 1.0}), TemperatureLogitsWarper(1.0)]
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        first = torch.softmax(chain(ids, target(ids).logits[:, -1]), -1)[0]
        extended = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second = torch.softmax(chain(extended, target(extended).logits[:, -1]), -1)
    exact = (first[:, None] * second).flatten().double()
    engine = Engine(draft, target, num_draft_tokens=3, draft_length="fixed")
    for seed in range(samples):
        params = SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed, eos_token_id=[], **settings)
        engine.add_request(prompt, params, request_id=str(seed))
    tokens = {str(s): [] for s in range(samples)}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert 0 < engine.stats.accepted_tokens < engine.stats.draft_tokens
    pairs = torch.tensor([t[0] * vocab + t[1] for t in tokens.values()])
    observed = torch.bincount(pairs, minlength=vocab * vocab).double()
    expected = exact * samples
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    result = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item())
    assert result.pvalue > 1e-3, (result, obs, exp)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(presence_penalty=2.5), "presence_penalty must be in"),
        (dict(frequency_penalty=-3.0), "frequency_penalty must be finite and >= -2"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty must be finite"),
        (dict(logit_bias={3: 101.0}), "logit_bias values must be in"),
        (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
        (dict(logit_bias=[1, 2]), "logit_bias must be a mapping"),
    ],
)
def test_bad_penalty_values_are_refused(settings, message):
    with pytest.raises((TypeError, ValueError), match=message):
        SamplingParams(**settings)


def test_a_logit_bias_id_outside_the_vocabulary_fails_that_request_only(tiny):
    target, draft = tiny
    engine = Engine(draft, target)
    with pytest.raises(RequestError, match=r"logit_bias must be token ids in \[0, 96\)"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=4, logit_bias={96: 1.0}))
    engine.add_request([1, 2], SamplingParams(max_new_tokens=4))
    assert sum(len(o.new_token_ids) for _ in range(10) for o in engine.step()) == 4


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(top_p=5e-324), "top_p must be a float in"),  # positive, but 0 in float32
        (dict(repetition_penalty=1e-50), "repetition_penalty must be > 0 and finite in float32"),
        (dict(repetition_penalty=1e39), "repetition_penalty must be > 0 and finite in float32"),
    ],
)
def test_values_that_vanish_or_overflow_in_float32_are_refused(settings, message):
    # NOTE: found by schemathesis: top_p=5e-324 passed the float64 check, became 0 on the device and the
    # draft's check failed the whole step, every running request with it.
    with pytest.raises(ValueError, match=message):
        SamplingParams(**settings)
