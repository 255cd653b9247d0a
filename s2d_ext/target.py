"""A Hugging Face causal LM run step by step over a KV cache that may hold holes.

Speculative decoding appends ``k + 1`` tokens per row per step and keeps a different number of them in
every row. :class:`CachedLM` never moves the kept ones during a step: rejected cache columns become
*holes*, zeros in a 2D ``live`` mask passed to the model as its attention mask, and every token gets an
explicit ``position_id`` (its index among the row's live tokens), so the model computes exactly what it
computes for a contiguous sequence. Columns that are holes in every row are cropped off the end right
away; the rest are removed by :meth:`CachedLM.compact`, which gathers every row's live columns with
``s2d_ext.ops.kv_compact`` (right-aligned, so short rows get holes on the left like left padding).

KV waste bound
--------------
After every :meth:`CachedLM.commit` the driver calls :meth:`CachedLM.maybe_compact`, which compacts when
the cache holds more than ``longest + max(ceil(max_waste * longest), min_slack)`` columns, ``longest``
being the most live tokens of any row. So between steps the cache never exceeds
``(1 + max_waste) * longest + min_slack`` columns (defaults: 25 % and 64 columns), and during a step
by at most ``k + 1`` more. ``longest`` is at most ``prompt + generated`` of the longest row, i.e. at most
the length of ``generate()``'s cache for the same batch.

Multi-device models (``device_map="auto"``): inputs go to the input embedding's device, logits come back
on the lm_head's device; each cache layer is compacted on its own device.
"""

from __future__ import annotations

import math

import torch

from s2d_ext import _cache_compat


def input_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s input embedding (where input_ids must live)."""
    return model.get_input_embeddings().weight.device


def output_vocab_size(model: torch.nn.Module) -> int:
    """Number of logits ``model`` produces per position."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def context_length(model: torch.nn.Module) -> int | None:
    """``max_position_embeddings`` of ``model``'s text config, or None when it has none."""
    value = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return int(value) if value else None


class CachedLM:
    """One model, one batch, one KV cache with holes.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM (its forward takes ``input_ids``, ``attention_mask``, ``position_ids`` and a cache).
    batch_size : int
    max_waste, min_slack : float, int
        Compaction trigger, see the module docstring.

    Attributes
    ----------
    live : torch.Tensor
        [B, S] bool: cache columns holding a token of the row (False = left pad or hole).
    next_pos : torch.Tensor
        [B] int64: position id of the row's next committed token.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, max_waste: float = 0.25, min_slack: int = 64):
        self.model = model
        self.device = input_device(model)
        self.cache = _cache_compat.new_cache(model)
        self.cache_keyword = _cache_compat.cache_keyword(model)
        self.window = None  # sliding window (set after the first forward creates the layers)
        self.max_waste, self.min_slack = max_waste, min_slack
        self.live = torch.zeros((batch_size, 0), dtype=torch.bool, device=self.device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self._pending_live = torch.zeros(batch_size, dtype=torch.int64, device=self.device)

    @property
    def num_columns(self) -> int:
        return self.live.shape[1]

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        live: torch.Tensor | None = None,  # [B, T] bool, False = a hole (its logits are garbage)
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Append ``tokens`` to the cache and return their logits [B, T or logits_to_keep, V].

        Live tokens of a row take consecutive positions after its committed and earlier uncommitted ones.
        """
        batch, width = tokens.shape
        window = self.sliding_window()
        if window is not None and self.num_columns + width > window - 1:
            # NOTE: HF slides its window over cache indices and keeps only window - 1 of them; holes would
            # stretch the window, so they go first. The caller keeps rows within the window.
            self.compact()
        if live is None:
            live = torch.ones((batch, width), dtype=torch.bool, device=self.device)
        rank = live.cumsum(-1) - 1  # [B, T] index among this call's live tokens
        position_ids = (self.next_pos + self._pending_live)[:, None] + rank.clamp(min=0)
        self.live = torch.cat([self.live, live], dim=1)
        self._pending_live += live.sum(-1)
        kwargs = {self.cache_keyword: self.cache, "use_cache": True}
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(input_ids=tokens, attention_mask=self.live, position_ids=position_ids, **kwargs)
        return out.logits

    def commit(self, keep: torch.Tensor, dead_tail: int | None = None) -> None:
        """Keep the first ``keep[b]`` live tokens appended since the last commit; the rest become holes.

        keep: [B] int64, at most the live tokens appended. Crops columns that are holes in every row
        off the end of the cache. ``dead_tail``: how many trailing columns are holes in every row after
        this commit, when the caller knows it (else it is read from the device: one host sync).
        """
        keep = keep.to(self.device, torch.int64)
        # NOTE: counted from the end, so a compaction between forward() and commit() changes nothing.
        after = self.live.flip(-1).cumsum(-1).flip(-1)  # [B, S] live columns at or after each column
        self.live &= ~(after <= (self._pending_live - keep)[:, None])
        self.next_pos += keep
        self._pending_live.zero_()
        if dead_tail is None:
            used = self.live.any(0).nonzero()
            dead_tail = self.num_columns - (int(used[-1]) + 1 if used.numel() else 0)
        if dead_tail:
            _cache_compat.crop_tail(self.cache, dead_tail)
            self.live = self.live[:, : self.num_columns - dead_tail]

    def maybe_compact(self, longest: int | None = None) -> bool:
        """Compact when the holes exceed the waste bound; returns whether it did.

        ``longest``: the most live tokens of any row, when the caller knows it (else read from the device).
        """
        if longest is None:
            longest = int(self.live.sum(-1).max()) if self.live.numel() else 0
        allowed = longest + max(math.ceil(self.max_waste * longest), self.min_slack)
        if self.num_columns <= allowed:
            return False
        self.compact(longest=longest)
        return True

    def compact(self, rows: torch.Tensor | None = None, longest: int | None = None) -> None:
        """Keep batch ``rows`` ([B_out] int64, None = all) and remove every hole column they share.

        Each row's live columns are right-aligned in ``S_out = max live count`` columns; ``longest``
        gives that count when the caller knows it (else it is read from the device).
        """
        if rows is not None:
            rows = rows.to(self.device)
            self.live = self.live.index_select(0, rows)
            self.next_pos = self.next_pos.index_select(0, rows)
            self._pending_live = self._pending_live.index_select(0, rows)
        batch, width = self.live.shape
        count = self.live.sum(-1)  # [B]
        out_width = (int(count.max()) if batch else 0) if longest is None else longest
        dest = torch.where(self.live, out_width - count[:, None] + self.live.cumsum(-1) - 1, out_width)
        columns = torch.arange(width, device=self.device).expand(batch, width)
        index = torch.full((batch, out_width + 1), -1, dtype=torch.int64, device=self.device)
        index.scatter_(1, dest, columns)  # NOTE: holes all land in the dropped extra column
        index = index[:, :out_width].contiguous()
        if _cache_compat.seq_length(self.cache) > 0:
            _cache_compat.rewrite_layers(self.cache, rows, index)
        self.live = index >= 0

    @staticmethod
    def concat(runners: list[CachedLM]) -> CachedLM:
        """One runner over the rows of ``runners`` (same model), in order; caches are left-padded with
        holes to a common width, so every row keeps its positions and attends to what it did before."""
        first = runners[0]
        if len(runners) == 1:
            return first
        width = max(r.num_columns for r in runners)
        out = CachedLM(first.model, 0, max_waste=first.max_waste, min_slack=first.min_slack)
        pad = lambda t, r, value: torch.nn.functional.pad(t, (width - r.num_columns, 0), value=value)  # noqa: E731
        out.live = torch.cat([pad(r.live, r, False) for r in runners], dim=0)
        out.next_pos = torch.cat([r.next_pos for r in runners])
        out._pending_live = torch.cat([r._pending_live for r in runners])
        out.cache = _cache_compat.concat_layers(
            [r.cache for r in runners], [r.live.shape[0] for r in runners], width
        )
        return out

    def sliding_window(self) -> int | None:
        if self.window is None and self.cache.layers:
            self.window = _cache_compat.sliding_window_of(self.cache) or 0
        return self.window or None
