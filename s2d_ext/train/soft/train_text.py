"""SoFT on tokenized text blocks (:func:`train_soft`): gradient accumulation, resumable checkpoints."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from s2d_ext.train.soft.checkpoint import load_resume_state, prepare_output_dir, save_checkpoint
from s2d_ext.train.soft.config import SoftConfig, SoftResult, check_config
from s2d_ext.train.soft.exits import layer_count, model_exits, set_exit_config, validate_exits
from s2d_ext.train.soft.loss import soft_loss
from s2d_ext.train.soft.optimizer import adamw


def _batch_indices(step: int, micro: int, config: SoftConfig, n_blocks: int) -> torch.Tensor:
    """Block indices of a micro-batch. NOTE: a pure function of (seed, step, micro) so resuming needs no RNG
    state: the stream visits a fresh seeded permutation of all blocks every epoch."""
    start = (step * config.grad_accum + micro) * config.batch_size
    positions = torch.arange(start, start + config.batch_size)
    epochs = positions // n_blocks
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(
            n_blocks, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        )
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n_blocks]
    return out


def train_soft(
    model,
    blocks: torch.Tensor,
    config: SoftConfig,
    *,
    targets: Sequence[Any] = (),
    out_dir: str | os.PathLike | None = None,
    tokenizer=None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "SoFT",
) -> SoftResult:
    """Sorted fine-tuning of ``model`` in place on ``blocks``.

    Parameters
    ----------
    model : Llama-family HF CausalLM (e.g. from :func:`truncate_model`); trained in its own dtype/device
    blocks : [n_blocks, seq_len] int64 token blocks (:func:`tokenize_blocks`)
    config : :class:`SoftConfig`
    targets : HF CausalLMs to distil from (frozen, same vocabulary), weighted by ``config.distill_weights``
    out_dir : checkpoint folder (model + tokenizer + ``soft_state.pt``); None = do not save
    resume : continue from the checkpoint in ``out_dir`` (loads weights, optimizer state and step)
    overwrite : replace a SoFT checkpoint already in ``out_dir``

    With ``config.draft_vocab = N`` every checkpoint also holds the draft vocabulary: the N most frequent
    tokens of ``blocks`` (:func:`s2d_ext.draft.draft_vocab.most_frequent_tokens`).

    NOTE: deterministic on the CPU given ``config.seed`` (and a fixed torch thread count): data order is a
    pure function of the seed and step, and the model has no dropout in train mode by default.
    """
    from tqdm.auto import tqdm

    check_config(config)
    if blocks.dim() != 2 or blocks.dtype != torch.long:
        raise ValueError(
            f"blocks must be [n_blocks, seq_len] int64, got {tuple(blocks.shape)} {blocks.dtype}"
        )
    exits = validate_exits(
        config.exits if config.exits is not None else model_exits(model), layer_count(model)
    )
    set_exit_config(model, exits, config.thresholds)
    draft_vocab = None
    if config.draft_vocab:
        from s2d_ext.draft.draft_vocab import most_frequent_tokens

        vocab_size = int(model.get_output_embeddings().weight.shape[0])
        if config.draft_vocab > vocab_size:
            raise ValueError(f"draft_vocab={config.draft_vocab} exceeds the model vocabulary ({vocab_size})")
        draft_vocab = most_frequent_tokens(blocks, vocab_size, config.draft_vocab)
    targets = list(targets)
    distill = list(config.distill_weights) if config.distill_weights else [1.0] * len(targets)
    if len(distill) != len(targets):
        raise ValueError(f"distill_weights has {len(distill)} values but {len(targets)} targets were given")

    do_resume = False
    if out_dir is not None:
        do_resume = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite)
    elif resume:
        raise ValueError("resume=True needs out_dir")

    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    optimizer = adamw(model, config)
    step, history, tokens_seen = 0, [], 0
    if do_resume:
        state = load_resume_state(model, out_dir)
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        step, history, tokens_seen = state["step"], state["history"], state["tokens_seen"]

    for t in targets:
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)

    def save(step: int) -> None:
        save_checkpoint(
            model,
            out_dir,
            tokenizer=tokenizer,
            optimizer=optimizer,
            step=step,
            config=config,
            history=history,
            tokens_seen=tokens_seen,
            draft_vocab=draft_vocab,
        )

    model.train()
    n_blocks = blocks.shape[0]
    bar = tqdm(total=config.max_steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    while step < config.max_steps:
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ce_sum = torch.zeros(len(exits))
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            batch = blocks[_batch_indices(step, micro, config, n_blocks)].to(device)
            with torch.no_grad():
                tl = [t(input_ids=batch, use_cache=False).logits for t in targets]
            out = soft_loss(
                model,
                batch,
                None,
                exits,
                target_logits=tl,
                distill_weights=distill,
                distill_temperature=config.distill_temperature,
                ce_weight=config.ce_weight,
                exit_weights=config.exit_weights,
            )
            (out.loss / config.grad_accum).backward()
            ce_sum += out.ce_per_exit.float().cpu()
            loss_sum += float(out.loss.detach())
            tokens_seen += batch.numel()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ce = (ce_sum / config.grad_accum).tolist()
        history.append({"step": step, "loss": loss_sum / config.grad_accum, "ce": ce, "lr": lr})
        bar.set_postfix_str(" ".join(f"ce@{e}={c:.3f}" for e, c in zip(exits, ce)), refresh=False)
        bar.update(1)
        if (
            out_dir is not None
            and config.save_every
            and step % config.save_every == 0
            and step < config.max_steps
        ):
            save(step)
    bar.close()
    model.eval()
    if out_dir is not None:
        save(step)
    return SoftResult(model=model, step=step, history=history, tokens_seen=tokens_seen)


@torch.no_grad()
def heldout_loss(
    model, blocks: torch.Tensor, exits: Sequence[int] | None = None, batch_size: int = 16
) -> list[float]:
    """Token-mean next-token cross-entropy (nats) of each exit on ``blocks`` [n, seq_len] int64."""
    exits = validate_exits(exits if exits is not None else model_exits(model), layer_count(model))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(len(exits), dtype=torch.float64)
    count = 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        out = soft_loss(model, batch, None, exits)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += out.ce_per_exit.double().cpu() * n
        count += n
    model.train(was_training)
    return (total / max(count, 1)).tolist()
