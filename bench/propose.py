"""Draft step time of SortedDraft at each exit depth vs. an HF forward (DynamicCache) of the same depth.

For every exit depth e of a random Llama (exits 4, 8, 12 of 12 layers by default), batch 1, greedy:

- ``hf``: ``truncated_hf_model(model, e)`` stepping one token at a time with a DynamicCache, plus the
  argmax over the logits (what transformers' assisted generation does per draft token);
- ``lean``: ``SortedDraft.truncate(model, e)`` (one exit, at e): the lean forward over the static cache;
- ``sorted``: the full sorted draft with thresholds that force every token to exit at e: the lean
  step plus the confidence checks at the earlier exits plus the amortised deferred KV fill of the
  deeper layers (``max_deferred`` positions at a time).

Each iteration proposes ``--k`` tokens with each of the three (HF: k single-token forwards), then
accepts them all, so the context grows from ``--prompt`` like real decoding. The three run
interleaved, so they see the same machine load; the figure is the median time per draft token and
the ratios are medians of per-iteration ratios. Two model sizes: the main one (compute and memory
bound on a CPU) and a tiny one (hidden 64, vocab 1000) where the per-step framework overhead shows.
Writes ``bench/results/propose_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from s2d_ext import SortedDraft
from s2d_ext._machine import cpu_name
from s2d_ext.draft.sorted_draft import truncated_hf_model
from s2d_ext.ops import exit_head

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    cpu = cpu_name()
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, {threads} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_stepper(model, prompt: torch.Tensor, k: int) -> Callable[[], float]:
    """One call = k single-token HF forwards (DynamicCache) + the emitted token; returns s / draft token."""
    device = prompt.device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :-1], past_key_values=cache, use_cache=True)
    token = prompt[:, -1:]

    @torch.no_grad()
    def step() -> float:
        nonlocal token
        sync(device)
        start = time.perf_counter()
        for _ in range(k):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        sync(device)
        seconds = (time.perf_counter() - start) / k
        out = model(token, past_key_values=cache, use_cache=True)  # the target's emitted token
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        return seconds

    return step


def draft_stepper(draft: SortedDraft, prompt: torch.Tensor, k: int, max_length: int, exits: set):
    """One call = ``propose`` of k tokens, all accepted (advance untimed); returns s / draft token."""
    device = prompt.device
    state = draft.begin(prompt, None, max_length)
    num_draft = torch.full((1,), k, dtype=torch.int64, device=device)

    @torch.no_grad()
    def step() -> float:
        sync(device)
        start = time.perf_counter()
        prop = draft.propose(state, k, num_draft)
        sync(device)
        seconds = (time.perf_counter() - start) / k
        exits.update(prop.exits.flatten().tolist())
        draft.advance(state, prop.num_draft, prop.tokens[:, -1])
        return seconds

    return step


@torch.no_grad()
def time_exit_head(model, iters: int) -> float:
    """Median seconds of one ``s2d_ext.ops.exit_head`` call (norm + lm_head + argmax/confidence), batch 1."""
    norm, head = model.model.norm, model.lm_head.weight
    hidden = torch.randn(1, head.shape[1], device=head.device, dtype=head.dtype)
    times = []
    for it in range(iters + 2):
        sync(head.device)
        start = time.perf_counter()
        exit_head(hidden, norm.weight, head, norm.variance_epsilon)
        sync(head.device)
        if it >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_config(name: str, config: LlamaConfig, exits: tuple[int, ...], args, device, dtype) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device=device)
    max_length = args.prompt + (args.warmup + args.iters) * (args.k + 1) + args.k + 1
    rows = []
    for depth_index, depth in enumerate(exits):
        forced = tuple(1.0 if i < depth_index else 0.0 for i in range(len(exits)))
        used: set = set()
        steppers = {
            "hf": hf_stepper(truncated_hf_model(model, depth), prompt, args.k),
            "lean": draft_stepper(SortedDraft.truncate(model, depth), prompt, args.k, max_length, set()),
            "sorted": draft_stepper(
                SortedDraft.from_pretrained(model, exits=exits, thresholds=forced),
                prompt,
                args.k,
                max_length,
                used,
            ),
        }
        times: dict[str, list[float]] = {key: [] for key in steppers}
        for it in range(args.warmup + args.iters):
            for key, step in steppers.items():
                seconds = step()
                if it >= args.warmup:
                    times[key].append(seconds)
        assert used == {depth}, f"forced exit {depth} used exits {used}"
        ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        rows.append(
            {
                "depth": depth,
                "hf_dynamic_cache_ms": round(ms["hf"], 4),
                "lean_ms": round(ms["lean"], 4),
                "sorted_forced_exit_ms": round(ms["sorted"], 4),
                "lean_speedup_vs_hf": round(
                    statistics.median(h / x for h, x in zip(times["hf"], times["lean"], strict=True)), 3
                ),
                "sorted_speedup_vs_hf": round(
                    statistics.median(h / x for h, x in zip(times["hf"], times["sorted"], strict=True)), 3
                ),
            }
        )
        print(name, rows[-1], flush=True)
    return {
        "name": name,
        "config": {
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "layers": config.num_hidden_layers,
            "exits": exits,
            "vocab": config.vocab_size,
        },
        "exit_head_ms": round(time_exit_head(model, args.iters) * 1e3, 4),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--exits", default="4,8,12")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny (overhead) configuration")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    exits = tuple(int(e) for e in args.exits.split(","))
    common = dict(num_hidden_layers=args.layers, max_position_embeddings=4096)
    configs = [
        (
            "main",
            LlamaConfig(
                hidden_size=args.hidden,
                intermediate_size=args.intermediate,
                num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads,
                vocab_size=args.vocab,
                **common,
            ),
        )
    ]
    if not args.no_tiny:
        tiny = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            **common,
        )
        configs.append(("tiny", tiny))
    results = [run_config(name, config, exits, args, device, dtype) for name, config in configs]

    result = {
        "benchmark": "propose",
        "machine": machine_name(),
        "device": str(device),
        "dtype": args.dtype,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "batch": 1,
        "prompt": args.prompt,
        "k": args.k,
        "iters": args.iters,
        "metric": "median ms per draft token (greedy, batch 1); speedups are medians of per-iteration ratios",
        "configs": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"propose_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    load = tuple(round(x, 2) for x in result["load_average_at_end"] or ())
    lines = [
        "# Draft step time: SortedDraft lean forward vs HF forward (DynamicCache)",
        "",
        f"Machine: {result['machine']}; device {device}, {args.dtype}; load average at the end {load} "
        "(a shared machine: other jobs ran meanwhile; the three variants run interleaved, so the ratios "
        "compare like with like).",
        f"Batch 1, greedy, prompt {args.prompt}, k={args.k} drafts per step, all accepted, "
        f"{args.iters} steps; median ms per draft token; speedups are medians of per-step ratios.",
        "",
        "- hf: truncated HF model of that depth, one token per forward with a DynamicCache, "
        "argmax of logits.",
        "- lean: `SortedDraft.truncate(model, depth)` (a single exit): the lean forward + exit head.",
        "- sorted: the sorted draft (all exits) with thresholds forcing every token to exit at that depth "
        "(adds the confidence checks at earlier exits and the amortised deferred KV fill of deeper layers).",
    ]
    for res in results:
        cfg = res["config"]
        lines += [
            "",
            f"## {res['name']}: hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
            f"{cfg['heads']} heads ({cfg['kv_heads']} KV), {cfg['layers']} layers, exits {cfg['exits']}, "
            f"vocab {cfg['vocab']}",
            "",
            f"One exit head (final norm + lm_head + argmax/confidence) costs {res['exit_head_ms']:.3f} ms; "
            "a sorted token that exits at the i-th exit pays i of them.",
            "",
            "| depth | hf (ms) | lean (ms) | sorted, forced exit (ms) | hf / lean | hf / sorted |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['depth']} | {r['hf_dynamic_cache_ms']:.3f} | {r['lean_ms']:.3f} | "
                f"{r['sorted_forced_exit_ms']:.3f} | {r['lean_speedup_vs_hf']:.2f}x | "
                f"{r['sorted_speedup_vs_hf']:.2f}x |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
