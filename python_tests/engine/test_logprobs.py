"""Logprobs: the processed target log-probability of each emitted token (and the top-n), equal to what
generate(output_logits=True / output_scores=True) gives at the same positions."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine, SamplingParams

from ..driver.tiny_models import make_target
from .helpers import collect


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=3)


def _run(engine, prompt, params):
    engine.add_request(prompt, params, request_id="r")
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == "r"]
    tokens = [t for o in outs for t in o.new_token_ids]
    logprobs = [x for o in outs for x in o.logprobs]
    top = [x for o in outs for x in o.top_logprobs]
    return tokens, logprobs, top


@pytest.mark.parametrize("processed", [False, True], ids=["raw", "repetition_penalty"])
def test_greedy_logprobs_equal_generate_logits(target, processed):
    prompt = [5, 9, 17, 2, 40, 3]
    extra = dict(repetition_penalty=1.5) if processed else {}
    engine = Engine(SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0)), target)
    tokens, logprobs, top = _run(engine, prompt, SamplingParams(max_new_tokens=18, logprobs=3, **extra))
    ref = target.generate(
        torch.tensor([prompt]),
        max_new_tokens=18,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
        **extra,
    )
    assert tokens == ref.sequences[0, len(prompt) :].tolist()
    # NOTE: greedy scores are the processed logits; without processors they are the raw logits.
    per_position = ref.scores if processed else ref.logits
    assert len(logprobs) == len(top) == len(per_position) == 18
    for j, (token, lp, pairs) in enumerate(zip(tokens, logprobs, top)):
        want = torch.log_softmax(per_position[j][0].double(), -1)
        assert lp == pytest.approx(float(want[token]), abs=1e-5)
        top_want = want.topk(3)
        assert [i for i, _ in pairs] == top_want.indices.tolist()
        assert [v for _, v in pairs] == pytest.approx(top_want.values.tolist(), abs=1e-5)
        assert pairs[0][0] == token  # greedy emits the most probable token


def test_sampled_logprobs_are_those_of_the_processed_distribution(target):
    """With sampling the emitted token's log-probability is under temperature + filters (what
    generate(output_scores=True) holds), at the positions of the tokens actually emitted."""
    prompt = [7, 1, 8, 2]
    params = SamplingParams(
        max_new_tokens=15, temperature=0.7, top_k=12, repetition_penalty=1.2, seed=5, logprobs=2
    )
    engine = Engine(SortedDraft.truncate(target, 2), target)
    tokens, logprobs, top = _run(engine, prompt, params)
    chain = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(12)]
    )
    sequence = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = target(sequence).logits[0]  # what output_logits holds, position by position
    for j, token in enumerate(tokens):
        end = len(prompt) + j
        scores = chain(sequence[:, :end], logits[end - 1 : end].clone())[0]
        want = torch.log_softmax(scores.double(), -1)
        assert logprobs[j] == pytest.approx(float(want[token]), abs=1e-4)
        assert [i for i, _ in top[j]] == want.topk(2).indices.tolist()


def test_logprobs_only_when_asked_and_batch_invariant(target):
    draft = SortedDraft.truncate(target, 2)
    engine = Engine(draft, target)
    engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=8, logprobs=0), request_id="a")
    engine.add_request(
        [9, 9, 1, 2], SamplingParams(max_new_tokens=8, temperature=1.0, seed=2), request_id="b"
    )
    got = collect(engine)
    alone = Engine(draft, target)
    alone.add_request([4, 5, 6], SamplingParams(max_new_tokens=8, logprobs=0), request_id="a")
    want = collect(alone)
    assert got["a"]["tokens"] == want["a"]["tokens"]
    assert got["a"]["logprobs"] == pytest.approx(want["a"]["logprobs"], abs=1e-6)
    assert len(got["a"]["logprobs"]) == 8 and got["b"]["logprobs"] == []


def test_min_p_with_top_p_logprobs_are_those_of_the_sampled_distribution(target):
    # Regression: a min-p row's logits were filtered twice (once before verify, again for the logprobs),
    # so the renormalised second top-p pass reported -inf for tokens that had been drawn.
    from transformers import MinPLogitsWarper, TopPLogitsWarper

    prompt = [1, 2, 3]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.5, min_p=0.01, seed=5, logprobs=2)
    engine = Engine(SortedDraft.truncate(target, 2), target)
    tokens, logprobs, top = _run(engine, prompt, params)
    chain = LogitsProcessorList([TemperatureLogitsWarper(1.0), TopPLogitsWarper(0.5), MinPLogitsWarper(0.01)])
    sequence = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = target(sequence).logits[0]
    for j, token in enumerate(tokens):
        end = len(prompt) + j
        want = torch.log_softmax(chain(sequence[:, :end], logits[end - 1 : end].clone())[0].double(), -1)
        assert torch.isfinite(want[token])  # a drawn token is inside the filtered support
        assert logprobs[j] == pytest.approx(float(want[token]), abs=1e-4)
        assert top[j][0][0] == int(want.argmax())
