"""The contract between a draft model and the engine.

A draft keeps per-batch state (its caches) in a :class:`DraftState` returned by :meth:`DraftModel.begin`;
:meth:`DraftModel.propose` extends every row's context by up to ``num_tokens`` draft tokens and
:meth:`DraftModel.advance` commits what verification kept, rolling the caches back past it. Between steps
requests join and leave the engine's batch through the state's own row operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DraftState(Protocol):
    """A draft's per-batch state (its caches): made by :meth:`DraftModel.begin`, passed back to the draft.

    Its row operations let requests join and leave a running batch between steps. Every kept row keeps
    its slots, caches and positions, so it computes what it would compute alone. (A state without them is
    rebuilt instead: ``begin`` over every row's context gives the state the rows would have had.)
    """

    def select(self, rows: Sequence[int]) -> DraftState:
        """The state of batch rows ``rows`` (host indices, repeats allowed), in that order."""
        ...

    def concat(self, others: Sequence[DraftState]) -> DraftState:
        """One state holding this state's rows, then those of each of ``others`` (same draft), in order."""
        ...

    def with_capacity(self, capacity: int) -> DraftState:
        """This state with room for at least ``capacity`` slots per row (static shapes for CUDA graphs)."""
        ...


@dataclass
class Proposal:
    """One step of drafts for a batch.

    Attributes
    ----------
    tokens : torch.Tensor
        [B, k] int64; entries ``j >= num_draft[b]`` are 0 and must be ignored.
    probs : torch.Tensor or None
        [B, k, V] float32: the processed q each token was sampled from (rows with temperature 0 hold
        a one-hot of the token; entries ``j >= num_draft[b]`` are zero). None when every row is greedy.
    num_draft : torch.Tensor
        [B] int64: drafts actually proposed (<= requested; a confidence stop may cut).
    exits : torch.Tensor
        [B, k] int64: layer count of the exit each token used (e.g. 6, 9, 12); -1 = no draft.
    confidence : torch.Tensor
        [B, k] float32: confidence at the chosen exit (0 where no draft).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None
    num_draft: torch.Tensor
    exits: torch.Tensor
    confidence: torch.Tensor


@runtime_checkable
class DraftMask(Protocol):
    """Which tokens some rows may draft at each position (a grammar): ``propose(..., logits_mask=)``.

    The masked rows draft from their exit's distribution restricted to the allowed tokens (q is that
    restricted distribution, so verification stays exact); the other rows draft as without a mask.
    """

    rows: torch.Tensor  # [R] int64 (draft device): the masked rows of the batch, distinct

    def allowed(self, position: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """[R, V] bool (True = allowed) for draft position ``position``, given ``tokens`` [B, position] int64:
        every row's drafts before it (entries of rows that stopped drafting are meaningless). None: no
        constraint at this position."""
        ...


@runtime_checkable
class DraftModel(Protocol):
    """What the driver needs from a draft model (``SortedDraft``, ``HFDraft``)."""

    vocab_size: int
    exits: tuple[int, ...]  # (num_layers,) for a plain draft
    device: torch.device

    def begin(
        self,
        input_ids: torch.Tensor,  # [B, L] int64, left-padded
        attention_mask: torch.Tensor | None,  # [B, L], 1 = token
        max_length: int,
    ) -> DraftState:
        """Prefill the prompt; caches are allocated for ``max_length`` tokens per row.

        Raises ValueError if ``max_length`` exceeds the model's context.
        """
        ...

    def propose(
        self,
        state: DraftState,
        num_tokens: int,
        num_draft: torch.Tensor,  # [B] int64 in 0..num_tokens
        *,
        temperature: torch.Tensor,  # [B] float32, 0 = argmax drafting
        top_k: torch.Tensor,  # [B] int64, 0 = off
        top_p: torch.Tensor,  # [B] float32, 1 = off
        seeds: torch.Tensor,  # [B] int64
        offsets: torch.Tensor,  # [B] int64
        thresholds: torch.Tensor | None = None,  # [B, n_exits] float32
        stop_threshold: torch.Tensor | None = None,  # [B] float32
        logits_mask: DraftMask | None = None,
    ) -> Proposal:
        """Propose up to ``num_tokens`` tokens continuing each row's context.

        A draft that supports ``logits_mask`` says so with ``supports_logits_mask = True``.
        Raises ValueError if a row would exceed ``max_length``.
        """
        ...

    def advance(
        self,
        state: DraftState,
        num_accepted: torch.Tensor,  # [B] int64/int32
        emitted: torch.Tensor,  # [B] int64
        active: torch.Tensor | None = None,  # [B] bool
    ) -> None:
        """Row b's context += proposal.tokens[b, :num_accepted[b]] + [emitted[b]]; inactive rows unchanged."""
        ...
