"""Draft-length policies: how many tokens each row drafts at the next step.

One policy object serves a batch and keeps per-row values as [B] int64 tensors. The driver calls
:meth:`DraftLengthPolicy.initial` once, then :meth:`DraftLengthPolicy.update` after every verification
step, and passes :attr:`DraftLengthPolicy.stop_threshold` to ``propose``.

- ``fixed``: always ``num_draft_tokens``.
- ``heuristic``: transformers' assisted-generation schedule: start at ``num_draft_tokens``, +2 after a
  step whose drafts were all accepted, -1 otherwise, never below 1 nor above ``max_num_draft``
  (default ``max(2 * num_draft_tokens, 16)``). Rows that proposed nothing keep their value.
- ``confidence``: ``num_draft_tokens`` is the cap; the draft stops a row after a token whose chosen
  exit's confidence is below ``stop_threshold`` (default :data:`DEFAULT_STOP_THRESHOLD`).
"""

from __future__ import annotations

import torch

DEFAULT_STOP_THRESHOLD = 0.3
KINDS = ("fixed", "heuristic", "confidence")


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class DraftLengthPolicy:
    """Base: a constant length. Subclasses override :meth:`update`.

    Attributes
    ----------
    num_draft_tokens : int
        The starting (and, for fixed / confidence, the only) length.
    max_tokens : int
        The largest length :meth:`update` may return (the driver's k_max).
    stop_threshold : float or None
        Confidence below which a row stops drafting within a step (ConfidenceStop only).
    """

    stop_threshold: float | None = None

    def __init__(self, num_draft_tokens: int) -> None:
        self.num_draft_tokens = _check_count("num_draft_tokens", num_draft_tokens)
        self.max_tokens = self.num_draft_tokens

    def initial(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[B] int64 lengths for the first step."""
        return torch.full((batch_size,), self.num_draft_tokens, dtype=torch.int64, device=device)

    def update(
        self,
        current: torch.Tensor,  # [B] int64, the lengths just requested
        num_accepted: torch.Tensor,  # [B] int, accepted drafts per row
        num_draft: torch.Tensor,  # [B] int, drafts actually proposed per row
    ) -> torch.Tensor:
        """[B] int64 lengths for the next step."""
        return torch.full_like(current, self.num_draft_tokens, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_draft_tokens={self.num_draft_tokens})"


class FixedLength(DraftLengthPolicy):
    """Always ``num_draft_tokens``."""


class HeuristicLength(DraftLengthPolicy):
    """transformers' heuristic: +2 after a fully accepted step, -1 otherwise, within [1, max_num_draft]."""

    def __init__(self, num_draft_tokens: int = 5, max_num_draft: int | None = None) -> None:
        super().__init__(num_draft_tokens)
        if max_num_draft is None:
            max_num_draft = max(2 * self.num_draft_tokens, 16)
        self.max_tokens = _check_count("max_num_draft", max_num_draft)
        if self.max_tokens < self.num_draft_tokens:
            raise ValueError(
                f"max_num_draft={self.max_tokens} must be >= num_draft_tokens={self.num_draft_tokens}"
            )

    def update(self, current, num_accepted, num_draft):  # noqa: D102 (see base)
        current = current.to(torch.int64)
        num_accepted = num_accepted.to(current.device, torch.int64)
        num_draft = num_draft.to(current.device, torch.int64)
        all_accepted = num_accepted >= num_draft
        step = torch.where(all_accepted, torch.full_like(current, 2), torch.full_like(current, -1))
        nxt = (current + step).clamp(min=1, max=self.max_tokens)
        # NOTE: a row that proposed nothing (finished / paused) learned nothing: keep its length.
        return torch.where(num_draft > 0, nxt, current)


class ConfidenceStop(DraftLengthPolicy):
    """Up to ``num_draft_tokens`` per step; a row stops after a token with confidence < stop_threshold."""

    def __init__(self, num_draft_tokens: int, stop_threshold: float = DEFAULT_STOP_THRESHOLD) -> None:
        super().__init__(num_draft_tokens)
        if isinstance(stop_threshold, bool) or not isinstance(stop_threshold, (int, float)):
            raise TypeError(f"stop_threshold must be a float, got {type(stop_threshold).__name__}")
        if not 0.0 <= float(stop_threshold) <= 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1], got {stop_threshold}")
        self.stop_threshold = float(stop_threshold)

    def __repr__(self) -> str:
        return (
            f"ConfidenceStop(num_draft_tokens={self.num_draft_tokens}, stop_threshold={self.stop_threshold})"
        )


def make_policy(
    kind: str,
    num_draft_tokens: int,
    stop_threshold: float | None = None,
    max_num_draft: int | None = None,
) -> DraftLengthPolicy:
    """``"fixed"`` | ``"heuristic"`` | ``"confidence"`` -> a policy object (see the module docstring)."""
    if kind == "fixed":
        return FixedLength(num_draft_tokens)
    if kind == "heuristic":
        return HeuristicLength(num_draft_tokens, max_num_draft=max_num_draft)
    if kind == "confidence":
        threshold = DEFAULT_STOP_THRESHOLD if stop_threshold is None else stop_threshold
        return ConfidenceStop(num_draft_tokens, stop_threshold=threshold)
    raise ValueError(f"draft length policy must be one of {KINDS}, got {kind!r}")
