"""A short run of bench/server_soak.py (the CI-sized soak): mixed requests against the app in a child
process; no 5xx, every malformed request a 400, nothing left in the engine, memory flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llguidance")
pytest.importorskip("fastapi")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "server_soak.py"


def test_a_short_soak_leaves_nothing_running(tmp_path):
    subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "120", "--out", str(tmp_path)], check=True, timeout=600
    )
    result = json.loads((tmp_path / "server_soak_cpu.json").read_text())
    statuses = result["statuses"]
    assert sum(statuses.values()) == 120
    for key, count in statuses.items():
        kind, status = key.rsplit(" ", 1)
        assert status == ("400" if kind.startswith("bad_") else "200"), (key, count)
    assert result["health"]["unfinished"] == 0
    assert result["health"]["aborted"] >= 1  # the dropped streams were aborted, not run to the end
    # NOTE: loose here (120 requests); the 1,000-request run in bench/results holds the 5% goal
    assert abs(result["rss_growth"]) < 0.25
