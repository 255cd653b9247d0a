"""Temperature, top-k, top-p and min-p on logits, in transformers' order and with its tie rules.

The verify op applies temperature / top-k / top-p itself. The engine needs them in PyTorch in two cases
only: rows with ``min_p`` (the op has no min-p, and min-p must come after top-p, whose mass it would
otherwise change, so such rows get all three filters here and reach the op with top-k / top-p off), and
the log-probabilities of emitted tokens (the distribution each token was actually drawn from).
"""

from __future__ import annotations

import torch


def filtered_scores(
    logits: torch.Tensor,  # [N, V] float, processed
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
) -> torch.Tensor:
    """[N, V] float32 ``logits / temperature`` with filtered tokens at ``-inf`` (temperature 0: logits).

    Filters apply only when sampling (``temperature > 0``), as in ``generate()``: top-k keeps scores
    ``>=`` the k-th largest (ties kept); top-p removes tokens whose ascending cumulative probability is
    ``<= 1 - top_p`` (the most probable always stays); min-p removes tokens whose probability is below
    ``min_p`` times the top one.
    """
    scores = logits.float()
    if temperature <= 0:
        return scores
    scores = scores / temperature
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = torch.where(scores < kth, neg_inf, scores)
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def min_p_logits(
    logits: torch.Tensor,  # [N, V] float, processed
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
) -> torch.Tensor:
    """[N, V] float32 logits that the op, run with top-k / top-p off, samples exactly as
    ``generate()`` samples with all four settings: filtered tokens are ``-inf``, the rest unscaled."""
    scores = filtered_scores(logits, temperature, top_k, top_p, min_p)
    return torch.where(torch.isneginf(scores), scores, logits.float())
