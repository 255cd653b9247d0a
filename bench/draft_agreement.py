"""How often a sorted draft's exits agree with the target on the target's own greedy answers (teacher forced).

For one Spec-Bench first turn per category (chat template), the target writes its greedy answer
(``--max-new-tokens``); the draft then reads prompt + answer in one forward, and at every answer position each
exit's top-1 (over the draft vocabulary when the checkpoint has one, as the draft proposes) is compared with
the target's token. This is the acceptance a first draft token can reach with greedy verification, free of the
draft-length policy and of timing. Writes ``bench/results/draft_agreement_cpu.{json,md}``.
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="smollm2", help="as s2d bench --target (default: smollm2)")
    parser.add_argument("--draft", required=True, help="sorted draft checkpoint (e.g. from s2d soft)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from s2d_ext import checkpoints
    from s2d_ext.bench.arguments import DEFAULT_DATA
    from s2d_ext.bench.spec_bench import encode_prompt, load_questions

    load_before = load()
    ref = checkpoints.resolve_target(args.target)
    tokenizer, target = checkpoints.load_tokenizer(ref), checkpoints.load_target(ref)
    draft = checkpoints.load_draft(args.draft, target)
    model, vocab, exits = draft.hf_model, draft.draft_vocab, draft.exits
    rows = load_questions(DEFAULT_DATA, 1)  # one first turn per category
    per_category, hits, total = {}, dict.fromkeys(exits, 0), 0
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([encode_prompt(tokenizer, row["turns"][0], 512)])
            answer = target.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False
            )[0, ids.shape[1] :]
            sequence = torch.cat([ids[0], answer])[None, :-1]
            hidden = model(sequence, output_hidden_states=True).hidden_states
            start = ids.shape[1] - 1  # the position that predicts the first answer token
            found = {}
            for e in exits:
                # NOTE: transformers' last hidden state is already normed (the final norm ran on it).
                h = hidden[e][0, start:]
                h = h if e == model.config.num_hidden_layers else model.model.norm(h)
                logits = model.lm_head(h)
                top = vocab[logits[:, vocab].argmax(-1)] if vocab is not None else logits.argmax(-1)
                found[e] = int((top == answer).sum())
                hits[e] += found[e]
            total += len(answer)
            per_category[row["category"]] = {str(e): found[e] / len(answer) for e in exits} | {
                "tokens": len(answer)
            }
    report = {
        "machine": machine(args.threads),
        "load_before": load_before,
        "load_after": load(),
        "target": args.target,
        "draft": args.draft,
        "draft_vocab": None if vocab is None else int(vocab.numel()),
        "answer_tokens": total,
        "agreement": {str(e): hits[e] / total for e in exits},
        "per_category": per_category,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft_agreement_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    head = " | ".join(f"exit {e}" for e in exits)
    lines = [
        "# Draft agreement with the target on its own greedy answers (teacher forced)",
        "",
        f"Machine: {report['machine']}. Before: {load_before}; after: {report['load_after']}.",
        f"Target {args.target}, draft {args.draft} (draft vocabulary: {report['draft_vocab'] or 'full'}); "
        "one "
        f"Spec-Bench first turn per category, chat template, {args.max_new_tokens} greedy tokens each "
        f"({total} answer positions). Agreement = the exit's top-1 equals the target's token.",
        "",
        f"| category | {head} |",
        "|---" * (len(exits) + 1) + "|",
    ]
    for category, values in per_category.items():
        lines.append(f"| {category} | " + " | ".join(f"{values[str(e)]:.3f}" for e in exits) + " |")
    lines.append("| **all** | " + " | ".join(f"**{report['agreement'][str(e)]:.3f}**" for e in exits) + " |")
    (args.out / "draft_agreement_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
