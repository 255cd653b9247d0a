"""``StepReadout``: what one step reads back from the device, packed into one copy.

The step's results are gathered on the draft's device as the targets verify their rows, then read in one
``[B, W]`` int64 copy (:func:`s2d_ext.engine.host_reads.read`). Per draft row, with ``k`` the step's
longest draft and ``n`` the most top log-probabilities a running request asks for::

    columns                        holds
    [0, k + 1)                     tokens      verify's out: accepted drafts, the emitted token, then -1
    k + 1                          n_accepted  drafts accepted
    k + 2                          n_proposed  drafts the draft made
    [k + 3, 2k + 3)                exits       exit layer of each draft (-1: none)
    2k + 3                         blocked     first position the processors masked entirely (k + 1: none)
    [2k + 4, 2k + 4 + (k+1)(1+2n)) logprobs    float64 bits (only when a request asks for them)

On the host, :meth:`StepReadout.row` names the fields of a row; nothing else knows the offsets.
"""

from __future__ import annotations

from typing import Any

import torch

from s2d_ext.engine import host_reads
from s2d_ext.engine.logprobs import block_width


class StepReadout:
    """The step's results of every draft row: scattered in per target on the device, read once.

    Parameters
    ----------
    batch : int
        Rows of the draft's batch.
    k : int
        The step's longest draft.
    top_n : int
        The most top log-probabilities a running request asks for; -1: no request asks for any.
    device : torch.device
        The draft's device.
    """

    def __init__(self, batch: int, k: int, top_n: int, device: torch.device) -> None:
        self.k, self.top_n = k, top_n
        self.tokens = torch.full((batch, k + 1), -1, dtype=torch.int64, device=device)  # [B, k+1]
        self.n_accepted = torch.zeros(batch, dtype=torch.int64, device=device)  # [B]
        self.blocked = torch.full((batch,), k + 1, dtype=torch.int64, device=device)  # [B]
        width = block_width(k, top_n) if top_n >= 0 else 0
        self.logprobs = torch.zeros((batch, width), dtype=torch.float64, device=device) if width else None
        self._columns = _Columns(k)
        self._rows: list[RowReadout] = []

    def scatter(
        self,
        rows: torch.Tensor,  # [b] int64 on the draft's device: a target's rows in the draft's batch
        tokens: torch.Tensor,  # [b, w+1] int64: verify's out for drafts of width w <= k
        n_accepted: torch.Tensor,  # [b] int
        blocked: torch.Tensor | None,  # [b] int64, or None: no row was processed
        logprobs: torch.Tensor | None,  # [b, (k+1)(1+2n)] float64, or None
    ) -> None:
        """Write one target's results into its rows."""
        device = self.tokens.device
        self.tokens[rows, : tokens.shape[1]] = tokens.to(device)
        self.n_accepted[rows] = n_accepted.to(device, torch.int64)
        if blocked is not None:
            self.blocked[rows] = blocked.to(device)
        if logprobs is not None:
            self.logprobs[rows] = logprobs.to(device)

    def emitted(self) -> torch.Tensor:
        """[B] int64 on the device: the token each row emitted (0 for rows that ran no verify)."""
        return self.tokens.gather(1, self.n_accepted[:, None]).squeeze(1).clamp(min=0)

    def read(self, num_proposed: torch.Tensor, exits: torch.Tensor) -> None:
        """The one device-to-host read of the step (``num_proposed`` [B], ``exits`` [B, >= k] of the
        proposal); :meth:`row` then answers on the host."""
        parts = [  # NOTE: in the order of the module docstring's table (_Columns)
            self.tokens,
            self.n_accepted[:, None],
            num_proposed.to(torch.int64)[:, None],
            exits[:, : self.k],
            self.blocked[:, None],
        ]
        if self.logprobs is not None:
            parts.append(self.logprobs.view(torch.int64))
        self._rows = [RowReadout(line, self._columns) for line in host_reads.read(torch.cat(parts, dim=1))]

    def row(self, i: int) -> RowReadout:
        """Row ``i`` of the read, by field."""
        return self._rows[i]


class _Columns:
    """Where each field of a packed row starts (the module docstring's table, for a step's ``k``)."""

    __slots__ = ("n_accepted", "n_proposed", "exits", "blocked", "logprobs")

    def __init__(self, k: int) -> None:
        self.n_accepted = k + 1  # after the k + 1 tokens
        self.n_proposed = k + 2
        self.exits = k + 3  # k of them
        self.blocked = 2 * k + 3
        self.logprobs = 2 * k + 4  # to the end of the row


class RowReadout:
    """One row of a :class:`StepReadout` after the read (host values).

    Attributes
    ----------
    tokens : list of int
        The accepted drafts and the emitted token; cut before the first position the processors masked
        entirely (``blocked``).
    n_accepted, n_proposed : int
        Drafts accepted / proposed.
    exits : list of int
        The exit layer of each of the ``n_proposed`` drafts.
    blocked : bool
        Whether the processors masked every token at a position this row would emit.
    logprobs : list of float
        The row's log-probability block (see :mod:`s2d_ext.engine.logprobs`).
    """

    __slots__ = ("_line", "_columns", "tokens", "n_accepted", "n_proposed", "blocked")

    def __init__(self, line: list[Any], columns: _Columns) -> None:
        self._line, self._columns = line, columns
        self.n_accepted, self.n_proposed = line[columns.n_accepted], line[columns.n_proposed]
        first_blocked = line[columns.blocked]
        self.blocked = first_blocked <= self.n_accepted
        self.tokens = line[: first_blocked if self.blocked else self.n_accepted + 1]

    @property
    def exits(self) -> list[int]:
        start = self._columns.exits
        return self._line[start : start + self.n_proposed]

    @property
    def logprobs(self) -> list[float]:
        return host_reads.bits_to_floats(self._line[self._columns.logprobs :])
