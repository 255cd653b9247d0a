"""Triton row-invariant linear layer, registered as ``torch.ops.s2d.invariant_linear_triton``.

One program per (block of BLOCK_N output columns, block of BLOCK_T rows) keeps a [BLOCK_T, BLOCK_N]
float32 accumulator and walks K in BLOCK_K steps: ``acc += sum_k x[t, k] * w[n, k]`` over each step. The
block sizes are constants, never chosen from T, so every (t, n) pair is reduced the same way whatever the
number of rows: each row's output is what it gets alone (row-invariant, see s2d_ext.ops.invariant_linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 4
BLOCK_N = 32
BLOCK_K = 64


@triton.jit
def _invariant_linear_kernel(
    x_ptr,  # [T, K] float32
    w_ptr,  # [N, K] float32 / bfloat16 / float16
    bias_ptr,  # [N] float32 (unused without HAS_BIAS)
    y_ptr,  # [T, N] float32
    rows,
    in_features,
    out_features,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ids = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    col_mask = cols < out_features
    row_mask = row_ids < rows
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < in_features
        x = tl.load(
            x_ptr + row_ids[:, None].to(tl.int64) * in_features + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * in_features + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    tl.store(
        y_ptr + row_ids[:, None].to(tl.int64) * out_features + cols[None, :],
        acc,
        mask=row_mask[:, None] & col_mask[None, :],
    )


@torch.library.custom_op("s2d::invariant_linear_triton", mutates_args=())
def invariant_linear_triton(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N] or None
) -> torch.Tensor:
    """Triton row-invariant linear; arguments already validated (see s2d_ext.ops.invariant_linear)."""
    out_features, in_features = weight.shape
    rows = x.shape[:-1].numel()  # NOTE: not reshape(-1, K), which is ambiguous for K = 0
    rows_in = x.reshape(rows, in_features).float().contiguous()
    y = torch.empty((rows, out_features), dtype=torch.float32, device=x.device)
    if rows and out_features:
        bias_f = bias.float().contiguous() if bias is not None else y
        grid = (triton.cdiv(out_features, BLOCK_N), triton.cdiv(rows, BLOCK_T))
        _invariant_linear_kernel[grid](
            rows_in,
            weight.contiguous(),
            bias_f,
            y,
            rows,
            in_features,
            out_features,
            HAS_BIAS=bias is not None,
            BLOCK_T=BLOCK_T,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


@invariant_linear_triton.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
