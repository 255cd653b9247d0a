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

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2d_ext.draft.draft_vocab import check_draft_vocab, load_draft_vocab, save_draft_vocab
from s2d_ext.draft.lean_llama import (
    LeanLayers,
    attention_bias,
    check_architecture,
    head_dim_of,
    max_context,
    rope_cos_sin,
    rope_inv_freq,
    sliding_window_of,
)
from s2d_ext.draft.protocol import DraftMask, Proposal
from s2d_ext.draft.static_cache import SortedDraftState
from s2d_ext.ops.exit_head import exit_head
from s2d_ext.ops.exit_sample import exit_sample, sample_logits

DEFAULT_MAX_DEFERRED = 16
FINAL_EXIT_VOCABS = ("draft", "full")
# NOTE: the dtypes the exit ops (exit_head / exit_sample) and the lean forward implement.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def _describe(hf_model: nn.Module) -> str:
    """How errors name a draft: its HF class and layer count."""
    return f"draft {type(hf_model).__name__} ({hf_model.config.num_hidden_layers} layers)"


def _check_dtype_argument(dtype: Any, hf_model: nn.Module | None = None) -> None:
    """Raise ValueError when a requested draft ``dtype`` is not one SortedDraft runs in."""
    if dtype is None or dtype in SUPPORTED_DTYPES:
        return
    who = f"{_describe(hf_model)}: " if hf_model is not None else ""
    raise ValueError(f"{who}dtype={dtype} is not supported; SortedDraft runs in {_DTYPE_NAMES}")


def _check_model_dtype(hf_model: nn.Module) -> None:
    """Raise ValueError when a floating-point weight of ``hf_model`` is not in a supported dtype."""
    for name, param in hf_model.named_parameters():
        if param.is_floating_point() and param.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{_describe(hf_model)} has dtype {param.dtype} ({name}); SortedDraft runs in "
                f"{_DTYPE_NAMES}: cast it first, e.g. model.to(torch.float32)"
            )


def _validate_exits(exits: Sequence[int], num_layers: int) -> tuple[int, ...]:
    try:
        exits = tuple(int(e) for e in exits)
    except TypeError as err:
        raise ValueError(f"exits must be a sequence of layer counts, got {exits!r}") from err
    if not exits:
        raise ValueError("exits must name at least one exit (the final one, num_layers)")
    if any(e < 1 for e in exits):
        raise ValueError(f"exits must be layer counts >= 1, got {exits}")
    if any(b <= a for a, b in zip(exits, exits[1:], strict=False)):
        raise ValueError(f"exits must be strictly increasing, got {exits}")
    if exits[-1] > num_layers:
        raise ValueError(f"exit {exits[-1]} is beyond the model's {num_layers} layers (exits={exits})")
    if exits[-1] != num_layers:
        raise ValueError(
            f"exits must end with the final exit {num_layers} (the model's num_hidden_layers), got {exits}; "
            f"use SortedDraft.truncate to drop layers"
        )
    return exits


def _validate_thresholds(thresholds: Sequence[float], exits: tuple[int, ...]) -> tuple[float, ...]:
    try:
        thresholds = tuple(float(t) for t in thresholds)
    except TypeError as err:
        raise ValueError(f"thresholds must be a sequence of floats, got {thresholds!r}") from err
    if len(thresholds) != len(exits):
        raise ValueError(
            f"thresholds must have one value per exit ({len(exits)} exits {exits}), got {len(thresholds)}"
        )
    if any(not (0.0 <= t <= 1.0) for t in thresholds):
        raise ValueError(f"thresholds must be in [0, 1], got {thresholds}")
    return thresholds


def _per_row(name: str, value: Any, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or a [B] tensor as a [B] tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"{name} must be a scalar or a [B={batch}] tensor, got shape {tuple(value.shape)}"
            )
        return value.to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    return torch.full((batch,), value, dtype=dtype, device=device)


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
        _check_model_dtype(hf_model)
        self.hf_model = hf_model
        self.config = config
        self.exits = _validate_exits(exits, config.num_hidden_layers)
        self.thresholds = _validate_thresholds(thresholds, self.exits)
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
        _check_dtype_argument(dtype, model_or_path if isinstance(model_or_path, nn.Module) else None)
        saved_vocab = None
        if isinstance(model_or_path, (str, os.PathLike)) and draft_vocab is None:
            saved_vocab = load_draft_vocab(model_or_path)
        if draft_vocab is None or draft_vocab is False:
            draft_vocab = saved_vocab
        elif draft_vocab is True:
            raise ValueError("draft_vocab must be token ids, None (the checkpoint's, if any) or False (none)")
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoConfig, AutoModelForCausalLM

            check_architecture(AutoConfig.from_pretrained(model_or_path))
            if dtype is not None:
                hf_kwargs["dtype"] = dtype
            hf_model = AutoModelForCausalLM.from_pretrained(model_or_path, **hf_kwargs)
        elif isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
            hf_model = model_or_path
            if dtype is not None:
                hf_model = convert_model(hf_model, dtype)
        else:
            raise TypeError(
                "model_or_path must be an HF causal LM or a checkpoint path, got "
                f"{type(model_or_path).__name__}"
            )
        if device is not None:
            hf_model = convert_model(hf_model, device)
        config = hf_model.config
        check_architecture(config)
        if exits is None:
            exits = getattr(config, "s2d_exits", None) or (config.num_hidden_layers,)
            if thresholds is None:
                thresholds = getattr(config, "s2d_thresholds", None)
        if thresholds is None:
            saved = getattr(config, "s2d_thresholds", None)
            saved_exits = getattr(config, "s2d_exits", None)
            if saved is not None and saved_exits is not None and tuple(saved_exits) == tuple(exits):
                thresholds = saved
            else:
                thresholds = (0.5,) * (len(exits) - 1) + (0.0,)
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
        _validate_exits(exits, n_layers)
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
        _check_dtype_argument(torch._C._nn._parse_to(*args, **kwargs)[1], self.hf_model)
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
        draft used at a fixed first exit never runs them at all; :meth:`flush` fills them at once.
        ``max_length`` is the number of tokens (prompt + generated + one step of drafts) a row may
        reach, padding excluded; the caches hold ``max_length + max(pad)`` slots.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a [B, L] tensor, got {getattr(input_ids, 'shape', input_ids)}"
            )
        if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        batch, prompt_len = input_ids.shape
        if batch < 1 or prompt_len < 1:
            raise ValueError(
                f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}"
            )
        # NOTE: the HF model may have been cast after construction (draft.hf_model.to(...)): name the
        # draft here rather than fail deep in an op.
        if (
            self.dtype not in SUPPORTED_DTYPES
            or self.hf_model.model.embed_tokens.weight.dtype not in SUPPORTED_DTYPES
        ):
            _check_model_dtype(self.hf_model)
        device = self.device
        input_ids = input_ids.to(device=device, dtype=torch.int64)
        if bool(((input_ids < 0) | (input_ids >= self.vocab_size)).any()):
            raise ValueError(f"input_ids must be token ids in [0, {self.vocab_size})")
        if attention_mask is None:
            pad = torch.zeros((batch,), dtype=torch.int64, device=device)
        else:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (
                batch,
                prompt_len,
            ):
                raise ValueError(
                    f"attention_mask must be a [B={batch}, L={prompt_len}] tensor, got "
                    f"{getattr(attention_mask, 'shape', attention_mask)}"
                )
            mask = attention_mask.to(device) != 0
            pad = (~mask).sum(dim=1)
            expected = torch.arange(prompt_len, device=device)[None, :] >= pad[:, None]
            if not bool((mask == expected).all()):
                raise ValueError("attention_mask must be left-padded (zeros, then ones, on every row)")
            if bool((pad >= prompt_len).any()):
                raise ValueError("attention_mask has a row without any token")
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        longest = int((prompt_len - pad).max())
        if max_length < longest:
            raise ValueError(f"max_length={max_length} is shorter than the longest prompt ({longest} tokens)")
        context = max_context(self.config)
        if max_length > context:
            raise ValueError(
                f"max_length={max_length} exceeds the model's context (max_position_embeddings={context})"
            )
        window = sliding_window_of(self.config)
        if window is not None and max_length > window:
            raise ValueError(
                f"max_length={max_length} exceeds the model's sliding_window={window}; SortedDraft "
                "implements full attention only, so sequences must fit in the window"
            )
        capacity = max_length + int(pad.max())
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

    def flush(self, state: SortedDraftState) -> None:
        """Run every deferred position through the deeper groups (all caches then hold every fed slot)."""
        with torch.no_grad():
            self._flush(state, stop=state.filled[0].clone())

    def _flush(self, state: SortedDraftState, stop: torch.Tensor) -> None:
        for group in range(len(self.exits)):
            self._run_group(state, group, stop if group == 0 else state.filled[group - 1])

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
            return head, None
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
        if isinstance(given, torch.Tensor):
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
        if not isinstance(state, SortedDraftState):
            raise TypeError(f"state must be a SortedDraftState from begin(), got {type(state).__name__}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        batch, device = state.batch_size, state.length.device
        k = num_tokens
        if num_draft is None:
            num_draft = k
        num_draft = _per_row("num_draft", num_draft, batch, device, torch.int64)
        too_long = state.num_tokens + num_draft > state.max_length
        temperature = _per_row("temperature", temperature, batch, device, torch.float32)
        top_k = _per_row("top_k", top_k, batch, device, torch.int64)
        top_p = _per_row("top_p", top_p, batch, device, torch.float32)
        # NOTE: checked once here, so the exit op skips its per-call value checks (validate=False); every
        # check is one flag of a single device-to-host read.
        bad = torch.stack(
            [
                ((num_draft < 0) | (num_draft > k)).any(),
                too_long.any(),
                (temperature < 0).any() | ~torch.isfinite(temperature).all(),
                (top_k < 0).any(),
                ~((top_p > 0) & (top_p <= 1)).all(),
            ]
        ).tolist()
        if bad[0]:
            raise ValueError(f"num_draft must be in 0..num_tokens={k}, got {num_draft.tolist()}")
        if bad[1]:
            row = int(too_long.nonzero()[0, 0])
            raise ValueError(
                f"row {row} would exceed max_length={state.max_length}: it holds "
                f"{int(state.num_tokens[row])} tokens and asks for {int(num_draft[row])} drafts "
                "(the draft is longer than the cache)"
            )
        if bad[2]:
            raise ValueError("temperature must be finite and >= 0")
        if bad[3]:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if bad[4]:
            raise ValueError("top_p must be in (0, 1]")
        if num_tokens > 2**16:
            raise ValueError(
                f"num_tokens must be at most {2**16} (Philox holds the draft position in 16 bits)"
            )
        sampled = temperature > 0
        any_sampled = bool(sampled.any())
        if any_sampled:
            if seeds is None:
                raise ValueError("seeds are required when a row samples (temperature > 0)")
            seeds = _per_row("seeds", seeds, batch, device, torch.int64)
            offsets = _per_row("offsets", 0 if offsets is None else offsets, batch, device, torch.int64)
        n_exits = len(self.exits)
        if thresholds is None:
            tau = torch.tensor(self.thresholds, dtype=torch.float32, device=device).expand(batch, n_exits)
        else:
            tau = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
            if tau.dim() == 1:
                tau = tau.expand(batch, -1)
            if tuple(tau.shape) != (batch, n_exits):
                raise ValueError(
                    f"thresholds must be [B={batch}, n_exits={n_exits}] (or [n_exits]), "
                    f"got {tuple(tau.shape)}"
                )
            if bool(((tau < 0) | (tau > 1) | torch.isnan(tau)).any()):
                raise ValueError("thresholds must be in [0, 1]")
        if stop_threshold is not None:
            stop_threshold = _per_row("stop_threshold", stop_threshold, batch, device, torch.float32)

        vocab = self.vocab_size
        tokens = torch.zeros((batch, k), dtype=torch.int64, device=device)
        exits_out = torch.full((batch, k), -1, dtype=torch.int64, device=device)
        confidence = torch.zeros((batch, k), dtype=torch.float32, device=device)
        probs = torch.zeros((batch, k, vocab), dtype=torch.float32, device=device) if any_sampled else None
        probs_flat = probs.view(batch * k, vocab) if probs is not None else None
        filters = any_sampled and bool(((top_k > 0) | (top_p < 1)).any())
        proposed = torch.zeros((batch,), dtype=torch.int64, device=device)
        stopped = torch.zeros((batch,), dtype=torch.bool, device=device)
        rows_all = torch.arange(batch, device=device)
        # NOTE: the exit decisions that do not depend on the data, from the thresholds on the host:
        # an early exit whose threshold is 1 for every row never fires (its head is skipped), and the
        # groups past an exit where every row fires unconditionally (threshold 0) never run here at all
        # (not even their deferred KV fill: a later call that needs them catches up in one window).
        host_tau = self._host_thresholds(tau, thresholds)
        head_off = [all(row[g] >= 1.0 for row in host_tau) for g in range(n_exits - 1)] + [False]
        reachable = n_exits
        for g in range(n_exits - 1):
            if all(any(row[i] <= 0.0 for i in range(g + 1)) for row in host_tau):
                reachable = g + 1
                break
        tau_fire = tau.masked_fill(tau >= 1.0, float("inf"))  # threshold 1: never fires
        norm = self.hf_model.model.norm
        eps = float(norm.variance_epsilon)
        # NOTE: a proposal not followed by advance() (a repeated propose) left drafts in the caches;
        # forget them so every row restarts from its pending token.
        state.filled.copy_(torch.minimum(state.filled, (state.length - 1)[None, :]))
        # end[b]: slots fed (or to feed) through group 0 by the current step.
        end = state.filled[0].clone()
        with torch.no_grad():
            for j in range(k):
                active = (num_draft > j) & ~stopped
                if not bool(active.any()):
                    break
                end = torch.where(active, state.length + j, end)
                step_token = torch.zeros((batch,), dtype=torch.int64, device=device)
                step_conf = torch.zeros((batch,), dtype=torch.float32, device=device)
                step_exit = torch.full((batch,), -1, dtype=torch.int64, device=device)
                need = active.clone()
                allowed = None  # [B, V] bool where masked rows are restricted, with masked [B] bool
                if logits_mask is not None:
                    allowed_rows = logits_mask.allowed(j, tokens[:, :j])
                    if allowed_rows is not None:
                        masked = torch.zeros((batch,), dtype=torch.bool, device=device)
                        masked[logits_mask.rows] = True
                        allowed = torch.ones((batch, vocab), dtype=torch.bool, device=device)
                        allowed[logits_mask.rows] = allowed_rows.to(device)
                for group in range(reachable):
                    stop = end if group == 0 else state.filled[group - 1]
                    if group > 0:
                        lag = state.filled[group - 1] - state.filled[group]
                        wanted, behind = torch.stack([need.any(), (lag > self.max_deferred).any()]).tolist()
                        if not wanted and not behind:
                            continue
                    out, n = self._run_group(state, group, stop)
                    if head_off[group]:
                        continue
                    rows = rows_all[need]  # NOTE: the one read of this exit's decision (rows still drafting)
                    if rows.shape[0] == 0:
                        continue
                    if allowed is not None:
                        # NOTE: masked rows decide apart (one more read); the others take the path below.
                        restricted = rows[masked[rows]]
                        if restricted.shape[0]:
                            self._masked_exit(
                                out[restricted, n[restricted] - 1], group, group == reachable - 1, restricted,
                                allowed[restricted], j, k, temperature, top_k, top_p, seeds, offsets,
                                tau_fire, filters, probs_flat, need, step_token, step_conf, step_exit,
                            )  # fmt: skip
                        rows = rows[~masked[rows]]
                        if rows.shape[0] == 0:
                            continue
                    # NOTE: when every row needs this exit (batch 1, early exits), skip the gathers.
                    every = rows.shape[0] == batch
                    hidden = out[rows, n[rows] - 1]  # [R, d]: the exit's hidden state at slot end - 1
                    last = group == reachable - 1
                    head, ids = self._exit_head_rows(group)
                    if any_sampled:
                        r_tokens, r_conf, fire = exit_sample(
                            hidden,
                            norm.weight,
                            head,
                            eps,
                            temperature if every else temperature[rows],
                            top_k if every else top_k[rows],
                            top_p if every else top_p[rows],
                            seeds if every else seeds[rows],
                            offsets if every else offsets[rows],
                            j,
                            0.0 if last else (tau_fire[:, group] if every else tau_fire[rows, group]),
                            probs_flat,
                            rows * k + j,
                            vocab_ids=ids,
                            filters=filters,
                            validate=False,
                        )
                    else:
                        r_tokens, r_conf, _ = exit_head(hidden, norm.weight, head, eps, 0.0)
                        if ids is not None:
                            r_tokens = ids[r_tokens]
                        fire = torch.ones_like(need[rows]) if last else r_conf >= tau_fire[rows, group]
                    # NOTE: written through the integer rows with where(), not boolean-mask indexing (a
                    # device-to-host read each).
                    step_token[rows] = torch.where(fire, r_tokens, step_token[rows])
                    step_conf[rows] = torch.where(fire, r_conf, step_conf[rows])
                    step_exit[rows] = torch.where(fire, self.exits[group], step_exit[rows])
                    need[rows] = need[rows] & ~fire
                tokens[:, j] = torch.where(active, step_token, tokens[:, j])
                confidence[:, j] = torch.where(active, step_conf, confidence[:, j])
                exits_out[:, j] = torch.where(active, step_exit, exits_out[:, j])
                proposed += active.to(torch.int64)
                # The draft token becomes the input of the next step, at slot length + j.
                slot = torch.where(active, state.length + j, torch.full_like(end, state.trash_slot))
                state.tokens.scatter_(1, slot[:, None], step_token[:, None])
                if stop_threshold is not None:
                    stopped |= active & (step_conf < stop_threshold)
        state.last_num_draft = proposed
        state.steps += 1
        return Proposal(
            tokens=tokens, probs=probs, num_draft=proposed, exits=exits_out, confidence=confidence
        )

    def _masked_exit(
        self, hidden, group, last, rows, allowed, j, k, temperature, top_k, top_p, seeds, offsets, tau_fire,
        filters, probs_flat, need, step_token, step_conf, step_exit,
    ) -> None:  # fmt: skip
        """Exit ``group`` for masked ``rows`` ([R]): logits restricted to ``allowed`` [R, V], then the same
        decision and sampling as the fused path, from those logits (``sample_logits``)."""
        head, ids = self._exit_head_rows(group)
        norm = self.hf_model.model.norm
        h32 = hidden.float()
        normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(
            hidden.dtype
        )
        logits = F.linear(normed * norm.weight, head).float()  # [R, Vh]
        keep = allowed if ids is None else allowed[:, ids]
        logits = logits.masked_fill(~keep, float("-inf"))
        if probs_flat is None:  # NOTE: every row is greedy: the one-hots go to a scratch buffer
            buffer, slots = torch.zeros((rows.shape[0], self.vocab_size), device=rows.device), None
        else:
            buffer, slots = probs_flat, rows * k + j
        r_tokens, r_conf, fire = sample_logits(
            logits,
            temperature[rows],
            top_k[rows],
            top_p[rows],
            seeds[rows] if probs_flat is not None else 0,
            offsets[rows] if probs_flat is not None else 0,
            j,
            0.0 if last else tau_fire[rows, group],
            buffer,
            torch.arange(rows.shape[0], device=rows.device) if slots is None else slots,
            vocab_ids=ids,
            filters=filters,
            validate=False,
        )
        step_token[rows] = torch.where(fire, r_tokens, step_token[rows])
        step_conf[rows] = torch.where(fire, r_conf, step_conf[rows])
        step_exit[rows] = torch.where(fire, self.exits[group], step_exit[rows])
        need[rows] = need[rows] & ~fire

    def advance(
        self,
        state: SortedDraftState,
        num_accepted: torch.Tensor,  # [B] int
        emitted: torch.Tensor,  # [B] int64
        active: torch.Tensor | None = None,  # [B] bool
    ) -> None:
        """Row b's context += its first ``num_accepted[b]`` drafts + ``emitted[b]``; caches roll back."""
        if not isinstance(state, SortedDraftState):
            raise TypeError(f"state must be a SortedDraftState from begin(), got {type(state).__name__}")
        batch, device = state.batch_size, state.length.device
        num_accepted = _per_row("num_accepted", num_accepted, batch, device, torch.int64)
        emitted = _per_row("emitted", emitted, batch, device, torch.int64)
        if active is None:
            active = torch.ones((batch,), dtype=torch.bool, device=device)
        else:
            active = _per_row("active", active, batch, device, torch.bool)
        bad = active & ((num_accepted < 0) | (num_accepted > state.last_num_draft))
        if bool(bad.any()):
            raise ValueError(
                "num_accepted must be in 0..num_draft of the last proposal "
                f"({state.last_num_draft.tolist()}), "
                f"got {num_accepted.tolist()}"
            )
        if bool((active & ((emitted < 0) | (emitted >= self.vocab_size))).any()):
            raise ValueError(f"emitted must be token ids in [0, {self.vocab_size}), got {emitted.tolist()}")
        new_length = torch.where(active, state.length + num_accepted + 1, state.length)
        if bool((new_length - state.pad > state.max_length).any()):
            raise ValueError(f"a row would exceed max_length={state.max_length} tokens")
        slot = torch.where(active, new_length - 1, torch.full_like(new_length, state.trash_slot))
        state.tokens.scatter_(1, slot[:, None], emitted[:, None])
        # Slots >= new_length - 1 hold rejected drafts (or nothing): forget their KV / hidden states.
        state.filled.copy_(torch.minimum(state.filled, (new_length - 1)[None, :]))
        state.length.copy_(new_length)
        state.last_num_draft = torch.zeros_like(state.last_num_draft)


def truncated_hf_model(hf_model: nn.Module, n_layers: int, *, share_embeddings: bool = False) -> nn.Module:
    """A new HF causal LM with the first ``n_layers`` decoder layers of ``hf_model`` (deep copies).

    The embedding, final norm, rotary buffers and ``lm_head`` are deep-copied as well, unless
    ``share_embeddings`` (then the new model uses ``hf_model``'s modules, marked as shared: see
    :func:`mark_shared_modules`).
    """
    base = hf_model.model
    all_layers = base.layers
    new_config = copy.deepcopy(hf_model.config)
    new_config.num_hidden_layers = n_layers
    if getattr(new_config, "layer_types", None) is not None:
        new_config.layer_types = list(new_config.layer_types[:n_layers])
    for attr in ("s2d_exits", "s2d_thresholds"):
        if hasattr(new_config, attr):
            delattr(new_config, attr)
    # NOTE: deep-copy the model without its layers (cheap), then only the kept layers; the memo maps
    # the old config to the new one so every copied module points at the truncated config.
    base.layers = nn.ModuleList()
    try:
        memo = {id(hf_model.config): new_config}
        if share_embeddings:
            for module in (base.embed_tokens, base.norm, hf_model.lm_head):
                memo[id(module)] = module
        new_model = copy.deepcopy(hf_model, memo)
    finally:
        base.layers = all_layers
    layer_memo = {id(hf_model.config): new_config}
    new_model.model.layers = nn.ModuleList(copy.deepcopy(all_layers[i], layer_memo) for i in range(n_layers))
    new_model.config = new_config
    new_model.model.config = new_config
    # NOTE: the deep copy carried hf_model's own marks along; this model shares exactly what it shares.
    object.__setattr__(new_model, SHARED_MODULES_ATTR, ())
    if share_embeddings:
        mark_shared_modules(new_model, ("model.embed_tokens", "model.norm", "lm_head"))
    return new_model


SHARED_MODULES_ATTR = "_s2d_shared_modules"


def mark_shared_modules(hf_model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Record that ``hf_model``'s submodules ``names`` belong to another model too (returns ``hf_model``).

    :meth:`SortedDraft.to` and :meth:`SortedDraft.from_pretrained` then cast / move converted copies of
    them (tied weights staying tied) and leave the other model's modules as they were.

    Parameters
    ----------
    hf_model : torch.nn.Module
        The draft's HF model.
    names : sequence of str
        Dotted submodule names (``"model.embed_tokens"``, ``"lm_head"``); added to those already marked.

    Raises
    ------
    ValueError
        When ``hf_model`` has no submodule of one of the names.
    """
    names = tuple(str(n) for n in names)
    for name in names:
        try:
            hf_model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"names: the model has no submodule {name!r} to mark as shared") from err
    known = tuple(getattr(hf_model, SHARED_MODULES_ATTR, ()) or ())
    # NOTE: object.__setattr__: a plain attribute, not a registered submodule or buffer.
    object.__setattr__(hf_model, SHARED_MODULES_ATTR, tuple(dict.fromkeys(known + names)))
    return hf_model


def shared_module_names(hf_model: nn.Module) -> tuple[str, ...]:
    """The submodule names :func:`mark_shared_modules` recorded on ``hf_model`` (empty: none)."""
    return tuple(getattr(hf_model, SHARED_MODULES_ATTR, ()) or ())


def convert_model(hf_model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """``hf_model.to(*args, **kwargs)``, but modules shared with another model are converted as copies.

    NOTE: ``nn.Module.to`` converts parameters in place (``param.data = ...``), so a module that another
    model holds too would change for that model as well. When the conversion changes a shared module's
    tensors, every marked module is replaced by a deep copy first (one memo: weights tied among them stay
    tied, and the model's own parameters tied to them follow the copies), and the marks are cleared (the
    model owns its copies). The copies are made before converting: the shared modules take twice their
    memory for a moment. A conversion that changes nothing keeps the sharing.
    """
    shared = shared_module_names(hf_model)
    if shared and _conversion_changes([hf_model.get_submodule(n) for n in shared], args, kwargs):
        memo: dict[int, Any] = {id(hf_model.config): hf_model.config}
        copies = {name: copy.deepcopy(hf_model.get_submodule(name), memo) for name in shared}
        for name, module in copies.items():
            hf_model.set_submodule(name, module)
        for module in hf_model.modules():
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    if tensor is not None and id(tensor) in memo:
                        store[key] = memo[id(tensor)]
        object.__setattr__(hf_model, SHARED_MODULES_ATTR, ())
    return hf_model.to(*args, **kwargs)


def _conversion_changes(modules: list[nn.Module], args: tuple, kwargs: dict) -> bool:
    """Whether ``module.to(*args, **kwargs)`` would change a tensor of one of ``modules``."""
    # NOTE: the parser nn.Module.to itself uses, so every accepted form of the arguments reads alike.
    device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if memory_format is not None:
        return True
    if device is not None:
        # NOTE: "cuda" means the current CUDA device, as in nn.Module.to.
        device = torch.empty(0, device=device).device
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if device is not None and tensor.device != device:
                return True
            if (
                dtype is not None
                and (tensor.is_floating_point() or tensor.is_complex())
                and tensor.dtype != dtype
            ):
                return True
    return False
