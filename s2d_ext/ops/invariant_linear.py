"""``invariant_linear``: a linear layer whose every output row is computed the same way whatever the number
of rows, fast for the few rows of a decode or verify step.

Vocabulary:

* **row**: one token's input vector (the ``T`` of a forward over ``T`` tokens);
* **row-invariant** (T-invariant): row ``t``'s output depends only on row ``t`` and the weights, bit for bit,
  never on ``T`` or on the other rows; so a verify forward over ``k + 1`` tokens gives each token exactly
  what a one-token decode gives, and greedy speculative decoding equals greedy decoding in any dtype
  (``torch.nn.functional.linear`` picks its GEMM kernel, and with it the rounding, by the number of rows);
* **skinny**: the weights stream from memory once per block of rows, so a forward over 2-8 tokens costs
  about what a forward over one costs where decoding is memory-bound (torch's CPU GEMM of a few rows costs
  up to T times a GEMV on CPUs without native bfloat16).

Backends: ``"reference"`` (:mod:`s2d_ext.ops.invariant_linear_reference`, the spec), ``"cpu"`` (C++: AVX2 +
FMA + F16C, or a portable build with the same bits), ``"cuda"`` (both ``torch.ops.s2d.invariant_linear``)
and ``"triton"`` (``torch.ops.s2d.invariant_linear_triton``). Each kernel backend is row-invariant; the
backends' bits differ from each other (their lane counts differ).
"""

from __future__ import annotations

import torch

from s2d_ext import _native
from s2d_ext.ops._backend import check_tensor, resolve_backend

#: the weight and input dtypes the kernels implement
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def invariant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ weight.T + bias`` with every row computed independently of the others (see the module).

    Parameters
    ----------
    x : torch.Tensor
        [..., K] float32, bfloat16 or float16 (the rows are the leading dimensions, flattened).
    weight : torch.Tensor
        [N, K] float32, bfloat16 or float16, as ``nn.Linear.weight``; same device as ``x``.
    bias : torch.Tensor, optional
        [N], any floating dtype.
    backend : str
        "auto", "reference", "cpu", "triton" or "cuda".

    Returns
    -------
    torch.Tensor
        [..., N] of ``x.dtype``, accumulated in float32.
    """
    check_tensor("x", x, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=DTYPES, device=x.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must be [..., K={weight.shape[1]}] (weight is [N, K] = {list(weight.shape)}), got "
            f"{list(x.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if not bias.dtype.is_floating_point or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must be a floating [N={weight.shape[0]}] tensor, got {bias.dtype} {list(bias.shape)}"
            )
    chosen = resolve_backend("invariant_linear", backend, x.device)
    weight = weight if weight.is_contiguous() else weight.contiguous()
    if chosen == "reference":
        from s2d_ext.ops.invariant_linear_reference import invariant_linear_reference

        return invariant_linear_reference(x, weight, bias)
    if chosen == "triton":
        from s2d_ext.triton.invariant_linear import invariant_linear_triton  # noqa: F401  (registers the op)

        return torch.ops.s2d.invariant_linear_triton(x, weight, bias)
    return torch.ops.s2d.invariant_linear(x, weight, bias)


def _fake_invariant_linear(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


if _native.has_native("invariant_linear"):
    torch.library.register_fake("s2d::invariant_linear")(_fake_invariant_linear)
