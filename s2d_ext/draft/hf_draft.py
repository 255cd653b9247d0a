"""A plain Hugging Face causal LM as a draft model: the draft protocol with one exit (vanilla speculation).

Any ``AutoModelForCausalLM`` works (it runs through :class:`s2d_ext.target.CachedLM`, the same hole-aware
cache runner as the target). Llama, Mistral and Qwen2 drafts are faster as
``SortedDraft.from_pretrained(model, exits=(n_layers,))``; :func:`s2d_ext.speculate` picks that when it can.

Per row the state holds a *pending* block of up to two tokens not yet in the draft's cache: the token
emitted by the last verification, preceded by the last accepted draft when the draft never ran it (all
drafts accepted). ``propose`` runs the pending block, then one token at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from s2d_ext._transfer import to_device
from s2d_ext.draft.protocol import DraftMask, Proposal
from s2d_ext.ops.exit_sample import sample_logits
from s2d_ext.target import CachedLM, context_length, input_device, output_vocab_size


@dataclass
class HFDraftState:
    runner: CachedLM
    pending: torch.Tensor  # [B, 2] int64, right-aligned
    pending_live: torch.Tensor  # [B, 2] bool
    max_length: int
    last_tokens: torch.Tensor | None = None  # [B, k] int64 drafts of the last proposal
    fed: torch.Tensor | None = None  # [B] int64 drafts of the last proposal that went through the model

    # ----------------------------------------------------------------- row operations (DraftState)
    def select(self, rows: Sequence[int]) -> HFDraftState:
        """The state of rows ``rows`` (host indices), in that order. NOTE: the runner is compacted in place
        (it reads its live counts once), so this state is spent."""
        index = to_device(list(rows), torch.int64, self.pending.device)
        self.runner.compact(index)
        return HFDraftState(
            runner=self.runner,
            pending=self.pending.index_select(0, index),
            pending_live=self.pending_live.index_select(0, index),
            max_length=self.max_length,
        )

    def concat(self, others: Sequence[HFDraftState]) -> HFDraftState:
        states = [self, *others]
        return HFDraftState(
            runner=CachedLM.concat([s.runner for s in states]),
            pending=torch.cat([s.pending for s in states], dim=0),
            pending_live=torch.cat([s.pending_live for s in states], dim=0),
            max_length=max(s.max_length for s in states),
        )

    def with_capacity(self, capacity: int) -> HFDraftState:
        """Itself: the runner's cache grows as it goes."""
        return self


class HFDraft:
    """Wrap a causal LM so it drafts through the :class:`~s2d_ext.draft.protocol.DraftModel` protocol.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Any causal LM with the target's vocabulary.
    """

    supports_logits_mask = True  # propose(..., logits_mask=): see DraftMask

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.vocab_size = output_vocab_size(model)
        self.exits = (int(model.config.get_text_config().num_hidden_layers),)
        self.device = input_device(model)

    def begin(
        self,
        input_ids: torch.Tensor,  # [B, L] int64, left-padded
        attention_mask: torch.Tensor | None,  # [B, L], 1 = token
        max_length: int,
    ) -> HFDraftState:
        context = context_length(self.model)
        if context is not None and max_length > context:
            raise ValueError(f"max_length={max_length} exceeds the draft's context of {context} tokens")
        batch, length = input_ids.shape
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        live = attention_mask.to(self.device).bool()
        runner = CachedLM(self.model, batch)
        window = runner.sliding_window()
        if window is not None and max_length >= window:
            raise ValueError(
                f"max_length={max_length} must stay below the draft's sliding window of {window}"
            )
        if length > 1:
            runner.forward(input_ids[:, :-1], live[:, :-1], logits_to_keep=1)
            runner.commit(live[:, :-1].sum(-1))
        pending = torch.zeros((batch, 2), dtype=torch.int64, device=self.device)
        pending[:, 1] = input_ids[:, -1]
        pending_live = torch.zeros((batch, 2), dtype=torch.bool, device=self.device)
        pending_live[:, 1] = True
        return HFDraftState(runner, pending, pending_live, max_length)

    @torch.no_grad()
    def propose(
        self,
        state: HFDraftState,
        num_tokens: int,
        num_draft: torch.Tensor,  # [B] int64 in 0..num_tokens
        *,
        temperature: torch.Tensor,  # [B] float32
        top_k: torch.Tensor,  # [B] int64
        top_p: torch.Tensor,  # [B] float32
        seeds: torch.Tensor,  # [B] int64
        offsets: torch.Tensor,  # [B] int64
        thresholds: torch.Tensor | None = None,  # [B, 1]; ignored: one exit
        stop_threshold: torch.Tensor | None = None,  # [B] float32
        logits_mask: DraftMask | None = None,
    ) -> Proposal:
        runner, batch = state.runner, state.pending.shape[0]
        n_draft = num_draft.to(self.device, torch.int64).clone()
        longest = int((runner.next_pos + state.pending_live.sum(-1) + n_draft).max()) if batch else 0
        if longest > state.max_length:
            raise ValueError(f"a row would reach {longest} tokens, over max_length={state.max_length}")
        tokens = torch.zeros((batch, num_tokens), dtype=torch.int64, device=self.device)
        confidence = torch.zeros((batch, num_tokens), dtype=torch.float32, device=self.device)
        sampled = bool((temperature > 0).any())
        if sampled and seeds is None:
            raise ValueError("seeds are required when a row samples (temperature > 0)")
        seeds = 0 if seeds is None else seeds  # NOTE: greedy rows draw no random number
        offsets = 0 if offsets is None else offsets
        probs = torch.zeros((batch, num_tokens, self.vocab_size), device=self.device) if sampled else None
        # NOTE: a greedy call writes its one-hots into a one-step scratch instead of a [B, k, V] q.
        if sampled:
            buffer = probs.view(-1, self.vocab_size)
        else:
            buffer = torch.zeros((batch, self.vocab_size), device=self.device)
        filters = sampled and bool(((top_k > 0) | (top_p < 1)).any())
        rows = torch.arange(batch, device=self.device)
        fed = torch.zeros(batch, dtype=torch.int64, device=self.device)
        # NOTE: the pending block always runs (even for num_tokens == 0) so it never grows past two tokens.
        logits = runner.forward(state.pending, state.pending_live, logits_to_keep=1)
        steps = (
            num_tokens if stop_threshold is not None else min(num_tokens, int(n_draft.max()) if batch else 0)
        )
        for j in range(steps):
            drafting = j < n_draft
            slot = rows * num_tokens + j if sampled else rows
            scores = logits[:, -1]
            allowed = None if logits_mask is None else logits_mask.allowed(j, tokens[:, :j])
            if allowed is not None:
                # NOTE: only the masked rows' logits change; every row samples from what it is given.
                keep = torch.ones_like(scores, dtype=torch.bool)
                keep[logits_mask.rows] = allowed.to(keep.device)
                scores = scores.masked_fill(~keep, float("-inf"))
            token, conf, _ = sample_logits(
                scores,
                temperature,
                top_k,
                top_p,
                seeds,
                offsets,
                j,
                0.0,
                buffer,
                slot,
                filters=filters,
            )
            tokens[:, j] = torch.where(drafting, token, 0)
            confidence[:, j] = torch.where(drafting, conf, 0)
            if sampled:
                probs[:, j] *= drafting[:, None]
            if stop_threshold is not None:
                stop = drafting & (conf < stop_threshold)
                n_draft = torch.where(stop, torch.full_like(n_draft, j + 1), n_draft)
                if not bool((n_draft > j + 1).any()):
                    break
            if j + 1 == steps:
                break
            live = (j + 1 < n_draft)[:, None]
            fed += live[:, 0]
            logits = runner.forward(token[:, None], live, logits_to_keep=1)
        state.last_tokens, state.fed = tokens, fed
        exits = torch.where(
            torch.arange(num_tokens, device=self.device) < n_draft[:, None], self.exits[0], -1
        )
        return Proposal(tokens, probs, n_draft, exits, confidence)

    def advance(
        self,
        state: HFDraftState,
        num_accepted: torch.Tensor,  # [B] int
        emitted: torch.Tensor,  # [B] int64
        active: torch.Tensor | None = None,  # [B] bool
    ) -> None:
        runner, batch = state.runner, state.pending.shape[0]
        n_acc = num_accepted.to(self.device, torch.int64)
        emitted = emitted.to(self.device, torch.int64)
        active = (
            torch.ones(batch, dtype=torch.bool, device=self.device)
            if active is None
            else active.to(self.device)
        )
        rows = torch.arange(batch, device=self.device)
        pending_count = state.pending_live.sum(-1)
        kept_drafts = torch.minimum(n_acc, state.fed)
        runner.commit(torch.where(active, pending_count + kept_drafts, 0))
        unfed = n_acc > state.fed  # the last accepted draft never went through the model
        last_draft = emitted
        if state.last_tokens.shape[1]:
            last_draft = state.last_tokens[rows, (n_acc - 1).clamp(min=0)]
        new_pending = torch.stack([torch.where(unfed, last_draft, 0), emitted], dim=1)
        new_live = torch.stack([unfed, torch.ones_like(unfed)], dim=1)
        runner.maybe_compact()
        state.pending = torch.where(active[:, None], new_pending, state.pending)
        state.pending_live = torch.where(active[:, None], new_live, state.pending_live)
        state.last_tokens, state.fed = None, None
