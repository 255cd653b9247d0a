"""``python -m s2d_ext bench``: the Spec-Bench harness of ``bench/spec_bench.py`` (needs a source checkout).

Also ``python -m s2d_ext bench kernels``: one report of the verify, exit_head and kv_compact benchmarks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _bench_package():
    if not (REPO_ROOT / "bench" / "spec_bench.py").exists():
        raise FileNotFoundError(
            f"the benchmarks live in the source checkout's bench/ folder, not found under {REPO_ROOT}; "
            "install with `pip install -e .` from a clone"
        )
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="Spec-Bench speedup/MAT of every method in one run (or `bench kernels`)",
        description="Spec-Bench style end-to-end benchmark; see bench/spec_bench.py.",
    )
    parser.add_argument(
        "what",
        nargs="?",
        default="spec",
        choices=["spec", "kernels"],
        help="spec (default): end-to-end; kernels: the kernel bandwidth report",
    )
    try:
        _bench_package()
    except FileNotFoundError:
        return parser  # run() explains; the other subcommands stay usable
    from bench.spec_bench import add_arguments

    add_arguments(parser)
    return parser


def run(args) -> int:
    _bench_package()
    if args.what == "kernels":
        from bench.kernel_report import write_kernel_report

        print(f"wrote {write_kernel_report(args.out)}")
        return 0
    from bench.spec_bench import run_and_report
    from bench.spec_bench_report import write_reports

    run_and_report(args, write_reports)
    return 0
