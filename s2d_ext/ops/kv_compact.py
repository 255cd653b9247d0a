"""``kv_compact``: gather the live slots of a KV cache into a new, hole-free cache.

Backends: ``"reference"`` (:mod:`s2d_ext.ops.kv_compact_reference`, the spec), ``"cpu"`` (C++),
``"cuda"`` (both ``torch.ops.s2d.kv_compact``) and ``"triton"`` (``torch.ops.s2d.kv_compact_triton``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from s2d_ext import _native
from s2d_ext.ops._backend import check_tensor, check_values, is_tracing, resolve_backend


def kv_compact(cache: torch.Tensor, index: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Copy, for every row, the cache slots listed in ``index`` to consecutive output slots.

    Parameters
    ----------
    cache : torch.Tensor
        [B, H, S, D], any floating dtype: one layer's key or value cache.
    index : torch.Tensor
        [B, S_out] int64: ``index[b, i]`` is the slot of row ``b`` placed at output slot ``i``, or
        -1 for a hole (zero-filled). Values must be in [-1, S).
    backend : str
        "auto", "reference", "cpu", "triton" or "cuda".

    Returns
    -------
    torch.Tensor
        [B, H, S_out, D], a new tensor of ``cache.dtype``: ``out[b, h, i] = cache[b, h, index[b, i]]``.
    """
    cache, index = _normalise(cache, index)
    chosen = resolve_backend("kv_compact", backend, cache.device)
    if cache.numel() == 0 or index.numel() == 0:
        batch, heads, _, dim = cache.shape
        return cache.new_zeros((batch, heads, index.shape[1], dim))
    if chosen == "reference":
        from s2d_ext.ops.kv_compact_reference import kv_compact_reference

        return kv_compact_reference(cache, index)
    if chosen == "triton":
        from s2d_ext.triton.kv_compact import kv_compact_triton  # noqa: F401  (registers the op)

        return torch.ops.s2d.kv_compact_triton(cache, index)
    return torch.ops.s2d.kv_compact(cache, index)


def kv_compact_layers(
    caches: Sequence[torch.Tensor], index: torch.Tensor, backend: str = "auto"
) -> list[torch.Tensor]:
    """:func:`kv_compact` of every tensor in ``caches`` (e.g. each layer's keys and values).

    Parameters
    ----------
    caches : sequence of torch.Tensor
        Each [B, H, S, D] (H, S, D and dtype may differ between entries).
    index : torch.Tensor
        [B, S_out] int64, shared by every entry; checked once.

    Returns
    -------
    list of torch.Tensor
        Each [B, H, S_out, D].
    """
    if isinstance(caches, torch.Tensor) or not isinstance(caches, Sequence):
        raise TypeError(f"caches must be a list or tuple of tensors, got {type(caches).__name__}")
    return [kv_compact(cache, index, backend=backend) for cache in caches]


def _normalise(cache, index) -> tuple[torch.Tensor, torch.Tensor]:
    cache = check_tensor("cache", cache, ndim=4)
    if not cache.dtype.is_floating_point:
        raise TypeError(f"cache must have a floating dtype, got {cache.dtype}")
    index = check_tensor("index", index, ndim=2, dtypes=(torch.int64,), device=cache.device)
    if index.shape[0] != cache.shape[0]:
        raise ValueError(f"index has batch {index.shape[0]} but cache has batch {cache.shape[0]}")
    slots = cache.shape[2]
    if index.numel() and not is_tracing(index.device):
        in_range = ((index >= -1) & (index < slots)).all()
        check_values([(in_range, f"index must hold slots in [0, S={slots}) or -1 for a hole")])
    return cache.contiguous(), index.contiguous()


def _fake_kv_compact(cache, index):
    batch, heads, _, dim = cache.shape
    return cache.new_empty((batch, heads, index.shape[1], dim))


if _native.has_native("kv_compact"):
    torch.library.register_fake("s2d::kv_compact")(_fake_kv_compact)
