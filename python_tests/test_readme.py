"""The README's examples run as written (a user copies them first)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    section = re.search(rf"<!-- {marker}:begin -->(.*?)<!-- {marker}:end -->", text, re.S)
    assert section, f"README.md lost its {marker} markers"
    code = re.search(r"```\w*\n(.*?)```", section.group(1), re.S)
    assert code, f"README.md's {marker} holds no code block"
    return code.group(1)


def test_use_snippet_runs_as_written_and_matches_generate(tmp_path):
    # NOTE: a fresh interpreter outside the checkout, as a user runs it (its assert compares with generate()).
    script = tmp_path / "use.py"
    script.write_text(_block("use-snippet"))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"MAT \d+\.\d\d, exits used \{", out.stdout)


def test_install_block_is_the_no_build_isolation_route():
    lines = [line for line in _block("install-block").splitlines() if line.strip()]
    assert lines[0].startswith("python3 -m venv s2d-env")
    assert any("torch==2.13.0" in line and "cmake" in line and "ninja" in line for line in lines)
    assert lines[-1].startswith("s2d-env/bin/python -m pip install --no-build-isolation /path/to/s2d_ext")
