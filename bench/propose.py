"""Draft token cost of SortedDraft per exit: greedy vs sampled, full vs reduced vocabulary, vs its layers.

For every exit depth e of a random Llama (a SmolLM2-shaped draft by default: hidden 576, 9 heads / 3 KV
heads, intermediate 1536, V = 49152, 12 layers with exits 4, 8, 12), batch 1, k drafts per step, all
accepted (the context grows like real decoding):

- ``hf``: ``truncated_hf_model(model, e)`` one token per forward with a DynamicCache, argmax of the logits
  (what transformers' assisted generation does per draft token);
- ``lean``: ``SortedDraft.truncate(model, e)`` (one exit at e, full vocabulary, greedy);
- ``greedy`` / ``sampled``: the sorted draft (every exit) with exit e fixed (the exits before it off,
  threshold 1: their heads are skipped; threshold 0 at e), greedy or sampled (T = 1, the fused
  ``exit_sample`` op): the sampled / greedy ratio is the cost of sampling at the same exit;
- ``vocab_greedy`` / ``vocab_sampled``: the same with the reduced draft vocabulary (``--draft-vocab``
  ids, 8192 of 49152 by default);
- ``vocab_pass_greedy`` / ``vocab_pass_sampled``: reduced vocabulary, and every token *passes* the exits
  before e (threshold 0.999999: their confidence test runs, on the subset, and never fires): the cost of
  the cheap exit decision at each passed exit;
- ``layers``: the draft cut at e with a one-token vocabulary: the e layers alone (its head is one dot
  product), the unit the layer costs below are counted in.

All variants of one depth run interleaved (round robin), so they see the same machine load; the figure
is the median ms per draft token and every ratio is the median of per-round ratios. Writes
``bench/results/propose_<device>.{json,md}``.
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
PASS_THRESHOLD = 0.999999  # below 1, so the exit's test runs; random weights never reach it


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


def draft_stepper(draft: SortedDraft, prompt, k: int, max_length: int, exits: set, sampled: bool, seed: int):
    """One call = ``propose`` of k tokens, all accepted (advance untimed); returns s / draft token."""
    device = prompt.device
    state = draft.begin(prompt, None, max_length)
    num_draft = torch.full((1,), k, dtype=torch.int64, device=device)
    sampling = dict(temperature=1.0, seeds=seed) if sampled else {}
    steps = 0

    @torch.no_grad()
    def step() -> float:
        nonlocal steps
        sync(device)
        start = time.perf_counter()
        prop = draft.propose(state, k, num_draft, offsets=steps, **sampling)
        sync(device)
        seconds = (time.perf_counter() - start) / k
        exits.update(prop.exits.flatten().tolist())
        draft.advance(state, prop.num_draft, prop.tokens[:, -1])
        steps += 1
        return seconds

    return step


@torch.no_grad()
def time_exit_head(model, iters: int, rows: torch.Tensor | None = None) -> float:
    """Median seconds of one ``s2d_ext.ops.exit_head`` call (norm + head + argmax/confidence), batch 1."""
    norm, head = model.model.norm, model.lm_head.weight
    if rows is not None:
        head = head[rows].contiguous()
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
    n_vocab = min(args.draft_vocab, config.vocab_size)
    # NOTE: random weights have no frequent tokens: every (V / N)-th id stands in for the N most frequent.
    vocab = torch.linspace(0, config.vocab_size - 1, n_vocab).round().long().unique().to(device)
    one_token = torch.zeros(1, dtype=torch.int64, device=device)
    rows = []
    for depth_index, depth in enumerate(exits):
        fixed = tuple(1.0 if i < depth_index else 0.0 for i in range(len(exits)))
        passing = tuple(PASS_THRESHOLD if i < depth_index else 0.0 for i in range(len(exits)))
        used: dict[str, set] = {}

        def sorted_draft(thresholds, draft_vocab=None):
            return SortedDraft.from_pretrained(
                model, exits=exits, thresholds=thresholds, draft_vocab=draft_vocab
            )

        def stepper(key, draft, sampled, used=used, depth=depth):
            used[key] = set()
            return draft_stepper(draft, prompt, args.k, max_length, used[key], sampled, seed=depth)

        layers_only = SortedDraft.truncate(model, depth, draft_vocab=one_token, share_embeddings=True)
        steppers = {
            "hf": hf_stepper(truncated_hf_model(model, depth), prompt, args.k),
            "lean": stepper("lean", SortedDraft.truncate(model, depth, share_embeddings=True), False),
            "greedy": stepper("greedy", sorted_draft(fixed), False),
            "sampled": stepper("sampled", sorted_draft(fixed), True),
            "vocab_greedy": stepper("vocab_greedy", sorted_draft(fixed, vocab), False),
            "vocab_sampled": stepper("vocab_sampled", sorted_draft(fixed, vocab), True),
            "vocab_pass_greedy": stepper("vocab_pass_greedy", sorted_draft(passing, vocab), False),
            "vocab_pass_sampled": stepper("vocab_pass_sampled", sorted_draft(passing, vocab), True),
            "layers": stepper("layers", layers_only, False),
        }
        times: dict[str, list[float]] = {key: [] for key in steppers}
        for it in range(args.warmup + args.iters):
            for key, step in steppers.items():
                seconds = step()
                if it >= args.warmup:
                    times[key].append(seconds)
        for key, exits_seen in used.items():
            assert exits_seen == {depth}, f"{key}: forced exit {depth} used exits {exits_seen}"

        def ratio(a, b, times=times):
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        layer = [t / depth for t in times["layers"]]  # one layer's time, per round

        def in_layers(key, times=times, layer=layer):
            """(t - t_layers) / t_layer: what the variant costs beyond its e layers, in layers."""
            over = [(t - lt) / one for t, lt, one in zip(times[key], times["layers"], layer, strict=True)]
            return round(statistics.median(over), 3)

        ms = {key: round(statistics.median(v) * 1e3, 4) for key, v in times.items()}
        rows.append(
            {
                "depth": depth,
                "ms": ms,
                "sampled_over_greedy": round(ratio("sampled", "greedy"), 3),
                "vocab_sampled_over_greedy": round(ratio("vocab_sampled", "vocab_greedy"), 3),
                "vocab_pass_sampled_over_greedy": round(ratio("vocab_pass_sampled", "vocab_pass_greedy"), 3),
                "layer_ms": round(statistics.median(layer) * 1e3, 4),
                "beyond_layers_in_layers": {
                    key: in_layers(key)
                    for key in ("lean", "greedy", "vocab_greedy", "vocab_sampled")
                    + ("vocab_pass_greedy", "vocab_pass_sampled")
                },
                "lean_speedup_vs_hf": round(ratio("hf", "lean"), 3),
                "greedy_speedup_vs_hf": round(ratio("hf", "greedy"), 3),
            }
        )
        print(name, json.dumps(rows[-1]), flush=True)
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
            "draft_vocab": int(vocab.numel()),
        },
        "exit_head_ms": round(time_exit_head(model, args.iters) * 1e3, 4),
        "exit_head_draft_vocab_ms": round(time_exit_head(model, args.iters, vocab) * 1e3, 4),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--exits", default="4,8,12")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--draft-vocab", type=int, default=8192)
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
    load_start = os.getloadavg()
    results = [run_config(name, config, exits, args, device, dtype) for name, config in configs]

    result = {
        "benchmark": "propose",
        "machine": machine_name(),
        "device": str(device),
        "dtype": args.dtype,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "batch": 1,
        "prompt": args.prompt,
        "k": args.k,
        "iters": args.iters,
        "metric": "median ms per draft token (batch 1); ratios are medians of per-round ratios",
        "configs": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"propose_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result, args) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


def render(result: dict, args) -> str:
    start = tuple(round(x, 2) for x in result["load_average_at_start"])
    end = tuple(round(x, 2) for x in result["load_average_at_end"])
    lines = [
        "# Draft token cost per exit: greedy vs sampled, full vs reduced vocabulary",
        "",
        f"Machine: {result['machine']}; device {result['device']}, {result['dtype']}; load average "
        f"{start} at the start, {end} at the end (a shared machine: the variants of a depth run "
        "interleaved, so their ratios compare like with like).",
        f"Batch 1, prompt {args.prompt}, k={args.k} drafts per step, all accepted, {args.iters} rounds; "
        "median ms per draft token; ratios are medians of per-round ratios. `python bench/propose.py`.",
        "",
        "- hf: truncated HF model, DynamicCache, argmax. lean: `SortedDraft.truncate(model, e)`.",
        "- greedy / sampled: the sorted draft with exit e fixed (exits before it off, their heads skipped), "
        "greedy or sampled (T=1, the fused `exit_sample` op). vocab_*: with the reduced draft vocabulary.",
        "- vocab_pass_*: reduced vocabulary, every token passes the exits before e (their confidence test "
        "runs on the subset and does not fire).",
        "- layers: the draft cut at e with a one-token vocabulary: its e layers alone. `beyond layers` = "
        "(t - t_layers) / (t_layers / e): the cost past the e layers, in layers (the exit's own head "
        "included).",
    ]
    for res in result["configs"]:
        cfg = res["config"]
        lines += [
            "",
            f"## {res['name']}: hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
            f"{cfg['heads']} heads ({cfg['kv_heads']} KV), {cfg['layers']} layers, "
            f"exits {tuple(cfg['exits'])}, vocab {cfg['vocab']}, draft vocabulary {cfg['draft_vocab']}",
            "",
            f"One exit head (norm + head + argmax/confidence): {res['exit_head_ms']:.3f} ms over V, "
            f"{res['exit_head_draft_vocab_ms']:.3f} ms over the draft vocabulary.",
            "",
            "| e | hf | lean | greedy | sampled | sampled / greedy | vocab greedy | vocab sampled | "
            "vocab sampled / greedy | vocab pass greedy | vocab pass sampled | layers | one layer |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            ms = r["ms"]
            lines.append(
                f"| {r['depth']} | {ms['hf']:.3f} | {ms['lean']:.3f} | {ms['greedy']:.3f} | "
                f"{ms['sampled']:.3f} | {r['sampled_over_greedy']:.2f}x | {ms['vocab_greedy']:.3f} | "
                f"{ms['vocab_sampled']:.3f} | "
                f"{r['vocab_sampled_over_greedy']:.2f}x | {ms['vocab_pass_greedy']:.3f} | "
                f"{ms['vocab_pass_sampled']:.3f} | {ms['layers']:.3f} | {r['layer_ms']:.3f} |"
            )
        lines += [
            "",
            "Cost past the e layers, in layers:",
            "",
            "| e | lean (full head) | fixed exit, vocab, greedy | fixed exit, vocab, sampled | "
            "passing, vocab, greedy | passing, vocab, sampled |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            b = r["beyond_layers_in_layers"]
            lines.append(
                f"| {r['depth']} | {b['lean']:.2f} | {b['vocab_greedy']:.2f} | {b['vocab_sampled']:.2f} | "
                f"{b['vocab_pass_greedy']:.2f} | {b['vocab_pass_sampled']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
