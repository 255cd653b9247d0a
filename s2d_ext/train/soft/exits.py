"""A sorted model's exits: validating them, recording them in the config, and cutting a model (or a
shared-embedding draft) down to its first layers."""

from __future__ import annotations

import copy
from collections.abc import Sequence


def validate_exits(exits: Sequence[int], num_layers: int, *, name: str = "exits") -> tuple[int, ...]:
    """Check that ``exits`` are strictly increasing layer counts in ``1..num_layers`` ending at it.

    Returns the exits as a tuple of ints; raises ValueError naming ``name`` otherwise.
    """
    try:
        exits_t = tuple(int(e) for e in exits)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of ints, got {exits!r}") from exc
    if not exits_t:
        raise ValueError(f"{name} must not be empty")
    if any(e < 1 for e in exits_t):
        raise ValueError(f"{name}={list(exits_t)}: every exit must be >= 1 (a number of layers)")
    if any(b <= a for a, b in zip(exits_t, exits_t[1:])):
        raise ValueError(f"{name}={list(exits_t)} must be strictly increasing")
    if exits_t[-1] != num_layers:
        raise ValueError(
            f"{name}={list(exits_t)} do not fit a model of {num_layers} layers: the last exit must equal "
            f"the number of layers ({num_layers})"
        )
    return exits_t


def layer_count(model) -> int:
    return int(model.config.num_hidden_layers)


def model_exits(model) -> tuple[int, ...]:
    """The exits stored in ``model.config.s2d_exits``, or ``(num_hidden_layers,)`` for a plain model."""
    exits = getattr(model.config, "s2d_exits", None)
    return tuple(int(e) for e in exits) if exits else (layer_count(model),)


def base_model(model):
    """The decoder stack (``model.model`` for Llama-family CausalLMs)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "norm") or not hasattr(base, "layers"):
        raise TypeError(
            f"model must be a Llama-family CausalLM (with .model.layers and .model.norm), got "
            f"{type(model).__name__}"
        )
    return base


def _default_thresholds(n: int) -> list[float]:
    # NOTE: the last exit always accepts (threshold 0); earlier ones exit when confident.
    return [0.5] * (n - 1) + [0.0]


def set_exit_config(model, exits: Sequence[int], thresholds: Sequence[float] | None = None) -> None:
    """Write ``s2d_exits`` / ``s2d_thresholds`` into ``model.config`` (the sorted-draft checkpoint format)."""
    exits_t = validate_exits(exits, layer_count(model))
    if thresholds is None:
        old = getattr(model.config, "s2d_thresholds", None)
        thresholds = (
            old if old is not None and len(old) == len(exits_t) else _default_thresholds(len(exits_t))
        )
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != len(exits_t):
        raise ValueError(f"thresholds has {len(thresholds)} values but there are {len(exits_t)} exits")
    if any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds={thresholds} must lie in [0, 1]")
    model.config.s2d_exits = list(exits_t)
    model.config.s2d_thresholds = thresholds


def truncate_model(model, num_layers: int, exits: Sequence[int] | None = None, thresholds=None):
    """A new model holding a copy of the embeddings, the first ``num_layers`` decoder layers, the final norm
    and the lm_head of ``model`` (a Llama-family HF CausalLM); the input model is left unchanged.

    Parameters
    ----------
    model : PreTrainedModel with ``.model.layers`` / ``.model.norm`` (Llama, Mistral, Qwen2, ...)
    num_layers : layers to keep, ``1 <= num_layers <= model.config.num_hidden_layers``
    exits : exits of the sorted model (default ``(num_layers,)``), stored in ``config.s2d_exits``
    thresholds : exit thresholds stored in ``config.s2d_thresholds`` (default 0.5 ..., 0.0)
    """
    from transformers import AutoModelForCausalLM

    base_layers = layer_count(model)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
    if not 1 <= num_layers <= base_layers:
        raise ValueError(f"num_layers={num_layers} does not fit the base model's {base_layers} layers")
    exits = validate_exits(exits if exits is not None else (num_layers,), num_layers)
    base_model(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    # NOTE: configs with per-layer lists (layer_types for sliding/full attention) must shrink with the stack.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    for attr in ("s2d_exits", "s2d_thresholds"):
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = next(model.parameters()).dtype
    new = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = getattr(model, "base_model_prefix", "model")
    kept = {}
    for key, value in model.state_dict().items():
        marker = f"{prefix}.layers."
        if key.startswith(marker) and int(key[len(marker) :].split(".", 1)[0]) >= num_layers:
            continue
        kept[key] = value.detach().clone()
    missing, unexpected = new.load_state_dict(kept, strict=False)
    # NOTE: rotary inv_freq buffers may be non-persistent; tied lm_head may be absent from the state dict.
    missing = [
        k for k in missing if "rotary_emb" not in k and not (k == "lm_head.weight" and has_tied_head(new))
    ]
    if missing or unexpected:
        raise RuntimeError(f"truncation failed: missing={missing} unexpected={unexpected}")
    new.to(next(model.parameters()).device)
    set_exit_config(new, exits, thresholds)
    return new


def has_tied_head(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def cut_draft(target, num_layers: int, exits: Sequence[int], thresholds: Sequence[float] | None = None):
    """The first ``num_layers`` layers of ``target`` as a sorted draft whose embedding and LM head *are* the
    target's modules (shared, frozen: SoFT trains the layers and the final norm only).

    NOTE: the final norm is the draft's own copy: every exit reads through it, so SoFT retunes it, and the
    target's must stay as it is.
    """
    draft = truncate_model(target, num_layers, exits, thresholds)
    draft.model.embed_tokens = target.get_input_embeddings()
    draft.lm_head = target.get_output_embeddings()
    for module in (draft.model.embed_tokens, draft.lm_head):
        for p in module.parameters():
            p.requires_grad_(False)
    return draft
