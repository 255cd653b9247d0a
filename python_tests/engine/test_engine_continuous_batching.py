"""Requests join and leave between steps; each one's output is what it gives alone with the same seed."""

from __future__ import annotations

import pytest
import torch

from s2d_ext.draft.hf_draft import HFDraft
from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine, SamplingParams, TargetConfig

from ..driver.tiny_models import greedy_reference, left_padded, make_draft_model, make_target
from .helpers import collect, run_alone


@pytest.fixture(scope="module")
def target():
    return make_target("llama", seed=3)


def _drafts(target):
    return {
        "sorted_two_exits": lambda: SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0)),
        "hf_draft": lambda: HFDraft(make_draft_model(target)),
    }


def _prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (n,), generator=gen).tolist()
    return [torch.randint(1, 96, (m,), generator=gen).tolist() for m in lengths]


PARAMS = [
    SamplingParams(max_new_tokens=20),
    SamplingParams(max_new_tokens=9, temperature=1.0, seed=11),
    SamplingParams(max_new_tokens=30, temperature=0.8, top_k=20, top_p=0.9, seed=12, eos_token_id=[5]),
    SamplingParams(max_new_tokens=14, eos_token_id=[7, 9]),
    SamplingParams(max_new_tokens=25, temperature=1.2, seed=13, stop_token_ids=[3]),
    SamplingParams(max_new_tokens=6, temperature=0.7, seed=14),
]


@pytest.mark.parametrize("draft_kind", ["sorted_two_exits", "hf_draft"])
def test_joins_and_leaves_equal_each_request_alone(target, draft_kind):
    draft = _drafts(target)[draft_kind]()
    make = lambda: Engine(draft, target)  # noqa: E731
    prompts = _prompts(len(PARAMS), seed=1)
    engine = make()

    def add(i):
        return lambda e: e.add_request(prompts[i], PARAMS[i], request_id=f"r{i}")

    schedule = {0: lambda e: (add(0)(e), add(1)(e)), 2: add(2), 3: add(3), 5: add(4), 9: add(5)}
    got = collect(engine, schedule)
    assert sorted(got) == [f"r{i}" for i in range(len(PARAMS))]
    for i, params in enumerate(PARAMS):
        alone = run_alone(make, prompts[i], params)
        assert got[f"r{i}"]["tokens"] == alone["tokens"], i
        assert got[f"r{i}"]["reason"] == alone["reason"] in ("stop", "length")
    assert engine.stats.accepted_tokens > 0 and not engine.has_unfinished()


def test_greedy_requests_joining_late_equal_generate(target):
    engine = Engine(SortedDraft.truncate(target, 2), target, num_draft_tokens=4)
    prompts = _prompts(4, seed=2)
    schedule = {
        s: (lambda e, i=i: e.add_request(prompts[i], SamplingParams(max_new_tokens=16), request_id=str(i)))
        for i, s in enumerate([0, 1, 4, 6])
    }
    got = collect(engine, schedule)
    for i, prompt in enumerate(prompts):
        ids, mask = left_padded([len(prompt)])
        ids[0] = torch.tensor(prompt)
        ref = greedy_reference(target, ids, mask, 16)[0, len(prompt) :].tolist()
        assert got[str(i)]["tokens"] == ref


def test_abort_mid_stream_leaves_the_others_unaffected(target):
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    make = lambda: Engine(draft, target)  # noqa: E731
    prompts = _prompts(3, seed=3)
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=s) for s in (1, 2, 3)]
    engine = make()
    for i in range(3):
        engine.add_request(prompts[i], params[i], request_id=f"r{i}")
    got = collect(engine, {3: lambda e: e.abort("r1")})
    assert "r1" not in got or got["r1"]["reason"] is None  # an aborted request produces nothing more
    for i in (0, 2):
        assert got[f"r{i}"]["tokens"] == run_alone(make, prompts[i], params[i])["tokens"]
    alone = run_alone(make, prompts[1], params[1])["tokens"]
    partial = got.get("r1", {"tokens": []})["tokens"]
    assert partial == alone[: len(partial)] and len(partial) < len(alone)
    with pytest.raises(ValueError, match="'r1'"):
        engine.abort("r1")  # no longer a request of this engine


def test_one_draft_two_targets_with_their_own_settings():
    large = make_target("llama", layers=4, seed=0)
    small = make_target("llama", layers=3, seed=0, damp=0.3)
    draft = SortedDraft.truncate(large, 2, exits=(1, 2), thresholds=(0.6, 0.0))
    configs = {
        "small": TargetConfig(small, num_draft_tokens=2, thresholds=(0.9, 0.0)),
        "large": TargetConfig(large, num_draft_tokens=4, draft_length="fixed"),
    }
    make = lambda: Engine(draft, configs)  # noqa: E731
    prompts = _prompts(4, seed=4)
    names = ["small", "large", "large", "small"]
    params = [
        SamplingParams(max_new_tokens=12, temperature=t, seed=i) for i, t in enumerate([0, 1.0, 0, 0.9])
    ]
    engine = make()
    add = lambda i: lambda e: e.add_request(prompts[i], params[i], target=names[i], request_id=str(i))  # noqa: E731
    schedule = {0: lambda e: (add(0)(e), add(1)(e)), 2: add(2), 3: add(3)}
    got = collect(engine, schedule)
    for i in range(4):
        assert got[str(i)]["tokens"] == run_alone(make, prompts[i], params[i], target=names[i])["tokens"]


def test_max_running_queues_the_rest_in_order(target):
    draft = SortedDraft.truncate(target, 2)
    make = lambda: Engine(draft, target)  # noqa: E731
    engine = Engine(draft, target, max_running=2)
    prompts = _prompts(5, seed=5)
    params = [SamplingParams(max_new_tokens=6 + 3 * i, temperature=1.0, seed=i) for i in range(5)]
    for i in range(5):
        engine.add_request(prompts[i], params[i], request_id=str(i))
    running = []
    got = {}
    while engine.has_unfinished():
        outs = engine.step()
        running.append(len({o.request_id for o in outs}))
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert max(running) <= 2
    for i in range(5):
        assert got[str(i)] == run_alone(make, prompts[i], params[i])["tokens"]
    with pytest.raises(ValueError, match="max_running"):
        Engine(draft, target, max_running=0)


def test_static_draft_shapes_keep_every_output(target):
    """Padded draft batch (a multiple of 4) and a fixed draft capacity, as CUDA graphs need: the draft
    sees only a few shapes while requests come and go, and no request's output changes."""
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    make = lambda: Engine(draft, target)  # noqa: E731
    engine = Engine(draft, target, draft_batch_multiple=4, draft_capacity=200)
    prompts = _prompts(len(PARAMS), seed=6)
    add = lambda i: lambda e: e.add_request(prompts[i], PARAMS[i], request_id=f"r{i}")  # noqa: E731
    shapes = set()
    original_propose = draft.propose

    def propose(state, *args, **kwargs):
        # NOTE: the draft protocol: every step hands the draft the state of its whole batch.
        shapes.add((state.batch_size, state.capacity))
        return original_propose(state, *args, **kwargs)

    draft.propose = propose
    got = collect(engine, {0: add(0), 1: add(1), 2: add(2), 4: lambda e: (add(3)(e), add(4)(e)), 6: add(5)})
    del draft.propose  # NOTE: the runs alone below are not this engine's
    for i, params in enumerate(PARAMS):
        assert got[f"r{i}"]["tokens"] == run_alone(make, prompts[i], params)["tokens"], i
    assert all(b % 4 == 0 for b, _ in shapes) and {c for _, c in shapes} == {200}, shapes
