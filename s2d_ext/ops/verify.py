"""``verify``: fused verification / rejection sampling of a batch of draft chains.

The public wrapper validates and normalises its arguments, then runs one backend:
``"reference"`` (:mod:`s2d_ext.ops.verify_reference`, the spec), ``"cpu"`` (C++),
``"cuda"`` (both ``torch.ops.s2d.verify``) or ``"triton"`` (``torch.ops.s2d.verify_triton``).
"""

from __future__ import annotations

import torch

from s2d_ext import _native
from s2d_ext.ops._backend import (
    FLOAT_DTYPES,
    TEMPERATURE_MESSAGE,
    Check,
    check_scalar,
    check_tensor,
    check_values,
    is_tracing,
    per_row,
    resolve_backend,
    temperatures_ok,
)
from s2d_ext.ops.logit_filters import logit_threshold

LOGIT_DTYPES = FLOAT_DTYPES
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    num_draft: torch.Tensor | int | None = None,
    temperature: torch.Tensor | float = 0.0,
    top_k: torch.Tensor | int = 0,
    top_p: torch.Tensor | float = 1.0,
    seeds: torch.Tensor | int | None = None,
    offsets: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide, for each row, how many draft tokens to keep and which token to emit next.

    Parameters
    ----------
    target_logits : torch.Tensor
        [B, K+1, V] float32, bfloat16 or float16: target logits at the K draft positions and
        the bonus position.
    draft_tokens : torch.Tensor
        [B, K] int64.
    draft_probs : torch.Tensor, optional
        [B, K, V] float32, the processed draft distribution q each token was sampled from.
        None means argmax drafting (q is a point mass on the draft token).
    num_draft : torch.Tensor or int, optional
        [B] integer, valid drafts per row in 0..K; None means K.
    temperature, top_k, top_p : scalar or [B] tensor
        Target processing per row, in transformers' order. ``temperature == 0`` is greedy.
    seeds, offsets : int or [B] int64 tensor, optional
        Philox key and counter offset per row. Without seeds, they are drawn from
        ``generator`` (or torch's default generator); pass them explicitly under CUDA graphs.
    backend : str
        "auto", "reference", "cpu", "triton" or "cuda".

    Returns
    -------
    out_tokens : torch.Tensor
        [B, K+1] int64: ``num_accepted[b]`` accepted drafts, the emitted token, then -1.
    num_accepted : torch.Tensor
        [B] int32.
    """
    args = _normalise(
        target_logits,
        draft_tokens,
        draft_probs,
        num_draft,
        temperature,
        top_k,
        top_p,
        seeds,
        offsets,
        generator,
    )
    chosen = resolve_backend("verify", backend, target_logits.device)
    if target_logits.shape[0] == 0:
        k_plus_1 = target_logits.shape[1]
        return (
            torch.empty((0, k_plus_1), dtype=torch.int64, device=target_logits.device),
            torch.empty((0,), dtype=torch.int32, device=target_logits.device),
        )
    if chosen == "reference":
        from s2d_ext.ops.verify_reference import verify_reference

        return verify_reference(*args)
    if chosen == "triton":
        from s2d_ext.triton.verify import verify_triton  # noqa: F401  (registers the op)

        return torch.ops.s2d.verify_triton(*args)
    return torch.ops.s2d.verify(*args)


def _normalise(
    target_logits, draft_tokens, draft_probs, num_draft, temperature, top_k, top_p, seeds, offsets, generator
) -> tuple:
    logits = check_tensor("target_logits", target_logits, ndim=3, dtypes=LOGIT_DTYPES)
    device = logits.device
    batch, k_plus_1, vocab = logits.shape
    if not 1 <= k_plus_1 <= 2**16:
        # NOTE: Philox counters hold the position in 16 bits.
        raise ValueError(f"target_logits must have 1 <= K+1 <= 65536 positions (dim 1), got {k_plus_1}")
    if not 1 <= vocab < 2**31:
        raise ValueError(
            f"target_logits must have a vocabulary of 1 to 2**31 - 1 tokens (dim 2), got {vocab}"
        )
    if device.type == "cuda" and batch > 65535:
        # NOTE: the CUDA kernels put the batch in grid.y.
        raise ValueError(f"target_logits on CUDA must have a batch (dim 0) of at most 65535, got {batch}")
    tokens = check_tensor("draft_tokens", draft_tokens, ndim=2, dtypes=(torch.int64,), device=device)
    if tokens.shape[0] != batch:
        raise ValueError(f"draft_tokens has batch {tokens.shape[0]} but target_logits has batch {batch}")
    num_spec = tokens.shape[1]
    if num_spec + 1 != k_plus_1:
        raise ValueError(
            f"K mismatch: draft_tokens has K={num_spec} so target_logits needs K+1={num_spec + 1} "
            f"positions (dim 1), got {k_plus_1}"
        )
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, ndim=3, dtypes=(torch.float32,), device=device)
        if tuple(draft_probs.shape) != (batch, num_spec, vocab):
            raise ValueError(
                f"draft_probs must have shape [B, K, V] = {[batch, num_spec, vocab]}, "
                f"got {list(draft_probs.shape)}"
            )
        draft_probs = draft_probs.contiguous()
    num_draft_given = num_draft is not None
    if num_draft is None:
        num_draft = num_spec
    num_draft = per_row("num_draft", num_draft, batch, device, torch.int64)
    temperature_in = temperature
    temperature = per_row("temperature", temperature, batch, device, torch.float32)
    scalar_filters = not isinstance(top_k, torch.Tensor) and not isinstance(top_p, torch.Tensor)
    if scalar_filters:
        # NOTE: the op takes no top-k/top-p tensors, so scalars become tensors only for a threshold.
        check_scalar("top_k", top_k, integer=True)
        check_scalar("top_p", top_p, integer=False)
    else:
        top_k = per_row("top_k", top_k, batch, device, torch.int64)
        top_p = per_row("top_p", top_p, batch, device, torch.float32)

    if seeds is None:
        seeds = torch.randint(_INT64_MIN, _INT64_MAX, (batch,), generator=generator, dtype=torch.int64)
        seeds = seeds.to(device)
    seeds = per_row("seeds", seeds, batch, device, torch.int64)
    offsets = per_row("offsets", 0 if offsets is None else offsets, batch, device, torch.int64)

    tracing = is_tracing(device)
    checks = []
    if batch and not tracing:
        checks = _value_checks(
            tokens, num_draft, num_draft_given, temperature_in, top_k, top_p, vocab, num_spec
        )
    # NOTE: whether a row filters (top-k / top-p) is read with the checks: one device read a call.
    queries = [] if scalar_filters or tracing else [((top_k > 0) | (top_p < 1.0)).any()]
    answers = check_values(checks, queries)
    if scalar_filters:
        needs_threshold = top_k > 0 or top_p < 1.0
    else:
        needs_threshold = True if tracing else answers[0]
    min_logit = None
    if needs_threshold and batch:
        top_k_t = per_row("top_k", top_k, batch, device, torch.int64)
        top_p_t = per_row("top_p", top_p, batch, device, torch.float32)
        min_logit = logit_threshold(logits, temperature, top_k_t, top_p_t)
    return (
        logits.contiguous(),
        tokens.contiguous(),
        draft_probs,
        num_draft,
        temperature,
        min_logit,
        seeds,
        offsets,
    )


def _value_checks(
    tokens, num_draft, num_draft_given, temperature, top_k, top_p, vocab, num_spec
) -> list[Check]:
    """The value checks of a call (Python scalars are known now; tensors are read at once by
    :func:`check_values`, and not at all while tracing).

    NOTE: the kernels stay safe without them: an out-of-range draft token is rejected, never read.
    """
    checks: list[Check] = []
    if num_draft_given:
        checks.append(
            (((num_draft >= 0) & (num_draft <= num_spec)).all(), f"num_draft must be in [0, K={num_spec}]")
        )
    # NOTE: entries j >= num_draft[b] are padding (the draft protocol fills them with 0) and are
    # never read, so only the valid drafts must be token ids.
    if tokens.numel():
        in_range = (tokens >= 0) & (tokens < vocab)
        if num_draft_given:
            in_range |= torch.arange(num_spec, device=tokens.device)[None, :] >= num_draft[:, None]
        checks.append(
            (in_range.all(), f"draft_tokens must hold token ids in [0, V={vocab}) at positions j < num_draft")
        )
    # NOTE: a positive temperature below MIN_TEMPERATURE overflows logits / temperature to inf (garbage
    # tokens); SamplingParams turns such temperatures into greedy before they reach the op.
    checks.append((temperatures_ok(temperature), TEMPERATURE_MESSAGE))
    tensors = isinstance(top_k, torch.Tensor)
    checks.append(((top_k >= 0).all() if tensors else top_k >= 0, "top_k must be >= 0 (0 disables it)"))
    # NOTE: written as 0 < p <= 1 so that NaN fails too.
    checks.append(
        (((top_p > 0) & (top_p <= 1)).all() if tensors else 0 < top_p <= 1, "top_p must be in (0, 1]")
    )
    return checks


def _fake_verify(target_logits, draft_tokens, draft_probs, num_draft, temperature, min_logit, seeds, offsets):
    batch, k_plus_1, _ = target_logits.shape
    out_tokens = target_logits.new_empty((batch, k_plus_1), dtype=torch.int64)
    num_accepted = target_logits.new_empty((batch,), dtype=torch.int32)
    return out_tokens, num_accepted


if _native.has_native("verify"):
    torch.library.register_fake("s2d::verify")(_fake_verify)
