"""Engine overhead: the engine's step against the loop it replaced (main's ``run_speculation``), same rows.

Both run ``speculate()`` on the same 8 prompts (Spec-Bench first turns, the bench family's largest
target and its sorted draft), interleaved round by round (the order flips every round), in one process;
the old loop is main's ``s2d_ext/speculate.py``, ``speculator.py`` and ``target.py`` loaded from git
(``--base``) as a package of their own. Same tokens are checked (greedy equal, and sampled equal with the
same seeds, since both draw the same Philox numbers). Figure: time per step; the ratio is the median of
the per-round ratios. Writes ``bench/results/engine_step_cpu.{json,md}``.

    python bench/engine_step.py            # bench family (build it first: s2d family build --size bench)
    python bench/engine_step.py --random   # random Llama models, a quick check
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import add_model_args, load, load_models, machine, prompts  # noqa: E402

import s2d_ext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def old_speculate(base: str):
    """main's speculate() as the module ``s2d_old.speculate`` (its speculator / target beside it)."""
    folder = Path(tempfile.mkdtemp(prefix="s2d_old_"))
    package = folder / "s2d_old"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("speculate", "speculator", "target"):
        text = subprocess.run(
            ["git", "show", f"{base}:s2d_ext/{name}.py"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        for other in ("speculate", "speculator", "target"):
            text = text.replace(f"from s2d_ext.{other} import", f"from s2d_old.{other} import")
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("s2d_old.speculate").speculate


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--base", default="main", help="git revision of the old loop (main)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = load()
    tokenizer, name, target, draft = load_models(args)
    old = old_speculate(args.base)
    ids, mask = left_pad(prompts(tokenizer, args.batch, draft.vocab_size, args.seed))
    results = []
    for temperature in (0.0, 1.0):
        kwargs = dict(
            max_new_tokens=args.max_new_tokens, temperature=temperature, seed=list(range(args.batch)),
            eos_token_id=[], pad_token_id=0, num_draft_tokens=5,
        )  # fmt: skip
        runs = {"old": [], "engine": []}
        steps = {}
        with torch.inference_mode():
            a, b = (
                old(target, draft, ids, mask, **kwargs),
                s2d_ext.speculate(target, draft, ids, mask, **kwargs),
            )
            same = torch.equal(a.sequences, b.sequences)
            for r in range(args.rounds):
                order = [("old", old), ("engine", s2d_ext.speculate)]
                for label, fn in order if r % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    out = fn(target, draft, ids, mask, **kwargs)
                    runs[label].append((time.perf_counter() - start) / out.stats.steps)
                    steps[label] = out.stats.steps
        ratios = [e / o for e, o in zip(runs["engine"], runs["old"])]
        results.append(
            {
                "temperature": temperature,
                "same_tokens": same,
                "steps": steps,
                "old_ms_per_step": 1e3 * statistics.median(runs["old"]),
                "engine_ms_per_step": 1e3 * statistics.median(runs["engine"]),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "old_ms_per_round": [1e3 * x for x in runs["old"]],
                "engine_ms_per_round": [1e3 * x for x in runs["engine"]],
            }
        )
        print(results[-1], flush=True)
    report = {
        "machine": machine(args.threads),
        "load_before": load_before,
        "load_after": load(),
        "model": name,
        "draft_exits": list(draft.exits),
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "base": args.base,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("engine_step_cpu" + ("_random" if args.random else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Engine step vs the old loop ({args.base}'s run_speculation), same rows",
        "",
        f"Machine: {report['machine']}. Before: {load_before}; after: {report['load_after']}.",
        f"Model: {name} with its sorted draft (exits {tuple(draft.exits)}), batch {args.batch}, "
        f"{args.max_new_tokens} new tokens per row (EOS ignored), num_draft_tokens 5 (heuristic), "
        f"{args.rounds} interleaved rounds; ratio = engine / old, median of the per-round ratios.",
        "",
        "| temperature | same tokens | steps (old / engine) | old ms/step | engine ms/step "
        "| ratio (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['temperature']:g} | {r['same_tokens']} | {r['steps']['old']} / {r['steps']['engine']} | "
            f"{r['old_ms_per_step']:.2f} | {r['engine_ms_per_step']:.2f} | {r['ratio_median']:.3f} "
            f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) |"
        )
    lines += ["", "Target: engine step at most 1.05x the old loop's."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
