"""One torch thread against two for Qwen2.5-Coder-1.5B in bfloat16, on a quiet host and on a loaded one.

Every setting runs in a fresh process (OpenMP reads its environment once): 1 or 2 torch threads, with the
host quiet or loaded (a second process spinning on one core the whole time, as another job would). Each
process times, on the same HumanEval prompts, plain ``generate`` (torch's kernels), ``generate`` on s2d's
row-invariant kernels, and greedy S2D (``speculate`` with ``--draft``, fixed exit and draft length) and
reports tokens/s. Settings alternate over ``--rounds``. Writes ``bench/results/threads_pair_cpu.{json,md}``.

    python bench/threads_pair.py --draft ~/.cache/s2d_ext/drafts/qwen-coder-0.5b-s2d
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import load, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, sys, time
import torch
import s2d_ext
from s2d_ext import checkpoints, compute
from s2d_ext.bench import humaneval
threads, draft_path, new_tokens, problems, exit_, k = sys.argv[1:7]
torch.set_num_threads(int(threads))
ref = checkpoints.resolve_target("qwen-coder-1.5b")
tok = checkpoints.load_tokenizer(ref)
target = checkpoints.load_target(ref, dtype=torch.bfloat16)
draft = checkpoints.load_draft(draft_path, [target], dtype=torch.bfloat16)
draft = s2d_ext.SortedDraft.truncate(
    draft.hf_model, int(exit_), exits=(int(exit_),), draft_vocab=draft.draft_vocab, share_embeddings=True
)
compute.apply_kernels(draft.hf_model, "invariant")
chosen = humaneval.load_problems(int(problems), stride=41)
prompts = [tok(p["prompt"], return_tensors="pt").input_ids for p in chosen]
n = int(new_tokens)
def timed(fn):
    fn(prompts[0][:, :8], 4)  # warm-up
    start, count = time.perf_counter(), 0
    for ids in prompts:
        count += fn(ids, n)
    return count / (time.perf_counter() - start)
def gen(ids, m):
    with torch.inference_mode():
        out = target.generate(ids, max_new_tokens=m, min_new_tokens=m, do_sample=False)
    return out.shape[1] - ids.shape[1]
def spec(ids, m):
    out = s2d_ext.speculate(target, draft, ids, max_new_tokens=m, eos_token_id=[], num_draft_tokens=int(k),
                            draft_length="fixed")
    return sum(out.stats.new_tokens)
result = {}
compute.apply_kernels(target, "torch"); result["generate"] = timed(gen)
compute.apply_kernels(target, "invariant"); result["generate-invariant"] = timed(gen)
result["s2d"] = timed(spec)
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--draft", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--exit", type=int, default=24, help="the draft's fixed exit (24)")
    parser.add_argument("--k", type=int, default=5, help="draft tokens per step (5)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = [(t, loaded) for loaded in (False, True) for t in (1, 2)]
    runs = []
    for r in range(args.rounds):
        for threads, loaded in settings if r % 2 == 0 else settings[::-1]:
            burner = None
            if loaded:  # NOTE: another job on one core for the whole measurement
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1)
            before = os.getloadavg()
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            argv = [
                str(threads),
                str(Path(args.draft).expanduser()),
                str(args.new_tokens),
                str(args.problems),
            ]
            argv += [str(args.exit), str(args.k)]
            try:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env
                )
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            tps = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(
                {
                    "threads": threads,
                    "loaded": loaded,
                    "round": r,
                    "load_before": before,
                    "load_after": os.getloadavg(),
                    **tps,
                }
            )
            print(runs[-1], flush=True)
    report = {
        "machine": machine(0),
        "load": load(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads_pair_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# One torch thread against two: Qwen2.5-Coder-1.5B, bfloat16, batch 1",
        "",
        f"Machine: {report['machine']} (threads per row below). {args.problems} HumanEval prompts (every "
        f"41st), {args.new_tokens} new tokens each (EOS ignored); S2D: the draft at exit {args.exit}, "
        f"{args.k} drafts a step. Loaded: a second process spins on one core throughout.",
        "",
        "| threads | host | load before | generate tok/s | generate (s2d kernels) tok/s | S2D tok/s "
        "| S2D / generate |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['threads']} | {'loaded' if run['loaded'] else 'quiet'} | {run['load_before'][0]:.2f} | "
            f"{run['generate']:.2f} | {run['generate-invariant']:.2f} | {run['s2d']:.2f} | "
            f"{run['s2d'] / run['generate']:.2f}x |"
        )
    (args.out / "threads_pair_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
