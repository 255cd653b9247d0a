"""Run requests through an engine on a schedule, and alone, and compare."""

from __future__ import annotations

from s2d_ext.engine import Engine, SamplingParams


def run_alone(make_engine, prompt, params: SamplingParams, target=None) -> dict:
    """A fresh engine with one request: its tokens, logprobs and finish reason."""
    engine = make_engine()
    rid = engine.add_request(prompt, params, target=target)
    got = collect(engine)
    return got[rid]


def collect(engine: Engine, schedule=None, max_steps: int = 10_000) -> dict:
    """Step ``engine`` until done; ``schedule[step]`` is a callable run before that step (adds, aborts).

    Returns request id -> {"tokens", "logprobs", "reason", "outputs"}; asserts the step outputs are
    consistent (num_generated counts every token once, nothing after finished).
    """
    schedule = dict(schedule or {})
    got: dict = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in schedule):
        if step in schedule:
            schedule.pop(step)(engine)
        for out in engine.step():
            entry = got.setdefault(
                out.request_id, {"tokens": [], "logprobs": [], "reason": None, "outputs": 0}
            )
            assert entry["reason"] is None, f"{out.request_id} produced output after it finished"
            entry["tokens"] += out.new_token_ids
            entry["outputs"] += 1
            if out.logprobs is not None:
                entry["logprobs"] += out.logprobs
            assert out.num_generated == len(entry["tokens"])
            if out.finished:
                entry["reason"] = out.finish_reason
                entry["error"] = out.error
        step += 1
        assert step < max_steps
    return got
