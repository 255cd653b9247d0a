"""How the models of a run compute on its device: the dtype, and the target's kernels (torch's or s2d's
row-invariant ones), chosen once by the CLI and the bench and stated in their output.

Measured on the 2-core development hosts (1 torch thread; bench/results/forward_width_*.md):

* on a CPU **with** native bfloat16 (AVX512-BF16 or AMX, where torch's oneDNN runs bf16 matmuls), torch's
  bf16 forward of Qwen2.5-Coder-1.5B costs about half its float32 one and stays flat up to 8 tokens;
* on a CPU **without** it (AMD EPYC with AVX2 only), torch's bf16 matmul of T rows costs about T GEMVs, so
  a verify forward over 8 tokens costs 3-5x a decode step in either dtype. s2d's row-invariant linear
  kernel (:mod:`s2d_ext.row_invariant`) reads bf16 weights at memory speed on any AVX2 CPU and streams
  them once for all rows: there bf16 + s2d kernels is the fast setting too.

So the defaults: bfloat16 on CUDA GPUs that support it and on CPUs, s2d's kernels on CPUs (on a GPU they
have not run yet: torch's). A bf16 run on a CPU without native bf16 and with torch's kernels warns once.
"""

from __future__ import annotations

import warnings

import torch

#: the target / draft kernels a run may use
KERNELS = ("invariant", "torch")


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (CUDA: sm_80+; CPU: AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def default_kernels(device: torch.device | str) -> str:
    """``"invariant"`` on CPUs (when the C++ kernel is built), else ``"torch"``."""
    from s2d_ext import _native

    device = torch.device(device)
    return "invariant" if device.type == "cpu" and _native.has_native("invariant_linear") else "torch"


def default_dtype(device: torch.device | str, kernels: str) -> tuple[torch.dtype, str]:
    """The dtype a run uses when none is asked for, and why (one clause, for the run's output)."""
    device = torch.device(device)
    if device.type == "cuda":
        if native_bfloat16(device):
            return torch.bfloat16, "the GPU supports bfloat16"
        return torch.float16, "the GPU has no bfloat16"
    if native_bfloat16(device):
        return torch.bfloat16, "this CPU runs bfloat16 natively (AVX512-BF16 / AMX)"
    if kernels == "invariant":
        return torch.bfloat16, "s2d's kernels read bfloat16 weights at memory speed on this CPU"
    return torch.float32, "this CPU has no native bfloat16 and torch's kernels are asked for"


def choose(
    device: torch.device | str, dtype: torch.dtype | None = None, kernels: str | None = None
) -> tuple[torch.dtype, str, str]:
    """(dtype, kernels, a line saying which and why) for a run on ``device``; ``None`` = the default.

    Warns once when bfloat16 is asked for on a CPU without native bfloat16 with torch's kernels (it runs,
    slowly: a matmul of T rows costs about T GEMVs there).
    """
    if kernels is None:
        kernels = default_kernels(device)
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if dtype is None:
        dtype, why = default_dtype(device, kernels)
    else:
        why = "asked for"
    device = torch.device(device)
    if (
        dtype == torch.bfloat16
        and device.type == "cpu"
        and kernels == "torch"
        and not native_bfloat16(device)
    ):
        warnings.warn(
            "bfloat16 on this CPU (no AVX512-BF16 / AMX) with torch's kernels is slow: a matmul of T rows "
            "costs about T GEMVs; use s2d's kernels (--kernels invariant) or --dtype float32",
            RuntimeWarning,
            stacklevel=2,
        )
    name = str(dtype).replace("torch.", "")
    line = f"dtype {name} ({why}); kernels: {'s2d row-invariant' if kernels == 'invariant' else 'torch'}"
    return dtype, kernels, line


def apply_kernels(model: torch.nn.Module, kernels: str) -> torch.nn.Module:
    """``model`` with s2d's row-invariant kernels (``"invariant"``) or torch's (``"torch"``), in place."""
    from s2d_ext.row_invariant import use_row_invariant_kernels

    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return use_row_invariant_kernels(model, enable=kernels == "invariant")
