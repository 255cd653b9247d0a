"""SoFT of a shared-embedding draft on self-written data (:func:`train_soft_self_data`): bf16 autocast,
a time budget, held-out evaluation, exact resume."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from s2d_ext.train.soft.checkpoint import (
    STATE_FILE,
    load_own_weights,
    prepare_output_dir,
    save_self_data_checkpoint,
)
from s2d_ext.train.soft.config import SoftConfig, SoftResult, check_config, jsonable
from s2d_ext.train.soft.exits import layer_count, model_exits, set_exit_config, validate_exits
from s2d_ext.train.soft.optimizer import adamw
from s2d_ext.train.soft.self_data_loss import self_data_batch, self_data_loss, vocab_index


def _autocast(device: torch.device, autocast: str | None):
    import contextlib

    if not autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))


def self_data_epoch_order(lengths: Sequence[int], epoch: int, seed: int, batch_size: int) -> list[list[int]]:
    """The micro-batches of one epoch: a seeded permutation, cut into windows of 16 batches whose sequences
    are sorted by length and split into batches (less padding), the batches then shuffled again.

    NOTE: a pure function of (lengths, epoch, seed, batch_size), so resuming needs no RNG state.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = 16 * batch_size
    batches = []
    for lo in range(0, len(perm), window):
        chunk = sorted(perm[lo : lo + window], key=lambda i: (lengths[i], i))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


@torch.no_grad()
def self_data_eval(
    model, data, indices: Sequence[int], exits: Sequence[int], *, batch_size: int = 8, autocast=None, **kw
) -> dict:
    """Per-exit CE, KL and top-1 agreement with the target over sequences ``indices`` (token-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, len(exits), dtype=torch.float64)
    count = 0
    for lo in range(0, len(indices), batch_size):
        batch = self_data_batch(data, indices[lo : lo + batch_size]).to(device)
        with _autocast(device, autocast):
            out = self_data_loss(model, batch, exits, **kw)
        n = out.tokens
        sums += torch.stack([out.ce_per_exit, out.kl_per_exit, out.agreement_per_exit]).double() * n
        count += n
    model.train(was_training)
    means = (sums / max(count, 1)).tolist()
    return {"ce": means[0], "kl": means[1], "agreement": means[2], "tokens": count}


def train_soft_self_data(
    model,
    data,
    config: SoftConfig,
    *,
    train_indices: Sequence[int],
    heldout_indices: Sequence[int] = (),
    draft_vocab: torch.Tensor | None = None,
    kl_weight: float = 1.0,
    autocast: str | None = None,
    max_seconds: float | None = None,
    eval_every: int = 0,
    save_fn=None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "SoFT",
) -> SoftResult:
    """SoFT of a draft cut with :func:`cut_draft` on a self-written data set (:mod:`s2d_ext.train.self_data`).

    ``config.batch_size`` counts *sequences* per micro-batch here. The loss is :func:`self_data_loss`
    (``config.ce_weight``, ``kl_weight``, ``config.exit_weights``). Parameters that do not require grad (the
    shared embedding and head) stay as they are.

    Parameters
    ----------
    model : the draft (HF CausalLM), trained in place
    data : :class:`s2d_ext.train.self_data.SelfData`
    train_indices, heldout_indices : sequences to train on / to evaluate (per-exit CE, KL, agreement) on
    draft_vocab : [V'] int64 sorted target ids the draft's head covers (None = all)
    autocast : e.g. "bfloat16": mixed precision (float32 weights and optimizer), about 3x faster on CPUs
        with AMX and on GPUs
    max_seconds : stop (and save, resumable) once a run has trained this long; None = no limit
    eval_every : held-out evaluation every N steps (0 = only at the start and the end)
    save_fn : ``save_fn(model, folder)`` writes the model (default ``model.save_pretrained``)
    out_dir, resume, overwrite : as for :func:`train_soft`; the resume state (optimizer, step, history) is
        ``soft_state.pt`` beside the model

    NOTE: deterministic on the CPU for a given seed and thread count: the data order is a pure function of
    (seed, epoch), every sequence is seen once per epoch, and the model has no dropout.
    """
    from tqdm.auto import tqdm

    check_config(config)
    exits = validate_exits(
        config.exits if config.exits is not None else model_exits(model), layer_count(model)
    )
    set_exit_config(model, exits, config.thresholds)
    train_indices = [int(i) for i in train_indices]
    heldout_indices = [int(i) for i in heldout_indices]
    if not train_indices:
        raise ValueError("train_indices is empty: nothing to train on")
    overlap = set(train_indices) & set(heldout_indices)
    if overlap:
        raise ValueError(f"{len(overlap)} sequences are both trained on and held out")
    do_resume = False
    if out_dir is not None:
        do_resume = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite)
    elif resume:
        raise ValueError("resume=True needs out_dir")
    device = next(model.parameters()).device
    index = vocab_index(draft_vocab, model.get_output_embeddings().weight.shape[0])
    loss_kw = dict(
        ce_weight=config.ce_weight,
        kl_weight=kl_weight,
        exit_weights=config.exit_weights,
        draft_vocab=draft_vocab,
        index=index,
    )
    torch.manual_seed(config.seed)
    optimizer = adamw(model, config, norm_lr_scale=config.norm_lr_scale)
    step, history, tokens_seen = 0, [], 0
    evals: list[dict] = []
    seconds_before = 0.0
    if do_resume:
        state = torch.load(Path(out_dir) / STATE_FILE, map_location="cpu", weights_only=False)
        load_own_weights(model, out_dir)
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        step, history, tokens_seen = state["step"], state["history"], state["tokens_seen"]
        evals = state.get("evals", [])
        seconds_before = state.get("train_seconds", 0.0)

    lengths = [int(data.seq_offsets[i + 1] - data.seq_offsets[i]) for i in range(data.num_sequences)]
    train_lengths = [lengths[i] for i in train_indices]
    per_epoch = len(self_data_epoch_order(train_lengths, 0, config.seed, config.batch_size))

    def micro_batch(step_: int, micro: int) -> list[int]:
        flat = step_ * config.grad_accum + micro
        epoch, pos = divmod(flat, per_epoch)
        chosen = self_data_epoch_order(train_lengths, epoch, config.seed, config.batch_size)[pos]
        return [train_indices[i] for i in chosen]

    def evaluate() -> None:
        if heldout_indices:
            result = self_data_eval(model, data, heldout_indices, exits, autocast=autocast, **loss_kw)
            evals.append({"step": step, **result})

    def save(final: bool) -> None:
        if out_dir is None:
            return
        save_self_data_checkpoint(
            model,
            out_dir,
            save_fn=save_fn,
            state={
                "step": step,
                "optimizer": optimizer.state_dict(),
                "history": history,
                "tokens_seen": tokens_seen,
                "evals": evals,
                "train_seconds": seconds_before + (time.perf_counter() - t_start),
                "finished": final,
            },
            record={
                "step": step,
                "max_steps": config.max_steps,
                "tokens_seen": tokens_seen,
                "exits": list(exits),
                "config": jsonable(dataclasses.asdict(config)),
                "kl_weight": kl_weight,
                "autocast": autocast,
                "draft_vocab_size": None if draft_vocab is None else int(draft_vocab.numel()),
                "train_seconds": seconds_before + (time.perf_counter() - t_start),
                "last": history[-1] if history else None,
                "evals": evals,
            },
        )

    t_start = time.perf_counter()
    if not evals:
        evaluate()
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    stopped_early = False
    while step < config.max_steps:
        if max_seconds is not None and time.perf_counter() - t_start >= max_seconds:
            stopped_early = True
            break
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        sums = torch.zeros(3, len(exits))
        loss_sum, micro_tokens = 0.0, 0
        for micro in range(config.grad_accum):
            batch = self_data_batch(data, micro_batch(step, micro)).to(device)
            with _autocast(device, autocast):
                out = self_data_loss(model, batch, exits, **loss_kw)
            (out.loss / config.grad_accum).backward()
            sums += torch.stack([out.ce_per_exit, out.kl_per_exit, out.agreement_per_exit])
            loss_sum += float(out.loss.detach())
            tokens_seen += batch.num_tokens
            micro_tokens += out.tokens
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.grad_clip
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ce, kl, agree = (sums / config.grad_accum).tolist()
        history.append(
            {
                "step": step,
                "loss": loss_sum / config.grad_accum,
                "ce": ce,
                "kl": kl,
                "agreement": agree,
                "lr": lr,
                "answer_tokens": micro_tokens,
                "seconds": seconds_before + (time.perf_counter() - t_start),
            }
        )
        bar.set_postfix_str(" ".join(f"agree@{e}={a:.2f}" for e, a in zip(exits, agree)), refresh=False)
        bar.update(1)
        if eval_every and step % eval_every == 0 and step < config.max_steps:
            evaluate()
            model.train()
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            save(final=False)
    bar.close()
    if not stopped_early:
        evaluate()
    model.eval()
    save(final=not stopped_early)
    return SoftResult(model=model, step=step, history=history, tokens_seen=tokens_seen)
