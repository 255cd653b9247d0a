"""``exit_sample`` / ``sample_logits``: sampled drafting at one exit, fused.

``exit_sample`` does, per row of a draft step, in one op: the final RMSNorm, the exit head (all ids or a
reduced draft vocabulary), temperature / top-k / top-p, the confidence, the exit decision against the
row's threshold and, only where the row fires, q written into its row of the proposal's probs buffer and
the token sampled from q with Philox (stream ``STREAM_DRAFT``, the row's seed / offset / position, so a
row's draw never depends on the rest of the batch). ``sample_logits`` does the same from given logits (a
plain HF draft). The spec is :mod:`s2d_ext.ops.exit_sample_reference`.

Backends: ``"reference"`` (the spec), ``"cpu"`` (C++, ``torch.ops.s2d.exit_sample`` /
``torch.ops.s2d.sample_logits``), ``"cuda"`` (the same ops: the head as a float32-output matmul, then one
sampling kernel) and ``"triton"`` (``torch.ops.s2d.exit_sample_triton`` / ``sample_logits_triton``).
"""

from __future__ import annotations

import torch

from s2d_ext import _native
from s2d_ext.ops._backend import (
    FLOAT_DTYPES,
    Check,
    check_tensor,
    check_values,
    head_arguments,
    is_tracing,
    per_row,
    resolve_backend,
    temperature_per_row,
)

LOGIT_DTYPES = FLOAT_DTYPES
MAX_POSITION = 2**16  # Philox counters hold the position in 16 bits


def exit_sample(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    lm_head_weight: torch.Tensor,
    eps: float,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    seeds: torch.Tensor | int,
    offsets: torch.Tensor | int,
    positions: torch.Tensor | int,
    threshold: torch.Tensor | float,
    probs: torch.Tensor,
    probs_rows: torch.Tensor,
    vocab_ids: torch.Tensor | None = None,
    filters: bool | None = None,
    backend: str = "auto",
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decide one exit of a draft step for each row: confidence, fire, and (where fired) q and a sample.

    Parameters
    ----------
    hidden : torch.Tensor
        [N, d] float32, bfloat16 or float16: hidden states before the final norm.
    norm_weight : torch.Tensor
        [d], dtype of ``hidden``: the final RMSNorm weight.
    lm_head_weight : torch.Tensor
        [Vh, d], dtype of ``hidden``: the head rows of the head vocabulary (``lm_head.weight`` itself, or
        its rows ``vocab_ids`` for a reduced draft vocabulary).
    eps : float
        RMSNorm epsilon, >= 0.
    temperature : float or torch.Tensor
        Scalar or [N], finite and >= 0; 0 = greedy row (argmax, one-hot q, raw top probability).
    top_k, top_p : int / float or torch.Tensor
        Scalar or [N]: top-k (>= 0, 0 = off) then top-p (in (0, 1], 1 = off) on the head vocabulary.
    seeds, offsets, positions : int or torch.Tensor
        Scalar or [N] int64: the Philox key, counter offset and draft position (0 <= position < 2**16).
    threshold : float or torch.Tensor
        Scalar or [N] float32: a row fires when its confidence is >= it (0: always).
    probs : torch.Tensor
        [M, V] float32, contiguous: the proposal's q buffer, written in place at the fired rows.
    probs_rows : torch.Tensor
        [N] int64, distinct, in [0, M): the row of ``probs`` that row i owns.
    vocab_ids : torch.Tensor, optional
        [Vh] int64, unique ascending ids in [0, V): head row h is token ``vocab_ids[h]``. None: Vh == V.
    filters : bool, optional
        Whether any row uses top-k / top-p; False skips their (sorting) threshold. None: derived from
        ``top_k`` / ``top_p`` (one reduction when they are tensors).
    backend : str
        "auto", "reference", "cpu", "triton" or "cuda".
    validate : bool
        False skips the value checks (one device reduction each: temperatures, top-k / top-p ranges,
        positions, thresholds, the probs rows, vocab_ids) for a caller that checked them once per call
        of its own (``SortedDraft.propose`` calls this op at every exit of every draft step). Shapes,
        dtypes and devices are always checked. NOTE: the kernels stay memory-safe without the value
        checks: a probs row outside [0, M) or a vocab id outside [0, V) is never written (the outputs
        of such a call are unspecified).

    Returns
    -------
    tokens : torch.Tensor
        [N] int64: the sampled token of fired rows with T > 0, else the argmax id.
    confidence : torch.Tensor
        [N] float32: max q (T > 0) or the raw top probability (T == 0), within the head vocabulary.
    fired : torch.Tensor
        [N] bool: ``confidence >= threshold``.
    """
    hidden, norm_weight, lm_head_weight, eps = head_arguments(hidden, norm_weight, lm_head_weight, eps)
    rows, device = hidden.shape[0], hidden.device
    temperature, checks = temperature_per_row(temperature, rows, device, validate)
    args = _normalise_sampling(
        rows, lm_head_weight.shape[0], device, temperature, top_k, top_p, seeds, offsets, positions,
        threshold, probs, probs_rows, vocab_ids, filters, checks, validate,
    )  # fmt: skip
    chosen = resolve_backend("exit_head", backend, hidden.device)
    if hidden.shape[0] == 0:
        return _empty(hidden.device)
    return run_exit_sample(chosen, hidden, norm_weight, lm_head_weight, eps, *args)


def run_exit_sample(
    backend: str,
    hidden: torch.Tensor,  # [N, d], N >= 1, contiguous
    norm_weight: torch.Tensor,  # [d]
    lm_head_weight: torch.Tensor,  # [Vh, d]
    eps: float,
    *args: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``backend`` kernel of :func:`exit_sample` (a name :func:`resolve_backend` gave) on arguments
    already normalised: ``args`` are temperature, top_k, top_p, seeds, offsets, positions, threshold ([N]
    tensors of float32 / int64 / float32 / int64 / int64 / int64 / float32), vocab_ids, probs, probs_rows
    and filters (a bool), as :func:`exit_sample` passes them on.

    NOTE: no check at all: for a caller that checked once for many calls (``SortedDraft.propose`` calls
    this at every exit of every draft token, on arguments it made itself).
    """
    if backend == "reference":
        from s2d_ext.ops.exit_sample_reference import exit_sample_reference

        return exit_sample_reference(hidden, norm_weight, lm_head_weight, eps, *args)
    if backend == "triton":
        from s2d_ext.triton.exit_sample import exit_sample_triton  # noqa: F401  (registers the op)

        return torch.ops.s2d.exit_sample_triton(hidden, norm_weight, lm_head_weight, eps, *args)
    return torch.ops.s2d.exit_sample(hidden, norm_weight, lm_head_weight, eps, *args)


def sample_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    seeds: torch.Tensor | int,
    offsets: torch.Tensor | int,
    positions: torch.Tensor | int,
    threshold: torch.Tensor | float,
    probs: torch.Tensor,
    probs_rows: torch.Tensor,
    vocab_ids: torch.Tensor | None = None,
    filters: bool | None = None,
    backend: str = "auto",
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`exit_sample` from given logits [N, Vh] (float32, bfloat16 or float16) instead of a head.

    Every other argument and the returns are as in :func:`exit_sample`.
    """
    logits = check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    rows, head_vocab = logits.shape
    if head_vocab < 1:
        raise ValueError("logits must have a vocabulary of at least one token (dim 1)")
    temperature, checks = temperature_per_row(temperature, rows, logits.device, validate)
    args = _normalise_sampling(
        rows, head_vocab, logits.device, temperature, top_k, top_p, seeds, offsets, positions, threshold,
        probs, probs_rows, vocab_ids, filters, checks, validate,
    )  # fmt: skip
    chosen = resolve_backend("exit_head", backend, logits.device)
    logits = logits.contiguous()
    if rows == 0:
        return _empty(logits.device)
    if chosen == "reference":
        from s2d_ext.ops.exit_sample_reference import sample_logits_reference

        return sample_logits_reference(logits, *args)
    if chosen == "triton":
        from s2d_ext.triton.exit_sample import sample_logits_triton  # noqa: F401  (registers the op)

        return torch.ops.s2d.sample_logits_triton(logits, *args)
    return torch.ops.s2d.sample_logits(logits, *args)


def _normalise_sampling(
    rows, head_vocab, device, temperature, top_k, top_p, seeds, offsets, positions, threshold, probs,
    probs_rows, vocab_ids, filters, checks, validate,
) -> tuple:  # fmt: skip
    """The per-row arguments as [N] tensors, checked (``checks``: the temperature's, read with the others);
    returns them in the ops' order."""
    probs = check_tensor("probs", probs, ndim=2, dtypes=(torch.float32,), device=device)
    if not probs.is_contiguous():
        raise ValueError("probs must be contiguous (it is written in place)")
    vocab = probs.shape[1]
    if not 1 <= vocab < 2**31:
        raise ValueError(f"probs must have 1 to 2**31 - 1 columns (the vocabulary V), got {vocab}")
    probs_rows = check_tensor("probs_rows", probs_rows, ndim=1, dtypes=(torch.int64,), device=device)
    if probs_rows.shape[0] != rows:
        raise ValueError(f"probs_rows must have shape [N={rows}], got {list(probs_rows.shape)}")
    if vocab_ids is None:
        if head_vocab != vocab:
            raise ValueError(
                f"without vocab_ids the head vocabulary ({head_vocab} ids) must equal the width of probs "
                f"(V={vocab})"
            )
    else:
        vocab_ids = check_tensor("vocab_ids", vocab_ids, ndim=1, dtypes=(torch.int64,), device=device)
        if vocab_ids.shape[0] != head_vocab:
            raise ValueError(
                f"vocab_ids must have one id per head row ([Vh={head_vocab}]), got {list(vocab_ids.shape)}"
            )
        vocab_ids = vocab_ids.contiguous()
    scalar_filters = not isinstance(top_k, torch.Tensor) and not isinstance(top_p, torch.Tensor)
    if filters is None and scalar_filters:
        filters = _scalar_filters(top_k, top_p)
    top_k = per_row("top_k", top_k, rows, device, torch.int64)
    top_p = per_row("top_p", top_p, rows, device, torch.float32)
    seeds = per_row("seeds", seeds, rows, device, torch.int64)
    offsets = per_row("offsets", offsets, rows, device, torch.int64)
    positions = per_row("positions", positions, rows, device, torch.int64)
    threshold = per_row("threshold", threshold, rows, device, torch.float32)
    readable = rows and not is_tracing(device)
    if validate and readable:
        checks = checks + _value_checks(
            rows, vocab, probs.shape[0], top_k, top_p, positions, threshold, probs_rows, vocab_ids
        )
    # NOTE: whether any row filters is read with the checks (one device read); while tracing, or with no
    # rows, the op assumes filters.
    queries = [((top_k > 0) | (top_p < 1)).any()] if filters is None and readable else []
    answers = check_values(checks, queries)
    if filters is None:
        filters = answers[0] if queries else True
    return (
        temperature,
        top_k,
        top_p,
        seeds,
        offsets,
        positions,
        threshold,
        vocab_ids,
        probs,
        probs_rows,
        bool(filters),
    )


def _scalar_filters(top_k, top_p) -> bool:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int or a [N] tensor, got {type(top_k).__name__}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a float or a [N] tensor, got {type(top_p).__name__}")
    return top_k > 0 or top_p < 1.0


def _value_checks(
    rows, vocab, buffer_rows, top_k, top_p, positions, threshold, probs_rows, vocab_ids
) -> list[Check]:
    """The value checks of the per-row arguments (read at once by :func:`check_values`)."""
    ordered = probs_rows.sort().values
    checks = [
        ((top_k >= 0).all(), "top_k must be >= 0 (0 disables it)"),
        # NOTE: written as 0 < p <= 1 so that NaN fails too.
        (((top_p > 0) & (top_p <= 1)).all(), "top_p must be in (0, 1]"),
        (
            ((positions >= 0) & (positions < MAX_POSITION)).all(),
            f"positions must be in [0, {MAX_POSITION}) (Philox holds them in 16 bits)",
        ),
        (~torch.isnan(threshold).any(), "threshold must not be NaN"),
        (
            (ordered[0] >= 0) & (ordered[-1] < buffer_rows),
            f"probs_rows must be rows of probs, in [0, M={buffer_rows})",
        ),
        (
            (ordered[1:] != ordered[:-1]).all(),
            "probs_rows must be distinct (each row of the step owns its row of probs)",
        ),
    ]
    if vocab_ids is not None and vocab_ids.numel():
        checks.append(
            ((vocab_ids[0] >= 0) & (vocab_ids[-1] < vocab), f"vocab_ids must be token ids in [0, V={vocab})")
        )
        checks.append(
            ((vocab_ids[1:] > vocab_ids[:-1]).all(), "vocab_ids must be unique and sorted ascending")
        )
    return checks


def _empty(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty((0,), dtype=torch.int64, device=device),
        torch.empty((0,), dtype=torch.float32, device=device),
        torch.empty((0,), dtype=torch.bool, device=device),
    )


def _fake_outputs(rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        like.new_empty((rows,), dtype=torch.int64),
        like.new_empty((rows,), dtype=torch.float32),
        like.new_empty((rows,), dtype=torch.bool),
    )


def _fake_exit_sample(hidden, norm_weight, lm_head_weight, eps, temperature, *rest):
    return _fake_outputs(hidden.shape[0], hidden)


def _fake_sample_logits(logits, temperature, *rest):
    return _fake_outputs(logits.shape[0], logits)


if _native.has_native("exit_head"):
    torch.library.register_fake("s2d::exit_sample")(_fake_exit_sample)
    torch.library.register_fake("s2d::sample_logits")(_fake_sample_logits)
