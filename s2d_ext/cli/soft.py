"""``python -m s2d_ext soft``: sorted fine-tuning (SoFT) of a Llama-family model (:mod:`s2d_ext.soft`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from s2d_ext.cli import UsageError
from s2d_ext.cli._common import (
    add_runtime_args,
    apply_runtime,
    checkpoint_folder,
    float_list,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    torch_dtype,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "soft",
        help="sorted fine-tuning of a (truncated) Llama-family model",
        description="Sorted fine-tuning: loss = mean over exits of next-token cross-entropy through the "
        "shared final norm and lm_head (+ optional KL toward targets). Writes an HF checkpoint with "
        "config.s2d_exits and config.s2d_thresholds (loadable by SortedDraft.from_pretrained) plus "
        "soft_state.pt for --resume.",
    )
    parser.add_argument(
        "--base", required=True, help="HF checkpoint folder (with its tokenizer) to start from"
    )
    parser.add_argument(
        "--layers", type=positive_int, default=None, help="keep the first N layers of the base (default: all)"
    )
    parser.add_argument(
        "--exits",
        type=int_list,
        default=None,
        help="exits as layer counts, e.g. 6,9,12 (last == --layers; default: the base's s2d_exits "
        "or the last layer)",
    )
    parser.add_argument(
        "--thresholds",
        type=float_list,
        default=None,
        help="exit thresholds saved in the checkpoint (default: 0.5 ..., 0)",
    )
    parser.add_argument("--data", required=True, help="training text: plain text or JSONL with a text field")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--out", required=True, help="output folder (absent, empty, or a SoFT checkpoint)")
    parser.add_argument("--resume", action="store_true", help="continue the SoFT checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a SoFT checkpoint in --out")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per block (256)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="blocks per micro-batch (8)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (1)")
    parser.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (100)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate (1e-4)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="warm-up steps (10)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="0 disables (1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=non_negative_int, default=0, help="checkpoint every N steps")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="use at most N data tokens")
    parser.add_argument(
        "--distill-target",
        action="append",
        default=[],
        metavar="PATH",
        help="target checkpoint to distil from (repeatable; same tokenizer)",
    )
    parser.add_argument(
        "--distill-weight",
        type=non_negative_float,
        action="append",
        default=[],
        metavar="W",
        help="weight of each --distill-target's KL term (one value, or one per target; 1.0)",
    )
    parser.add_argument("--distill-temperature", type=positive_float, default=1.0)
    parser.add_argument(
        "--ce-weight", type=non_negative_float, default=1.0, help="weight of the CE term (1.0)"
    )
    parser.add_argument(
        "--draft-vocab",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also save the N most frequent data tokens as the draft vocabulary (draft_vocab.safetensors)",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_args(parser)
    return parser


def _check_args(args) -> tuple[float, ...]:
    """Cheap checks before any model is loaded. Returns the per-target distillation weights."""
    from s2d_ext.soft import prepare_output_dir

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    checkpoint_folder("--base", args.base)
    for path in args.distill_target:
        checkpoint_folder("--distill-target", path)
    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data {args.data!r} does not exist")
    if data.stat().st_size == 0:
        raise ValueError(f"--data {args.data!r} is empty")
    prepare_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    weights = tuple(args.distill_weight) or (1.0,)
    n_targets = len(args.distill_target)
    if args.distill_weight and not n_targets:
        raise UsageError("--distill-weight needs --distill-target")
    if len(weights) == 1:
        weights = weights * n_targets
    elif len(weights) != n_targets:
        raise UsageError(f"{len(weights)} --distill-weight values for {n_targets} --distill-target paths")
    return weights


def run(args) -> int:
    distill_weights = _check_args(args)
    apply_runtime(args)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from s2d_ext import soft

    hf_logging.disable_progress_bar()  # NOTE: our own bar shows the training; no per-save/load bars

    config = AutoConfig.from_pretrained(args.base)
    base_layers = int(config.num_hidden_layers)
    layers = args.layers if args.layers is not None else (args.exits[-1] if args.exits else base_layers)
    if layers > base_layers:
        raise ValueError(f"--layers {layers} does not fit the base model's {base_layers} layers")
    exits = args.exits
    if exits is None:
        saved = getattr(config, "s2d_exits", None)
        exits = tuple(saved) if saved and saved[-1] == layers else (layers,)
    try:
        exits = soft.validate_exits(exits, layers, name="--exits")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.thresholds is not None and len(args.thresholds) != len(exits):
        raise UsageError(f"--thresholds has {len(args.thresholds)} values for {len(exits)} exits")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.base)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise FileNotFoundError(f"--base {args.base!r} holds no usable tokenizer ({exc})") from None
    texts = soft.load_texts(args.data, args.text_field)
    blocks = soft.tokenize_blocks(texts, tokenizer, args.seq_len, max_tokens=args.max_tokens)
    print(f"data: {blocks.numel():,} tokens in {blocks.shape[0]} blocks of {blocks.shape[1]}")

    dtype = torch_dtype(args.dtype)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(args.device)
    model = base if layers == base_layers else soft.truncate_model(base, layers, exits, args.thresholds)
    del base
    targets = [
        AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(args.device).eval()
        for p in args.distill_target
    ]
    cfg = soft.SoftConfig(
        exits=exits,
        thresholds=args.thresholds,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        ce_weight=args.ce_weight,
        distill_weights=distill_weights,
        distill_temperature=args.distill_temperature,
        save_every=args.save_every,
        draft_vocab=args.draft_vocab,
        extra={"base": str(args.base), "data": str(args.data), "distill_targets": list(args.distill_target)},
    )
    result = soft.train_soft(
        model,
        blocks,
        cfg,
        targets=targets,
        out_dir=args.out,
        tokenizer=tokenizer,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    last = result.history[-1] if result.history else None
    ce = " ".join(f"exit {e}: {c:.3f}" for e, c in zip(exits, last["ce"])) if last else "n/a"
    print(f"saved {args.out} after {result.step} steps ({result.tokens_seen:,} tokens); last CE {ce}")
    return 0
