"""The exit head (final RMSNorm + lm_head + row statistics) in plain PyTorch: the spec of every backend.

Definitions (``T`` is the row's temperature)
--------------------------------------------
normed
    HF Llama RMSNorm: ``h32 = hidden.float()``;
    ``normed = (h32 * rsqrt(mean(h32 ** 2, -1) + eps)).to(hidden.dtype) * norm_weight`` (so the
    product with ``norm_weight`` is rounded to ``hidden.dtype``, exactly as transformers does it).
logits
    ``normed @ lm_head_weight.T`` with float32 accumulation (no rounding of the logits to bf16/f16).
tokens
    ``argmax(logits)``, the smallest id on ties.
scaled
    ``logits / T`` if ``T > 0`` else ``logits``.
confidence
    ``max softmax(scaled) = exp(max(scaled) - logsumexp(scaled))``.
logsumexp
    ``logsumexp(scaled)``.

Non-finite logits (defined, identical on every backend; as in :func:`verify_reference.sanitize`):
NaN counts as ``-inf``, ``+inf`` as the largest finite float32, and a row whose logits are all
``-inf`` is uniform (token 0, confidence ``1/V``, logsumexp ``log V``).
"""

from __future__ import annotations

import torch

from s2d_ext.ops.verify_reference import sanitize

# NOTE: a bf16/f16 lm_head is converted to float32 this many vocab rows at a time, so the exact
# float32-accumulated logits never need a float32 copy of the whole [V, d] weight.
_VOCAB_CHUNK = 8192


def rms_norm(
    hidden: torch.Tensor,  # [N, d]
    norm_weight: torch.Tensor,  # [d]
    eps: float,
) -> torch.Tensor:
    """HF Llama RMSNorm; returns [N, d] in ``hidden.dtype``."""
    h32 = hidden.float()
    variance = h32.pow(2).mean(-1, keepdim=True)
    return (h32 * torch.rsqrt(variance + eps)).to(hidden.dtype) * norm_weight


def head_logits(
    normed: torch.Tensor,  # [N, d]
    lm_head_weight: torch.Tensor,  # [V, d]
) -> torch.Tensor:
    """``normed @ lm_head_weight.T`` as [N, V] float32, accumulated in float32."""
    if lm_head_weight.dtype == torch.float32:
        return normed.float() @ lm_head_weight.T
    normed32 = normed.float()
    vocab = lm_head_weight.shape[0]
    logits = normed32.new_empty((normed.shape[0], vocab))
    for start in range(0, vocab, _VOCAB_CHUNK):
        stop = min(start + _VOCAB_CHUNK, vocab)
        logits[:, start:stop] = normed32 @ lm_head_weight[start:stop].float().T
    return logits


def exit_head_logits(
    hidden: torch.Tensor,  # [N, d]
    norm_weight: torch.Tensor,  # [d]
    lm_head_weight: torch.Tensor,  # [V, d]
    eps: float,
) -> torch.Tensor:
    """The raw float32 logits [N, V] of the exit head (what the fused kernels never materialise)."""
    return head_logits(rms_norm(hidden, norm_weight, eps), lm_head_weight)


def exit_head_reference(
    hidden: torch.Tensor,  # [N, d]
    norm_weight: torch.Tensor,  # [d]
    lm_head_weight: torch.Tensor,  # [V, d]
    eps: float,
    temperature: torch.Tensor,  # [N] float32, 0 = unscaled
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``tokens`` [N] int64, ``confidence`` [N] float32 and ``logsumexp`` [N] float32."""
    logits = sanitize(exit_head_logits(hidden, norm_weight, lm_head_weight, eps))  # [N, V]
    tokens = logits.argmax(dim=-1)
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    # NOTE: scaled after subtracting the max, as the kernels do: (l - max) / T <= 0 never overflows, and
    # confidence = 1 / sum exp(...) keeps ties exact (exp(max - logsumexp) rounds 2 tied logits at a
    # large scale to 1.0 instead of 0.5, and logits / T overflowed to inf - inf = NaN).
    top = logits.amax(dim=-1)
    total = torch.exp((logits - top[:, None]) / safe_t[:, None]).sum(dim=-1)
    confidence = 1.0 / total
    lse = top / safe_t + torch.log(total)
    return tokens, confidence, lse
