"""A SoFT run's configuration (:class:`SoftConfig`), validated in one place, and its result."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


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


def check_config(config: SoftConfig) -> None:
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


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
