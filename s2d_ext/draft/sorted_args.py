"""SortedDraft's argument checks: the constructor's, ``begin``'s and ``propose``'s.

The value checks of a call go through :func:`s2d_ext.ops._backend.check_values`: one device read for all
of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from s2d_ext.draft.lean_llama import max_context, sliding_window_of
from s2d_ext.draft.static_cache import SortedDraftState
from s2d_ext.ops._backend import check_values, to_per_row

# NOTE: the dtypes the exit ops (exit_head / exit_sample) and the lean forward implement.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def describe(hf_model: nn.Module) -> str:
    """How errors name a draft: its HF class and layer count."""
    return f"draft {type(hf_model).__name__} ({hf_model.config.num_hidden_layers} layers)"


def check_dtype_argument(dtype: Any, hf_model: nn.Module | None = None) -> None:
    """Raise ValueError when a requested draft ``dtype`` is not one SortedDraft runs in."""
    if dtype is None or dtype in SUPPORTED_DTYPES:
        return
    who = f"{describe(hf_model)}: " if hf_model is not None else ""
    raise ValueError(f"{who}dtype={dtype} is not supported; SortedDraft runs in {_DTYPE_NAMES}")


def check_model_dtype(hf_model: nn.Module) -> None:
    """Raise ValueError when a floating-point weight of ``hf_model`` is not in a supported dtype."""
    for name, param in hf_model.named_parameters():
        if param.is_floating_point() and param.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{describe(hf_model)} has dtype {param.dtype} ({name}); SortedDraft runs in "
                f"{_DTYPE_NAMES}: cast it first, e.g. model.to(torch.float32)"
            )


def validate_exits(exits: Sequence[int], num_layers: int) -> tuple[int, ...]:
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


def saved_exits_and_thresholds(
    config: Any, exits: Sequence[int] | None, thresholds: Sequence[float] | None
) -> tuple[Sequence[int], Sequence[float]]:
    """``exits`` / ``thresholds`` with the defaults of :meth:`SortedDraft.from_pretrained`: the config's
    ``s2d_exits`` / ``s2d_thresholds`` (its thresholds only when they belong to the same exits), else
    ``(num_hidden_layers,)`` and 0.5 for every early exit, 0 for the last."""
    saved_exits = getattr(config, "s2d_exits", None)
    saved_thresholds = getattr(config, "s2d_thresholds", None)
    if exits is None:
        exits = saved_exits or (config.num_hidden_layers,)
        if thresholds is None:
            thresholds = saved_thresholds
    if thresholds is None:
        same_exits = saved_exits is not None and tuple(saved_exits) == tuple(exits)
        if saved_thresholds is not None and same_exits:
            thresholds = saved_thresholds
        else:
            thresholds = (0.5,) * (len(exits) - 1) + (0.0,)
    return exits, thresholds


def validate_thresholds(thresholds: Sequence[float], exits: tuple[int, ...]) -> tuple[float, ...]:
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


def checked_prompt(
    draft: Any, input_ids: Any, attention_mask: Any, max_length: Any
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``begin``'s arguments checked: input_ids [B, L] int64 on the draft's device, each row's left padding
    ([B] int64 there, and on the host)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, L] tensor, got {getattr(input_ids, 'shape', input_ids)}")
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
        draft.dtype not in SUPPORTED_DTYPES
        or draft.hf_model.model.embed_tokens.weight.dtype not in SUPPORTED_DTYPES
    ):
        check_model_dtype(draft.hf_model)
    device = draft.device
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    if bool(((input_ids < 0) | (input_ids >= draft.vocab_size)).any()):
        raise ValueError(f"input_ids must be token ids in [0, {draft.vocab_size})")
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
    pads = pad.tolist()  # NOTE: the state keeps them on the host (joins size their slots with them)
    longest = prompt_len - min(pads)
    if max_length < longest:
        raise ValueError(f"max_length={max_length} is shorter than the longest prompt ({longest} tokens)")
    context = max_context(draft.config)
    if max_length > context:
        raise ValueError(
            f"max_length={max_length} exceeds the model's context (max_position_embeddings={context})"
        )
    window = sliding_window_of(draft.config)
    if window is not None and max_length > window:
        raise ValueError(
            f"max_length={max_length} exceeds the model's sliding_window={window}; SortedDraft "
            "implements full attention only, so sequences must fit in the window"
        )
    return input_ids, pad, pads


@dataclass
class ProposeArgs:
    """``propose``'s checked arguments ([B] tensors on the state's device)."""

    num_draft: torch.Tensor  # [B] int64 in 0..k
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor | None  # [B] int64 (sampled calls)
    offsets: torch.Tensor | None  # [B] int64 (sampled calls)
    thresholds: torch.Tensor  # [B, n_exits] float32
    stop_threshold: torch.Tensor | None  # [B] float32
    sampled: bool  # a row samples (temperature > 0)
    filters: bool  # a row samples and some row uses top-k / top-p


def checked_propose_args(
    draft: Any,
    state: Any,
    num_tokens: int,
    num_draft: torch.Tensor | int | None,  # [B] or scalar
    temperature: torch.Tensor | float,  # [B] or scalar
    top_k: torch.Tensor | int,  # [B] or scalar
    top_p: torch.Tensor | float,  # [B] or scalar
    seeds: torch.Tensor | int | None,  # [B] or scalar
    offsets: torch.Tensor | int | None,  # [B] or scalar
    thresholds: torch.Tensor | Sequence[float] | None,  # [B, n_exits] or [n_exits]
    stop_threshold: torch.Tensor | float | None,  # [B] or scalar
) -> ProposeArgs:
    """``propose``'s arguments (see :meth:`SortedDraft.propose`) as [B] tensors on the state's device,
    checked: types and shapes on the host, every value check and the two flags the call branches on in one
    device read."""
    if not isinstance(state, SortedDraftState):
        raise TypeError(f"state must be a SortedDraftState from begin(), got {type(state).__name__}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    batch, device, k = state.batch_size, state.length.device, num_tokens
    num_draft = to_per_row("num_draft", k if num_draft is None else num_draft, batch, device, torch.int64)
    temperature = to_per_row("temperature", temperature, batch, device, torch.float32)
    top_k = to_per_row("top_k", top_k, batch, device, torch.int64)
    top_p = to_per_row("top_p", top_p, batch, device, torch.float32)
    tau = _thresholds_per_row(draft, thresholds, batch, device)
    too_long = state.num_tokens + num_draft > state.max_length  # [B] bool

    def too_long_message() -> str:
        row = int(too_long.nonzero()[0, 0])
        return (
            f"row {row} would exceed max_length={state.max_length}: it holds "
            f"{int(state.num_tokens[row])} tokens and asks for {int(num_draft[row])} drafts "
            "(the draft is longer than the cache)"
        )

    sampled = temperature > 0
    checks = [
        (
            ((num_draft >= 0) & (num_draft <= k)).all(),
            lambda: f"num_draft must be in 0..num_tokens={k}, got {num_draft.tolist()}",
        ),
        (~too_long.any(), too_long_message),
        (((temperature >= 0) & torch.isfinite(temperature)).all(), "temperature must be finite and >= 0"),
        ((top_k >= 0).all(), "top_k must be >= 0 (0 disables it)"),
        (((top_p > 0) & (top_p <= 1)).all(), "top_p must be in (0, 1]"),
        (k <= 2**16, f"num_tokens must be at most {2**16} (Philox holds the draft position in 16 bits)"),
        (
            ~sampled.any() if seeds is None else True,
            "seeds are required when a row samples (temperature > 0)",
        ),
    ]
    if thresholds is not None:
        checks.append((((tau >= 0) & (tau <= 1)).all(), "thresholds must be in [0, 1]"))
    # NOTE: checked once here (one device read, with the two flags the call branches on), so the exit op
    # skips its per-call value checks (validate=False).
    any_sampled, any_filter = check_values(checks, [sampled.any(), ((top_k > 0) | (top_p < 1)).any()])
    if any_sampled:
        seeds = to_per_row("seeds", seeds, batch, device, torch.int64)
        offsets = to_per_row("offsets", 0 if offsets is None else offsets, batch, device, torch.int64)
    if stop_threshold is not None:
        stop_threshold = to_per_row("stop_threshold", stop_threshold, batch, device, torch.float32)
    return ProposeArgs(
        num_draft, temperature, top_k, top_p, seeds, offsets, tau, stop_threshold, any_sampled,
        any_sampled and any_filter,
    )  # fmt: skip


def _thresholds_per_row(draft: Any, thresholds: Any, batch: int, device: torch.device) -> torch.Tensor:
    """[B, n_exits] float32 exit thresholds (None: the draft's own)."""
    n_exits = len(draft.exits)
    if thresholds is None:
        return torch.tensor(draft.thresholds, dtype=torch.float32, device=device).expand(batch, n_exits)
    tau = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
    if tau.dim() == 1:
        tau = tau.expand(batch, -1)
    if tuple(tau.shape) != (batch, n_exits):
        raise ValueError(
            f"thresholds must be [B={batch}, n_exits={n_exits}] (or [n_exits]), got {tuple(tau.shape)}"
        )
    return tau


def checked_advance_args(
    state: SortedDraftState,
    num_accepted: Any,  # [B] int
    emitted: Any,  # [B] int64
    active: Any,  # [B] bool, or None (every row)
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SortedDraft.advance``'s arguments as [B] tensors on the state's device, or a ValueError / TypeError
    naming the argument."""
    if not isinstance(state, SortedDraftState):
        raise TypeError(f"state must be a SortedDraftState from begin(), got {type(state).__name__}")
    batch, device = state.batch_size, state.length.device
    num_accepted = to_per_row("num_accepted", num_accepted, batch, device, torch.int64)
    emitted = to_per_row("emitted", emitted, batch, device, torch.int64)
    if active is None:
        active = torch.ones((batch,), dtype=torch.bool, device=device)
    else:
        active = to_per_row("active", active, batch, device, torch.bool)
    bad = active & ((num_accepted < 0) | (num_accepted > state.last_num_draft))
    if bool(bad.any()):
        raise ValueError(
            "num_accepted must be in 0..num_draft of the last proposal "
            f"({state.last_num_draft.tolist()}), "
            f"got {num_accepted.tolist()}"
        )
    if bool((active & ((emitted < 0) | (emitted >= vocab_size))).any()):
        raise ValueError(f"emitted must be token ids in [0, {vocab_size}), got {emitted.tolist()}")
    return num_accepted, emitted, active
