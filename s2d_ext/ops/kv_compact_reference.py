"""KV-cache compaction in plain PyTorch: the spec of every backend.

``out[b, h, i] = cache[b, h, index[b, i]]`` for ``0 <= index[b, i] < S``; every other index value
(``-1`` = a hole, or anything out of range, which the wrapper rejects in eager mode) yields zeros.
"""

from __future__ import annotations

import torch


def kv_compact_reference(
    cache: torch.Tensor,  # [B, H, S, D]
    index: torch.Tensor,  # [B, S_out] int64, -1 = hole
) -> torch.Tensor:
    """Returns a new [B, H, S_out, D] tensor of ``cache.dtype``."""
    batch, heads, slots, dim = cache.shape
    valid = (index >= 0) & (index < slots)  # [B, S_out]
    safe = torch.where(valid, index, torch.zeros_like(index))
    gather_index = safe[:, None, :, None].expand(batch, heads, index.shape[1], dim)
    out = torch.gather(cache, 2, gather_index)
    return out.masked_fill(~valid[:, None, :, None], 0)
