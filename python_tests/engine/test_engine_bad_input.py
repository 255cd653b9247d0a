"""Bad input fails the request it belongs to, with a message naming the argument; the engine's state and
every other request are unaffected."""

from __future__ import annotations

import pytest
import torch

from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine, RequestError, SamplingParams

from ..driver.tiny_models import make_target
from .helpers import collect, run_alone


@pytest.fixture(scope="module")
def setup():
    target = make_target("llama", seed=3, context=64)
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    return target, draft


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_new_tokens=-2), "min_new_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed="seven"), "seed"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(bad_words_ids=[[]]), "bad_words_ids"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(logits_processors=[3]), "logits_processors"),
    ],
)
def test_parameters_out_of_range_name_themselves(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SamplingParams(**kwargs)


def test_bad_requests_leave_the_engine_and_the_others_unaffected(setup):
    target, draft = setup
    make = lambda: Engine(draft, target)  # noqa: E731
    good = [
        ([3, 4, 5], SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)),
        ([9, 8], SamplingParams(max_new_tokens=10)),
    ]
    engine = make()
    for i, (prompt, params) in enumerate(good):
        engine.add_request(prompt, params, request_id=f"ok{i}")

    def bad_inputs(e):
        with pytest.raises(RequestError, match="already in use"):
            e.add_request([1, 2], SamplingParams(max_new_tokens=4), request_id="ok0")
        with pytest.raises(RequestError, match="'nope'"):
            e.abort("nope")
        with pytest.raises(RequestError, match="prompt_ids.*longer than.*context"):
            e.add_request(list(range(1, 70)), SamplingParams(max_new_tokens=1))
        with pytest.raises(RequestError, match="max_new_tokens"):
            e.add_request([1, 2, 3], SamplingParams(max_new_tokens=62))
        with pytest.raises(ValueError, match="eos_token_id"):
            e.add_request([1, 2], SamplingParams(max_new_tokens=4, eos_token_id=96))
        with pytest.raises(ValueError, match="bad_words_ids"):
            e.add_request([1, 2], SamplingParams(max_new_tokens=4, bad_words_ids=[[5, 200]]))
        with pytest.raises(RequestError, match="prompt_ids must hold token ids"):
            e.add_request([1, 96], SamplingParams(max_new_tokens=4))
        with pytest.raises(RequestError, match="prompt_ids is empty"):
            e.add_request([], SamplingParams(max_new_tokens=4))
        with pytest.raises(RequestError, match="prompt_ids must be"):
            e.add_request(torch.ones((2, 2), dtype=torch.int64), SamplingParams(max_new_tokens=4))
        with pytest.raises(RequestError, match="target 'other'"):
            e.add_request([1, 2], SamplingParams(max_new_tokens=4), target="other")
        with pytest.raises(TypeError, match="params"):
            e.add_request([1, 2], {"max_new_tokens": 4})
        with pytest.raises(RequestError, match="request_id"):
            e.add_request([1, 2], SamplingParams(max_new_tokens=4), request_id=17)
        assert e.num_unfinished == 2

    got = collect(engine, {0: bad_inputs, 1: bad_inputs})
    assert sorted(got) == ["ok0", "ok1"]
    for i, (prompt, params) in enumerate(good):
        assert got[f"ok{i}"]["tokens"] == run_alone(make, prompt, params)["tokens"]


def test_a_processor_that_raises_fails_its_request_only(setup):
    target, draft = setup
    make = lambda: Engine(draft, target)  # noqa: E731
    calls = []

    def explode(token_ids, num_prompt, prefix_lengths, logits):
        calls.append(len(prefix_lengths))
        if len(calls) == 3:
            raise RuntimeError("grammar engine crashed")
        return logits

    def wrong_shape(token_ids, num_prompt, prefix_lengths, logits):
        return logits[:, :5]

    good = [
        ([3, 4, 5], SamplingParams(max_new_tokens=16, temperature=1.0, seed=1)),
        ([9, 8], SamplingParams(max_new_tokens=16)),
    ]
    engine = make()
    for i, (prompt, params) in enumerate(good):
        engine.add_request(prompt, params, request_id=f"ok{i}")
    engine.add_request(
        [6, 6, 6], SamplingParams(max_new_tokens=16, logits_processors=[explode]), request_id="boom"
    )
    add_shape = lambda e: e.add_request(
        [2, 7], SamplingParams(max_new_tokens=8, logits_processors=[wrong_shape]), request_id="shape"
    )  # noqa: E731
    late = ([5, 1, 5], SamplingParams(max_new_tokens=9, temperature=0.9, seed=4))
    add_late = lambda e: e.add_request(*late, request_id="late")  # noqa: E731
    got = collect(engine, {1: add_shape, 4: add_late})
    assert got["boom"]["reason"] == "error" and "grammar engine crashed" in got["boom"]["error"]
    assert len(got["boom"]["tokens"]) > 0  # it ran two steps before its processor raised
    assert got["shape"]["reason"] == "error" and "must return a" in got["shape"]["error"]
    for i, (prompt, params) in enumerate(good):
        assert got[f"ok{i}"]["tokens"] == run_alone(make, prompt, params)["tokens"]
    assert got["late"]["tokens"] == run_alone(make, *late)["tokens"]
    assert not engine.has_unfinished()


def test_request_ids_are_free_again_once_finished(setup):
    target, draft = setup
    engine = Engine(draft, target)
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=3), request_id="x")
    first = collect(engine)["x"]["tokens"]
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=3), request_id="x")
    assert collect(engine)["x"]["tokens"] == first


def test_a_temperature_too_small_to_sample_at_is_greedy(setup):
    # Regression: 1e-40 overflowed logits / temperature to inf and gave garbage tokens.
    target, draft = setup
    make = lambda: Engine(draft, target)  # noqa: E731
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=2e-5).temperature == 2e-5
    tiny = run_alone(make, [1, 2, 3], SamplingParams(max_new_tokens=8, temperature=1e-40, seed=1))
    greedy = run_alone(make, [1, 2, 3], SamplingParams(max_new_tokens=8))
    assert tiny["tokens"] == greedy["tokens"]


def test_logprobs_beyond_the_vocabulary_is_refused(setup):
    target, draft = setup
    engine = Engine(draft, target)
    with pytest.raises(RequestError, match="logprobs must be at most the vocabulary size"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=3, logprobs=target.config.vocab_size + 1))
    assert not engine.has_unfinished()
    rid = engine.add_request([1, 2], SamplingParams(max_new_tokens=3, logprobs=target.config.vocab_size))
    got = collect(engine)[rid]
    assert got["reason"] == "length" and len(got["logprobs"]) == 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constraints_that_leave_no_token_fail_their_request_only(setup, temperature):
    # Regression: with every token masked, greedy emitted token 0 and sampling emitted garbage.
    target, draft = setup
    make = lambda: Engine(draft, target)  # noqa: E731
    other = ([9, 8, 7], SamplingParams(max_new_tokens=12, temperature=1.0, seed=3))
    cases = {
        # nothing allowed from the start
        "none": ([1, 2, 3], dict(allowed_token_ids=[5], bad_words_ids=[[5]]), []),
        # 5 is the only allowed token, and 5 may not follow 5: the second position has no token
        "later": ([1, 2, 3], dict(allowed_token_ids=[5], bad_words_ids=[[5, 5]]), [5]),
    }
    for name, (prompt, constraint, emitted) in cases.items():
        params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=1, **constraint)
        engine = make()
        engine.add_request(prompt, params, request_id=name)
        engine.add_request(*other, request_id="other")
        got = collect(engine)
        assert got[name]["reason"] == "error" and "no token is allowed" in got[name]["error"]
        assert got[name]["tokens"] == emitted
        assert got["other"] == run_alone(make, *other) | {"outputs": got["other"]["outputs"]}
