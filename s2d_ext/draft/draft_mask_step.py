"""One draft position's grammar mask as the exit ops take it: the masked rows and their allowed tokens."""

from __future__ import annotations

import torch

from s2d_ext.draft.protocol import DraftMask


def step_mask(
    logits_mask: DraftMask, j: int, tokens: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([B] bool masked rows, [B, V] bool allowed tokens) at draft position ``j``, or None where no row is
    restricted there; ``tokens`` [B, k] holds each row's drafts so far."""
    allowed_rows = logits_mask.allowed(j, tokens[:, :j])
    if allowed_rows is None:
        return None
    batch, device = tokens.shape[0], tokens.device
    masked = torch.zeros((batch,), dtype=torch.bool, device=device)
    masked[logits_mask.rows] = True
    allowed = torch.ones((batch, vocab), dtype=torch.bool, device=device)
    allowed[logits_mask.rows] = allowed_rows.to(device)
    return masked, allowed
