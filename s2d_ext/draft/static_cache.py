"""The per-batch state of a :class:`~s2d_ext.SortedDraft`: static KV caches and deferred hidden states.

Slot layout
-----------
Row ``b`` of every buffer is indexed by *slot*: the position in the left-padded batch. Slots
``[0, pad[b])`` are padding (never attended), slot ``length[b] - 1`` holds the row's last context
token, which the draft has not fed yet (it is the input of the next draft step). Every buffer has
one extra *trash* slot at index ``capacity``: writes of padded window entries go there, so they never
collide with real slots, and no query ever attends to it.

Deferred KV fill
----------------
The layers between two exits form a *group*. ``filled[g, b]`` counts the slots whose keys and values
are in group ``g``'s caches. A token that exits at exit ``g`` leaves groups ``g+1..`` behind; its
output hidden state stays in ``hidden[g+1]`` (the input buffer of group ``g+1``), and the next time
group ``g+1`` runs it processes every slot in ``[filled[g+1], filled[g])`` at once, so deeper layers
always see the full context. The lag is capped (``max_deferred``): a group whose lag exceeds it runs
even if no row needs its exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from s2d_ext._transfer import to_device


@dataclass
class SortedDraftState:
    """Caches and bookkeeping of one batch (create with :meth:`SortedDraft.begin`).

    Attributes
    ----------
    batch_size, capacity, max_length : int
        Rows; usable slots per row; tokens per row the caller declared (prompt + generated + drafts).
    tokens : torch.Tensor
        [B, S+1] int64: the token at each slot (context, then the last step's drafts).
    length : torch.Tensor
        [B] int64: slots in use (padding included); ``length - 1`` is the pending token's slot.
    pad : torch.Tensor
        [B] int64: left-padding slots of each row.
    filled : torch.Tensor
        [G, B] int64: slots whose KV is in each exit group's caches.
    k_cache, v_cache : list of torch.Tensor
        Per layer [B, Hkv, S+1, hd], keys after RoPE as transformers stores them.
    hidden : list of torch.Tensor or None
        Per group, the input hidden states [B, S+1, d] (None for group 0, whose input is the embedding).
    last_num_draft : torch.Tensor
        [B] int64: drafts the last ``propose`` made (bounds ``num_accepted`` in ``advance``).
    steps : int
        Proposals made so far.
    pads : list of int
        ``pad`` on the host (joins size the slots with it, without reading the device).
    """

    batch_size: int
    capacity: int
    max_length: int
    tokens: torch.Tensor
    length: torch.Tensor
    pad: torch.Tensor
    filled: torch.Tensor
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    hidden: list[torch.Tensor | None]
    last_num_draft: torch.Tensor
    steps: int = field(default=0)
    pads: list[int] = field(default_factory=list)

    @property
    def trash_slot(self) -> int:
        return self.capacity

    @property
    def num_tokens(self) -> torch.Tensor:
        """[B] int64: context tokens per row (padding excluded)."""
        return self.length - self.pad

    @staticmethod
    def allocate(
        batch_size: int,
        capacity: int,
        max_length: int,
        num_layers: int,
        num_groups: int,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> SortedDraftState:
        slots = capacity + 1  # + the trash slot
        cache_shape = (batch_size, num_kv_heads, slots, head_dim)
        # NOTE: zero-filled (not empty): masked slots still enter the attention average with weight 0,
        # and 0 * NaN garbage would poison it.
        return SortedDraftState(
            batch_size=batch_size,
            capacity=capacity,
            max_length=max_length,
            tokens=torch.zeros((batch_size, slots), dtype=torch.int64, device=device),
            length=torch.zeros((batch_size,), dtype=torch.int64, device=device),
            pad=torch.zeros((batch_size,), dtype=torch.int64, device=device),
            filled=torch.zeros((num_groups, batch_size), dtype=torch.int64, device=device),
            k_cache=[torch.zeros(cache_shape, dtype=dtype, device=device) for _ in range(num_layers)],
            v_cache=[torch.zeros(cache_shape, dtype=dtype, device=device) for _ in range(num_layers)],
            hidden=[None]
            + [
                torch.zeros((batch_size, slots, hidden_size), dtype=dtype, device=device)
                for _ in range(num_groups - 1)
            ],
            last_num_draft=torch.zeros((batch_size,), dtype=torch.int64, device=device),
        )

    # ----------------------------------------------------------------- row operations (DraftState)
    def select(self, rows: Sequence[int]) -> SortedDraftState:
        """The state of rows ``rows`` (host indices), in that order; each keeps its slots and caches."""
        index = to_device(list(rows), torch.int64, self.length.device)
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return SortedDraftState(
            batch_size=len(rows),
            capacity=self.capacity,
            max_length=self.max_length,
            tokens=pick(self.tokens),
            length=pick(self.length),
            pad=pick(self.pad),
            filled=self.filled.index_select(1, index),
            k_cache=[pick(t) for t in self.k_cache],
            v_cache=[pick(t) for t in self.v_cache],
            hidden=[None if t is None else pick(t) for t in self.hidden],
            last_num_draft=pick(self.last_num_draft),
            steps=self.steps,
            pads=[self.pads[i] for i in rows],
        )

    def concat(self, others: Sequence[SortedDraftState]) -> SortedDraftState:
        """This state's rows, then each of ``others``' rows, in one state."""
        states = [self, *others]
        max_length = max(s.max_length for s in states)
        # NOTE: slot = pad + position, so a row keeps its slots; only the capacity (and with it the
        # trash slot, always the last one) grows to fit every row's pad + max_length.
        capacity = max(max(s.capacity for s in states), max(max(s.pads) for s in states) + max_length)
        return _joined(states, capacity, max_length)

    def with_capacity(self, capacity: int) -> SortedDraftState:
        """This state with at least ``capacity`` slots per row."""
        return self if self.capacity >= capacity else _joined([self], capacity, self.max_length)

    def context(self, row: int) -> torch.Tensor:
        """[n] int64: row ``row``'s context tokens (padding excluded, pending token included)."""
        return self.tokens[row, int(self.pad[row]) : int(self.length[row])].clone()


def _joined(states: Sequence[SortedDraftState], capacity: int, max_length: int) -> SortedDraftState:
    """The rows of ``states`` in one state of ``capacity`` slots per row."""
    first = states[0]
    widen = lambda t, s: _widen_slots(t, s.capacity, capacity)  # noqa: E731
    cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731
    return SortedDraftState(
        batch_size=sum(s.batch_size for s in states),
        capacity=capacity,
        max_length=max_length,
        tokens=cat([widen(s.tokens, s) for s in states]),
        length=cat([s.length for s in states]),
        pad=cat([s.pad for s in states]),
        filled=torch.cat([s.filled for s in states], dim=1),
        k_cache=[cat([widen(s.k_cache[i], s) for s in states]) for i in range(len(first.k_cache))],
        v_cache=[cat([widen(s.v_cache[i], s) for s in states]) for i in range(len(first.v_cache))],
        hidden=[
            None if first.hidden[g] is None else cat([widen(s.hidden[g], s) for s in states])
            for g in range(len(first.hidden))
        ],
        last_num_draft=cat([s.last_num_draft for s in states]),
        steps=max(s.steps for s in states),
        pads=[p for s in states for p in s.pads],
    )


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
