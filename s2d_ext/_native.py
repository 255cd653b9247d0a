"""Loads the compiled op libraries (``s2d_ext/_<op>_C*.so``) that register ``torch.ops.s2d.*``.

Each op is its own library, so one that failed to build leaves the others usable. A missing
library only makes its "cpu"/"cuda" backends unavailable; the reference and Triton backends
still work.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def load_op_library(op: str) -> bool:
    """Load ``_<op>_C`` once; return whether ``torch.ops.s2d.<op>`` has native kernels."""
    candidates = sorted(_PACKAGE_DIR.glob(f"_{op}_C*.so"))
    for path in candidates:
        torch.ops.load_library(str(path))
        return True
    return False


def has_native(op: str) -> bool:
    return load_op_library(op)


def has_native_cuda(op: str) -> bool:
    """Whether the library of ``op`` was built with its CUDA kernels."""
    if not load_op_library(op):
        return False
    return bool(getattr(torch.ops.s2d, f"{op}_has_cuda")())


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
