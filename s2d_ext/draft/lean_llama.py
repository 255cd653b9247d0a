"""A lean forward of Llama-family decoder layers (Llama, Mistral, Qwen2) over a static KV cache.

It reads the weights straight from the Hugging Face modules (so training the HF model updates the
draft) and computes exactly what transformers computes: HF RMSNorm, rotate-half RoPE, GQA attention
with ``head_dim ** -0.5`` scaling, SwiGLU-style MLP. What it leaves out is everything that makes
``generate()`` slow per step: cache objects, mask factories, hooks, Python work over the vocabulary.

Every tensor shape in :meth:`LeanLayers.forward` depends only on ``(B, W, K)`` (batch, window of new
positions, key range), so a step can be captured by ``torch.compile`` or CUDA graphs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2d_ext.row_invariant import InvariantLinear
from s2d_ext.row_invariant import linear as invariant_linear_function

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# NOTE: rope types whose inverse frequencies do not depend on the sequence length; "dynamic" and
# "longrope" rescale with the current length, which a static cache cannot follow.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def check_architecture(config: Any) -> None:
    """Raise ValueError if ``config`` describes a model the lean forward does not implement."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = getattr(config, "architectures", None) or [type(config).__name__]
        raise ValueError(
            f"unsupported architecture {model_type!r} ({', '.join(arch)}); SortedDraft supports "
            f"model types {', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, MistralForCausalLM, "
            "Qwen2ForCausalLM)"
        )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; SortedDraft implements {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ValueError(f"unsupported partial_rotary_factor={partial}; only 1.0 is implemented")


def rope_parameters(config: Any) -> dict:
    """The rope settings of ``config``: transformers 5.x ``rope_parameters`` or legacy fields."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        params = dict(params)
        # NOTE: per-layer-type dicts ({"full_attention": {...}}) are not used by these models.
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = dict(params["full_attention"])
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    return params


def head_dim_of(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def rope_inv_freq(config: Any, device: torch.device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] float32 and the cos/sin scale, as transformers computes them."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = head_dim_of(config)
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
    return inv_freq.to(device, torch.float32), float(scaling)


def rope_cos_sin(
    inv_freq: torch.Tensor,  # [hd/2] float32
    positions: torch.Tensor,  # [B, W] int64
    attention_scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, W, hd] in ``dtype`` (computed in float32 like transformers)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm of x [..., d]."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def sliding_window_of(config: Any) -> int | None:
    """The attention window the model uses, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", None) is False:
        return None
    return int(window)


class LeanLayers(nn.Module):
    """Decoder layers ``[start, stop)`` of an HF Llama-family model, run over a static KV cache.

    Holds references to the HF layer modules (no copy). Call :meth:`forward` with the window of new
    positions; it writes their keys/values into the caches and returns the output hidden states.
    """

    def __init__(self, hf_layers: list[nn.Module], config: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(hf_layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.scaling = self.head_dim**-0.5
        self.refresh()

    def refresh(self) -> None:
        """Re-read the weight tensors from the HF modules (after ``to()``, ``load_state_dict(assign=True)``).

        NOTE: the forward reads plain tuples of tensors, not ``module.attr`` chains: nn.Module attribute
        lookups are a visible share of a batch-1 step's Python time.
        """
        # NOTE: a draft whose HF model went through use_row_invariant_kernels runs its linear layers with
        # the same kernel (on a CPU, the weights stream once: the fast batch-1 path there).
        self._linear = F.linear
        if self.layers and isinstance(self.layers[0].self_attn.q_proj, InvariantLinear):
            self._linear = invariant_linear_function
        self._weights = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self._weights.append(
                (
                    layer.input_layernorm.weight,
                    float(layer.input_layernorm.variance_epsilon),
                    attn.q_proj.weight,
                    attn.q_proj.bias,
                    attn.k_proj.weight,
                    attn.k_proj.bias,
                    attn.v_proj.weight,
                    attn.v_proj.bias,
                    attn.o_proj.weight,
                    attn.o_proj.bias,
                    layer.post_attention_layernorm.weight,
                    float(layer.post_attention_layernorm.variance_epsilon),
                    mlp.gate_proj.weight,
                    mlp.gate_proj.bias,
                    mlp.up_proj.weight,
                    mlp.up_proj.bias,
                    mlp.down_proj.weight,
                    mlp.down_proj.bias,
                    mlp.act_fn,
                )
            )

    def forward(
        self,
        hidden: torch.Tensor,  # [B, W, d]
        cos: torch.Tensor,  # [B, W, hd]
        sin: torch.Tensor,  # [B, W, hd]
        write_slots: torch.Tensor,  # [B, W] int64 cache slot of each position (invalid -> trash slot)
        attn_bias: torch.Tensor,  # [B, 1, W, K] additive mask over cache slots [0, K)
        k_caches: list[torch.Tensor],  # per layer [B, Hkv, S+1, hd]
        v_caches: list[torch.Tensor],  # per layer [B, Hkv, S+1, hd]
    ) -> torch.Tensor:
        batch, window, _ = hidden.shape
        keys = attn_bias.shape[-1]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, W, hd]
        index = write_slots[:, None, :, None].expand(batch, self.num_kv_heads, window, self.head_dim)
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        linear = self._linear
        for weights, k_cache, v_cache in zip(self._weights, k_caches, v_caches, strict=True):
            (in_w, in_eps, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, post_w, post_eps,
             gate_w, gate_b, up_w, up_b, down_w, down_b, act) = weights  # fmt: skip
            x = rms_norm(hidden, in_w, in_eps)
            q = linear(x, q_w, q_b).view(batch, window, heads, head_dim).transpose(1, 2)
            k = linear(x, k_w, k_b).view(batch, window, kv_heads, head_dim).transpose(1, 2)
            v = linear(x, v_w, v_b).view(batch, window, kv_heads, head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
            out = F.scaled_dot_product_attention(
                q,
                k_cache[:, :, :keys],
                v_cache[:, :, :keys],
                attn_mask=attn_bias,
                scale=self.scaling,
                enable_gqa=heads != kv_heads,
            )
            out = out.transpose(1, 2).reshape(batch, window, heads * head_dim)
            hidden = hidden + linear(out, o_w, o_b)
            x = rms_norm(hidden, post_w, post_eps)
            hidden = hidden + linear(act(linear(x, gate_w, gate_b)) * linear(x, up_w, up_b), down_w, down_b)
        return hidden


def attention_bias(
    query_slots: torch.Tensor,  # [B, W] int64
    pad: torch.Tensor,  # [B] int64 left-pad count
    keys: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask [B, 1, W, K]: query at slot s sees slots ``pad <= key <= s``.

    NOTE: masked entries get the dtype's most negative finite value, not -inf: a query that sees no
    key (a pad position in prefill) then averages finite values instead of producing NaN.
    """
    key = torch.arange(keys, device=query_slots.device)
    allowed = (key >= pad[:, None, None]) & (key <= query_slots[:, :, None])  # [B, W, K]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=query_slots.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


def max_context(config: Any) -> int:
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else math.inf
