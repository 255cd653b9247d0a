"""``python -m s2d_ext generate``: S2D speculative decoding with your own target and sorted draft."""

from __future__ import annotations

import argparse
from pathlib import Path

from s2d_ext.cli import UsageError
from s2d_ext.cli._common import (
    add_runtime_args,
    apply_runtime,
    checked_target_paths,
    draft_run_args,
    int_list,
    load_targets_and_draft,
    run_compute,
)
from s2d_ext.packaged_models import ALIASES_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="speculative decoding with a target and a sorted draft checkpoint",
        description="Generate with --target, drafting with the sorted draft --draft (exits from --exits "
        "or its config.s2d_exits); by default also runs target.generate and reports MAT, exit usage, "
        "tokens/s and whether the greedy outputs match.",
    )
    parser.add_argument(
        "--target",
        required=True,
        help=f"target: an HF checkpoint folder, a .gguf file, or {ALIASES_HELP}",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the --target folder")
    parser.add_argument(
        "--draft",
        required=True,
        help="sorted draft checkpoint folder (same vocabulary; one that references the target's embedding "
        "and head, as s2d soft --self-data saves it, borrows them from --target)",
    )
    parser.add_argument("--exits", type=int_list, default=None, help="draft exits, e.g. 6,9,12")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --target)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    parser.add_argument("--no-compare", action="store_true", help="skip target.generate (no match/speedup)")
    draft_run_args(parser)
    add_runtime_args(parser, inference=True)
    return parser


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {args.prompt_file!r} does not exist")
        prompts += [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt (or --prompt-file)")
    if any(not p for p in prompts):
        raise UsageError("prompts must not be empty")
    return prompts


def run(args) -> int:
    prompts = _prompts(args)
    ref = checked_target_paths(args)
    apply_runtime(args)

    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from s2d_ext.demo import compare_on_prompts, format_table
    from s2d_ext.train.soft import validate_exits

    hf_logging.disable_progress_bar()
    draft_config = AutoConfig.from_pretrained(args.draft)
    if args.exits is not None:
        try:
            validate_exits(args.exits, int(draft_config.num_hidden_layers), name="--exits")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.thresholds is not None:
        n_exits = len(args.exits or getattr(draft_config, "s2d_exits", None) or (1,))
        if len(args.thresholds) != n_exits:
            raise UsageError(f"--thresholds has {len(args.thresholds)} values for {n_exits} exits")
    dtype, kernels = run_compute(args)
    args.target = [args.target]  # NOTE: one target: load_targets_and_draft takes a list
    tokenizer, targets, draft = load_targets_and_draft(args, [ref], dtype, kernels)
    target = targets[ref.name]
    print(f"draft: {draft.num_layers} layers, exits {draft.exits}, thresholds {draft.thresholds}")
    report = compare_on_prompts(
        ref.name or "target",
        target,
        draft,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens or 64,
        num_draft_tokens=args.num_draft_tokens,
        draft_length=args.draft_length,
        thresholds=args.thresholds,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        compare=not args.no_compare,
    )
    for i, (prompt, completion) in enumerate(zip(prompts, report.completions)):
        print(f"--- prompt {i}\n{prompt}{completion}")
    print()
    print(format_table([report]))
    return 0
