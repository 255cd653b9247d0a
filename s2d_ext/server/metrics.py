"""``GET /metrics``: the server's counters in Prometheus' text format (``prometheus-client``).

Each app has a registry of its own (several apps may live in one process, as in the tests):

- ``s2d_requests_total{endpoint, status}``: requests answered, by HTTP status;
- ``s2d_prompt_tokens_total``, ``s2d_generation_tokens_total``: tokens of the finished choices;
- ``s2d_draft_tokens_proposed_total``, ``s2d_draft_tokens_accepted_total``: the engine's counters;
- ``s2d_draft_acceptance_by_position{position}``: accepted / proposed drafts at each draft position;
- ``s2d_engine_steps_total`` and ``s2d_step_seconds_total{part}``: the step time split (draft / target /
  verify / other) when the engine profiles (``Engine(profile=True)``: it synchronises), else only
  ``part="step"``, the wall time of whole steps;
- ``s2d_requests_running`` (in the engine) and ``s2d_queue_length`` (posted to the engine thread, not yet
  taken in).

The engine's numbers are read when scraped, from the engine thread's counters (plain Python numbers; a
scrape may see a step half counted, never a torn number).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector:
    """Reads an :class:`~s2d_ext.server.async_engine.AsyncEngine`'s counters at scrape time."""

    def __init__(self, async_engine: Any) -> None:
        self.async_engine = async_engine

    def collect(self):
        engine = self.async_engine.engine
        stats = engine.stats
        yield CounterMetricFamily(
            "s2d_draft_tokens_proposed", "draft tokens proposed", value=stats.draft_tokens
        )
        yield CounterMetricFamily(
            "s2d_draft_tokens_accepted", "draft tokens accepted by verification", value=stats.accepted_tokens
        )
        by_position = GaugeMetricFamily(
            "s2d_draft_acceptance_by_position",
            "accepted / proposed drafts at each draft position (0 = first)",
            labels=["position"],
        )
        for j, (accepted, proposed) in enumerate(zip(list(stats.accepted_at), list(stats.proposed_at))):
            by_position.add_metric([str(j)], accepted / proposed if proposed else 0.0)
        yield by_position
        yield CounterMetricFamily("s2d_engine_steps", "engine steps", value=stats.steps)
        split = CounterMetricFamily("s2d_step_seconds", "step time by part", labels=["part"])
        split.add_metric(["step"], self.async_engine.step_seconds)
        clock = getattr(engine, "clock", None)
        if clock is not None and getattr(clock, "enabled", False):
            for part, seconds in dict(clock.spent).items():
                split.add_metric([part], float(seconds))
        yield split
        yield GaugeMetricFamily(
            "s2d_requests_running",
            "unfinished requests in the engine",
            value=self.async_engine.num_unfinished,
        )
        yield GaugeMetricFamily(
            "s2d_queue_length",
            "commands (new requests) posted to the engine thread, not yet taken in",
            value=self.async_engine.pending,
        )


class ServerMetrics:
    """The registry of one app, its request / token counters and the engine collector."""

    def __init__(self, async_engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "s2d_requests", "requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "s2d_prompt_tokens", "prompt tokens of finished choices", registry=self.registry
        )
        self.generation_tokens = Counter(
            "s2d_generation_tokens", "generated tokens of finished choices", registry=self.registry
        )
        self.registry.register(EngineCollector(async_engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
