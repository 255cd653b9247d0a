"""Rows joining and leaving a draft's batch state between steps (continuous batching).

A draft state (:class:`~s2d_ext.draft.static_cache.SortedDraftState`,
:class:`~s2d_ext.draft.hf_draft.HFDraftState`) is made for one batch by ``draft.begin``. The engine
prefills joining requests in a batch of their own and then :func:`concat_states` them onto the running
batch; finished rows leave through :func:`select_rows`. Both leave every kept row's slots, caches and
positions as they were, so a row computes what it would compute alone.

Draft states of other draft classes are rebuilt instead: ``draft.begin`` on every row's current context
(prompt + generated tokens) gives the state the row would have had (:func:`supports_row_ops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from s2d_ext.target import CachedLM


def supports_row_ops(state: Any) -> bool:
    from s2d_ext.draft.hf_draft import HFDraftState
    from s2d_ext.draft.static_cache import SortedDraftState

    return isinstance(state, (SortedDraftState, HFDraftState))


def select_rows(state: Any, rows: torch.Tensor) -> Any:
    """The state of batch rows ``rows`` ([B_out] int64 on the state's device), in that order."""
    from s2d_ext.draft.hf_draft import HFDraftState
    from s2d_ext.draft.static_cache import SortedDraftState

    if isinstance(state, SortedDraftState):
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        return SortedDraftState(
            batch_size=int(rows.numel()),
            capacity=state.capacity,
            max_length=state.max_length,
            tokens=pick(state.tokens),
            length=pick(state.length),
            pad=pick(state.pad),
            filled=state.filled.index_select(1, rows),
            k_cache=[pick(t) for t in state.k_cache],
            v_cache=[pick(t) for t in state.v_cache],
            hidden=[None if t is None else pick(t) for t in state.hidden],
            last_num_draft=pick(state.last_num_draft),
            steps=state.steps,
        )
    if isinstance(state, HFDraftState):
        state.runner.compact(rows)
        return HFDraftState(
            runner=state.runner,
            pending=state.pending.index_select(0, rows),
            pending_live=state.pending_live.index_select(0, rows),
            max_length=state.max_length,
        )
    raise TypeError(f"cannot select rows of a {type(state).__name__}")


def with_capacity(state: Any, capacity: int) -> Any:
    """``state`` with at least ``capacity`` slots per row (static shapes for CUDA graphs)."""
    from s2d_ext.draft.static_cache import SortedDraftState

    if not isinstance(state, SortedDraftState) or state.capacity >= capacity:
        return state
    return concat_states([state], [0], min_capacity=capacity)


def concat_states(states: Sequence[Any], max_pads: Sequence[int], min_capacity: int = 0) -> Any:
    """One state holding the rows of ``states`` in order.

    ``max_pads[i]`` is the largest left padding of ``states[i]``'s rows (known to the caller, so no
    device read is needed here). ``min_capacity``: slots per row at least (SortedDraftState).
    """
    from s2d_ext.draft.hf_draft import HFDraftState
    from s2d_ext.draft.static_cache import SortedDraftState

    first = states[0]
    if len(states) == 1 and (not isinstance(first, SortedDraftState) or first.capacity >= min_capacity):
        return first
    if isinstance(first, SortedDraftState):
        max_length = max(s.max_length for s in states)
        # NOTE: slot = pad + position, so a row keeps its slots; only the capacity (and with it the
        # trash slot, always the last one) grows to fit every row's pad + max_length.
        capacity = max(max(s.capacity for s in states), max(max_pads) + max_length, min_capacity)
        widen = lambda t, s: _widen_slots(t, s.capacity, capacity)  # noqa: E731
        cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731
        n_layers, n_groups = len(first.k_cache), len(first.hidden)
        return SortedDraftState(
            batch_size=sum(s.batch_size for s in states),
            capacity=capacity,
            max_length=max_length,
            tokens=cat([widen(s.tokens, s) for s in states]),
            length=cat([s.length for s in states]),
            pad=cat([s.pad for s in states]),
            filled=torch.cat([s.filled for s in states], dim=1),
            k_cache=[cat([widen(s.k_cache[i], s) for s in states]) for i in range(n_layers)],
            v_cache=[cat([widen(s.v_cache[i], s) for s in states]) for i in range(n_layers)],
            hidden=[
                None if first.hidden[g] is None else cat([widen(s.hidden[g], s) for s in states])
                for g in range(n_groups)
            ],
            last_num_draft=cat([s.last_num_draft for s in states]),
            steps=max(s.steps for s in states),
        )
    if isinstance(first, HFDraftState):
        return HFDraftState(
            runner=CachedLM.concat([s.runner for s in states]),
            pending=torch.cat([s.pending for s in states], dim=0),
            pending_live=torch.cat([s.pending_live for s in states], dim=0),
            max_length=max(s.max_length for s in states),
        )
    raise TypeError(f"cannot concatenate states of type {type(first).__name__}")


def _widen_slots(t: torch.Tensor, capacity: int, new_capacity: int) -> torch.Tensor:
    """[B, ..., capacity + 1, ...] -> [B, ..., new_capacity + 1, ...]: the slot dim is the one of size
    capacity + 1 (dim 1 for tokens / hidden, dim 2 for KV caches); new slots, trash included, are zero."""
    if new_capacity == capacity:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = new_capacity + 1
    out = t.new_zeros(shape)
    out.narrow(dim, 0, capacity).copy_(t.narrow(dim, 0, capacity))
    return out
