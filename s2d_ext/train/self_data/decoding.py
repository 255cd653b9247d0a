"""Batched decoding of the target's answers, recording its top-k next-token log-probabilities."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    """One row of :func:`decode_batch`: its new tokens, whether it stopped at EOS, the recorded top-k."""

    tokens: list[int]
    finished: bool
    topk_ids: torch.Tensor | None  # [n, K] int32: top-k of the distribution that predicted tokens[i]
    topk_logprobs: torch.Tensor | None  # [n, K] float32


@torch.no_grad()
def decode_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperatures: Sequence[float],
    stop_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
    top_k_record: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> list[Decoded]:
    """Decode left-padded ``prompts`` together over a KV cache, each row at its own temperature (0 = argmax;
    else a sample from softmax(logits / T) drawn with ``generator``), until a stop id or ``max_new_tokens``.

    With ``top_k_record > 0`` it records, for every emitted token, the top-k of the *unscaled* (T=1)
    log-softmax that predicted it. Finished rows leave the batch (their cache rows are dropped).
    """
    from s2d_ext import _cache_compat

    device = model.get_input_embeddings().weight.device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    temps = torch.tensor([float(t) for t in temperatures], dtype=torch.float32, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    cache = _cache_compat.new_cache(model)
    cache_kw = _cache_compat.cache_keyword(model)

    alive = torch.arange(batch, device=device)  # [R] original row of each cache row
    active = torch.ones(batch, dtype=torch.bool, device=device)  # [R] cache rows still writing
    tokens: list[list[int]] = [[] for _ in range(batch)]
    rec_ids: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    rec_lp: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finished = [False] * batch
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    step_ids, step_pos = input_ids, position_ids
    for step in range(max_new_tokens):
        with autocast:
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
        logits = out.logits[:, -1].float()  # [R, V]
        t = temps[alive]
        nxt = logits.argmax(-1)
        if bool((t > 0).any()):
            probs = torch.softmax(logits / t.clamp(min=1e-6)[:, None], dim=-1)
            sampled = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
            nxt = torch.where(t > 0, sampled, nxt)
        if top_k_record:
            top_lp, top_ids = torch.log_softmax(logits, dim=-1).topk(top_k_record, dim=-1)
            top_lp, top_ids = top_lp.cpu(), top_ids.to(torch.int32).cpu()
        stopped = active & torch.isin(nxt, stops)
        for r, (orig, tok, live, stop) in enumerate(
            zip(alive.tolist(), nxt.tolist(), active.tolist(), stopped.tolist())
        ):
            if not live:
                continue
            tokens[orig].append(tok)
            if top_k_record:
                rec_ids[orig].append(top_ids[r])
                rec_lp[orig].append(top_lp[r])
            finished[orig] = stop
        active = active & ~stopped
        if step == max_new_tokens - 1 or not bool(active.any()):
            break
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
        # NOTE: finished rows leave once they are a quarter of the batch: fewer rows, cheaper steps.
        if int((~active).sum()) >= max(1, active.numel() // 4):
            rows = active.nonzero().squeeze(1)
            cache.batch_select_indices(rows)
            alive, active, mask, step_pos, nxt = (
                alive[rows],
                active[rows],
                mask[rows],
                step_pos[rows],
                nxt[rows],
            )
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt[:, None]
    result = []
    for row in range(batch):
        ids = torch.stack(rec_ids[row]) if top_k_record and rec_ids[row] else None
        lps = torch.stack(rec_lp[row]) if top_k_record and rec_lp[row] else None
        result.append(Decoded(tokens=tokens[row], finished=finished[row], topk_ids=ids, topk_logprobs=lps))
    return result
