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

    def run_generate():
        for ids in prompts:
            x = torch.tensor([ids])
            target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)  # fmt: skip

    engine = Engine(draft, {"t": TargetConfig(target, 5, "heuristic", None)})

    def run_s2d():
        for ids in prompts:
            engine.add_request(ids, SamplingParams(max_new_tokens=n, temperature=0.0, eos_token_id=[]))
            while engine.has_unfinished():
                engine.step()

    result = {"threads": args.threads, "tp": int(os.environ.get("WORLD_SIZE", "1"))}
    tokens = n * len(prompts)
    with torch.inference_mode():
        run_s2d()  # NOTE: warm-up (kernels, caches)
        for name, fn in (("generate", run_generate), ("s2d", run_s2d)):
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            result[f"{name}_tok_s"] = tokens / seconds
        if tp:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                run_s2d()
                total = time.perf_counter() - start
            # NOTE: top-level collective ops only (self + children), so nested events are not counted twice.
            coll = 0.0
            for event in prof.events():
                name = event.name.lower()
                if any(k in name for k in COLLECTIVE_KEYS) and not any(
                    k in (event.cpu_parent.name.lower() if event.cpu_parent else "") for k in COLLECTIVE_KEYS
                ):
                    coll += event.cpu_time_total / 1e6
            result["s2d_collective_share"] = coll / total
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    here = [sys.argv[0]]
    common = ["--worker", "--target", args.target, "--draft", args.draft, "--dtype", args.dtype,
              "--kernels", args.kernels, "--prompts", str(args.prompts),
              "--new-tokens", str(args.new_tokens)]  # fmt: skip
    settings = {
        "1 process x 1 thread": [sys.executable, *here, *common, "--threads", "1"],
        "1 process x 2 threads": [sys.executable, *here, *common, "--threads", "2"],
        "tp 2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                      "--master-port", str(_free_port()), *here, *common, "--threads", "1"],
    }  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for name, command in settings.items():
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed (status {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(lines[-1][7:])
        r = results[name]
        share = (
            f", {100 * r['s2d_collective_share']:.0f}% of S2D time in collectives"
            if "s2d_collective_share" in r
            else ""
        )
        print(
            f"{name}: generate {r['generate_tok_s']:.1f} tok/s, S2D {r['s2d_tok_s']:.1f} tok/s{share}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
