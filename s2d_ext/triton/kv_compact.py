"""Triton KV-cache compaction, registered as ``torch.ops.s2d.kv_compact_triton``.

One program per (b * h, block of output slots) copies [BLOCK_I, BLOCK_D] tiles. The cache is
viewed as same-sized integers, so the copy is bit exact for every float dtype (fp8 included).
Holes and out-of-range slots are masked (never read) and written as zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _kv_compact_kernel(
    cache_ptr,  # [B, H, S, D] as integers
    index_ptr,  # [B, S_out] int64
    out_ptr,  # [B, H, S_out, D] as integers
    heads,
    slots,
    slots_out,
    dim,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // heads
    out_slots = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    slot_mask = out_slots < slots_out
    src_slots = tl.load(index_ptr + b * slots_out + out_slots, mask=slot_mask, other=-1)
    valid = (src_slots >= 0) & (src_slots < slots)
    safe = tl.where(valid, src_slots, 0)
    for d_start in range(0, dim, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        values = tl.load(
            cache_ptr + (bh * slots + safe[:, None]) * dim + cols[None, :],
            mask=valid[:, None] & col_mask[None, :],
            other=0,
        )
        tl.store(
            out_ptr + (bh * slots_out + out_slots[:, None]) * dim + cols[None, :],
            values,
            mask=slot_mask[:, None] & col_mask[None, :],
        )


@torch.library.custom_op("s2d::kv_compact_triton", mutates_args=())
def kv_compact_triton(
    cache: torch.Tensor,  # [B, H, S, D]
    index: torch.Tensor,  # [B, S_out] int64
) -> torch.Tensor:
    """Triton compaction; arguments already validated and contiguous (see s2d_ext.ops.kv_compact)."""
    batch, heads, slots, dim = cache.shape
    slots_out = index.shape[1]
    out = torch.empty((batch, heads, slots_out, dim), dtype=cache.dtype, device=cache.device)
    if out.numel() == 0:
        return out
    bits = _BITS_DTYPE[cache.element_size()]
    block_d = min(triton.next_power_of_2(dim), 256)
    block_i = max(1, min(triton.next_power_of_2(slots_out), 4096 // block_d))
    grid = (batch * heads, triton.cdiv(slots_out, block_i))
    _kv_compact_kernel[grid](
        cache.view(bits),
        index,
        out.view(bits),
        heads,
        slots,
        slots_out,
        dim,
        BLOCK_I=block_i,
        BLOCK_D=block_d,
    )
    return out


@kv_compact_triton.register_fake
def _(cache, index):
    batch, heads, _, dim = cache.shape
    return cache.new_empty((batch, heads, index.shape[1], dim))
