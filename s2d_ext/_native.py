"""Loads the compiled op libraries (``s2d_ext/_<op>_C*.so``) that register ``torch.ops.s2d.*``.

Each op is its own library, so one that failed to build leaves the others usable. A missing
library only makes its "cpu"/"cuda" backends unavailable; the reference and Triton backends
still work.

NOTE: the libraries link against torch's C++ ABI, so they are loaded only when ``_build_info.json`` (written
by ``setup.py`` beside them) names the running torch and its CUDA flavour. On a mismatch, or with no such
record, nothing is loaded and one warning says how to rebuild: loading a library built against another torch
can crash the process or, worse, run with a wrong struct layout.

NOTE: availability is computed once, at import, into plain dicts. Backend choice then reads
constants, which torch.compile traces without graph breaks (``fullgraph=True`` works), instead of
tracing into library loading.

``S2D_NATIVE_DIR`` loads the libraries from another folder (CI's sanitizer build).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
OPS = ("verify", "exit_head", "kv_compact", "invariant_linear")
BUILD_INFO = "_build_info.json"
REBUILD = "python -m pip install --no-build-isolation --force-reinstall --no-deps ."


def _library_dir() -> Path:
    override = os.environ.get("S2D_NATIVE_DIR")
    return Path(override).resolve() if override else _PACKAGE_DIR


def build_mismatch(folder: Path) -> str | None:
    """Why the libraries in ``folder`` must not be loaded into this process, or None when they may."""
    record = folder / BUILD_INFO
    if not record.is_file():
        return f"{record} is missing, so the torch they were built against is unknown"
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        return f"{record} is unreadable ({exc})"
    built, running = info.get("torch"), torch.__version__
    if built != running:
        return f"they were built against torch {built}, and this process runs torch {running}"
    if info.get("torch_cuda") != torch.version.cuda:
        return (
            f"they were built against torch with CUDA {info.get('torch_cuda')}, and this process runs "
            f"torch with CUDA {torch.version.cuda}"
        )
    return None


def _load_all() -> dict[str, bool]:
    folder = _library_dir()
    libraries = {op: sorted(folder.glob(f"_{op}_C*.so")) for op in OPS}
    if not any(libraries.values()):
        return {op: False for op in OPS}
    why = build_mismatch(folder)
    if why is not None:
        warnings.warn(
            f"s2d_ext: the compiled kernels in {folder} are not loaded: {why}. The reference and Triton "
            f"backends still work; rebuild from the source folder with `{REBUILD}` (or `make install`).",
            RuntimeWarning,
            stacklevel=3,
        )
        return {op: False for op in OPS}
    loaded = {}
    for op in OPS:
        if libraries[op]:
            torch.ops.load_library(str(libraries[op][0]))
        loaded[op] = bool(libraries[op])
    return loaded


_NATIVE: dict[str, bool] = _load_all()
_NATIVE_CUDA: dict[str, bool] = {
    op: bool(getattr(torch.ops.s2d, f"{op}_has_cuda")()) if _NATIVE[op] else False for op in OPS
}
_HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def has_native(op: str) -> bool:
    """Whether ``torch.ops.s2d.<op>`` has its compiled (C++) kernels."""
    return _NATIVE[op]


def has_native_cuda(op: str) -> bool:
    """Whether the library of ``op`` was built with its CUDA kernels."""
    return _NATIVE_CUDA[op]


def has_triton() -> bool:
    return _HAS_TRITON
