"""The SoFT loss on text: every exit's logits through the shared final norm and head, the mean of their
cross-entropies, plus optional distillation toward one or several targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from s2d_ext.train.soft.exits import base_model, layer_count, model_exits, validate_exits


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
    exits = validate_exits(exits if exits is not None else model_exits(model), layer_count(model))
    base = base_model(model)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
    )
    hidden = out.hidden_states  # tuple of num_layers + 1 tensors [B, L, d]; [0] = embeddings
    head = model.get_output_embeddings()
    logits = []
    for e in exits:
        if e == layer_count(model):
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
    exits = validate_exits(exits if exits is not None else model_exits(model), layer_count(model))
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
