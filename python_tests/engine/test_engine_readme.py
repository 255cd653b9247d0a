"""The README's engine example runs as written (its assert compares the greedy request with generate())."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_engine_snippet_runs_as_written(tmp_path):
    section = re.search(
        r"<!-- engine-snippet:begin -->(.*?)<!-- engine-snippet:end -->", README.read_text(), re.S
    )
    assert section, "README.md lost its engine-snippet markers"
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S).group(1)
    script = tmp_path / "engine_example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'greedy': 32" in out.stdout
