"""Log-probabilities of emitted tokens, under the distribution each was drawn from.

Per position ``p`` of a row's verified block (``k + 1`` positions) a cell of ``1 + 2n`` float64 values: the
emitted token's log-probability, then the ``n`` most probable ``(id, log-probability)`` pairs. The block is
computed on the device beside verify and travels in the step's one read (:mod:`s2d_ext.engine.readout`).
"""

from __future__ import annotations

import torch

from s2d_ext.engine.filters import filtered_scores
from s2d_ext.engine.params import SamplingParams


def block_width(k: int, top_n: int) -> int:
    """Values in a row's block: ``k + 1`` positions of ``1 + 2 top_n``."""
    return (k + 1) * (1 + 2 * top_n)


def logprob_block(
    logits: torch.Tensor,  # [P, V]: one row's processed target logits, P <= k + 1 positions
    out: torch.Tensor,  # [P] int64: verify's out for the row (the token emitted or accepted at each position)
    params: SamplingParams,
    k: int,
    top_n: int,
) -> torch.Tensor:
    """[(k+1) * (1 + 2 top_n)] float64: the row's block (positions past P are zero)."""
    p = params
    if p.min_p > 0 and not p.greedy:
        # NOTE: a min-p row's logits were filtered already (min_p_logits, by the target batch); filtering
        # them again would renormalise before top-p and cut tokens that were drawn. Only the temperature is
        # left.
        scores = filtered_scores(logits, p.temperature, 0, 1.0, 0.0)
    else:
        scores = filtered_scores(logits, p.temperature, p.top_k, p.top_p, p.min_p)  # [P, V]
    logp = torch.log_softmax(scores, dim=-1)
    positions = logp.shape[0]
    block = torch.zeros((k + 1, 1 + 2 * top_n), dtype=torch.float64, device=logits.device)
    block[:positions, 0] = logp.gather(1, out[:positions].clamp(min=0)[:, None]).squeeze(1).double()
    if top_n:
        top = logp.topk(min(top_n, logp.shape[1]), dim=-1)
        n = top.values.shape[1]
        block[:positions, 1 : 1 + 2 * n : 2] = top.indices.double()
        block[:positions, 2 : 2 + 2 * n : 2] = top.values.double()
    return block.flatten()


def fill_logprobs(output, values: list[float], top_n: int, want: int) -> None:
    """Set ``output.logprobs`` / ``top_logprobs`` (a RequestOutput) from its row's block ``values``: one entry
    per new token, ``want`` (<= top_n) pairs each."""
    width = 1 + 2 * top_n
    output.logprobs, output.top_logprobs = [], []
    for j in range(len(output.new_token_ids)):
        cell = values[j * width : (j + 1) * width]
        output.logprobs.append(cell[0])
        pairs = [(int(cell[1 + 2 * i]), cell[2 + 2 * i]) for i in range(min(want, top_n))]
        output.top_logprobs.append(pairs)
