"""Argument types and helpers shared by the subcommands."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def int_list(text: str) -> tuple[int, ...]:
    """``"6,9,12"`` -> ``(6, 9, 12)`` (argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 6,9,12, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def float_list(text: str) -> tuple[float, ...]:
    """``"0.6,0.5,0"`` -> ``(0.6, 0.5, 0.0)`` (argparse type)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.6,0.5,0, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def add_runtime_args(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """--device, --threads (and --dtype)."""
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    if dtype:
        parser.add_argument(
            "--dtype", choices=DTYPES, default="float32", help="model dtype (default: float32)"
        )


def apply_runtime(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def draft_run_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of a speculative run shared by demo and generate."""
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="new tokens per prompt (demo: 40, generate: 64)",
    )
    parser.add_argument("--num-draft-tokens", type=positive_int, default=5, help="draft tokens per step (5)")
    parser.add_argument(
        "--draft-length",
        choices=("fixed", "heuristic", "confidence"),
        default="heuristic",
        help="draft-length policy (heuristic)",
    )
    parser.add_argument(
        "--thresholds",
        type=float_list,
        default=None,
        help="exit thresholds, one per draft exit (default: the draft's own)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature (0 = greedy, the default; greedy outputs are compared)",
    )
    parser.add_argument("--top-k", type=non_negative_int, default=0)
    parser.add_argument("--top-p", type=positive_float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="Philox seed of sampled runs (0)")
