"""Backend choice and argument checks: the one home of the op wrappers' validation.

Every op (and :meth:`SortedDraft.propose <s2d_ext.draft.sorted_draft.SortedDraft.propose>`) checks its
arguments in two passes. Types, shapes, dtypes and devices are host facts, checked as the arguments are
normalised (:func:`check_tensor`, :func:`per_row`, :func:`head_arguments`). Values live on the device: each
value check is a *check*, ``(ok, message)``, and :func:`check_values` reads all of a call's checks in ONE
device-to-host copy, then raises the first that fails (in the order the call lists them). Value checks
synchronise, so the ops skip them while tracing (:func:`is_tracing`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

from s2d_ext import _native

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
#: The dtypes of the ops' floating inputs (hidden states, logits, head weights).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The smallest positive temperature the ops take (s2d_ext.engine.params.GREEDY_BELOW is the same). NOTE:
#: below it, scores / T overflow float32 (garbage tokens, an infinite logsumexp).
MIN_TEMPERATURE = 1e-5


def temperatures_ok(temperature) -> bool | torch.Tensor:
    """Finite and 0 (greedy) or >= MIN_TEMPERATURE: a bool for a Python scalar, a 0-dim bool tensor else."""
    if isinstance(temperature, torch.Tensor):
        ok = torch.isfinite(temperature) & ((temperature == 0) | (temperature >= MIN_TEMPERATURE))
        return ok.all()
    return bool(math.isfinite(temperature) and (temperature == 0 or temperature >= MIN_TEMPERATURE))


#: The message of a temperature that fails :func:`temperatures_ok`.
TEMPERATURE_MESSAGE = f"temperature must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE:g}"

#: One value check: ``(ok, message)``. ``ok`` is a Python bool or a 0-dim bool tensor (read later, with the
#: call's other checks); ``message`` is the ValueError's text, or a callable building it (only on failure).
Check = tuple["bool | torch.Tensor", "str | Callable[[], str]"]


def check_values(checks: Sequence[Check], queries: Sequence[torch.Tensor] = ()) -> list[bool]:
    """Raise ValueError for the first of ``checks`` that fails; return the host values of ``queries``.

    Every tensor among the checks' ``ok`` and the ``queries`` (0-dim bool tensors the caller branches on)
    is read in one device-to-host copy: the one synchronisation of a call's value checks. Nothing is read
    when there is no tensor.
    """
    tensors = [ok for ok, _ in checks if isinstance(ok, torch.Tensor)] + list(queries)
    read = torch.stack(tensors).tolist() if tensors else []
    values = iter(read)
    for ok, message in checks:
        if not (next(values) if isinstance(ok, torch.Tensor) else ok):
            raise ValueError(message() if callable(message) else message)
    return read[len(read) - len(queries) :]


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    if not _native.has_triton():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# NOTE: measured on an H100 (bench/results/exit_head_cuda.md), with the CUDA exit head of then (one
# hand-written kernel that read the LM head once per row): at 16 or 64 rows it was 1.1 to 13 times
# slower than Triton's, about even at one row, so "auto" prefers Triton for exit_head on a GPU. The
# CUDA exit head is now torch's tensor-core matmul over chunks of V plus a fused reduction
# (csrc/include/s2d/exit_head_chunked.h), which has NOT run on a GPU yet (only nvcc and the CPU
# simulator tests); "auto" keeps Triton first until `bench/exit_head.py --device cuda` compares them.
_TRITON_FIRST_ON_CUDA = frozenset({"exit_head"})


def available_backends(op: str, device: torch.device) -> list[str]:
    """Backends that can run ``op`` on tensors of ``device``, fastest first, reference last."""
    found = []
    if device.type == "cuda" and _native.has_native_cuda(op):
        found.append("cuda")
    if device.type == "cpu" and _native.has_native(op):
        found.append("cpu")
    if triton_usable(device):
        found.insert(0 if device.type == "cuda" and op in _TRITON_FIRST_ON_CUDA else len(found), "triton")
    found.append("reference")
    return found


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "cpu" and backend in ("auto", "cpu") and _native.has_native(op):
        return "cpu"  # NOTE: the common case, answered without listing every backend
    usable = available_backends(op, device)
    if backend == "auto":
        # NOTE: under TRITON_INTERPRET=1 Triton runs on the CPU, but only to test it; never pick
        # the interpreter automatically over the C++ kernel or the reference.
        if device.type == "cpu":
            return "cpu" if "cpu" in usable else "reference"
        return usable[0]
    if backend not in usable:
        raise RuntimeError(
            f"backend {backend!r} is not available for {op} on {device.type} tensors (available: {usable})"
        )
    return backend


def is_tracing(device: torch.device | None = None) -> bool:
    """True under torch.compile tracing or CUDA-graph capture, where value checks would sync, and for
    meta tensors, which have no values to check.

    With ``device`` given, capture is only looked for when it is a CUDA device: a value check on
    CPU tensors never touches the GPU stream being captured.
    """
    if torch.compiler.is_compiling():
        return True
    if device is not None and device.type == "meta":
        return True
    if device is not None and device.type != "cuda":
        return False
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but must be on {device} like the other inputs")
    return value


def per_row(
    name: str,
    value: object,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A Python scalar or a [B] tensor, returned as a contiguous [B] tensor of ``dtype``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"{name} must be a scalar or a [B={batch}] tensor, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but must be on {device} like the other inputs")
        if dtype.is_floating_point and not (value.dtype.is_floating_point or not value.dtype.is_complex):
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        if not dtype.is_floating_point and value.dtype.is_floating_point:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dtype == torch.bool:
            raise TypeError(f"{name} must be a number tensor, got a bool tensor")
        # NOTE: tested first, because .to() and .contiguous() cost a dispatch even as no-ops.
        if value.dtype != dtype:
            value = value.to(dtype)
        return value if value.is_contiguous() else value.contiguous()
    check_scalar(name, value, integer=not dtype.is_floating_point)
    return torch.full((batch,), value, dtype=dtype, device=device)


def check_scalar(name: str, value: object, *, integer: bool) -> None:
    """The type checks ``per_row`` applies to a Python scalar, without building a tensor."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    if integer and isinstance(value, float):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if integer and not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")


def temperature_per_row(
    temperature: object, rows: int, device: torch.device, validate: bool
) -> tuple[torch.Tensor, list[Check]]:
    """``temperature`` (a scalar or [N]) as [N] float32 on ``device``, and its value check.

    With ``validate``, a Python scalar is checked here, on the host, and a tensor gets a check for
    :func:`check_values` (none when there is nothing to read: no rows, or tracing).
    """
    scalar = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if validate and scalar and not temperatures_ok(temperature):
        raise ValueError(TEMPERATURE_MESSAGE)
    tensor = per_row("temperature", temperature, rows, device, torch.float32)
    if not validate or scalar or not rows or is_tracing(device):
        return tensor, []
    return tensor, [(temperatures_ok(tensor), TEMPERATURE_MESSAGE)]


def head_arguments(
    hidden: object, norm_weight: object, lm_head_weight: object, eps: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The exit-head arguments of ``exit_head`` / ``exit_sample``, checked (host facts only) and contiguous.

    hidden [N, d] in :data:`FLOAT_DTYPES`; norm_weight [d] and lm_head_weight [V, d] of hidden's dtype and
    device; eps a finite float >= 0.
    """
    hidden = check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    device, dtype = hidden.device, hidden.dtype
    dim = hidden.shape[1]
    if dim < 1:
        raise ValueError("hidden must have a hidden size d >= 1 (dim 1)")
    norm_weight = check_tensor("norm_weight", norm_weight, ndim=1, device=device)
    lm_head_weight = check_tensor("lm_head_weight", lm_head_weight, ndim=2, device=device)
    for name, value in (("norm_weight", norm_weight), ("lm_head_weight", lm_head_weight)):
        if value.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({dtype}), got {value.dtype}")
    if norm_weight.shape[0] != dim:
        raise ValueError(f"norm_weight must have shape [d={dim}], got {list(norm_weight.shape)}")
    if lm_head_weight.shape[1] != dim:
        raise ValueError(f"lm_head_weight must have shape [V, d={dim}], got {list(lm_head_weight.shape)}")
    if lm_head_weight.shape[0] < 1:
        raise ValueError("lm_head_weight must have a vocabulary of at least one token (dim 0)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return hidden.contiguous(), norm_weight.contiguous(), lm_head_weight.contiguous(), eps


def to_per_row(
    name: str, value: object, batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A scalar or a [B] tensor as a contiguous [B] tensor of ``dtype`` on ``device``, converting as the
    drafts do (where :func:`per_row` refuses another device)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"{name} must be a scalar or a [B={batch}] tensor, got shape {tuple(value.shape)}"
            )
        return value.to(device=device, dtype=dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    return torch.full((batch,), value, dtype=dtype, device=device)
