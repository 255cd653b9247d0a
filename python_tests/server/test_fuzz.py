"""schemathesis over the server's OpenAPI schema on loopback: valid and invalid bodies for every operation;
no answer is a 5xx, and every 4xx has a JSON body ``{"error": {"message": str, "type": str, ...}}``.

``S2D_FUZZ_EXAMPLES`` sets the examples per operation and mode (default 25, a CI-sized run);
``S2D_FUZZ_REPORT=path`` writes the status counts there (``bench/server_fuzz.py`` runs a long one).
"""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch

from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine

from ..driver.tiny_models import make_target
from ..engine.grammar_helpers import EOS, CharEosTokenizer

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def fuzz_server():
    from s2d_ext.server.app import build_app
    from s2d_ext.server.async_engine import AsyncEngine
    from s2d_ext.server.launch import serving_in_thread

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    # NOTE: a 48-token context keeps every accepted request short (the fuzzer asks for any max_tokens)
    target = make_target("llama", seed=3, context=48)
    target.generation_config.eos_token_id = EOS
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    engine = AsyncEngine(Engine(draft, {"tiny": target}))
    with serving_in_thread(build_app(engine, CharEosTokenizer(), max_n=2, max_prompts=2)) as url:
        yield url, engine
    engine.close()
    torch.set_num_threads(previous)


def test_no_server_error_and_every_4xx_has_a_json_error(fuzz_server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    url, engine = fuzz_server
    examples = int(os.environ.get("S2D_FUZZ_EXAMPLES", "25"))
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: collections.Counter = collections.Counter()
    problems = []
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/metrics"}

    def fuzz(operation, mode):
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call(base_url=url, timeout=60)
            statuses[(operation.method.upper(), operation.path, mode.value, response.status_code)] += 1
            if response.status_code >= 500:
                problems.append((response.status_code, case.body, response.text[:300]))
            elif response.status_code >= 400:
                try:
                    error = json.loads(response.text)["error"]
                    ok = isinstance(error["message"], str) and isinstance(error["type"], str)
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    problems.append((response.status_code, case.body, response.text[:300]))

        try:
            run()
        except Unsatisfiable:
            # NOTE: an operation without parameters or body (GET /health) has no invalid input to make
            assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.path

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    report = os.environ.get("S2D_FUZZ_REPORT")
    if report:
        rows = [
            {"method": m, "path": p, "mode": g, "status": s, "count": n}
            for (m, p, g, s), n in statuses.items()
        ]
        with open(report, "w") as f:
            json.dump(
                {"examples_per_operation_and_mode": examples, "statuses": rows, "problems": problems}, f
            )
    assert not problems, problems[:5]
    assert any(s == 200 for (_, p, _, s) in statuses if p == "/v1/completions")  # valid bodies got through
    assert any(400 <= s < 500 for (_, p, _, s) in statuses if p == "/v1/chat/completions")
    assert engine.num_unfinished == 0 or engine.steps > 0  # the engine stayed up
