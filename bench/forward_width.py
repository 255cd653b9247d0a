"""What a verify step of T tokens costs against a 1-token decode step, per dtype and kernels, on this machine.

Speculative decoding pays one target forward over ``k + 1`` tokens per step; on a memory-bound device that
costs about one decode step, which is the whole bet. On a CPU the matrix products of a few rows are not
free: torch's CPU GEMM of T rows can cost up to T GEMVs, most of all in bfloat16 on a CPU without native
bfloat16 (AVX512-BF16 / AMX). This measures, for a target (default: Qwen2.5-Coder-1.5B, ``--target`` as ``s2d
bench --target``), the median time of one cached forward over T new tokens (T = 1..8) after a 160-token
prompt through ``s2d_ext.target.CachedLM`` (the engine's path), for float32 and bfloat16 and for torch's
kernels and s2d's row-invariant ones (:mod:`s2d_ext.row_invariant`), and the median time of one linear layer
([T, d] x [4d', d], 20 distinct weights streamed from memory) with ``F.linear`` and with
``s2d_ext.ops.invariant_linear``. Every configuration runs in each round, interleaved, so a drifting load
reaches all alike; ratios are against T = 1 of the same configuration. Writes
``bench/results/forward_width_<target>_cpu.{json,md}``.

    python bench/forward_width.py --target qwen-coder-1.5b --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import load, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (1, 2, 3, 4, 5, 6, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KERNELS = ("torch", "invariant")


def forward_times(targets: dict, widths, reps: int, prompt: int = 160) -> dict:
    """{(dtype, kernels): {T: s}}: median seconds of a cached CachedLM forward over T new tokens."""
    from s2d_ext import compute
    from s2d_ext.target import CachedLM

    vocab = next(iter(targets.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    runners = {}
    for name, target in targets.items():
        runner = CachedLM(target, 1)
        runner.forward(ids)
        runner.commit(torch.tensor([prompt]), dead_tail=0)
        runners[name] = runner
    times = {(name, k): {t: [] for t in widths} for name in targets for k in KERNELS}
    for _ in range(reps):
        for name, target in targets.items():
            for kernels in KERNELS:  # NOTE: interleaved, so that a drifting load reaches every setting alike
                compute.apply_kernels(target, kernels)
                for t in widths:
                    x = torch.randint(0, vocab, (1, t))
                    start = time.perf_counter()
                    runners[name].forward(x)
                    runners[name].commit(torch.tensor([0]))
                    times[(name, kernels)][t].append(time.perf_counter() - start)
    return {key: {t: statistics.median(v) for t, v in by.items()} for key, by in times.items()}


def linear_times(d: int, n: int, widths, reps: int) -> dict:
    """{(dtype, kernels): {T: s}} of one [T, d] x [n, d] linear layer, 20 weights streamed per timing."""
    from s2d_ext.ops import invariant_linear

    weights = {name: [torch.randn(n, d).to(dtype) for _ in range(20)] for name, dtype in DTYPES.items()}
    fns = {"torch": F.linear, "invariant": lambda x, w: invariant_linear(x, w)}
    times = {(name, k): {t: [] for t in widths} for name in DTYPES for k in KERNELS}
    for _ in range(reps):
        for name, dtype in DTYPES.items():
            for kernels, fn in fns.items():
                for t in widths:
                    x = torch.randn(t, d).to(dtype)
                    start = time.perf_counter()
                    for w in weights[name]:
                        fn(x, w)
                    times[(name, kernels)][t].append((time.perf_counter() - start) / len(weights[name]))
    return {key: {t: statistics.median(v) for t, v in by.items()} for key, by in times.items()}


def table(title: str, measured: dict, unit: float, digits: int) -> list[str]:
    keys = list(measured)
    base = measured[("float32", "torch")][1]
    head = " | ".join(f"{d} {k} ms | vs its T=1" for d, k in keys)
    lines = [title, "", f"| T | {head} |", "|---|" + "---|---|" * len(keys)]
    for t in WIDTHS:
        cells = []
        for key in keys:
            value = measured[key][t]
            cells.append(f"{unit * value:.{digits}f} | {value / measured[key][1]:.2f}x")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "Against float32 with torch's kernels at T = 1 (the plain decode step):", ""]
    lines += [f"| T | {' | '.join(f'{d} {k}' for d, k in keys)} |", "|---|" + "---|" * len(keys)]
    for t in WIDTHS:
        lines.append(f"| {t} | " + " | ".join(f"{measured[key][t] / base:.2f}x" for key in keys) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="qwen-coder-1.5b", help="as s2d bench --target")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from s2d_ext import checkpoints, compute

    load_before = load()
    ref = checkpoints.resolve_target(args.target)
    targets = {name: checkpoints.load_target(ref, dtype=dtype) for name, dtype in DTYPES.items()}
    config = targets["float32"].config
    with torch.inference_mode():
        forward = forward_times(targets, WIDTHS, args.reps)
        linear = linear_times(config.hidden_size, config.intermediate_size, WIDTHS, args.reps)
    report = {
        "machine": machine(args.threads),
        "native_bfloat16": compute.native_bfloat16("cpu"),
        "load_before": load_before,
        "load_after": load(),
        "target": args.target,
        "forward_s": {f"{d}|{k}": v for (d, k), v in forward.items()},
        "linear_s": {f"{d}|{k}": v for (d, k), v in linear.items()},
        "linear_shape": [config.hidden_size, config.intermediate_size],
    }
    stem = f"forward_width_{ref.name}_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Verify width: a cached forward over T tokens against T = 1 ({args.target})",
        "",
        f"Machine: {report['machine']}; native bfloat16 (AVX512-BF16 / AMX): {report['native_bfloat16']}. "
        f"Before: {load_before}; after: {report['load_after']}.",
        f"Target: {args.target} ({config.num_hidden_layers} layers, d={config.hidden_size}, "
        f"V={config.vocab_size}), 160-token prompt, batch 1, s2d_ext.target.CachedLM (the engine's path); "
        f"medians of {args.reps} rounds, every configuration interleaved in each. Kernels: torch's (sdpa "
        "attention, F.linear) or s2d's row-invariant ones (invariant_linear, s2d_invariant attention).",
        "",
        *table("## Forward", forward, 1e3, 0),
        f"## One linear layer: [T, {config.hidden_size}] x [{config.intermediate_size}, "
        f"{config.hidden_size}], 20 distinct weights per timing (streamed from memory, as in a forward)",
        "",
        *table("", linear, 1e3, 2)[2:],
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
