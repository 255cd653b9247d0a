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

from dataclasses import dataclass, field

import torch


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

    def context(self, row: int) -> torch.Tensor:
        """[n] int64: row ``row``'s context tokens (padding excluded, pending token included)."""
        return self.tokens[row, int(self.pad[row]) : int(self.length[row])].clone()
