"""Loads the compiled op libraries (``s2d_ext/_<op>_C*.so``) that register ``torch.ops.s2d.*``.

Each op is its own library, so one that failed to build leaves the others usable. A missing
library only makes its "cpu"/"cuda" backends unavailable; the reference and Triton backends
still work.

NOTE: availability is computed once, at import, into plain dicts. Backend choice then reads
constants, which torch.compile traces without graph breaks (``fullgraph=True`` works), instead of
tracing into library loading.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
OPS = ("verify", "exit_head", "kv_compact")


def _load(op: str) -> bool:
    for path in sorted(_PACKAGE_DIR.glob(f"_{op}_C*.so")):
        torch.ops.load_library(str(path))
        return True
    return False


_NATIVE: dict[str, bool] = {op: _load(op) for op in OPS}
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
