"""The SoFT loss on self-written data (:mod:`s2d_ext.train.self_data`): CE plus a KL to the target's
cached top-k distribution, at answer positions only, optionally within a reduced draft vocabulary."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from s2d_ext.train.soft.exits import base_model, layer_count


def exit_hidden_states(model, input_ids, attention_mask, exits: Sequence[int]) -> list[torch.Tensor]:
    """Each exit's hidden state after the shared final norm: list of [B, L, d], in ``exits`` order."""
    base = base_model(model)
    out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    states = []
    for e in exits:
        # NOTE: HF's last hidden state is already normed; the earlier ones are the raw residual stream.
        states.append(out.last_hidden_state if e == layer_count(model) else base.norm(out.hidden_states[e]))
    return states


def topk_kl(
    log_q: torch.Tensor,  # [N, V'] float32 log-probabilities of the draft
    topk_index: torch.Tensor,  # [N, K] int64 columns of log_q, -1 = a token the draft cannot emit
    topk_logprobs: torch.Tensor,  # [N, K] float32 log-probabilities of the target
) -> torch.Tensor:
    """KL(p || q) between the target's and the draft's distributions *coarsened* to K + 1 outcomes: the
    target's recorded top-K tokens and "anything else" (the rest of both distributions' mass). [N] float32.

    NOTE: this is the exact KL of the coarsened pair, so it is >= 0, 0 only when q matches p on the recorded
    tokens, and at most the full KL (data processing): what the cache of top-K makes computable.
    """
    p = topk_logprobs.exp()  # [N, K]
    in_vocab = topk_index >= 0
    q_lp = log_q.gather(1, topk_index.clamp(min=0))  # [N, K]
    # tokens outside the draft's vocabulary move to the "rest" outcome on both sides
    p_in = torch.where(in_vocab, p, torch.zeros_like(p))
    kl_in = (p_in * (topk_logprobs - q_lp)).sum(-1)
    p_rest = (1.0 - p_in.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - torch.where(in_vocab, q_lp.exp(), torch.zeros_like(q_lp)).sum(-1)).clamp(min=1e-12)
    kl_rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log()), 0.0)
    return kl_in + kl_rest


@dataclass
class SelfDataBatch:
    """A micro-batch of :class:`s2d_ext.train.self_data.SelfData` sequences, right-padded.

    ``positions`` index the flattened [B * L] positions whose next token is an answer token; ``labels``,
    ``topk_*`` belong to those positions (the answer token, the target's recorded top-K there).
    """

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    positions: torch.Tensor  # [N] int64 in [0, B * L)
    labels: torch.Tensor  # [N] int64 target token ids
    topk_ids: torch.Tensor  # [N, K] or [N, M, K] (M teachers) int64 target token ids
    topk_logprobs: torch.Tensor  # [N, K] or [N, M, K] float32

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> SelfDataBatch:
        return SelfDataBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def self_data_batch(data, indices: Sequence[int], max_len: int | None = None) -> SelfDataBatch:
    """Sequences ``indices`` of ``data`` (:class:`s2d_ext.train.self_data.SelfData`) as a right-padded batch.
    ``max_len`` cuts sequences (their answers' tails) to that many tokens."""
    seqs = [data.sequence(int(i)) for i in indices]
    if max_len is not None:
        seqs = [s[:max_len] for s in seqs]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    positions, labels, top_ids, top_lp = [], [], [], []
    for row, (i, seq) in enumerate(zip(indices, seqs)):
        n = len(seq)
        input_ids[row, :n] = seq
        mask[row, :n] = 1
        start = int(data.answer_start[int(i)])
        first = int(data.answer_offsets[int(i)])
        count = n - start  # answer tokens kept
        if count <= 0:
            continue
        # position p predicts token p + 1: the answer's tokens start..n-1 are predicted at start-1..n-2
        positions.append(row * width + torch.arange(start - 1, n - 1))
        labels.append(seq[start:n])
        top_ids.append(data.topk_ids[first : first + count])
        top_lp.append(data.topk_logprobs[first : first + count])
    if not positions:
        raise ValueError("the batch holds no answer tokens")
    return SelfDataBatch(
        input_ids=input_ids,
        attention_mask=mask,
        positions=torch.cat(positions),
        labels=torch.cat(labels).long(),
        topk_ids=torch.cat(top_ids).long(),
        topk_logprobs=torch.cat(top_lp).float(),
    )


@dataclass
class SelfDataLossOutput:
    """:func:`self_data_loss`: the loss (differentiable); per-exit CE, KL, top-1 agreement (detached)."""

    loss: torch.Tensor  # []
    ce_per_exit: torch.Tensor  # [n_exits]
    kl_per_exit: torch.Tensor  # [n_exits]
    agreement_per_exit: torch.Tensor  # [n_exits]: P(exit's argmax == the target's argmax)
    tokens: int  # answer tokens in the loss


def vocab_index(draft_vocab: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """[vocab_size] int64: each target token's column in the draft's head, -1 if the draft cannot emit it
    (None for the full vocabulary)."""
    if draft_vocab is None:
        return None
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[draft_vocab.long().cpu()] = torch.arange(draft_vocab.numel())
    return index


def self_data_loss(
    model,
    batch: SelfDataBatch,
    exits: Sequence[int],
    *,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    exit_weights: Sequence[float] | None = None,
    draft_vocab: torch.Tensor | None = None,  # [V'] int64 target ids, sorted (None = full vocabulary)
    index: torch.Tensor | None = None,  # vocab_index(draft_vocab, V), precomputed
) -> SelfDataLossOutput:
    """SoFT loss on the target's own text: ``sum_e w_e (ce_weight * CE_e + kl_weight * KL_e)`` over the answer
    positions, where KL_e is :func:`topk_kl` against the target's recorded top-K and CE_e the cross-entropy
    of the answer token (positions whose token the draft vocabulary lacks are left out of CE_e).

    NOTE: the head runs only at the answer positions (not [B, L, V] per exit): with V = 49152 that is what
    keeps a 12-layer SmolLM2 draft's training step in memory on a CPU.
    """
    n_exits = len(exits)
    weights = [1.0 / n_exits] * n_exits if exit_weights is None else [float(w) for w in exit_weights]
    head = model.get_output_embeddings().weight  # [V, d]
    if draft_vocab is not None:
        dv = draft_vocab.to(head.device)
        head = head.index_select(0, dv)  # [V', d]
        if index is None:
            index = vocab_index(draft_vocab, model.get_output_embeddings().weight.shape[0])
        index = index.to(head.device)
        labels = index[batch.labels]
        top_index = index[batch.topk_ids]
    else:
        labels, top_index = batch.labels, batch.topk_ids
    states = exit_hidden_states(model, batch.input_ids, batch.attention_mask, exits)
    labels_ce = torch.where(labels >= 0, labels, torch.full_like(labels, -100))
    n_ce = (labels_ce >= 0).sum().clamp_min(1)
    # NOTE: [N, K] is one teacher (self-written data); [N, M, K] is M teachers (teacher-forced data): the KL
    # term is the mean of the teachers' (the paper's one draft for several targets), and so is agreement.
    top_index = top_index if top_index.dim() == 3 else top_index[:, None]
    top_logprobs = batch.topk_logprobs if batch.topk_logprobs.dim() == 3 else batch.topk_logprobs[:, None]
    teachers = top_index.shape[1]
    total = head.new_zeros((), dtype=torch.float32)
    ces, kls, agree = [], [], []
    for w, hidden in zip(weights, states):
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)  # [N, d]
        log_q = F.log_softmax((h @ head.t().to(h.dtype)).float(), dim=-1)  # [N, V']
        ce = F.nll_loss(log_q, labels_ce, ignore_index=-100, reduction="sum") / n_ce
        kl = (
            sum(topk_kl(log_q, top_index[:, m], top_logprobs[:, m]).mean() for m in range(teachers))
            / teachers
        )
        total = total + w * (ce_weight * ce + kl_weight * kl)
        ces.append(ce.detach())
        kls.append(kl.detach())
        top1 = log_q.detach().argmax(-1)[:, None]  # [N, 1]
        agree.append((top1 == top_index[:, :, 0]).float().mean())
    return SelfDataLossOutput(
        loss=total,
        ce_per_exit=torch.stack(ces).float().cpu(),
        kl_per_exit=torch.stack(kls).float().cpu(),
        agreement_per_exit=torch.stack(agree).cpu(),
        tokens=int(batch.positions.numel()),
    )
