"""Row-invariant kernels for a whole HF model: every token's logits computed by the same operations
whatever the number of tokens in the forward.

Vocabulary:

* **row**: one token of a forward (the ``T`` of a forward over ``T`` tokens);
* **row-invariant**: row ``t``'s outputs depend only on row ``t``'s inputs (and, in attention, on the keys
  and values it attends to), bit for bit, never on ``T``. A verify forward over ``k + 1`` tokens then gives
  each token exactly the logits a one-token decode gives, and greedy speculative decoding equals greedy
  ``generate()`` of the same model in bfloat16 as in float32 (torch's GEMMs pick their kernel, and with it
  the rounding, by the number of rows: a near-tie between the top two logits can flip).

:func:`use_row_invariant_kernels` makes a model row-invariant in place:

* every plain ``nn.Linear`` becomes an :class:`InvariantLinear` (the class is swapped: same parameters,
  state dict and tied weights, nothing copied), whose forward is :func:`s2d_ext.ops.invariant_linear`. On
  a CPU it is also the fast path: the weights stream from memory once for all rows, so a forward over 2-8
  tokens costs about what one costs (torch's CPU GEMM of a few rows costs up to T times a GEMV);
* attention becomes ``"s2d_invariant"`` (registered with transformers' ``AttentionInterface``): scores and
  the weighted sum of values through the same op, the softmax row by row (float32).

The rest of a decoder layer (RMSNorm, rotary embedding, activations, residuals) is elementwise or
row-wise already. ``generate()`` on a converted model runs the same kernels, so it is the baseline a
speculative run on it is compared with.
"""

from __future__ import annotations

import torch
from torch import nn

from s2d_ext import _native
from s2d_ext.ops.invariant_linear import DTYPES, invariant_linear

__all__ = [
    "ATTENTION",
    "InvariantLinear",
    "invariant_linear_count",
    "linear",
    "row_invariant_attention",
    "uses_row_invariant_kernels",
    "use_row_invariant_kernels",
]

#: the attention implementation name registered with transformers
ATTENTION = "s2d_invariant"

_NATIVE_CPU = _native.has_native("invariant_linear")
#: the attention implementation a model had before, restored by ``use_row_invariant_kernels(m, False)``
_PREVIOUS_ATTENTION = "_s2d_previous_attention"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` with the row-invariant op (x: [..., K], weight: [N, K], bias: [N] or None)."""
    if _NATIVE_CPU and x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype in DTYPES:
        # NOTE: the op directly on the hot path (a 1.5B forward makes ~250 of these calls): the C++
        # binding checks shapes and devices itself; the Python wrapper would add ~10 us per call.
        weight = weight if weight.is_contiguous() else weight.contiguous()
        return torch.ops.s2d.invariant_linear(x, weight, bias)
    return invariant_linear(x, weight, bias)


class InvariantLinear(nn.Linear):
    """An ``nn.Linear`` computing ``x @ weight.T + bias`` with :func:`~s2d_ext.ops.invariant_linear`.

    Not built directly: :func:`use_row_invariant_kernels` swaps the class of existing ``nn.Linear`` modules.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        return linear(x, self.weight, self.bias)


def row_invariant_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, H_kv, L, D]
    value: torch.Tensor,  # [B, H_kv, L, D]
    attention_mask: torch.Tensor | None,  # [B, 1 or H, T, L]: additive float, or bool (True = attend)
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with each query row computed independently of the others (transformers' signature).

    Returns the output [B, T, H, D] (as transformers' attention functions do) and None (no weights).
    """
    if dropout and module.training:
        raise ValueError("s2d_invariant attention is for inference: dropout must be 0")
    batch, heads, rows, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    out = query.new_empty((batch, kv_heads, groups * rows, dim))
    # NOTE: the query heads that share a key / value head become rows of one product (head kv * groups + g
    # is rows g * T .. g * T + T - 1), so each (batch, kv head) pair is two op calls.
    grouped = query.reshape(batch, kv_heads, groups * rows, dim)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask.expand(batch, heads, rows, keys)
    for b in range(batch):
        for h in range(kv_heads):
            scores = linear(grouped[b, h], key[b, h], None).float() * scaling  # [G * T, L]
            if mask is not None:
                head_mask = mask[b, h * groups : (h + 1) * groups].reshape(groups * rows, -1)[:, -keys:]
                if head_mask.dtype == torch.bool:
                    scores = scores.masked_fill(~head_mask, float("-inf"))
                else:
                    scores = scores + head_mask.float()
            probs = torch.softmax(scores, dim=-1).to(query.dtype)
            out[b, h] = linear(probs, value[b, h].transpose(0, 1).contiguous(), None)  # [G * T, D]
    return out.reshape(batch, heads, rows, dim).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, row_invariant_attention)
    # NOTE: the additive float mask eager attention gets (holes and padding as large negatives).
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def use_row_invariant_kernels(model: nn.Module, enable: bool = True) -> nn.Module:
    """Make ``model`` row-invariant in place (see the module); ``enable=False`` undoes it. Returns ``model``.

    Subclasses of ``nn.Linear`` (quantized layers, LoRA wrappers, ...) are left alone. The attention is
    switched on HF models (those with ``set_attn_implementation``); other modules get the linear layers only.
    """
    for module in model.modules():
        if enable and type(module) is nn.Linear:
            module.__class__ = InvariantLinear
        elif not enable and type(module) is InvariantLinear:
            module.__class__ = nn.Linear
    config = getattr(model, "config", None)
    if hasattr(model, "set_attn_implementation") and config is not None:
        current = getattr(config, "_attn_implementation", None)
        if enable and current != ATTENTION:
            _register()
            object.__setattr__(model, _PREVIOUS_ATTENTION, current)
            model.set_attn_implementation(ATTENTION)
        elif not enable and current == ATTENTION:
            model.set_attn_implementation(getattr(model, _PREVIOUS_ATTENTION, None) or "sdpa")
    return model


def invariant_linear_count(model: nn.Module) -> int:
    """How many of ``model``'s modules are :class:`InvariantLinear`."""
    return sum(type(m) is InvariantLinear for m in model.modules())


def uses_row_invariant_kernels(model: nn.Module) -> bool:
    """Whether :func:`use_row_invariant_kernels` converted ``model`` (its attention and linear layers)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTENTION and invariant_linear_count(model) > 0
