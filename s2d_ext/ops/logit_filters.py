"""The target processing every verify backend shares: sanitising, temperature and the top-k / top-p threshold.

``s2d_ext.ops.verify`` computes ``min_logit`` here once per call, whatever the backend, and the kernels only
compare against it; the reference (:mod:`s2d_ext.ops.verify_reference`) uses the same functions, so the two
can never disagree on which tokens a filter keeps.

Definitions (transformers' order): ``scores = logits / temperature`` (rows with temperature 0 are scaled by
1); top-k keeps scores >= the k-th largest; top-p then keeps the smallest prefix of the sorted distribution
whose mass before the token is < top_p (the most likely token always stays). Non-finite logits: NaN counts as
``-inf``, ``+inf`` as the largest finite float32, and a row whose logits are all ``-inf`` is uniform.
"""

from __future__ import annotations

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


def sanitize(scores: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf -> float32 max; all-(-inf) rows of the last dim become all zeros."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=FLOAT32_MAX, neginf=float("-inf"))
    dead = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    return torch.where(dead, torch.zeros_like(scores), scores)


def scaled_scores(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / temperature`` per row, sanitised.

    logits: [B, P, V] (any float dtype); temperature: [B] float32, 0 rows are scaled by 1.
    """
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    return sanitize(logits.float() / safe_t[:, None, None])


def logit_threshold(
    target_logits: torch.Tensor,  # [B, P, V]
    temperature: torch.Tensor,  # [B] float32
    top_k: torch.Tensor,  # [B] int64, 0 = off
    top_p: torch.Tensor,  # [B] float32, 1 = off
) -> torch.Tensor:
    """The per-position ``min_logit`` [B, P] float32 that implements top-k then top-p.

    Scaled scores below it are removed. ``-inf`` where the row is greedy or has neither filter.
    """
    batch, positions, vocab = target_logits.shape
    scores = scaled_scores(target_logits, temperature)
    ordered = scores.sort(dim=-1, descending=True).values  # [B, P, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = ordered.gather(-1, (k - 1)[:, None, None].expand(batch, positions, 1)).squeeze(-1)
    rank = torch.arange(vocab, device=scores.device)
    in_top_k = rank[None, None, :] < k[:, None, None]
    probs = torch.softmax(ordered.masked_fill(~in_top_k, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly earlier (larger) tokens
    # NOTE: top_p == 1 disables top-p even where float rounding makes the cumulative mass reach 1
    # before the last token (it would otherwise drop tail tokens of a top-k-only row).
    top_p_off = (top_p >= 1)[:, None, None]
    kept = ((mass_before < top_p[:, None, None].float()) | top_p_off) & in_top_k
    kept[..., 0] = True  # the most likely token is always kept
    last_kept = kept.sum(dim=-1, keepdim=True) - 1
    top_p_min = ordered.gather(-1, last_kept).squeeze(-1)
    threshold = torch.maximum(kth, top_p_min)
    active = (temperature > 0) & ((top_k > 0) | (top_p < 1))
    return torch.where(active[:, None], threshold, torch.full_like(threshold, float("-inf")))
