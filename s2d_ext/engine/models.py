"""What the engine is built from: the draft (any draft-protocol object, or a plain HF causal LM), the
targets, and each target's configuration (:class:`TargetConfig`), checked once when the engine is made."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from s2d_ext import _cache_compat
from s2d_ext.engine.params import RequestError, check_int
from s2d_ext.target import context_length, output_vocab_size

DRAFT_LENGTHS = ("fixed", "heuristic", "confidence")


@dataclasses.dataclass
class TargetConfig:
    """One target and how the draft serves it (configuration only: no per-call state).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM with the draft's vocabulary.
    num_draft_tokens : int
        Draft length (start value of "heuristic", cap of "confidence").
    draft_length : str
        "fixed", "heuristic" or "confidence" (see :mod:`s2d_ext.draft.policies`).
    thresholds : sequence of float, optional
        Exit thresholds of a sorted draft for this target's rows; None = the draft's own.
    stop_threshold : float, optional
        Confidence stop of the "confidence" policy.
    """

    model: torch.nn.Module
    num_draft_tokens: int = 5
    draft_length: str = "heuristic"
    thresholds: Sequence[float] | None = None
    stop_threshold: float | None = None

    def checked(self, name: str, draft: Any) -> TargetConfig:
        """A validated copy (thresholds as a tuple)."""
        check_target(name, self.model, draft)
        n = check_int("num_draft_tokens", self.num_draft_tokens, low=1)
        if self.draft_length not in DRAFT_LENGTHS:
            raise ValueError(f"draft_length must be one of {DRAFT_LENGTHS}, got {self.draft_length!r}")
        tau = self.thresholds
        if tau is not None:
            tau = [float(t) for t in (tau.tolist() if isinstance(tau, torch.Tensor) else tau)]
            if len(tau) != len(draft.exits) or any(not 0.0 <= t <= 1.0 for t in tau):
                raise ValueError(
                    f"thresholds must be {len(draft.exits)} values in [0, 1] (one per draft exit "
                    f"{draft.exits}), got {tau}"
                )
            tau = tuple(tau)
        return dataclasses.replace(self, num_draft_tokens=n, thresholds=tau)


def as_draft(draft: Any) -> Any:
    """A draft-protocol object for ``draft``: itself, or a wrapper of a plain HF causal LM.

    Llama / Mistral / Qwen2 models become a one-exit ``SortedDraft`` (its lean, cache-light forward);
    any other causal LM becomes an :class:`~s2d_ext.draft.hf_draft.HFDraft`.
    """
    from s2d_ext.draft.protocol import DraftModel

    if isinstance(draft, DraftModel):
        return draft
    if (
        isinstance(draft, torch.nn.Module)
        and hasattr(draft, "config")
        and hasattr(draft, "get_output_embeddings")
    ):
        from s2d_ext.draft.hf_draft import HFDraft
        from s2d_ext.draft.lean_llama import check_architecture
        from s2d_ext.draft.sorted_draft import SortedDraft

        try:
            check_architecture(draft.config)
            single_device = len({p.device for p in draft.parameters()}) == 1
        except ValueError:
            single_device = False
        if not single_device:
            return HFDraft(draft)
        was_training = draft.training
        wrapped = SortedDraft(draft, exits=(draft.config.num_hidden_layers,), thresholds=(0.0,))
        draft.train(was_training)  # NOTE: SortedDraft calls eval(); leave the caller's module as it was
        return wrapped
    raise TypeError(
        f"draft must be a SortedDraft (or another s2d_ext DraftModel) or a transformers causal LM, "
        f"got {type(draft).__name__}"
    )


def check_target(name: str, model: Any, draft: Any) -> None:
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        raise TypeError(f"target {name!r} must be a transformers causal LM, got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"target {name!r} is an encoder-decoder model; speculate() needs a causal LM")
    vocab = output_vocab_size(model)
    if vocab != draft.vocab_size:
        raise ValueError(
            f"draft vocabulary ({draft.vocab_size} tokens) does not match target {name!r} ({vocab} tokens); "
            "the draft must share the target's tokenizer and lm_head size"
        )


def target_window(model: torch.nn.Module) -> int | None:
    """The target's sliding window (None: full attention), read off a fresh cache."""
    return _cache_compat.sliding_window_of(_cache_compat.new_cache(model))


def check_length(
    name: str, model: torch.nn.Module, window: int | None, longest: int, max_new_tokens: int, arg: str
) -> None:
    """A prompt of ``longest`` tokens plus ``max_new_tokens`` must fit target ``name``'s context (and
    stay below its sliding window: holes shift cache indices, and HF slides its window over indices)."""
    context = context_length(model)
    if context is not None and longest > context:
        raise RequestError(
            f"{arg}: a prompt of {longest} tokens is longer than the context of target {name!r} ({context})"
        )
    if context is not None and longest + max_new_tokens > context:
        raise RequestError(
            f"max_new_tokens={max_new_tokens}: prompt ({longest}) + new tokens exceeds the context of "
            f"target {name!r} ({context})"
        )
    reach = longest + max_new_tokens
    if window is not None and reach >= window:
        raise RequestError(
            f"max_new_tokens: target {name!r} uses sliding-window attention (window {window}) and "
            f"prompt + max_new_tokens ({reach}) must stay below it"
        )


def draft_limit(draft: Any) -> int | None:
    """The most tokens (prompt + new) a draft row may hold, when the draft says (None: unknown)."""
    from s2d_ext.draft.hf_draft import HFDraft
    from s2d_ext.draft.sorted_draft import SortedDraft

    if isinstance(draft, SortedDraft):
        from s2d_ext.draft.lean_llama import max_context, sliding_window_of

        limits = [max_context(draft.config), sliding_window_of(draft.config)]
        limits = [int(v) for v in limits if v is not None and v != float("inf")]
        return min(limits) if limits else None
    if isinstance(draft, HFDraft):
        context = context_length(draft.model)
        window = target_window(draft.model)
        limits = [v for v in (context, None if window is None else window - 1) if v is not None]
        return min(limits) if limits else None
    return None
