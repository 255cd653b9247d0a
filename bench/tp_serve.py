"""Tensor parallelism on the CPU: HF ``generate()`` and S2D (the engine ``s2d serve`` steps) tokens/s with the
target split over 2 processes x 1 thread (torchrun, gloo) against 1 process x 1 thread and x 2 threads.

    python bench/tp_serve.py                       # the Qwen pair (slow: minutes per setting)
    python bench/tp_serve.py --target T --draft D --dtype float32 --prompts 2 --new-tokens 16

Each setting runs in its own process(es) (``--worker``); greedy, batch 1, prompts one after the other. The
share of S2D's time spent in collectives comes from a separate profiled pass (torch.profiler events of
gloo / c10d collectives on rank 0), so it does not slow the timed one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "def quicksort(items):",
    "class LRUCache:\n    def __init__(self, capacity):",
    "import numpy as np\n\ndef moving_average(x, n):",
    "def parse_csv(path):",
]
COLLECTIVE_KEYS = ("gloo", "c10d", "all_reduce", "allreduce", "all_gather", "allgather", "broadcast")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from s2d_ext import checkpoints, compute
    from s2d_ext.cli._common import torch_dtype
    from s2d_ext.engine import Engine, SamplingParams, TargetConfig

    torch.set_num_threads(args.threads)
    tp = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    if tp:
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    dtype = torch_dtype(args.dtype)
    ref = checkpoints.resolve_target(args.target)
    target = checkpoints.load_target(ref, dtype=dtype, **({"tp_plan": "auto"} if tp else {}))
    tokenizer = checkpoints.load_tokenizer(ref)
    draft = checkpoints.load_draft(args.draft, [target], dtype=dtype)
    compute.apply_kernels(target, args.kernels)
    compute.apply_kernels(draft.hf_model, args.kernels)
    prompts = [tokenizer.encode(p) for p in PROMPTS[: args.prompts]]
    n = args.new_tokens
    forwards = {"target": 0}

    def count_forward(*_):
        forwards["target"] += 1

    target.register_forward_pre_hook(count_forward)

    def run_generate(ids):
        x = torch.tensor([ids])
        target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)  # fmt: skip

    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else None
    engine = Engine(draft, {"t": TargetConfig(target, args.num_draft_tokens, args.draft_length, thresholds)})

    def run_s2d(ids):
        engine.add_request(ids, SamplingParams(max_new_tokens=n, temperature=0.0, eos_token_id=[]))
        while engine.has_unfinished():
            engine.step()

    methods = {"generate": run_generate, "s2d": run_s2d}
    result = {"threads": args.threads, "tp": int(os.environ.get("WORLD_SIZE", "1"))}
    seconds = {name: 0.0 for name in methods}
    with torch.inference_mode():
        run_s2d(prompts[0])  # NOTE: warm-up (kernels, caches)
        run_generate(prompts[0])
        # NOTE: the methods alternate prompt by prompt (and swap order each round), so a change in the
        # host's load falls on both; the ratio s2d / generate is what the settings are compared by.
        for r in range(args.rounds):
            for ids in prompts:
                for name in methods if r % 2 == 0 else reversed(list(methods)):
                    start = time.perf_counter()
                    methods[name](ids)
                    seconds[name] += time.perf_counter() - start
        tokens = n * len(prompts) * args.rounds
        for name in methods:
            result[f"{name}_tok_s"] = tokens / seconds[name]
        # NOTE: one more pass of each method, untimed, counts target forwards per token and, under TP,
        # the collectives: their number and share of the time (torch.profiler, rank 0; top-level
        # collective events only, so nested events are not counted twice).
        for name, fn in methods.items():
            forwards["target"] = 0
            with profile(activities=[ProfilerActivity.CPU]) if tp else contextlib.nullcontext() as prof:
                start = time.perf_counter()
                for ids in prompts:
                    fn(ids)
                total = time.perf_counter() - start
            result[f"{name}_target_forwards_per_token"] = forwards["target"] / (n * len(prompts))
            if not tp:
                continue
            coll, count = 0.0, 0
            for event in prof.events():
                lower = event.name.lower()
                parent = event.cpu_parent.name.lower() if event.cpu_parent else ""
                if any(k in lower for k in COLLECTIVE_KEYS) and not any(k in parent for k in COLLECTIVE_KEYS):
                    coll += event.cpu_time_total / 1e6
                    count += 1
            result[f"{name}_collective_share"] = coll / total
            result[f"{name}_collectives_per_token"] = count / (n * len(prompts))
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    if tp:
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="qwen-coder-1.5b")
    parser.add_argument(
        "--draft", default=str(Path.home() / ".cache/s2d_ext/drafts/qwen-coder-0.5b-untrained")
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--kernels", default="torch", choices=("torch", "invariant"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--draft-length", default="fixed", choices=("fixed", "heuristic", "confidence"))
    parser.add_argument(
        "--thresholds", default="1,1,0",
        help="exit thresholds, comma-separated ('' = the draft's own); the default exits at the last exit "
        "(the setting the HumanEval run calibrated for the 1.5B: exit 24, k = 3)",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON file for the results (and a .md beside it)")
    parser.add_argument(
        "--settings", default="1x1,1x2,tp2",
        help="which settings to run: 1x1 (1 process x 1 thread), 1x2 (x 2 threads), tp2 (2 processes x 1)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", action="store_true", help="keep the other settings' results already in --out"
    )
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    here = [sys.argv[0]]
    common = ["--worker", "--target", args.target, "--draft", args.draft, "--dtype", args.dtype,
              "--kernels", args.kernels, "--prompts", str(args.prompts),
              "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds),
              "--num-draft-tokens", str(args.num_draft_tokens), "--draft-length", args.draft_length,
              "--thresholds", args.thresholds]  # fmt: skip
    every = {
        "1 process x 1 thread": [sys.executable, *here, *common, "--threads", "1"],
        "1 process x 2 threads": [sys.executable, *here, *common, "--threads", "2"],
        "tp 2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                      "--master-port", str(_free_port()), *here, *common, "--threads", "1"],
    }  # fmt: skip
    keys = dict(zip(("1x1", "1x2", "tp2"), every))
    chosen = [k.strip() for k in args.settings.split(",") if k.strip()]
    if not chosen or any(k not in keys for k in chosen):
        raise SystemExit(f"--settings takes a comma-separated list of {tuple(keys)}, got {args.settings!r}")
    settings = {keys[k]: every[keys[k]] for k in chosen}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    if args.merge and args.out and Path(args.out).is_file():
        results = {
            k: v for k, v in json.loads(Path(args.out).read_text())["results"].items() if k not in settings
        }
    for name, command in settings.items():
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed (status {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = r = json.loads(lines[-1][7:])
        r["finished"] = time.strftime("%Y-%m-%d %H:%M")
        r["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
        line = f"{name}: generate {r['generate_tok_s']:.2f} tok/s, S2D {r['s2d_tok_s']:.2f} tok/s "
        line += f"({r['s2d_tok_s'] / r['generate_tok_s']:.2f}x)"
        if "s2d_collective_share" in r:
            line += (
                f"; collectives per token {r['generate_collectives_per_token']:.0f} (generate) / "
                f"{r['s2d_collectives_per_token']:.0f} (S2D), share of time "
                f"{100 * r['generate_collective_share']:.0f}% / {100 * r['s2d_collective_share']:.0f}%"
            )
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        Path(args.out).with_suffix(".md").write_text(markdown(args, results))


def markdown(args, results: dict) -> str:
    """The results as a markdown table."""
    rows = [
        "| setting | generate tok/s | S2D tok/s | S2D / generate "
        "| target forwards per token (generate / S2D) "
        "| collectives per token (generate / S2D) | time in collectives (generate / S2D) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        coll = (
            f"{r['generate_collectives_per_token']:.0f} / {r['s2d_collectives_per_token']:.0f}",
            f"{100 * r['generate_collective_share']:.0f}% / {100 * r['s2d_collective_share']:.0f}%",
        ) if "s2d_collective_share" in r else ("-", "-")  # fmt: skip
        rows.append(
            f"| {name} | {r['generate_tok_s']:.2f} | {r['s2d_tok_s']:.2f} | "
            f"{r['s2d_tok_s'] / r['generate_tok_s']:.2f}x | {r['generate_target_forwards_per_token']:.2f} / "
            f"{r['s2d_target_forwards_per_token']:.2f} | {coll[0]} | {coll[1]} |"
        )
    settings = ", ".join(f"{k}={v}" for k, v in vars(args).items() if k not in ("worker", "out"))
    return f"# Tensor parallelism on the CPU\n\nSettings: {settings}.\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
