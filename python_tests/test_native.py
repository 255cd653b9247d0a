"""s2d_ext._native: compiled kernels load only into the torch they were built against.

Regression test: build and runtime torch could silently differ (an install from a second venv built against
the first venv's torch). Now the build records its torch, and a mismatch falls back to the reference / Triton
paths with one warning that says how to rebuild.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s2d_ext import _native

PACKAGE = Path(_native.__file__).resolve().parent


def _record(folder: Path, **overrides) -> None:
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_kernels": False}
    info.update(overrides)
    (folder / _native.BUILD_INFO).write_text(json.dumps(info))


def test_build_mismatch_reasons(tmp_path):
    assert "missing" in _native.build_mismatch(tmp_path)
    _record(tmp_path)
    assert _native.build_mismatch(tmp_path) is None
    _record(tmp_path, torch="2.11.0+cpu")
    assert "2.11.0+cpu" in _native.build_mismatch(tmp_path)
    # NOTE: a CUDA version other than the running torch's (a fresh machine may install a CUDA torch)
    other = "12.1" if torch.version.cuda == "13.0" else "13.0"
    _record(tmp_path, torch_cuda=other)
    assert f"CUDA {other}" in _native.build_mismatch(tmp_path)
    (tmp_path / _native.BUILD_INFO).write_text("{not json")
    assert "unreadable" in _native.build_mismatch(tmp_path)


@pytest.mark.skipif(not _native.has_native("verify"), reason="needs the built native libraries")
def test_libraries_of_another_torch_are_not_loaded(tmp_path):
    for library in PACKAGE.glob("_*_C*.so"):
        shutil.copy(library, tmp_path / library.name)
    _record(tmp_path, torch="2.11.0+cpu")
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import s2d_ext, s2d_ext._native as n\n"
        "    from s2d_ext.ops import verify\n"
        "mine = [str(w.message) for w in caught if 's2d_ext' in str(w.message)]\n"
        "assert len(mine) == 1, mine\n"
        "assert 'built against torch 2.11.0+cpu' in mine[0] and '--no-build-isolation' in mine[0], mine[0]\n"
        "assert not any(n._NATIVE.values()), n._NATIVE\n"
        "out, n_acc = verify(torch.randn(2, 3, 11), torch.randint(0, 11, (2, 2)))\n"
        "print('fallback ok', tuple(out.shape))\n"
    )
    env = {"S2D_NATIVE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback ok (2, 3)" in out.stdout
