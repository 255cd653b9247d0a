"""Shims over the transformers cache API, so the driver runs on every tested transformers version.

Tested range: transformers 5.17 through 5.24 (``TESTED_TRANSFORMERS``). What differs across it:

- the forward keyword of the cache: ``past_key_values=`` (5.17) vs ``cache=`` (later 5.x);
- ``DynamicCache.crop(n)``: 5.17 reads a positive ``n`` as an absolute length (``crop(0)`` empties the
  cache), later versions reject positive values. We only ever call ``crop(-n)`` with ``n > 0``.

Every version keeps a ``DynamicCache`` as ``cache.layers[i].keys / .values`` of shape [B, H, S, D], which
is what compaction rewrites.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import transformers
from transformers import DynamicCache

TESTED_TRANSFORMERS = ((5, 17), (5, 24))


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.cache
def check_transformers_version() -> None:
    """Warn once when the installed transformers is outside the tested range."""
    found = _version_tuple(transformers.__version__)
    low, high = TESTED_TRANSFORMERS
    if not low <= found <= high:
        warnings.warn(
            f"s2d_ext was tested with transformers {low[0]}.{low[1]} to {high[0]}.{high[1]}, found "
            f"{transformers.__version__}; the cache shims may not fit it.",
            stacklevel=3,
        )


@functools.cache
def _cache_keyword_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache under: ``"cache"`` or ``"past_key_values"``."""
    return _cache_keyword_of(type(model))


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty ``DynamicCache`` laid out for ``model`` (sliding-window layers where its config has them)."""
    check_transformers_version()
    return DynamicCache(config=model.config)


def sliding_window_of(cache: DynamicCache) -> int | None:
    """The smallest sliding window among the cache's layers, or None when every layer attends fully."""
    windows = [
        getattr(layer, "sliding_window", None)
        for layer in cache.layers
        if getattr(layer, "is_sliding", False)
    ]
    windows = [w for w in windows if w is not None]
    return min(windows) if windows else None


def seq_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def crop_tail(cache: DynamicCache, num_remove: int) -> None:
    """Drop the last ``num_remove`` cache columns. ``num_remove == 0`` is a no-op (never ``crop(0)``)."""
    if num_remove < 0:
        raise ValueError(f"num_remove must be >= 0, got {num_remove}")
    if num_remove:
        cache.crop(-num_remove)


def rewrite_layers(cache: DynamicCache, rows: torch.Tensor | None, index: torch.Tensor) -> None:
    """Keep batch ``rows`` and gather cache columns ``index`` in every layer, in place.

    rows: [B_out] int64 batch rows to keep, or None for all of them.
    index: [B_out, S_out] int64 source column of each output column; -1 = hole (zeros).
    """
    compact = _kv_compact_op()
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or getattr(layer, "keys", None) is None:
            continue
        if layer.keys.numel() == 0 and layer.keys.dim() < 4:
            continue
        keys, values = layer.keys, layer.values
        layer_index = index.to(keys.device)
        if rows is not None:
            layer_rows = rows.to(keys.device)
            keys, values = keys.index_select(0, layer_rows), values.index_select(0, layer_rows)
        layer.keys = compact(keys, layer_index)
        layer.values = compact(values, layer_index)
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count their columns separately
            layer.cumulative_length = layer.keys.shape[-2]


def concat_layers(caches: list[DynamicCache], batch_sizes: list[int], width: int) -> DynamicCache:
    """The rows of ``caches`` stacked along the batch, each layer left-padded with zero columns to
    ``width``; reuses (and so consumes) ``caches[0]``'s layer objects.

    batch_sizes[i]: the rows of ``caches[i]`` (an empty cache, one that never ran, has no tensors).
    """
    out = caches[0]
    for index, layer in enumerate(out.layers):
        parts = [c.layers[index] if index < len(c.layers) else None for c in caches]
        filled = [p for p in parts if _has_tensors(p)]
        if not filled:
            continue
        sample_k, sample_v = filled[0].keys, filled[0].values
        keys, values = [], []
        for part, rows in zip(parts, batch_sizes):
            if _has_tensors(part):
                k, v = part.keys, part.values
                pad = width - k.shape[-2]
                k = torch.nn.functional.pad(k, (0, 0, pad, 0)) if pad else k
                v = torch.nn.functional.pad(v, (0, 0, pad, 0)) if pad else v
            else:
                shape = (rows, sample_k.shape[1], width, sample_k.shape[3])
                k = sample_k.new_zeros(shape)
                v = sample_v.new_zeros((rows, sample_v.shape[1], width, sample_v.shape[3]))
            keys.append(k)
            values.append(v)
        if not _has_tensors(layer):
            layer.lazy_initialization(sample_k, sample_v)
        layer.keys = torch.cat(keys, dim=0)
        layer.values = torch.cat(values, dim=0)
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count their columns separately
            layer.cumulative_length = width
    return out


def _has_tensors(layer) -> bool:
    if layer is None or not getattr(layer, "is_initialized", True):
        return False
    keys = getattr(layer, "keys", None)
    return keys is not None and keys.dim() == 4


def gather_columns(
    cache: torch.Tensor,  # [B, H, S, D]
    index: torch.Tensor,  # [B, S_out] int64, -1 = hole
) -> torch.Tensor:
    """Plain-PyTorch column gather, the fallback when ``s2d_ext.ops.kv_compact`` is not available."""
    batch, heads, _, dim = cache.shape
    safe = index.clamp(min=0)[:, None, :, None].expand(batch, heads, index.shape[1], dim)
    out = cache.gather(2, safe)
    return out.masked_fill((index < 0)[:, None, :, None], 0)


def _kv_compact_op():
    try:
        from s2d_ext.ops import kv_compact
    except ImportError:  # NOTE: the op lands in parallel; the driver must not depend on its arrival.
        return gather_columns
    return kv_compact
