"""Log-probabilities of a prompt's own tokens (``echo`` with ``logprobs``), as vLLM returns them.

Position ``i`` of the prompt gets ``log p(prompt[i] | prompt[:i])`` under the target's raw distribution
(no processors, no temperature: vLLM's default ``raw_logprobs``) and its ``top_n`` most probable tokens;
the first token has none (None), as in vLLM. One forward of the prompt through the target, run by the
engine's thread (:meth:`~s2d_ext.server.async_engine.AsyncEngine.call`), which owns the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from s2d_ext.target import input_device


@torch.no_grad()
def prompt_logprobs(
    model: Any, prompt_ids: Sequence[int], top_n: int
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """([L] log-probabilities, [L] top-n (id, log-probability) lists) of ``prompt_ids``; entry 0 is None."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=input_device(model))
    logits = model(ids, use_cache=False).logits[0, :-1].float()  # [L-1, V]: position i predicts token i+1
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()  # [L-1]
    tops: list[list[tuple[int, float]] | None] = [None]
    if top_n:
        top = logp.topk(min(top_n, logp.shape[1]), dim=-1)
        tops += [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        tops += [[] for _ in chosen]
    return [None, *chosen], tops
