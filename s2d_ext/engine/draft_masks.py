"""The draft's share of a step's grammar masks: which tokens each constrained row may draft.

A request whose processors include one with ``draft_allowed(generated, committed) -> [V] bool or None``
(:class:`~s2d_ext.engine.grammar.GrammarProcessor`) drafts inside its grammar: :func:`draft_mask_for` gives
the draft a :class:`~s2d_ext.draft.protocol.DraftMask` over those rows, whose mask at draft position ``j``
is the one the target's processor will apply at verified position ``j`` (same prefix: the request's tokens
plus the step's drafts before ``j``), so drafts the grammar refuses are never proposed. It is a speed-up
only: q stays the distribution each draft was sampled from, so verification is exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class StepDraftMask:
    """A :class:`~s2d_ext.draft.protocol.DraftMask` for one step over ``requests`` (the draft's rows
    ``rows``): each row's allowed tokens after its generated tokens + its drafts so far."""

    def __init__(self, rows: list[int], requests: list[Any], device: torch.device, vocab_size: int) -> None:
        self.rows = torch.tensor(rows, dtype=torch.int64, device=device)  # [R]
        self._requests = requests
        self._vocab_size = vocab_size

    def allowed(self, position: int, tokens: torch.Tensor) -> torch.Tensor | None:
        drafts = tokens[self.rows, :position].tolist() if position else [[] for _ in self._requests]
        masks = []
        for request, row_drafts in zip(self._requests, drafts):
            generated = request.generated
            mask = None
            for processor in request.processors:
                if not _masks_drafts(processor):
                    continue
                allowed = processor.draft_allowed(generated + row_drafts, len(generated))
                if allowed is not None:
                    mask = allowed if mask is None else mask & allowed
            masks.append(torch.ones(self._vocab_size, dtype=torch.bool) if mask is None else mask)
        return torch.stack(masks)  # [R, V] on the host; the draft moves it


def draft_mask_for(draft: Any, rows: Sequence[Any], vocab_size: int) -> StepDraftMask | None:
    """The step's draft mask over the running ``rows`` (the draft batch's requests, in order) whose
    processors mask drafts; None when there are none or the draft does not take a mask."""
    if not getattr(draft, "supports_logits_mask", False):
        return None
    picked = [
        (i, r) for i, r in enumerate(rows) if not r.finished and any(_masks_drafts(p) for p in r.processors)
    ]
    if not picked:
        return None
    return StepDraftMask([i for i, _ in picked], [r for _, r in picked], draft.device, vocab_size)


def _masks_drafts(processor: Any) -> bool:
    return hasattr(processor, "draft_allowed") and getattr(processor, "mask_drafts", True)
