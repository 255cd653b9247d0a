"""Sampled drafting at one exit, in plain PyTorch: the spec of ``exit_sample`` and ``sample_logits``.

One call decides, for each row of a draft step, what its exit does (``T`` is the row's temperature):

head vocabulary
    The ids the exit's head scores: every id (``vocab_ids=None``), or a reduced draft vocabulary
    ``vocab_ids`` [Vh] (unique ids, ascending; see :mod:`s2d_ext.draft.draft_vocab`). Head row ``h`` is
    token ``vocab_ids[h]``; q is zero outside the head vocabulary.
logits
    ``exit_sample``: the exit head's float32 logits [N, Vh] (:func:`exit_head_reference.exit_head_logits`
    of the head rows). ``sample_logits``: given.
scores
    ``sanitize(logits / T)`` over the head vocabulary (``T == 0``: ``sanitize(logits)``). A row whose
    logits are all ``-inf`` (or NaN) is uniform over the head vocabulary.
processed q
    ``T > 0``: ``softmax`` of the scores after top-k, then top-p, exactly as
    :func:`verify_reference.logit_threshold` defines them on the head vocabulary.
    ``T == 0``: a one-hot of the argmax (smallest id on ties).
confidence
    ``T > 0``: ``max q``. ``T == 0``: ``max softmax(sanitize(logits))`` (the raw top probability).
    So with a reduced vocabulary it is the top probability *within the subset*, its log-sum-exp taken
    over the subset only: the cheap exit decision.
fired
    ``confidence >= threshold`` (a row's threshold 0 always fires; the last exit passes 0).
tokens
    Fired rows with ``T > 0``: a sample from q by the two-level exponential race
    (:func:`verify_reference.exponential_race`) over the *full* id space [0, V), on stream
    ``STREAM_DRAFT`` at (``seeds``, ``offsets``, ``positions``). Every other row: the argmax id.
probs
    For every fired row ``i``: ``probs[probs_rows[i]] = q`` (the whole row of V entries, zeros outside the
    head vocabulary). Rows that did not fire leave their ``probs`` row untouched.
"""

from __future__ import annotations

import torch

from s2d_ext.ops.exit_head_reference import exit_head_logits
from s2d_ext.ops.philox import STREAM_DRAFT
from s2d_ext.ops.verify_reference import exponential_race, logit_threshold, processed_probs, sanitize


def sample_logits_reference(
    logits: torch.Tensor,  # [N, Vh] float32 / bfloat16 / float16
    temperature: torch.Tensor,  # [N] float32, 0 = greedy row
    top_k: torch.Tensor,  # [N] int64, 0 = off
    top_p: torch.Tensor,  # [N] float32, 1 = off
    seeds: torch.Tensor,  # [N] int64
    offsets: torch.Tensor,  # [N] int64
    positions: torch.Tensor,  # [N] int64, < 2**16
    threshold: torch.Tensor,  # [N] float32
    vocab_ids: torch.Tensor | None,  # [Vh] int64 ascending, or None (Vh == V)
    probs: torch.Tensor,  # [M, V] float32, rows probs_rows are overwritten where fired
    probs_rows: torch.Tensor,  # [N] int64 in [0, M), distinct
    filters: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``tokens`` [N] int64, ``confidence`` [N] float32 and ``fired`` [N] bool; writes ``probs``.

    ``filters=False`` promises that no row uses top-k / top-p and skips their (sorting) threshold.
    """
    rows, head_vocab = logits.shape
    vocab = probs.shape[1]
    device = logits.device
    logits = logits.float()[:, None, :]  # [N, 1, Vh]
    greedy = temperature <= 0
    min_logit = logit_threshold(logits, temperature, top_k, top_p) if filters else None
    q_head = processed_probs(logits, temperature, min_logit)[:, 0]  # [N, Vh]
    raw = sanitize(logits[:, 0])  # [N, Vh]
    argmax = raw.argmax(dim=-1)  # [N]
    raw_top = torch.softmax(raw, dim=-1).amax(dim=-1)
    one_hot = torch.zeros_like(q_head).scatter_(-1, argmax[:, None], 1.0)
    q_head = torch.where(greedy[:, None], one_hot, q_head)
    confidence = torch.where(greedy, raw_top, q_head.amax(dim=-1))
    fired = confidence >= threshold
    ids = torch.arange(head_vocab, device=device) if vocab_ids is None else vocab_ids
    q = torch.zeros((rows, vocab), dtype=torch.float32, device=device)
    q[:, ids] = q_head
    sampled = exponential_race(q, seeds, offsets, positions, stream=STREAM_DRAFT)
    tokens = torch.where(fired & ~greedy, sampled, ids[argmax])
    probs[probs_rows[fired]] = q[fired]
    return tokens, confidence, fired


def exit_sample_reference(
    hidden: torch.Tensor,  # [N, d]
    norm_weight: torch.Tensor,  # [d]
    lm_head_weight: torch.Tensor,  # [Vh, d]: the head rows of the head vocabulary
    eps: float,
    temperature: torch.Tensor,  # [N]
    top_k: torch.Tensor,  # [N]
    top_p: torch.Tensor,  # [N]
    seeds: torch.Tensor,  # [N]
    offsets: torch.Tensor,  # [N]
    positions: torch.Tensor,  # [N]
    threshold: torch.Tensor,  # [N]
    vocab_ids: torch.Tensor | None,  # [Vh] or None
    probs: torch.Tensor,  # [M, V]
    probs_rows: torch.Tensor,  # [N]
    filters: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_logits_reference` of the exit head's logits (final RMSNorm + head rows)."""
    logits = exit_head_logits(hidden, norm_weight, lm_head_weight, eps)
    return sample_logits_reference(
        logits, temperature, top_k, top_p, seeds, offsets, positions, threshold, vocab_ids, probs,
        probs_rows, filters,
    )  # fmt: skip
