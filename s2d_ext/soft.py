"""Sorted fine-tuning (SoFT, arXiv 2309.08968 as used by S2D, arXiv 2407.01955).

A sorted model is an ordinary Llama-family causal LM whose prefixes (the first ``e`` layers, for each
exit ``e``) are trained to be language models too: every exit's hidden state goes through the *shared*
final norm and lm_head. SoFT minimises the mean over exits of the next-token cross-entropy:

    loss = sum_e w_e * (ce_weight * CE_e + sum_t lambda_t * T^2 * KL(p_t^T || q_e^T))

where ``w_e = 1 / n_exits`` (the paper's plain mean) unless ``exit_weights`` is given, ``CE_e`` is the
token-mean next-token cross-entropy of exit ``e``, and the optional distillation term pulls every exit
toward one or several *targets'* next-token distributions ``p_t`` (targets must share the vocabulary):
``KL(p || q) = sum_v p_v (log p_v - log q_v)`` with both distributions softened by the temperature ``T``
(``p^T = softmax(target_logits / T)``) and the usual ``T^2`` factor so gradients keep their scale.
``lambda_t`` is the per-target weight. With one exit equal to the model's depth and no targets this is
plain language-model training (the family builder uses it to train the targets too).

This module works on plain HF models (``LlamaForCausalLM`` and relatives, e.g. truncated by
:func:`truncate_model`), independent of :class:`s2d_ext.SortedDraft`; its checkpoints are in the sorted-draft
format (``config.s2d_exits`` / ``config.s2d_thresholds``) and load with ``SortedDraft.from_pretrained``.

Entry points: :func:`exit_logits`, :func:`soft_loss`, :func:`truncate_model`, :func:`load_texts`,
:func:`tokenize_blocks`, :func:`train_soft` (gradient accumulation, resumable checkpoints, tqdm bar).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

#: File written beside the model in a SoFT output folder: marks it as ours and holds the resume state.
STATE_FILE = "soft_state.pt"
#: Human-readable record of the training configuration and history.
CONFIG_FILE = "soft_config.json"

__all__ = [
    "SoftConfig",
    "SoftLossOutput",
    "SoftResult",
    "exit_logits",
    "heldout_loss",
    "load_texts",
    "model_exits",
    "prepare_output_dir",
    "save_checkpoint",
    "soft_loss",
    "tokenize_blocks",
    "train_soft",
    "truncate_model",
    "validate_exits",
]


# ----------------------------------------------------------------------------------------------------------
# Exits and truncation
# ----------------------------------------------------------------------------------------------------------


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


def _num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def model_exits(model) -> tuple[int, ...]:
    """The exits stored in ``model.config.s2d_exits``, or ``(num_hidden_layers,)`` for a plain model."""
    exits = getattr(model.config, "s2d_exits", None)
    return tuple(int(e) for e in exits) if exits else (_num_layers(model),)


def _base(model):
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
    exits_t = validate_exits(exits, _num_layers(model))
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

    base_layers = _num_layers(model)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
    if not 1 <= num_layers <= base_layers:
        raise ValueError(f"num_layers={num_layers} does not fit the base model's {base_layers} layers")
    exits = validate_exits(exits if exits is not None else (num_layers,), num_layers)
    _base(model)
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
    missing = [k for k in missing if "rotary_emb" not in k and not (k == "lm_head.weight" and _tied(new))]
    if missing or unexpected:
        raise RuntimeError(f"truncation failed: missing={missing} unexpected={unexpected}")
    new.to(next(model.parameters()).device)
    set_exit_config(new, exits, thresholds)
    return new


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


def exit_logits(
    model, input_ids, attention_mask=None, exits: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Logits of each exit through the shared final norm and lm_head.

    Parameters
    ----------
    model : Llama-family HF CausalLM
    input_ids : [B, L] int64
    attention_mask : [B, L] (1 = token) or None
    exits : layer counts (default: ``model_exits(model)``)

    Returns
    -------
    list of [B, L, V] float tensors, one per exit, in ``exits`` order.
    """
    exits = validate_exits(exits if exits is not None else model_exits(model), _num_layers(model))
    base = _base(model)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
    )
    hidden = out.hidden_states  # tuple of num_layers + 1 tensors [B, L, d]; [0] = embeddings
    head = model.get_output_embeddings()
    logits = []
    for e in exits:
        if e == _num_layers(model):
            # NOTE: HF returns the *normed* final state as hidden_states[-1]; use the model's own logits.
            logits.append(out.logits)
        else:
            logits.append(head(base.norm(hidden[e])))
    return logits


@dataclass
class SoftLossOutput:
    """Result of :func:`soft_loss`: ``loss`` (scalar, differentiable), per-exit CE and KL (detached)."""

    loss: torch.Tensor  # [] scalar
    ce_per_exit: torch.Tensor  # [n_exits] float32
    kl_per_exit: torch.Tensor  # [n_exits] float32 (weighted sum over targets; 0 without targets)


def soft_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    exits: Sequence[int] | None = None,
    *,
    target_logits: Sequence[torch.Tensor] | None = None,
    distill_weights: Sequence[float] | None = None,
    distill_temperature: float = 1.0,
    ce_weight: float = 1.0,
    exit_weights: Sequence[float] | None = None,
) -> SoftLossOutput:
    """SoFT loss (see the module docstring for the formula).

    Parameters
    ----------
    model : Llama-family HF CausalLM being trained
    input_ids : [B, L] int64 (L >= 2)
    attention_mask : [B, L] (1 = token) or None; positions whose token or next token is padding are ignored
    exits : layer counts (default: ``model_exits(model)``)
    target_logits : per target, [B, L, V] logits of a target on the same ``input_ids`` (no grad needed)
    distill_weights : per target weight lambda_t (default 1.0 each)
    distill_temperature : softening temperature T > 0 of the distillation term
    ce_weight : weight of the cross-entropy term
    exit_weights : per exit weights w_e (default uniform 1 / n_exits)
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, L] with L >= 2, got shape {tuple(input_ids.shape)}")
    exits = validate_exits(exits if exits is not None else model_exits(model), _num_layers(model))
    n_exits = len(exits)
    if exit_weights is None:
        weights = [1.0 / n_exits] * n_exits
    else:
        weights = [float(w) for w in exit_weights]
        if len(weights) != n_exits:
            raise ValueError(f"exit_weights has {len(weights)} values but there are {n_exits} exits")
    target_logits = list(target_logits or [])
    if distill_weights is None:
        distill_weights = [1.0] * len(target_logits)
    distill_weights = [float(w) for w in distill_weights]
    if len(distill_weights) != len(target_logits):
        raise ValueError(
            f"distill_weights has {len(distill_weights)} values but there are {len(target_logits)} targets"
        )
    if distill_temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")

    labels = input_ids[:, 1:].clone()  # [B, L-1]
    if attention_mask is not None:
        valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # [B, L-1]
        labels[~valid] = -100
    else:
        valid = torch.ones_like(labels, dtype=torch.bool)
    n_valid = valid.sum().clamp_min(1)

    all_logits = exit_logits(model, input_ids, attention_mask, exits)
    vocab = all_logits[0].shape[-1]
    target_logprobs = []
    for t, tl in enumerate(target_logits):
        if tl.shape[:2] != input_ids.shape or tl.shape[-1] != vocab:
            raise ValueError(
                f"target_logits[{t}] has shape {tuple(tl.shape)}, expected {(*input_ids.shape, vocab)} "
                "(targets must share the draft's vocabulary)"
            )
        target_logprobs.append(F.log_softmax(tl[:, :-1].detach().float() / distill_temperature, dim=-1))

    total = input_ids.new_zeros((), dtype=torch.float32)
    ces, kls = [], []
    for w, logits in zip(weights, all_logits):
        shifted = logits[:, :-1].float()  # [B, L-1, V]
        ce = F.cross_entropy(
            shifted.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        ce = ce / n_valid
        kl_total = shifted.new_zeros(())
        if target_logprobs:
            log_q = F.log_softmax(shifted / distill_temperature, dim=-1)
            for lam, log_p in zip(distill_weights, target_logprobs):
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, L-1]
                kl = (kl * valid).sum() / n_valid * distill_temperature**2
                kl_total = kl_total + lam * kl
        total = total + w * (ce_weight * ce + kl_total)
        ces.append(ce.detach())
        kls.append(kl_total.detach())
    return SoftLossOutput(loss=total, ce_per_exit=torch.stack(ces), kl_per_exit=torch.stack(kls))


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def load_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents of a training file: plain text (the whole file is one document) or JSONL (``.jsonl`` /
    ``.json`` suffix, or a first line that is a JSON object) with one ``{text_field: str}`` object per line.

    Raises FileNotFoundError for a missing file and ValueError for an empty one or a malformed JSONL line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} is not a regular file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise ValueError(f"data file {str(path)!r} is empty")
    first = raw.lstrip().split("\n", 1)[0].strip()
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    if not is_jsonl and first.startswith("{"):
        try:
            is_jsonl = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_jsonl = False
    if not is_jsonl:
        return [raw]
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data file {str(path)!r} line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ValueError(f"data file {str(path)!r} line {lineno}: no string field {text_field!r}")
        if obj[text_field]:
            texts.append(obj[text_field])
    if not texts:
        raise ValueError(f"data file {str(path)!r} holds no non-empty {text_field!r} texts")
    return texts


def tokenize_blocks(
    texts: Sequence[str], tokenizer, seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Tokenize documents, join them with the EOS token and cut the stream into blocks.

    Returns [n_blocks, seq_len] int64 (the trailing remainder is dropped; a stream shorter than one block
    gives a single shorter block). ``max_tokens`` caps the stream length.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    if len(stream) < 2:
        raise ValueError("the data holds fewer than 2 tokens: nothing to train on")
    ids = torch.tensor(stream, dtype=torch.long)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        return ids.unsqueeze(0)
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SoftConfig:
    """Hyper-parameters of :func:`train_soft`. ``batch_size`` is per micro-batch; one optimizer step sees
    ``batch_size * grad_accum`` blocks."""

    exits: tuple[int, ...] | None = None  # default: the model's own exits
    thresholds: tuple[float, ...] | None = None  # written to config.s2d_thresholds
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    ce_weight: float = 1.0
    exit_weights: tuple[float, ...] | None = None
    distill_weights: tuple[float, ...] = ()
    distill_temperature: float = 1.0
    save_every: int = 0  # optimizer steps between checkpoints (0 = only at the end)
    draft_vocab: int = 0  # > 0: save the N most frequent tokens of the data as the draft vocabulary
    # NOTE: train_soft_self_data only: the learning rate of norm weights (and other 1-D parameters) is
    # lr * norm_lr_scale. A truncated model's exits read its hidden states through the final norm; their
    # logits start far too confident (CE 16-20 nats on SmolLM2), and the norm's gain fixes that scale fastest.
    norm_lr_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded in soft_config.json

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )


@dataclass
class SoftResult:
    model: Any
    step: int
    history: list[dict]  # one entry per optimizer step: {"step", "loss", "ce": [...], "lr"}
    tokens_seen: int


def _check_config(config: SoftConfig) -> None:
    for name in ("max_steps", "batch_size", "grad_accum"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if config.lr <= 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if config.warmup_steps < 0 or config.save_every < 0:
        raise ValueError("warmup_steps and save_every must be >= 0")
    vocab = config.draft_vocab
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 0:
        raise ValueError(f"draft_vocab must be an int >= 0 (0 = none), got {config.draft_vocab!r}")


def _batch_indices(step: int, micro: int, config: SoftConfig, n_blocks: int) -> torch.Tensor:
    """Block indices of a micro-batch. NOTE: a pure function of (seed, step, micro) so resuming needs no RNG
    state: the stream visits a fresh seeded permutation of all blocks every epoch."""
    start = (step * config.grad_accum + micro) * config.batch_size
    positions = torch.arange(start, start + config.batch_size)
    epochs = positions // n_blocks
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(
            n_blocks, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        )
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n_blocks]
    return out


def prepare_output_dir(out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Check ``out_dir`` before training; returns True when training should resume from it.

    An absent or empty folder is fine. A folder holding a SoFT checkpoint (``soft_state.pt``) is resumed with
    ``resume`` or replaced with ``overwrite``, else refused. A folder holding anything else is always refused.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is a file; refusing to overwrite it")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise ValueError(f"cannot resume: output folder {str(out)!r} holds no SoFT checkpoint")
        return False
    if not (out / STATE_FILE).is_file():
        raise ValueError(
            f"output folder {str(out)!r} is not empty and holds no SoFT checkpoint; refusing to overwrite it "
            "(choose a new or empty folder)"
        )
    if resume:
        return True
    if overwrite:
        return False
    raise ValueError(
        f"output folder {str(out)!r} already holds a SoFT checkpoint; pass resume=True (--resume) to "
        "continue it or overwrite=True (--overwrite) to replace it"
    )


def save_checkpoint(
    model,
    out_dir,
    *,
    tokenizer=None,
    optimizer=None,
    step: int = 0,
    config=None,
    history=None,
    tokens_seen: int = 0,
    draft_vocab: torch.Tensor | None = None,
) -> Path:
    """Save ``model`` with ``save_pretrained`` (safetensors) plus the resume state, atomically: everything is
    written to a sibling temporary folder that then replaces ``out_dir``. ``draft_vocab`` (ids) is saved
    as ``draft_vocab.safetensors`` (:mod:`s2d_ext.draft.draft_vocab`)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if draft_vocab is not None:
        from s2d_ext.draft.draft_vocab import save_draft_vocab

        save_draft_vocab(tmp, draft_vocab)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "history": history or [],
            "tokens_seen": tokens_seen,
        },
        tmp / STATE_FILE,
    )
    record = {
        "step": step,
        "tokens_seen": tokens_seen,
        "exits": list(model_exits(model)),
        "config": _jsonable(dataclasses.asdict(config)) if config is not None else None,
        "last": (history or [None])[-1],
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def train_soft(
    model,
    blocks: torch.Tensor,
    config: SoftConfig,
    *,
    targets: Sequence[Any] = (),
    out_dir: str | os.PathLike | None = None,
    tokenizer=None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "SoFT",
) -> SoftResult:
    """Sorted fine-tuning of ``model`` in place on ``blocks``.

    Parameters
    ----------
    model : Llama-family HF CausalLM (e.g. from :func:`truncate_model`); trained in its own dtype/device
    blocks : [n_blocks, seq_len] int64 token blocks (:func:`tokenize_blocks`)
    config : :class:`SoftConfig`
    targets : HF CausalLMs to distil from (frozen, same vocabulary), weighted by ``config.distill_weights``
    out_dir : checkpoint folder (model + tokenizer + ``soft_state.pt``); None = do not save
    resume : continue from the checkpoint in ``out_dir`` (loads weights, optimizer state and step)
    overwrite : replace a SoFT checkpoint already in ``out_dir``

    With ``config.draft_vocab = N`` every checkpoint also holds the draft vocabulary: the N most frequent
    tokens of ``blocks`` (:func:`s2d_ext.draft.draft_vocab.most_frequent_tokens`).

    NOTE: deterministic on the CPU given ``config.seed`` (and a fixed torch thread count): data order is a
    pure function of the seed and step, and the model has no dropout in train mode by default.
    """
    from tqdm.auto import tqdm

    _check_config(config)
    if blocks.dim() != 2 or blocks.dtype != torch.long:
        raise ValueError(
            f"blocks must be [n_blocks, seq_len] int64, got {tuple(blocks.shape)} {blocks.dtype}"
        )
    exits = validate_exits(
        config.exits if config.exits is not None else model_exits(model), _num_layers(model)
    )
    set_exit_config(model, exits, config.thresholds)
    draft_vocab = None
    if config.draft_vocab:
        from s2d_ext.draft.draft_vocab import most_frequent_tokens

        vocab_size = int(model.get_output_embeddings().weight.shape[0])
        if config.draft_vocab > vocab_size:
            raise ValueError(f"draft_vocab={config.draft_vocab} exceeds the model vocabulary ({vocab_size})")
        draft_vocab = most_frequent_tokens(blocks, vocab_size, config.draft_vocab)
    targets = list(targets)
    distill = list(config.distill_weights) if config.distill_weights else [1.0] * len(targets)
    if len(distill) != len(targets):
        raise ValueError(f"distill_weights has {len(distill)} values but {len(targets)} targets were given")

    do_resume = False
    if out_dir is not None:
        do_resume = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite)
    elif resume:
        raise ValueError("resume=True needs out_dir")

    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    step, history, tokens_seen = 0, [], 0
    if do_resume:
        state = _load_resume_state(model, out_dir)
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        step, history, tokens_seen = state["step"], state["history"], state["tokens_seen"]

    for t in targets:
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)

    model.train()
    n_blocks = blocks.shape[0]
    bar = tqdm(total=config.max_steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    while step < config.max_steps:
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ce_sum = torch.zeros(len(exits))
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            batch = blocks[_batch_indices(step, micro, config, n_blocks)].to(device)
            with torch.no_grad():
                tl = [t(input_ids=batch, use_cache=False).logits for t in targets]
            out = soft_loss(
                model,
                batch,
                None,
                exits,
                target_logits=tl,
                distill_weights=distill,
                distill_temperature=config.distill_temperature,
                ce_weight=config.ce_weight,
                exit_weights=config.exit_weights,
            )
            (out.loss / config.grad_accum).backward()
            ce_sum += out.ce_per_exit.float().cpu()
            loss_sum += float(out.loss.detach())
            tokens_seen += batch.numel()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ce = (ce_sum / config.grad_accum).tolist()
        history.append({"step": step, "loss": loss_sum / config.grad_accum, "ce": ce, "lr": lr})
        bar.set_postfix_str(" ".join(f"ce@{e}={c:.3f}" for e, c in zip(exits, ce)), refresh=False)
        bar.update(1)
        if (
            out_dir is not None
            and config.save_every
            and step % config.save_every == 0
            and step < config.max_steps
        ):
            save_checkpoint(
                model,
                out_dir,
                tokenizer=tokenizer,
                optimizer=optimizer,
                step=step,
                config=config,
                history=history,
                tokens_seen=tokens_seen,
                draft_vocab=draft_vocab,
            )
    bar.close()
    model.eval()
    if out_dir is not None:
        save_checkpoint(
            model,
            out_dir,
            tokenizer=tokenizer,
            optimizer=optimizer,
            step=step,
            config=config,
            history=history,
            tokens_seen=tokens_seen,
            draft_vocab=draft_vocab,
        )
    return SoftResult(model=model, step=step, history=history, tokens_seen=tokens_seen)


def _load_resume_state(model, out_dir) -> dict:
    from safetensors.torch import load_file

    out = Path(out_dir)
    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)
    weights = {}
    from s2d_ext.draft.draft_vocab import DRAFT_VOCAB_FILE

    for f in sorted(out.glob("*.safetensors")):
        if f.name != DRAFT_VOCAB_FILE:  # NOTE: the draft vocabulary sits beside the weights
            weights.update(load_file(f))
    if not weights:
        raise ValueError(f"cannot resume: no safetensors weights in {str(out)!r}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k and not (k == "lm_head.weight" and _tied(model))]
    if missing or unexpected:
        raise ValueError(
            f"cannot resume from {str(out)!r}: its weights do not match the model (missing={missing[:3]}, "
            f"unexpected={unexpected[:3]})"
        )
    return state


@torch.no_grad()
def heldout_loss(
    model, blocks: torch.Tensor, exits: Sequence[int] | None = None, batch_size: int = 16
) -> list[float]:
    """Token-mean next-token cross-entropy (nats) of each exit on ``blocks`` [n, seq_len] int64."""
    exits = validate_exits(exits if exits is not None else model_exits(model), _num_layers(model))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(len(exits), dtype=torch.float64)
    count = 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        out = soft_loss(model, batch, None, exits)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += out.ce_per_exit.double().cpu() * n
        count += n
    model.train(was_training)
    return (total / max(count, 1)).tolist()


# ----------------------------------------------------------------------------------------------------------
# SoFT on the target's own text (s2d_ext.self_data): cached target distributions, shared embedding and head
# ----------------------------------------------------------------------------------------------------------


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


def exit_hidden_states(model, input_ids, attention_mask, exits: Sequence[int]) -> list[torch.Tensor]:
    """Each exit's hidden state after the shared final norm: list of [B, L, d], in ``exits`` order."""
    base = _base(model)
    out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    states = []
    for e in exits:
        # NOTE: HF's last hidden state is already normed; the earlier ones are the raw residual stream.
        states.append(out.last_hidden_state if e == _num_layers(model) else base.norm(out.hidden_states[e]))
    return states


def topk_kl(
    log_q: torch.Tensor,  # [N, V'] float32 log-probabilities of the draft
    topk_index: torch.Tensor,  # [N, K] int64 columns of log_q, -1 = a token the draft cannot emit
    topk_logprobs: torch.Tensor,  # [N, K] float32 log-probabilities of the target
) -> torch.Tensor:
    """KL(p || q) between the target's and the draft's distributions *coarsened* to K + 1 outcomes: the
    target's recorded top-K tokens and "anything else" (the rest of both distributions' mass). [N] float32.

    NOTE: this is the exact KL of the coarsened pair, so it is >= 0, 0 only when q matches p on the recorded
    tokens, and at most the full KL (data processing): what the cache of top-K makes computable.
    """
    p = topk_logprobs.exp()  # [N, K]
    in_vocab = topk_index >= 0
    q_lp = log_q.gather(1, topk_index.clamp(min=0))  # [N, K]
    # tokens outside the draft's vocabulary move to the "rest" outcome on both sides
    p_in = torch.where(in_vocab, p, torch.zeros_like(p))
    kl_in = (p_in * (topk_logprobs - q_lp)).sum(-1)
    p_rest = (1.0 - p_in.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - torch.where(in_vocab, q_lp.exp(), torch.zeros_like(q_lp)).sum(-1)).clamp(min=1e-12)
    kl_rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log()), 0.0)
    return kl_in + kl_rest


@dataclass
class SelfDataBatch:
    """A micro-batch of :class:`s2d_ext.self_data.SelfData` sequences, right-padded.

    ``positions`` index the flattened [B * L] positions whose next token is an answer token; ``labels``,
    ``topk_*`` belong to those positions (the answer token, the target's recorded top-K there).
    """

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    positions: torch.Tensor  # [N] int64 in [0, B * L)
    labels: torch.Tensor  # [N] int64 target token ids
    topk_ids: torch.Tensor  # [N, K] int64 target token ids
    topk_logprobs: torch.Tensor  # [N, K] float32

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> SelfDataBatch:
        return SelfDataBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def self_data_batch(data, indices: Sequence[int], max_len: int | None = None) -> SelfDataBatch:
    """Sequences ``indices`` of ``data`` (a :class:`s2d_ext.self_data.SelfData`) as one right-padded batch.
    ``max_len`` cuts sequences (their answers' tails) to that many tokens."""
    seqs = [data.sequence(int(i)) for i in indices]
    if max_len is not None:
        seqs = [s[:max_len] for s in seqs]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    positions, labels, top_ids, top_lp = [], [], [], []
    for row, (i, seq) in enumerate(zip(indices, seqs)):
        n = len(seq)
        input_ids[row, :n] = seq
        mask[row, :n] = 1
        start = int(data.answer_start[int(i)])
        first = int(data.answer_offsets[int(i)])
        count = n - start  # answer tokens kept
        if count <= 0:
            continue
        # position p predicts token p + 1: the answer's tokens start..n-1 are predicted at start-1..n-2
        positions.append(row * width + torch.arange(start - 1, n - 1))
        labels.append(seq[start:n])
        top_ids.append(data.topk_ids[first : first + count])
        top_lp.append(data.topk_logprobs[first : first + count])
    if not positions:
        raise ValueError("the batch holds no answer tokens")
    return SelfDataBatch(
        input_ids=input_ids,
        attention_mask=mask,
        positions=torch.cat(positions),
        labels=torch.cat(labels).long(),
        topk_ids=torch.cat(top_ids).long(),
        topk_logprobs=torch.cat(top_lp).float(),
    )


@dataclass
class SelfDataLossOutput:
    """:func:`self_data_loss`: the loss (differentiable); per-exit CE, KL, top-1 agreement (detached)."""

    loss: torch.Tensor  # []
    ce_per_exit: torch.Tensor  # [n_exits]
    kl_per_exit: torch.Tensor  # [n_exits]
    agreement_per_exit: torch.Tensor  # [n_exits]: P(exit's argmax == the target's argmax)
    tokens: int  # answer tokens in the loss


def vocab_index(draft_vocab: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """[vocab_size] int64: each target token's column in the draft's head, -1 if the draft cannot emit it
    (None for the full vocabulary)."""
    if draft_vocab is None:
        return None
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[draft_vocab.long().cpu()] = torch.arange(draft_vocab.numel())
    return index


def self_data_loss(
    model,
    batch: SelfDataBatch,
    exits: Sequence[int],
    *,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    exit_weights: Sequence[float] | None = None,
    draft_vocab: torch.Tensor | None = None,  # [V'] int64 target ids, sorted (None = full vocabulary)
    index: torch.Tensor | None = None,  # vocab_index(draft_vocab, V), precomputed
) -> SelfDataLossOutput:
    """SoFT loss on the target's own text: ``sum_e w_e (ce_weight * CE_e + kl_weight * KL_e)`` over the answer
    positions, where KL_e is :func:`topk_kl` against the target's recorded top-K and CE_e the cross-entropy
    of the answer token (positions whose token the draft vocabulary lacks are left out of CE_e).

    NOTE: the head runs only at the answer positions (not [B, L, V] per exit): with V = 49152 that is what
    keeps a 12-layer SmolLM2 draft's training step in memory on a CPU.
    """
    n_exits = len(exits)
    weights = [1.0 / n_exits] * n_exits if exit_weights is None else [float(w) for w in exit_weights]
    head = model.get_output_embeddings().weight  # [V, d]
    if draft_vocab is not None:
        dv = draft_vocab.to(head.device)
        head = head.index_select(0, dv)  # [V', d]
        if index is None:
            index = vocab_index(draft_vocab, model.get_output_embeddings().weight.shape[0])
        index = index.to(head.device)
        labels = index[batch.labels]
        top_index = index[batch.topk_ids]
    else:
        labels, top_index = batch.labels, batch.topk_ids
    states = exit_hidden_states(model, batch.input_ids, batch.attention_mask, exits)
    labels_ce = torch.where(labels >= 0, labels, torch.full_like(labels, -100))
    n_ce = (labels_ce >= 0).sum().clamp_min(1)
    target_top1 = top_index[:, 0]
    total = head.new_zeros((), dtype=torch.float32)
    ces, kls, agree = [], [], []
    for w, hidden in zip(weights, states):
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)  # [N, d]
        log_q = F.log_softmax((h @ head.t().to(h.dtype)).float(), dim=-1)  # [N, V']
        ce = F.nll_loss(log_q, labels_ce, ignore_index=-100, reduction="sum") / n_ce
        kl = topk_kl(log_q, top_index, batch.topk_logprobs).mean()
        total = total + w * (ce_weight * ce + kl_weight * kl)
        ces.append(ce.detach())
        kls.append(kl.detach())
        agree.append((log_q.detach().argmax(-1) == target_top1).float().mean())
    return SelfDataLossOutput(
        loss=total,
        ce_per_exit=torch.stack(ces).float().cpu(),
        kl_per_exit=torch.stack(kls).float().cpu(),
        agreement_per_exit=torch.stack(agree).cpu(),
        tokens=int(batch.positions.numel()),
    )


def _autocast(device: torch.device, autocast: str | None):
    import contextlib

    if not autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))


def self_data_epoch_order(lengths: Sequence[int], epoch: int, seed: int, batch_size: int) -> list[list[int]]:
    """The micro-batches of one epoch: a seeded permutation, cut into windows of 16 batches whose sequences
    are sorted by length and split into batches (less padding), the batches then shuffled again.

    NOTE: a pure function of (lengths, epoch, seed, batch_size), so resuming needs no RNG state.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = 16 * batch_size
    batches = []
    for lo in range(0, len(perm), window):
        chunk = sorted(perm[lo : lo + window], key=lambda i: (lengths[i], i))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


@torch.no_grad()
def self_data_eval(
    model, data, indices: Sequence[int], exits: Sequence[int], *, batch_size: int = 8, autocast=None, **kw
) -> dict:
    """Per-exit CE, KL and top-1 agreement with the target over sequences ``indices`` (token-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, len(exits), dtype=torch.float64)
    count = 0
    for lo in range(0, len(indices), batch_size):
        batch = self_data_batch(data, indices[lo : lo + batch_size]).to(device)
        with _autocast(device, autocast):
            out = self_data_loss(model, batch, exits, **kw)
        n = out.tokens
        sums += torch.stack([out.ce_per_exit, out.kl_per_exit, out.agreement_per_exit]).double() * n
        count += n
    model.train(was_training)
    means = (sums / max(count, 1)).tolist()
    return {"ce": means[0], "kl": means[1], "agreement": means[2], "tokens": count}


def train_soft_self_data(
    model,
    data,
    config: SoftConfig,
    *,
    train_indices: Sequence[int],
    heldout_indices: Sequence[int] = (),
    draft_vocab: torch.Tensor | None = None,
    kl_weight: float = 1.0,
    autocast: str | None = None,
    max_seconds: float | None = None,
    eval_every: int = 0,
    save_fn=None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "SoFT",
) -> SoftResult:
    """SoFT of a draft cut with :func:`cut_draft` on a self-written data set (:mod:`s2d_ext.self_data`).

    ``config.batch_size`` counts *sequences* per micro-batch here. The loss is :func:`self_data_loss`
    (``config.ce_weight``, ``kl_weight``, ``config.exit_weights``). Parameters that do not require grad (the
    shared embedding and head) stay as they are.

    Parameters
    ----------
    model : the draft (HF CausalLM), trained in place
    data : :class:`s2d_ext.self_data.SelfData`
    train_indices, heldout_indices : sequences to train on / to evaluate (per-exit CE, KL, agreement) on
    draft_vocab : [V'] int64 sorted target ids the draft's head covers (None = all)
    autocast : e.g. "bfloat16": mixed precision (float32 weights and optimizer), about 3x faster on CPUs
        with AMX and on GPUs
    max_seconds : stop (and save, resumable) once a run has trained this long; None = no limit
    eval_every : held-out evaluation every N steps (0 = only at the start and the end)
    save_fn : ``save_fn(model, folder)`` writes the model (default ``model.save_pretrained``)
    out_dir, resume, overwrite : as for :func:`train_soft`; the resume state (optimizer, step, history) is
        ``soft_state.pt`` beside the model

    NOTE: deterministic on the CPU for a given seed and thread count: the data order is a pure function of
    (seed, epoch), every sequence is seen once per epoch, and the model has no dropout.
    """
    from tqdm.auto import tqdm

    _check_config(config)
    exits = validate_exits(
        config.exits if config.exits is not None else model_exits(model), _num_layers(model)
    )
    set_exit_config(model, exits, config.thresholds)
    train_indices = [int(i) for i in train_indices]
    heldout_indices = [int(i) for i in heldout_indices]
    if not train_indices:
        raise ValueError("train_indices is empty: nothing to train on")
    overlap = set(train_indices) & set(heldout_indices)
    if overlap:
        raise ValueError(f"{len(overlap)} sequences are both trained on and held out")
    do_resume = False
    if out_dir is not None:
        do_resume = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite)
    elif resume:
        raise ValueError("resume=True needs out_dir")
    device = next(model.parameters()).device
    index = vocab_index(draft_vocab, model.get_output_embeddings().weight.shape[0])
    loss_kw = dict(
        ce_weight=config.ce_weight,
        kl_weight=kl_weight,
        exit_weights=config.exit_weights,
        draft_vocab=draft_vocab,
        index=index,
    )
    torch.manual_seed(config.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": config.norm_lr_scale},
        ],
        lr=config.lr,
        betas=config.betas,
    )
    step, history, tokens_seen = 0, [], 0
    evals: list[dict] = []
    seconds_before = 0.0
    if do_resume:
        state = torch.load(Path(out_dir) / STATE_FILE, map_location="cpu", weights_only=False)
        _load_own_weights(model, out_dir)
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        step, history, tokens_seen = state["step"], state["history"], state["tokens_seen"]
        evals = state.get("evals", [])
        seconds_before = state.get("train_seconds", 0.0)

    lengths = [int(data.seq_offsets[i + 1] - data.seq_offsets[i]) for i in range(data.num_sequences)]
    train_lengths = [lengths[i] for i in train_indices]
    per_epoch = len(self_data_epoch_order(train_lengths, 0, config.seed, config.batch_size))

    def micro_batch(step_: int, micro: int) -> list[int]:
        flat = step_ * config.grad_accum + micro
        epoch, pos = divmod(flat, per_epoch)
        chosen = self_data_epoch_order(train_lengths, epoch, config.seed, config.batch_size)[pos]
        return [train_indices[i] for i in chosen]

    def evaluate() -> None:
        if heldout_indices:
            result = self_data_eval(model, data, heldout_indices, exits, autocast=autocast, **loss_kw)
            evals.append({"step": step, **result})

    def save(final: bool) -> None:
        if out_dir is None:
            return
        _save_self_data_checkpoint(
            model,
            out_dir,
            save_fn=save_fn,
            state={
                "step": step,
                "optimizer": optimizer.state_dict(),
                "history": history,
                "tokens_seen": tokens_seen,
                "evals": evals,
                "train_seconds": seconds_before + (time.perf_counter() - t_start),
                "finished": final,
            },
            record={
                "step": step,
                "max_steps": config.max_steps,
                "tokens_seen": tokens_seen,
                "exits": list(exits),
                "config": _jsonable(dataclasses.asdict(config)),
                "kl_weight": kl_weight,
                "autocast": autocast,
                "draft_vocab_size": None if draft_vocab is None else int(draft_vocab.numel()),
                "train_seconds": seconds_before + (time.perf_counter() - t_start),
                "last": history[-1] if history else None,
                "evals": evals,
            },
        )

    t_start = time.perf_counter()
    if not evals:
        evaluate()
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    stopped_early = False
    while step < config.max_steps:
        if max_seconds is not None and time.perf_counter() - t_start >= max_seconds:
            stopped_early = True
            break
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        sums = torch.zeros(3, len(exits))
        loss_sum, micro_tokens = 0.0, 0
        for micro in range(config.grad_accum):
            batch = self_data_batch(data, micro_batch(step, micro)).to(device)
            with _autocast(device, autocast):
                out = self_data_loss(model, batch, exits, **loss_kw)
            (out.loss / config.grad_accum).backward()
            sums += torch.stack([out.ce_per_exit, out.kl_per_exit, out.agreement_per_exit])
            loss_sum += float(out.loss.detach())
            tokens_seen += batch.num_tokens
            micro_tokens += out.tokens
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.grad_clip
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ce, kl, agree = (sums / config.grad_accum).tolist()
        history.append(
            {
                "step": step,
                "loss": loss_sum / config.grad_accum,
                "ce": ce,
                "kl": kl,
                "agreement": agree,
                "lr": lr,
                "answer_tokens": micro_tokens,
                "seconds": seconds_before + (time.perf_counter() - t_start),
            }
        )
        bar.set_postfix_str(" ".join(f"agree@{e}={a:.2f}" for e, a in zip(exits, agree)), refresh=False)
        bar.update(1)
        if eval_every and step % eval_every == 0 and step < config.max_steps:
            evaluate()
            model.train()
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            save(final=False)
    bar.close()
    if not stopped_early:
        evaluate()
    model.eval()
    save(final=not stopped_early)
    return SoftResult(model=model, step=step, history=history, tokens_seen=tokens_seen)


def _save_self_data_checkpoint(model, out_dir, *, save_fn, state: dict, record: dict) -> Path:
    """Like :func:`save_checkpoint` (atomic folder swap), with a custom ``save_fn(model, folder)``."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir()
    (save_fn or (lambda m, folder: m.save_pretrained(folder)))(model, tmp)
    torch.save(state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def _load_own_weights(model, out_dir) -> None:
    """Resume: load the weights saved in ``out_dir`` into ``model``; the shared (frozen) embedding and head
    may be absent from the file (a referencing checkpoint) and are then kept as they are."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        if f.name != "draft_vocab.safetensors":
            weights.update(load_file(f))
    if not weights:
        raise ValueError(f"cannot resume: no safetensors weights in {str(out)!r}")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [
        k
        for k in missing
        if "rotary_emb" not in k and k not in frozen and not (k == "lm_head.weight" and _tied(model))
    ]
    if missing or unexpected:
        raise ValueError(
            f"cannot resume from {str(out)!r}: its weights do not match the model (missing={missing[:3]}, "
            f"unexpected={unexpected[:3]})"
        )


def read_training_record(out_dir: str | os.PathLike) -> dict:
    """The ``soft_config.json`` record of a SoFT output folder."""
    return json.loads((Path(out_dir) / CONFIG_FILE).read_text())
