"""One torch thread against two on a (shared) CPU: the decode step of SmolLM2-135M at batch 1.

    python bench/threads_cpu.py [--rounds 2] [--steps 24]

Every setting runs in a fresh process (OpenMP reads its environment once, at start), in alternating order,
``--rounds`` times; each process times ``--steps`` single-token forwards over a 200-token KV cache and reports
the median and the spread (p90 / median). Settings: 1 thread; 2 threads (libgomp's default: idle threads spin
before they sleep); 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` (they sleep at once). The weights are random
(SmolLM2-135M's config), so no model file is needed: speed does not depend on the values.

Writes ``bench/results/threads_cpu.{json,md}`` with the load average before and after each process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "1 thread": {"threads": 1, "env": {}},
    "2 threads": {"threads": 2, "env": {}},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
}

CHILD = r"""
import json, os, statistics, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    rope_theta=100000.0, rms_norm_eps=1e-5)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 49152, (1, 200))
times = []
with torch.inference_mode():
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    nxt = torch.tensor([[5]])
    for _ in range(int(sys.argv[2]) + 2):
        t = time.perf_counter()
        model(nxt, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
times = sorted(times[2:])
print(json.dumps({"median_ms": 1e3 * statistics.median(times),
                  "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
                  "cpu_s": time.process_time()}))
"""


def run_one(name: str, steps: int) -> dict:
    setting = SETTINGS[name]
    env = dict(os.environ, **setting["env"])
    env.pop("OMP_NUM_THREADS", None)
    before = os.getloadavg()[0]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(setting["threads"]), str(steps)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(setting=name, load_before=before, load_after=os.getloadavg()[0])
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    names = list(SETTINGS)
    runs = []
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs.append(run_one(name, args.steps))
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for name in names:
        mine = [x for x in runs if x["setting"] == name]
        summary[name] = {
            "median_ms": statistics.median(x["median_ms"] for x in mine),
            "p90_over_median": statistics.median(x["p90_ms"] / x["median_ms"] for x in mine),
            "load": [round(x["load_before"], 2) for x in mine],
        }
    import torch

    from s2d_ext._machine import cpu_name

    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "steps": args.steps}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads_cpu.json").write_text(
        json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=1)
    )
    base = summary["1 thread"]["median_ms"]
    lines = [
        "# One thread against two: SmolLM2-135M decode step, batch 1, 200-token cache",
        "",
        f"{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}; medians over {args.rounds} processes "
        f"x {args.steps} steps; load = 1-minute load average when each process started.",
        "",
        "| setting | decode step (ms) | vs 1 thread | p90 / median | load |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['median_ms']:.1f} | {s['median_ms'] / base:.2f}x | {s['p90_over_median']:.2f} | "
            f"{', '.join(str(x) for x in s['load'])} |"
        )
    (args.out / "threads_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
