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
