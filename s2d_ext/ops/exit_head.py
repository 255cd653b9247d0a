"""``exit_head``: fused final RMSNorm + lm_head + argmax / top probability / log-sum-exp.

The fused op streams over the vocabulary and never writes the [N, V] logits; it serves greedy
drafting and the early-exit confidence test. ``exit_head_probs`` returns the processed draft
distribution q [N, V] (through :func:`s2d_ext.ops.exit_sample.exit_sample`, the fused sampled-drafting
op, on the same backend).

Backends of ``exit_head``: ``"reference"`` (:mod:`s2d_ext.ops.exit_head_reference`, the spec),
``"cpu"`` (C++), ``"cuda"`` (both ``torch.ops.s2d.exit_head``) and ``"triton"``
(``torch.ops.s2d.exit_head_triton``).
"""

from __future__ import annotations

import torch

from s2d_ext import _native
from s2d_ext.ops._backend import (
    FLOAT_DTYPES,
    check_tensor,
    check_values,
    head_arguments,
    per_row,
    resolve_backend,
    temperature_per_row,
)
from s2d_ext.ops.exit_sample import exit_sample

HIDDEN_DTYPES = FLOAT_DTYPES


def exit_head(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    lm_head_weight: torch.Tensor,
    eps: float,
    temperature: torch.Tensor | float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy token, top probability and log-sum-exp of each row's exit-head distribution.

    Parameters
    ----------
    hidden : torch.Tensor
        [N, d] float32, bfloat16 or float16: hidden states before the final norm.
    norm_weight : torch.Tensor
        [d], same dtype and device as ``hidden``: the RMSNorm weight.
    lm_head_weight : torch.Tensor
        [V, d], same dtype and device as ``hidden``: the head projection.
    eps : float
        RMSNorm epsilon, >= 0.
    temperature : float or torch.Tensor
        Scalar or [N]; >= 0. Scales the logits for ``confidence`` and ``logsumexp`` (0 = unscaled).
    backend : str
        "auto", "reference", "cpu", "triton" or "cuda".

    Returns
    -------
    tokens : torch.Tensor
        [N] int64, argmax of the raw logits (smallest id on ties).
    confidence : torch.Tensor
        [N] float32, ``max softmax(logits / T)`` (``T == 0``: unscaled).
    logsumexp : torch.Tensor
        [N] float32, ``logsumexp(logits / T)`` (``T == 0``: unscaled).
    """
    hidden, norm_weight, lm_head_weight, eps = head_arguments(hidden, norm_weight, lm_head_weight, eps)
    temperature, checks = temperature_per_row(temperature, hidden.shape[0], hidden.device, validate=True)
    check_values(checks)
    chosen = resolve_backend("exit_head", backend, hidden.device)
    if hidden.shape[0] == 0:
        return (
            torch.empty((0,), dtype=torch.int64, device=hidden.device),
            torch.empty((0,), dtype=torch.float32, device=hidden.device),
            torch.empty((0,), dtype=torch.float32, device=hidden.device),
        )
    return run_exit_head(chosen, hidden, norm_weight, lm_head_weight, eps, temperature)


def run_exit_head(
    backend: str,
    hidden: torch.Tensor,  # [N, d], N >= 1, contiguous
    norm_weight: torch.Tensor,  # [d]
    lm_head_weight: torch.Tensor,  # [V, d]
    eps: float,
    temperature: torch.Tensor,  # [N] float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``backend`` kernel of :func:`exit_head` (a name :func:`resolve_backend` gave) on arguments already
    normalised. NOTE: no check at all: for a caller that checked once for many calls
    (``SortedDraft.propose``)."""
    if backend == "reference":
        from s2d_ext.ops.exit_head_reference import exit_head_reference

        return exit_head_reference(hidden, norm_weight, lm_head_weight, eps, temperature)
    if backend == "triton":
        from s2d_ext.triton.exit_head import exit_head_triton  # noqa: F401  (registers the op)

        return torch.ops.s2d.exit_head_triton(hidden, norm_weight, lm_head_weight, eps, temperature)
    return torch.ops.s2d.exit_head(hidden, norm_weight, lm_head_weight, eps, temperature)


def exit_head_probs(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    lm_head_weight: torch.Tensor,
    eps: float,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int = 0,
    top_p: torch.Tensor | float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The processed draft distribution q of each row, materialised as [N, V].

    Temperature, then top-k, then top-p, exactly as :func:`s2d_ext.ops.verify_reference.logit_threshold`
    and :func:`~s2d_ext.ops.verify_reference.processed_probs` define them (so a draft sampled from q
    is verified against the same processing); rows with ``temperature == 0`` get a one-hot of the
    argmax. It runs :func:`s2d_ext.ops.exit_sample.exit_sample` (the same backend) with every row firing;
    drafting itself calls that op, which writes q only at the exit that fires.

    Parameters
    ----------
    hidden, norm_weight, lm_head_weight, eps : as in :func:`exit_head`
        hidden [N, d]; norm_weight [d]; lm_head_weight [V, d].
    temperature : float or torch.Tensor
        Scalar or [N], >= 0.
    top_k : int or torch.Tensor
        Scalar or [N] int, >= 0 (0 = off).
    top_p : float or torch.Tensor
        Scalar or [N], in (0, 1] (1 = off).
    backend : str
        "auto", "reference", "cpu", "triton" or "cuda".

    Returns
    -------
    probs : torch.Tensor
        [N, V] float32, rows summing to 1.
    confidence : torch.Tensor
        [N] float32, ``probs.max(-1)``.
    """
    hidden = check_tensor("hidden", hidden, ndim=2, dtypes=HIDDEN_DTYPES)
    lm_head_weight = check_tensor("lm_head_weight", lm_head_weight, ndim=2)
    batch, device = hidden.shape[0], hidden.device
    probs = torch.zeros((batch, lm_head_weight.shape[0]), dtype=torch.float32, device=device)
    rows = torch.arange(batch, device=device)
    # NOTE: the race's draw is not returned, so any key does; threshold 0 makes every row fire.
    _, confidence, _ = exit_sample(
        hidden, norm_weight, lm_head_weight, eps, temperature, top_k, top_p, 0, 0, 0, 0.0, probs, rows,
        backend=backend,
    )  # fmt: skip
    greedy = per_row("temperature", temperature, batch, device, torch.float32) <= 0
    return probs, torch.where(greedy, torch.ones_like(confidence), confidence)


def _fake_exit_head(hidden, norm_weight, lm_head_weight, eps, temperature):
    batch = hidden.shape[0]
    tokens = hidden.new_empty((batch,), dtype=torch.int64)
    confidence = hidden.new_empty((batch,), dtype=torch.float32)
    logsumexp = hidden.new_empty((batch,), dtype=torch.float32)
    return tokens, confidence, logsumexp


if _native.has_native("exit_head"):
    torch.library.register_fake("s2d::exit_head")(_fake_exit_head)
