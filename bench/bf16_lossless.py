"""What greedy speculative decoding keeps of ``generate()`` in bfloat16, on a real model.

For each prompt (Spec-Bench first turns, chat template) greedy ``speculate()`` and greedy ``generate()`` run
on the same bf16 target, once with torch's kernels and once with s2d's row-invariant kernels
(:mod:`s2d_ext.row_invariant`). Reported per kernels: how many outputs are equal, and, for each that is
not, where it parts and the margin between ``generate``'s top two logits there, in bfloat16 units in the
last place of the top logit (a near-tie is 0-2 units). Writes ``bench/results/bf16_lossless_<target>_cpu``.

    python bench/bf16_lossless.py --target qwen-coder-1.5b --draft ~/.cache/s2d_ext/drafts/qwen-coder-0.5b-s2d
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import load, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bf16_units(top: torch.Tensor) -> float:
    """(top[0] - top[1]) in bfloat16 units in the last place of top[0]."""
    exponent = torch.floor(torch.log2(top[0].abs().clamp(min=torch.finfo(torch.float32).tiny)))
    return float((top[0] - top[1]) / torch.exp2(exponent - 7))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="qwen-coder-1.5b")
    parser.add_argument("--draft", required=True, help="sorted draft checkpoint")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import s2d_ext
    from s2d_ext import checkpoints, compute
    from s2d_ext.bench.arguments import DEFAULT_DATA
    from s2d_ext.bench.spec_bench import encode_prompt, load_questions

    before = load()
    ref = checkpoints.resolve_target(args.target)
    tokenizer = checkpoints.load_tokenizer(ref)
    target = checkpoints.load_target(ref, dtype=torch.bfloat16)
    draft = checkpoints.load_draft(args.draft, [target], dtype=torch.bfloat16)
    questions = load_questions(DEFAULT_DATA, 1)[: args.prompts]
    prompts = [encode_prompt(tokenizer, q["turns"][0], 256) for q in questions]
    rows = {}
    for kernels in ("torch", "invariant"):
        compute.apply_kernels(target, kernels)
        compute.apply_kernels(draft.hf_model, kernels)
        rows[kernels] = []
        for q, prompt in zip(questions, prompts):
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                reference = target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            out = s2d_ext.speculate(target, draft, ids, max_new_tokens=args.max_new_tokens)
            ours, theirs = out.sequences[0, len(prompt) :], reference[0, len(prompt) :]
            n = min(len(ours), len(theirs))
            differ = (ours[:n] != theirs[:n]).nonzero()
            row = {"category": q["category"], "equal": bool(torch.equal(ours, theirs))}
            if not row["equal"]:
                first = int(differ[0]) if len(differ) else n
                with torch.inference_mode():
                    logits = target(reference[:, : len(prompt) + first]).logits[0, -1].float()
                row.update(first=first, margin_units=bf16_units(logits.topk(2).values))
            rows[kernels].append(row)
            print(kernels, row, flush=True)
    report = {
        "machine": machine(args.threads),
        "load_before": before,
        "load_after": load(),
        "target": args.target,
        "draft": args.draft,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
    }
    stem = f"bf16_lossless_{ref.name}_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Greedy speculate() against generate() in bfloat16 ({args.target})",
        "",
        f"Machine: {report['machine']}. Before: {before}; after: {report['load_after']}.",
        f"{len(prompts)} Spec-Bench first turns (one per category, chat template), {args.max_new_tokens} new "
        f"tokens, greedy, batch 1; draft {args.draft}. Margin: generate's top-2 logits where the outputs "
        "part, in bf16 units in the last place of the top logit.",
        "",
        "| kernels | equal outputs | where they part (token: margin in units) |",
        "|---|---|---|",
    ]
    for kernels, found in rows.items():
        parts = ", ".join(f"{r['first']}: {r['margin_units']:.1f}" for r in found if not r["equal"]) or "-"
        lines.append(f"| {kernels} | {sum(r['equal'] for r in found)} / {len(found)} | {parts} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
