"""The AdamW both SoFT loops use: weight decay on matrices only, and a learning-rate scale per group."""

from __future__ import annotations

import torch


def adamw(model, config, *, norm_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (``config``: a :class:`SoftConfig`).

    Matrices decay by ``config.weight_decay``; norm gains and other 1-D parameters do not, and their
    learning rate is ``lr * norm_lr_scale`` (each group's ``"lr_scale"``, applied by the loop's schedule).
    NOTE: frozen parameters (a draft's shared embedding and head) are left out, so AdamW keeps no state
    for the target's largest tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": norm_lr_scale},
        ],
        lr=config.lr,
        betas=config.betas,
    )
