"""Surgery on Hugging Face models for drafts: cutting a model's first layers into a new one, and modules a
draft shares with its target (marked, so that casting or moving the draft converts copies of them and
leaves the target as it was)."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from s2d_ext.draft.lean_llama import check_architecture
from s2d_ext.packaged_models import drop_gguf_quantizer

#: The attribute :func:`mark_shared_modules` records the shared submodule names in.
SHARED_MODULES_ATTR = "_s2d_shared_modules"


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
    # NOTE: a model loaded with gguf_file= keeps transformers' GGUF quantizer, and save_pretrained refuses
    # it ("not serializable") although its weights are plain dequantised tensors: the copy forgets it.
    drop_gguf_quantizer(new_model)
    if share_embeddings:
        mark_shared_modules(new_model, ("model.embed_tokens", "model.norm", "lm_head"))
    return new_model


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


def load_hf_model(
    model_or_path: nn.Module | str | os.PathLike,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    hf_kwargs: dict[str, Any],
) -> nn.Module:
    """The HF causal LM a draft is built on: loaded from a checkpoint path (``hf_kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained``), or a model object used in place; cast to ``dtype`` and moved
    to ``device`` with :func:`convert_model` (shared modules as converted copies)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoConfig, AutoModelForCausalLM

        check_architecture(AutoConfig.from_pretrained(model_or_path))
        if dtype is not None:
            hf_kwargs = {**hf_kwargs, "dtype": dtype}
        hf_model = AutoModelForCausalLM.from_pretrained(model_or_path, **hf_kwargs)
    elif isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
        hf_model = model_or_path
        if dtype is not None:
            hf_model = convert_model(hf_model, dtype)
    else:
        raise TypeError(
            f"model_or_path must be an HF causal LM or a checkpoint path, got {type(model_or_path).__name__}"
        )
    if device is not None:
        hf_model = convert_model(hf_model, device)
    return hf_model
