"""``python -m s2d_ext demo``: one sorted draft, every target of the local family (:mod:`s2d_ext.demo`)."""

from __future__ import annotations

import argparse

from s2d_ext.cli._common import add_runtime_args, apply_runtime, draft_run_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo on the local model family (built on first use, ~3 min)",
        description="Builds or loads the local model family, then runs S2D speculative decoding with its one "
        "sorted draft for every target on Python-code prompts and compares with target.generate.",
    )
    parser.add_argument("--size", choices=("tiny", "bench"), default="tiny", help="family size (tiny)")
    parser.add_argument(
        "--cache-dir", default=None, help="family cache root (default: $S2D_FAMILY_DIR or ~/.cache)"
    )
    parser.add_argument("--prompt", action="append", default=[], help="replace the demo prompts (repeatable)")
    parser.add_argument("--show", type=int, default=1, help="completions printed per target (1)")
    draft_run_args(parser)
    add_runtime_args(parser, dtype=False)
    return parser


def run(args) -> int:
    if args.threads is None and str(args.device).startswith("cpu"):
        # NOTE: the tiny models gain nothing from intra-op threads; one thread keeps the timings stable
        # (and far better on a busy machine, where extra threads contend). Override with --threads.
        args.threads = 1
    apply_runtime(args)
    from s2d_ext.demo import run_demo

    run_demo(
        args.size,
        args.cache_dir,
        prompts=args.prompt or None,
        max_new_tokens=args.max_new_tokens or 40,
        num_draft_tokens=args.num_draft_tokens,
        draft_length=args.draft_length,
        thresholds=args.thresholds,
        temperature=args.temperature,
        seed=args.seed,
        device=args.device,
        show=args.show,
    )
    return 0
