"""``SortedDraft``: a nested ("sorted") early-exit draft model for speculative decoding (S2D).

A Llama-family decoder of ``N`` layers with exits after e.g. layers ``(6, 9, 12)``: every exit reads
the hidden state through the shared final norm and ``lm_head``. Each draft token runs the layers up
to the first exit, and stops there if that exit's confidence (its top softmax probability; for
sampled rows, the top of the processed q) reaches the exit's threshold; otherwise it continues from
that hidden state to the next exit. The last exit always fires; a threshold of 1 turns an early exit
off (it never fires and its head is not computed).

With a reduced draft vocabulary (:mod:`s2d_ext.draft.draft_vocab`) every exit head scores only its N ids:
the confidence is the top probability *within the subset* (its log-sum-exp over the subset), a greedy
token the argmax within it, and q is zero outside it. So a token that does not exit early pays N / V of
a full head at each early exit it passes (the cheap exit decision). ``final_exit_vocab="full"`` keeps
the full vocabulary at the last exit only.

The draft runs its own lean forward (:mod:`s2d_ext.draft.lean_llama`) over static per-layer caches
(:mod:`s2d_ext.draft.static_cache`), with deferred KV fill for the layers an early exit skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2d_ext.draft.draft_mask_step import step_mask
from s2d_ext.draft.draft_vocab import check_draft_vocab, load_draft_vocab, save_draft_vocab
from s2d_ext.draft.lean_llama import (
    LeanLayers,
    attention_bias,
    check_architecture,
    head_dim_of,
    rope_cos_sin,
    rope_inv_freq,
)
from s2d_ext.draft.protocol import DraftMask, Proposal
from s2d_ext.draft.sorted_args import (
    ProposeArgs,
    check_dtype_argument,
    check_model_dtype,
    checked_advance_args,
    checked_prompt,
    checked_propose_args,
    saved_exits_and_thresholds,
    validate_exits,
    validate_thresholds,
)
from s2d_ext.draft.static_cache import SortedDraftState
from s2d_ext.draft.surgery import (
    SHARED_MODULES_ATTR,
    convert_model,
    load_hf_model,
    mark_shared_modules,
    shared_module_names,
    truncated_hf_model,
)
from s2d_ext.ops._backend import resolve_backend
from s2d_ext.ops.exit_head import run_exit_head
from s2d_ext.ops.exit_sample import run_exit_sample, sample_logits

# NOTE: the surgery on HF models lives in s2d_ext.draft.surgery; its names stay importable from here.
__all__ = [
    "SHARED_MODULES_ATTR",
    "SortedDraft",
    "convert_model",
    "mark_shared_modules",
    "shared_module_names",
    "truncated_hf_model",
]

DEFAULT_MAX_DEFERRED = 16
FINAL_EXIT_VOCABS = ("draft", "full")


class SortedDraft:
    """A sorted (nested early-exit) draft over a Llama / Mistral / Qwen2 HF causal LM.

    Parameters
    ----------
    hf_model : transformers.PreTrainedModel
        The draft's HF causal LM (``LlamaForCausalLM`` ...); used in place, not copied.
    exits : sequence of int
        Strictly increasing layer counts, the last equal to ``num_hidden_layers``.
    thresholds : sequence of float
        One per exit, in [0, 1]; the last exit always fires whatever its value, and an early exit with
        threshold 1 never fires (its head is skipped: 1 turns the exit off).
    compile : bool
        Wrap each exit group's layer step in ``torch.compile`` (``compile_backend``); the attention then
        always spans the whole static cache so shapes depend only on (batch, window).
    compile_backend : str
        ``torch.compile`` backend ("inductor", "aot_eager", "eager", ...).
    compile_mode : str or None
        ``torch.compile`` mode (e.g. "reduce-overhead" for CUDA graphs; not exercised by the CPU tests).
    max_deferred : int
        Cap on the positions an exit group may lag behind the one before it (deferred KV fill), while the
        thresholds let a token reach it (past an exit with threshold 0 for every row, nothing runs).
    draft_vocab : torch.Tensor or sequence of int, optional
        A reduced draft vocabulary: unique ascending target token ids ([N] int64, see
        :mod:`s2d_ext.draft.draft_vocab`). Every exit head then scores only these ids.
    final_exit_vocab : str
        "draft" (default): the last exit uses ``draft_vocab`` too; "full": the last exit scores every id
        (only the early exits' heads, and so their exit decisions, are reduced).
    """

    supports_logits_mask = True  # propose(..., logits_mask=): see DraftMask

    def __init__(
        self,
        hf_model: nn.Module,
        exits: Sequence[int],
        thresholds: Sequence[float],
        *,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        max_deferred: int = DEFAULT_MAX_DEFERRED,
        draft_vocab: torch.Tensor | Sequence[int] | None = None,
        final_exit_vocab: str = "draft",
    ) -> None:
        config = hf_model.config
        check_architecture(config)
        check_model_dtype(hf_model)
        self.hf_model = hf_model
        self.config = config
        self.exits = validate_exits(exits, config.num_hidden_layers)
        self.thresholds = validate_thresholds(thresholds, self.exits)
        if int(max_deferred) < 0:
            raise ValueError(f"max_deferred must be >= 0, got {max_deferred}")
        self.max_deferred = int(max_deferred)
        self.compiled = bool(compile)
        self.compile_backend = compile_backend
        layers = list(hf_model.model.layers)
        starts = (0, *self.exits[:-1])
        self._groups = [LeanLayers(layers[lo:hi], config) for lo, hi in zip(starts, self.exits, strict=True)]
        self._group_fns = [
            torch.compile(group, backend=compile_backend, mode=compile_mode) if compile else group
            for group in self._groups
        ]
        if final_exit_vocab not in FINAL_EXIT_VOCABS:
            raise ValueError(f"final_exit_vocab must be one of {FINAL_EXIT_VOCABS}, got {final_exit_vocab!r}")
        self.final_exit_vocab = final_exit_vocab
        self.draft_vocab: torch.Tensor | None = None
        self._subset_head: tuple | None = None  # (key, [N, d] rows of lm_head) cache, see _exit_head_rows
        self._tau_cache: tuple | None = None  # (thresholds tensor, its version, host copy), see propose
        if draft_vocab is not None:
            vocab = check_draft_vocab(draft_vocab, self.vocab_size)
            self.draft_vocab = vocab.to(self.device)
        self.hf_model.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model_or_path: nn.Module | str | os.PathLike,
        exits: Sequence[int] | None = None,
        thresholds: Sequence[float] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        max_deferred: int = DEFAULT_MAX_DEFERRED,
        draft_vocab: torch.Tensor | Sequence[int] | bool | None = None,
        final_exit_vocab: str = "draft",
        **hf_kwargs: Any,
    ) -> SortedDraft:
        """A draft from an HF model object or a checkpoint path.

        ``exits`` / ``thresholds`` default to the config's ``s2d_exits`` / ``s2d_thresholds``, else to
        ``(num_hidden_layers,)`` / ``(0.0,)`` (thresholds default to ``0.5`` for every early exit and
        ``0.0`` for the last when only ``exits`` is given). ``hf_kwargs`` go to
        ``AutoModelForCausalLM.from_pretrained``. A model object is used in place: ``dtype`` / ``device``
        cast and move it (``nn.Module.to``; modules it shares with another model, see
        :func:`mark_shared_modules`, as converted copies), and it is put in eval mode.

        ``draft_vocab``: None loads the checkpoint's ``draft_vocab.safetensors`` when the path has one;
        False ignores it; ids (a tensor or sequence) are used as given.
        """
        check_dtype_argument(dtype, model_or_path if isinstance(model_or_path, nn.Module) else None)
        saved_vocab = None
        if isinstance(model_or_path, (str, os.PathLike)) and draft_vocab is None:
            saved_vocab = load_draft_vocab(model_or_path)
        if draft_vocab is None or draft_vocab is False:
            draft_vocab = saved_vocab
        elif draft_vocab is True:
            raise ValueError("draft_vocab must be token ids, None (the checkpoint's, if any) or False (none)")
        hf_model = load_hf_model(model_or_path, dtype, device, hf_kwargs)
        check_architecture(hf_model.config)
        exits, thresholds = saved_exits_and_thresholds(hf_model.config, exits, thresholds)
        return cls(
            hf_model,
            exits,
            thresholds,
            compile=compile,
            compile_backend=compile_backend,
            compile_mode=compile_mode,
            max_deferred=max_deferred,
            draft_vocab=draft_vocab,
            final_exit_vocab=final_exit_vocab,
        )

    @classmethod
    def truncate(
        cls,
        hf_model: nn.Module,
        n_layers: int,
        exits: Sequence[int] | None = None,
        thresholds: Sequence[float] | None = None,
        *,
        share_embeddings: bool = False,
        **kwargs: Any,
    ) -> SortedDraft:
        """A draft made of the first ``n_layers`` layers of a bigger HF model.

        The kept layers are deep-copied; the embedding, final norm and ``lm_head`` are copied too, or
        shared with ``hf_model`` when ``share_embeddings=True`` (then :meth:`to` converts copies of them
        and leaves ``hf_model``'s). ``kwargs`` go to the constructor.
        """
        check_architecture(hf_model.config)
        total = hf_model.config.num_hidden_layers
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or not 1 <= n_layers <= total:
            raise ValueError(f"n_layers must be an int in 1..{total} (the model's layers), got {n_layers!r}")
        exits = tuple(exits) if exits is not None else (n_layers,)
        validate_exits(exits, n_layers)
        if thresholds is None:
            thresholds = (0.5,) * (len(exits) - 1) + (0.0,)
        draft_model = truncated_hf_model(hf_model, n_layers, share_embeddings=share_embeddings)
        return cls(draft_model, exits, thresholds, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> None:
        """Save an ordinary HF checkpoint whose config carries ``s2d_exits`` and ``s2d_thresholds``, plus
        ``draft_vocab.safetensors`` when the draft has a draft vocabulary."""
        self.config.s2d_exits = list(self.exits)
        self.config.s2d_thresholds = list(self.thresholds)
        self.hf_model.save_pretrained(path, **kwargs)
        if self.draft_vocab is not None:
            save_draft_vocab(path, self.draft_vocab)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return int(self.hf_model.lm_head.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.hf_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.lm_head.weight.dtype

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def to(self, *args: Any, **kwargs: Any) -> SortedDraft:
        """Move / cast the HF model, as ``nn.Module.to`` (states made before must be recreated).

        Modules the draft shares with another model (``truncate(share_embeddings=True)``, or marked with
        :func:`mark_shared_modules`) are replaced by converted copies when the conversion changes them,
        so the other model is left as it was.
        """
        # NOTE: checked before converting, so a refused dtype leaves the draft as it was.
        check_dtype_argument(torch._C._nn._parse_to(*args, **kwargs)[1], self.hf_model)
        convert_model(self.hf_model, *args, **kwargs)
        if self.draft_vocab is not None:
            self.draft_vocab = self.draft_vocab.to(self.device)
        return self

    def __repr__(self) -> str:
        return (
            f"SortedDraft({self.config.model_type}, layers={self.num_layers}, exits={self.exits}, "
            f"thresholds={self.thresholds}, dtype={self.dtype}, device={self.device}"
            + (f", draft_vocab={self.draft_vocab.numel()} ids" if self.draft_vocab is not None else "")
            + ")"
        )

    # ------------------------------------------------------------------ state
    def begin(
        self,
        input_ids: torch.Tensor,  # [B, L] int64, left-padded
        attention_mask: torch.Tensor | None,  # [B, L], 1 = token
        max_length: int,
    ) -> SortedDraftState:
        """Prefill ``input_ids[:, :-1]`` through the first exit group; the last token becomes the pending
        input.

        The deeper groups catch up on the prompt (deferred fill) when a token first reaches them, so a
        draft used at a fixed first exit never runs them at all.
        ``max_length`` is the number of tokens (prompt + generated + one step of drafts) a row may
        reach, padding excluded; the caches hold ``max_length + max(pad)`` slots.
        """
        input_ids, pad, pads = checked_prompt(self, input_ids, attention_mask, max_length)
        batch, prompt_len = input_ids.shape
        device = self.device
        capacity = max_length + max(pads)
        config = self.config
        state = SortedDraftState.allocate(
            batch_size=batch,
            capacity=capacity,
            max_length=max_length,
            num_layers=self.num_layers,
            num_groups=len(self.exits),
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim_of(config),
            hidden_size=config.hidden_size,
            dtype=self.dtype,
            device=device,
        )
        state.tokens[:, :prompt_len] = input_ids
        state.pad.copy_(pad)
        state.pads = pads
        state.length.fill_(prompt_len)
        self._inv_freq, self._rope_scaling = rope_inv_freq(config, device)
        for group in self._groups:
            group.refresh()
        with torch.no_grad():
            if prompt_len > 1:
                # NOTE: group 0 only: a deeper group's prefill is deferred like any other lag.
                stop = torch.full((batch,), prompt_len - 1, dtype=torch.int64, device=device)
                self._run_group(state, 0, stop)
        return state

    # ------------------------------------------------------------------ the layer step
    def _run_group(
        self,
        state: SortedDraftState,
        group: int,
        stop: torch.Tensor,  # [B] int64: process slots [filled[group], stop)
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Feed each row's slots ``[filled[group], stop)`` through exit group ``group``.

        Returns the output hidden states [B, W, d] (None when no row has work) and the window
        lengths [B] int64; the last valid entry of row b is ``out[b, n[b] - 1]``.
        """
        start = state.filled[group]
        n = (stop - start).clamp(min=0)
        # NOTE: the window and the key length are read in one device-to-host copy, not two.
        window, longest = torch.stack([n.max(), stop.max()]).tolist()
        if window == 0:
            return None, n
        device = start.device
        offsets = torch.arange(window, device=device)
        slots = start[:, None] + offsets[None, :]  # [B, W]
        valid = offsets[None, :] < n[:, None]
        write_slots = torch.where(valid, slots, torch.full_like(slots, state.trash_slot))
        if group == 0:
            hidden = F.embedding(state.tokens.gather(1, write_slots), self.hf_model.model.embed_tokens.weight)
        else:
            buf = state.hidden[group]
            hidden = buf.gather(1, write_slots[:, :, None].expand(-1, -1, buf.shape[-1]))
        positions = (slots - state.pad[:, None]).clamp(min=0)
        cos, sin = rope_cos_sin(self._inv_freq, positions, self._rope_scaling, hidden.dtype)
        # NOTE: the compiled step sees static shapes (whole cache as keys) and small windows only;
        # prefill and other long windows run eagerly instead of compiling one graph per length.
        use_compiled = self.compiled and window <= self.max_deferred + 2
        keys = state.capacity + 1 if use_compiled else longest
        bias = attention_bias(slots, state.pad, keys, hidden.dtype)
        lo = self.exits[group - 1] if group > 0 else 0
        hi = self.exits[group]
        step = self._group_fns[group] if use_compiled else self._groups[group]
        out = step(hidden, cos, sin, write_slots, bias, state.k_cache[lo:hi], state.v_cache[lo:hi])
        if group + 1 < len(self.exits):
            nxt = state.hidden[group + 1]
            nxt.scatter_(1, write_slots[:, :, None].expand(-1, -1, nxt.shape[-1]), out)
        state.filled[group] = torch.maximum(start, stop)
        return out, n

    def _exit_head_rows(self, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head rows exit ``group`` scores ([Vh, d]) and their token ids ([Vh] int64, None: all ids).

        NOTE: the rows of a draft vocabulary are gathered once into a contiguous [N, d] copy (re-gathered
        when the head's storage or contents change), so each head streams N rows, not V.
        """
        head = self.hf_model.lm_head.weight
        if self.draft_vocab is None or (group == len(self.exits) - 1 and self.final_exit_vocab == "full"):
            return head.contiguous(), None
        key = (head.data_ptr(), head._version, head.device, head.dtype, self.draft_vocab.data_ptr())
        if self._subset_head is None or self._subset_head[0] != key:
            with torch.no_grad():
                rows = head.index_select(0, self.draft_vocab).contiguous()
            self._subset_head = (key, rows)
        return self._subset_head[1], self.draft_vocab

    def _host_thresholds(self, tau: torch.Tensor, given: Any) -> list[list[float]]:
        """``tau`` [B, n_exits] on the host, read once per thresholds tensor (the driver passes the same
        tensor every step), so a step does not wait on the device for it."""
        if given is None:
            return [list(self.thresholds)] * tau.shape[0]
        # NOTE: an inference tensor (made under torch.inference_mode) has no version counter to key a cache.
        if isinstance(given, torch.Tensor) and not given.is_inference():
            cached = self._tau_cache
            if cached is not None and cached[0] is given and cached[1] == given._version:
                return cached[2]
            host = tau.tolist()
            self._tau_cache = (given, given._version, host)
            return host
        return tau.tolist()

    # ------------------------------------------------------------------ protocol
    def propose(
        self,
        state: SortedDraftState,
        num_tokens: int,
        num_draft: torch.Tensor | int | None = None,
        *,
        temperature: torch.Tensor | float = 0.0,
        top_k: torch.Tensor | int = 0,
        top_p: torch.Tensor | float = 1.0,
        seeds: torch.Tensor | int | None = None,
        offsets: torch.Tensor | int | None = None,
        thresholds: torch.Tensor | Sequence[float] | None = None,
        stop_threshold: torch.Tensor | float | None = None,
        logits_mask: DraftMask | None = None,
    ) -> Proposal:
        """Propose up to ``num_tokens`` tokens per row (see :class:`~s2d_ext.draft.protocol.DraftModel`).

        Parameters
        ----------
        state : SortedDraftState
            From :meth:`begin`.
        num_tokens : int
            k, the step's maximum.
        num_draft : torch.Tensor, int or None
            [B] int64 in 0..k (None = k for every row).
        temperature, top_k, top_p : scalar or [B]
            Draft sampling per row (temperature 0 = argmax drafting).
        seeds, offsets : scalar or [B] int64
            Philox key / counter offset (stream ``STREAM_DRAFT``, position = j in the step); required when
            a row samples.
        thresholds : [B, n_exits] float32, sequence of floats or None
            Per-row exit thresholds (None = the draft's own); an early exit's 1 turns it off.
        stop_threshold : [B] float32, scalar or None
            A row stops after a token whose chosen-exit confidence is below it.
        logits_mask : DraftMask, optional
            Allowed tokens of some rows at each position (a grammar): their exits score, decide and sample
            from the head's logits restricted to them (``sample_logits``; q and the confidence are those of
            the restricted distribution); the other rows take the fused path as without a mask.

        Returns
        -------
        Proposal
            tokens [B, k] int64, probs [B, k, V] float32 or None, num_draft [B] int64, exits [B, k] int64,
            confidence [B, k] float32.
        """
        args = checked_propose_args(
            self, state, num_tokens, num_draft, temperature, top_k, top_p, seeds, offsets, thresholds,
            stop_threshold,
        )  # fmt: skip
        plan = self._exit_plan(args.thresholds, thresholds)
        batch, k, device = state.batch_size, num_tokens, state.length.device
        tokens = torch.zeros((batch, k), dtype=torch.int64, device=device)
        exits = torch.full((batch, k), -1, dtype=torch.int64, device=device)
        confidence = torch.zeros((batch, k), dtype=torch.float32, device=device)
        probs = torch.zeros((batch, k, self.vocab_size), device=device) if args.sampled else None
        proposed = torch.zeros((batch,), dtype=torch.int64, device=device)
        stopped = torch.zeros((batch,), dtype=torch.bool, device=device)
        # NOTE: a proposal not followed by advance() (a repeated propose) left drafts in the caches;
        # forget them so every row restarts from its pending token.
        state.filled.copy_(torch.minimum(state.filled, (state.length - 1)[None, :]))
        end = state.filled[0].clone()  # [B]: slots fed (or to feed) through group 0 by this step
        with torch.no_grad():
            for j in range(k):
                active = (args.num_draft > j) & ~stopped  # [B]: rows drafting token j
                if not bool(active.any()):
                    break
                end = torch.where(active, state.length + j, end)
                mask = None if logits_mask is None else step_mask(logits_mask, j, tokens, self.vocab_size)
                token, conf, layer = self._draft_token(state, j, active, end, args, plan, probs, mask)
                tokens[:, j] = torch.where(active, token, tokens[:, j])
                confidence[:, j] = torch.where(active, conf, confidence[:, j])
                exits[:, j] = torch.where(active, layer, exits[:, j])
                proposed += active.to(torch.int64)
                # The draft token becomes the input of the next step, at slot length + j.
                slot = torch.where(active, state.length + j, torch.full_like(end, state.trash_slot))
                state.tokens.scatter_(1, slot[:, None], token[:, None])
                if args.stop_threshold is not None:
                    stopped |= active & (conf < args.stop_threshold)
        state.last_num_draft = proposed
        state.steps += 1
        return Proposal(tokens=tokens, probs=probs, num_draft=proposed, exits=exits, confidence=confidence)

    def _draft_token(
        self,
        state: SortedDraftState,
        j: int,
        active: torch.Tensor,  # [B] bool: rows drafting this token
        end: torch.Tensor,  # [B] int64: slots group 0 feeds up to
        args: ProposeArgs,
        plan: _ExitPlan,
        probs: torch.Tensor | None,  # [B, k, V] float32: q, written where a sampled row exits
        mask: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([B] bool masked rows, [B, V] bool allowed)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draft token ``j`` of every active row: run the exit groups in turn; a row's token exits at the
        first exit that fires for it. Returns its token, confidence and exit layer ([B] each)."""
        batch = state.batch_size
        token = torch.zeros((batch,), dtype=torch.int64, device=end.device)
        conf = torch.zeros((batch,), dtype=torch.float32, device=end.device)
        layer = torch.full((batch,), -1, dtype=torch.int64, device=end.device)
        undecided = active.clone()  # [B]: rows whose token has not exited yet
        for group in range(plan.reachable):
            stop = end if group == 0 else state.filled[group - 1]
            if group > 0:
                lag = state.filled[group - 1] - state.filled[group]
                wanted, behind = torch.stack([undecided.any(), (lag > self.max_deferred).any()]).tolist()
                if not wanted and not behind:
                    continue
            out, n = self._run_group(state, group, stop)
            if plan.head_off[group]:
                continue
            rows = plan.row_ids[undecided]  # NOTE: the one read of this exit's decision (rows still drafting)
            if rows.shape[0] == 0:
                continue
            last = group == plan.reachable - 1
            decisions = []  # (rows, their token, confidence, fired)
            if mask is not None:
                # NOTE: masked rows decide from restricted logits (one more read); the others: the fused path.
                masked, allowed = mask
                restricted = rows[masked[rows]]
                if restricted.shape[0]:
                    hidden = out[restricted, n[restricted] - 1]
                    decisions.append(
                        (
                            restricted,
                            *self._masked_exit(
                                group, last, hidden, restricted, allowed[restricted], j, args, plan, probs
                            ),
                        )
                    )
                rows = rows[~masked[rows]]
            if rows.shape[0]:
                hidden = out[rows, n[rows] - 1]  # [R, d]: the exit's hidden state at slot end - 1
                decisions.append((rows, *self._exit(group, last, hidden, rows, j, args, plan, probs)))
            for rows, row_token, row_conf, fired in decisions:
                # NOTE: written through the integer rows with where(), not boolean-mask indexing (a
                # device-to-host read each).
                token[rows] = torch.where(fired, row_token, token[rows])
                conf[rows] = torch.where(fired, row_conf, conf[rows])
                layer[rows] = torch.where(fired, self.exits[group], layer[rows])
                undecided[rows] = undecided[rows] & ~fired
        return token, conf, layer

    def _masked_exit(
        self,
        group: int,
        last: bool,
        hidden: torch.Tensor,  # [R, d]: the exit's hidden states of the masked undecided rows
        rows: torch.Tensor,  # [R] int64: those rows
        allowed: torch.Tensor,  # [R, V] bool: their allowed tokens at this position
        j: int,
        args: ProposeArgs,
        plan: _ExitPlan,
        probs: torch.Tensor | None,  # [B, k, V] float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exit ``group`` for masked ``rows``: the head's logits restricted to ``allowed``, then the same
        decision and sampling as the fused path from those logits (``sample_logits``). Token, confidence and
        whether the exit fires ([R] each)."""
        head, ids = self._exit_head_rows(group)
        norm = self.hf_model.model.norm
        h32 = hidden.float()
        normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(
            hidden.dtype
        )
        logits = F.linear(normed * norm.weight, head).float()  # [R, Vh]
        keep = allowed if ids is None else allowed[:, ids]
        logits = logits.masked_fill(~keep, float("-inf"))
        if probs is None:  # NOTE: every row is greedy: the one-hots go to a scratch buffer
            buffer, slots = torch.zeros((rows.shape[0], self.vocab_size), device=rows.device), None
        else:
            buffer, slots = probs.view(-1, probs.shape[2]), rows * probs.shape[1] + j
        return sample_logits(
            logits,
            args.temperature[rows],
            args.top_k[rows],
            args.top_p[rows],
            args.seeds[rows] if probs is not None else 0,
            args.offsets[rows] if probs is not None else 0,
            j,
            0.0 if last else plan.fire_at[group][rows],
            buffer,
            torch.arange(rows.shape[0], device=rows.device) if slots is None else slots,
            vocab_ids=ids,
            filters=args.filters,
            validate=False,
        )

    def _exit(
        self,
        group: int,
        last: bool,
        hidden: torch.Tensor,  # [R, d]: the exit's hidden states of the undecided rows
        rows: torch.Tensor,  # [R] int64: those rows
        j: int,
        args: ProposeArgs,
        plan: _ExitPlan,
        probs: torch.Tensor | None,  # [B, k, V] float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exit ``group``'s head on ``rows``: their token, confidence and whether the exit fires ([R] each).

        Greedy batches take the argmax and fire at ``confidence >= threshold``; sampled ones run the fused
        ``exit_sample`` (q written, and a token drawn, only where the row fires). The last exit always fires.
        """
        head, ids = self._exit_head_rows(group)
        norm = self.hf_model.model.norm
        eps, count = float(norm.variance_epsilon), rows.shape[0]
        # NOTE: the arguments were checked once for the whole call (checked_propose_args), so each exit runs
        # the op's kernel directly.
        if not args.sampled:
            zero = torch.zeros((count,), dtype=torch.float32, device=rows.device)  # temperature: raw logits
            tokens, conf, _ = run_exit_head(plan.backend, hidden, norm.weight, head, eps, zero)
            tokens = tokens if ids is None else ids[tokens]
            fired = torch.ones_like(rows, dtype=torch.bool) if last else conf >= plan.fire_at[group][rows]
            return tokens, conf, fired
        # NOTE: when every row needs this exit (batch 1, early exits), skip the gathers.
        of_rows = (lambda t: t) if count == args.num_draft.shape[0] else (lambda t: t[rows])  # noqa: E731
        k, vocab = probs.shape[1], probs.shape[2]
        return run_exit_sample(
            plan.backend,
            hidden,
            norm.weight,
            head,
            eps,
            of_rows(args.temperature),
            of_rows(args.top_k),
            of_rows(args.top_p),
            of_rows(args.seeds),
            of_rows(args.offsets),
            torch.full((count,), j, dtype=torch.int64, device=rows.device),  # position
            torch.zeros((count,), device=rows.device) if last else of_rows(plan.fire_at[group]),  # threshold
            ids,
            probs.view(-1, vocab),
            rows * k + j,  # the rows of probs they own
            args.filters,
        )

    def _exit_plan(self, tau: torch.Tensor, given: Any) -> _ExitPlan:
        """The exit decisions that do not depend on the data, from the thresholds on the host.

        NOTE: an early exit whose threshold is 1 for every row never fires (its head is skipped), and the
        groups past an exit where every row fires unconditionally (threshold 0) never run here at all (not
        even their deferred KV fill: a later call that needs them catches up in one window).
        """
        host_tau = self._host_thresholds(tau, given)
        n_exits = len(self.exits)
        head_off = [all(row[g] >= 1.0 for row in host_tau) for g in range(n_exits - 1)] + [False]
        reachable = n_exits
        for g in range(n_exits - 1):
            if all(any(row[i] <= 0.0 for i in range(g + 1)) for row in host_tau):
                reachable = g + 1
                break
        fire_at = tau.masked_fill(tau >= 1.0, float("inf")).t().contiguous()  # threshold 1: never fires
        backend = resolve_backend("exit_head", "auto", tau.device)
        return _ExitPlan(head_off, reachable, fire_at, torch.arange(tau.shape[0], device=tau.device), backend)

    def advance(
        self,
        state: SortedDraftState,
        num_accepted: torch.Tensor,  # [B] int
        emitted: torch.Tensor,  # [B] int64
        active: torch.Tensor | None = None,  # [B] bool
    ) -> None:
        """Row b's context += its first ``num_accepted[b]`` drafts + ``emitted[b]``; caches roll back."""
        num_accepted, emitted, active = checked_advance_args(
            state, num_accepted, emitted, active, self.vocab_size
        )
        new_length = torch.where(active, state.length + num_accepted + 1, state.length)
        if bool((new_length - state.pad > state.max_length).any()):
            raise ValueError(f"a row would exceed max_length={state.max_length} tokens")
        slot = torch.where(active, new_length - 1, torch.full_like(new_length, state.trash_slot))
        state.tokens.scatter_(1, slot[:, None], emitted[:, None])
        # Slots >= new_length - 1 hold rejected drafts (or nothing): forget their KV / hidden states.
        state.filled.copy_(torch.minimum(state.filled, (new_length - 1)[None, :]))
        state.length.copy_(new_length)
        state.last_num_draft = torch.zeros_like(state.last_num_draft)


@dataclass
class _ExitPlan:
    """What a proposal knows about its exits before it runs (host values, one call)."""

    head_off: list[bool]  # per exit: its threshold is 1 for every row (the head is skipped)
    reachable: int  # exit groups a token can reach (those past an always-firing exit never run)
    fire_at: torch.Tensor  # [n_exits, B] float32: thresholds, inf where 1 (never fires)
    row_ids: torch.Tensor  # [B] int64: 0..B-1
    backend: str  # the exit ops' backend
