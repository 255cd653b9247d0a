"""``DraftBatch``: the draft's one batch over every running request, whatever its target.

The draft proposes for all rows at once, each row with its own request's sampling settings and its
target's exit thresholds and stop threshold (:meth:`DraftBatch.propose`). Requests join and leave between
steps through the draft state's own row operations (:class:`~s2d_ext.draft.protocol.DraftState`: ``concat``,
``select``, ``with_capacity``); a state without them is rebuilt over every row's context instead. With
static draft shapes the batch is padded with idle rows (copies of row 0 that never draft) to a multiple.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from s2d_ext.draft.protocol import DraftState, Proposal
from s2d_ext.engine import host_reads
from s2d_ext.engine.readout import StepReadout
from s2d_ext.engine.request import Request
from s2d_ext.engine.target_batch import left_padded

PADDING = "padding"  # the finish reason of an idle row (static draft shapes)


class DraftBatch:
    """The draft's state and its rows, in state order.

    Parameters
    ----------
    draft : DraftModel
    thresholds : dict of str to tuple of float or None
        Exit thresholds of each target's rows (None: the draft's own).
    stop_thresholds : dict of str to float or None
        Each target's confidence stop (None: no stop).
    multiple, capacity : int, optional
        Static shapes: rows padded to a multiple of ``multiple``, at least ``capacity`` slots per row.
    """

    def __init__(
        self,
        draft: Any,
        thresholds: Mapping[str, tuple[float, ...] | None],
        stop_thresholds: Mapping[str, float | None],
        multiple: int | None,
        capacity: int | None,
    ) -> None:
        self.draft = draft
        self.thresholds, self.stop_thresholds = dict(thresholds), dict(stop_thresholds)
        self.multiple, self.capacity = multiple, capacity
        self.rows: list[Request] = []  # the state's rows, in order (idle padding rows included)
        self.state: Any = None
        self.arguments: dict[str, Any] = {}  # propose()'s per-row arguments

    # ------------------------------------------------------------------------------------------- step
    def propose(self, n_draft: list[int], logits_mask: Any = None) -> Proposal:
        """Drafts of every row, ``n_draft[i]`` for row i (0: none); ``logits_mask`` (a
        :class:`~s2d_ext.draft.protocol.DraftMask`, or None) keeps some rows' drafts inside their grammar."""
        device = self.draft.device
        return self.draft.propose(
            self.state,
            max(n_draft),
            host_reads.to_device(n_draft, torch.int64, device),
            offsets=host_reads.to_device([r.steps for r in self.rows], torch.int64, device),
            **self.arguments,
            **({} if logits_mask is None else {"logits_mask": logits_mask}),
        )

    def advance(self, readout: StepReadout, advancing: list[bool]) -> None:
        """The ``advancing`` rows (the ones that go on) take their accepted drafts and emitted token into the
        draft's context."""
        active = host_reads.to_device(advancing, torch.bool, self.draft.device)
        self.draft.advance(self.state, readout.n_accepted, readout.emitted(), active)

    # ------------------------------------------------------------------------------ joins and leaves
    def prefill(self, joining: list[Request]) -> Any:
        """A state of ``joining``'s prompts (None when the whole batch will be rebuilt in :meth:`append`)."""
        if self.state is not None and self.rows and not isinstance(self.state, DraftState):
            return None
        return self._begin([r.prompt for r in joining], joining)

    def append(self, joining: list[Request], state: Any) -> None:
        """Rows prefilled by :meth:`prefill` join the batch (after the current rows)."""
        if self.state is None or not self.rows:
            self.state, self.rows = state, list(joining)
        elif isinstance(self.state, DraftState):
            self.state, self.rows = self.state.concat([state]), self.rows + list(joining)
        else:
            self.rows = self.rows + list(joining)
            self.state = self._rebuild()
        if self.capacity and isinstance(self.state, DraftState):
            self.state = self.state.with_capacity(self.capacity)
        self._pad()

    def drop_finished(self) -> None:
        """Drop the finished rows (a cache gather) and pad again."""
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        rows = [self.rows[i] for i in keep]
        if not rows:
            self.state, self.rows = None, []
        elif isinstance(self.state, DraftState):
            self.state, self.rows = self.state.select(keep), rows
        else:
            self.rows = rows
            self.state = self._rebuild()
        self._pad()

    def refresh(self) -> None:
        """Each row's index and the per-row arguments of propose, rebuilt whenever the batch changes."""
        rows, device = self.rows, self.draft.device
        for i, r in enumerate(rows):
            r.draft_row = i
        if not rows:
            self.arguments = {}
            return
        own = getattr(self.draft, "thresholds", None)
        n_exits = len(self.draft.exits)
        thresholds = [self.thresholds[r.target] for r in rows]
        stops = [self.stop_thresholds[r.target] for r in rows]
        self.arguments = {
            "temperature": host_reads.to_device([r.params.temperature for r in rows], torch.float32, device),
            "top_k": host_reads.to_device([r.params.top_k for r in rows], torch.int64, device),
            "top_p": host_reads.to_device([r.params.top_p for r in rows], torch.float32, device),
            "seeds": host_reads.to_device([r.seed for r in rows], torch.int64, device),
            "thresholds": host_reads.to_device(
                [list(t if t is not None else (own or [0.0] * n_exits)) for t in thresholds],
                torch.float32,
                device,
            )
            if any(t is not None for t in thresholds)
            else None,
            "stop_threshold": host_reads.to_device([s or 0.0 for s in stops], torch.float32, device)
            if any(s is not None for s in stops)
            else None,
        }

    def _pad(self) -> None:
        """Idle rows (copies of row 0, never drafting) up to a multiple of ``multiple``."""
        missing = -len(self.rows) % self.multiple if self.multiple and self.rows else 0
        if not missing or not isinstance(self.state, DraftState):
            return
        self.state = self.state.concat([self.state.select([0] * missing)])
        first = self.rows[0]
        for _ in range(missing):
            idle = Request(PADDING, first.target, first.params, [], 0, [], 0)
            idle.finished, idle.reason = True, PADDING
            self.rows.append(idle)

    def _rebuild(self) -> Any:
        """A fresh state over every row's context (drafts whose state has no row operations)."""
        return self._begin([r.prompt + r.generated for r in self.rows], self.rows)

    def _begin(self, contexts: list[list[int]], requests: list[Request]) -> Any:
        ids, mask, _ = left_padded(contexts)
        max_length = max(len(r.prompt) + r.params.max_new_tokens for r in requests)
        device = self.draft.device
        return self.draft.begin(ids.to(device), mask.to(device), max_length)
