"""Quick measured run: speculate() vs target.generate() on random Llama models (no downloads).

    python bench/speculate_quick.py            # -> bench/results/speculate_quick_cpu.{json,md}
    python bench/speculate_quick.py --device cuda
    python bench/speculate_quick.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32000 \
        --tag speculate_1b_cuda      # issue 13's GPU check: a 1.2B-parameter random target, bf16

The models are random, so the draft is made useful by construction: the target's upper layers are
damped (their output projections scaled by ``--damp``) and the draft is the target's first layers
(a plain one-exit draft, and a sorted draft with two exits). MAT therefore measures the driver, not a
trained draft. Greedy decoding; the speculative output is checked token-for-token against generate().
Timings: median of ``--repeats`` runs after one warm-up; ratios come from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import s2d_ext  # noqa: E402
from s2d_ext._machine import cpu_name  # noqa: E402
from s2d_ext.draft.sorted_draft import SortedDraft, truncated_hf_model  # noqa: E402


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def make_target(args) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        for layer in model.model.layers[args.draft_layers :]:
            layer.self_attn.o_proj.weight.mul_(args.damp)
            layer.mlp.down_proj.weight.mul_(args.damp)
    return model.to(args.device)


def timed(fn, device: str, repeats: int):
    fn()
    samples, result = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--damp", type=float, default=0.05)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tag", default=None, help="results file stem (default: speculate_quick_<device>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    target = make_target(args)
    drafts = {
        "plain draft (one exit)": truncated_hf_model(target, args.draft_layers).eval(),
        "sorted draft exits (1, 2)": SortedDraft.truncate(
            target, args.draft_layers, exits=(1, args.draft_layers), thresholds=(0.5, 0.0)
        ),
    }
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in (1, 4):
        ids = torch.randint(0, args.vocab, (batch, args.prompt_len), generator=gen).to(args.device)
        with torch.inference_mode():
            base_s, ref = timed(
                lambda ids=ids: target.generate(
                    ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0
                ),
                args.device,
                args.repeats,
            )
        new = batch * args.max_new_tokens
        rows.append(
            {"batch": batch, "method": "target.generate", "tokens_per_s": new / base_s, "speedup": 1.0}
        )
        for name, draft in drafts.items():
            for policy in ("fixed", "heuristic"):
                secs, out = timed(
                    lambda draft=draft, ids=ids, policy=policy: s2d_ext.speculate(
                        target,
                        draft,
                        ids,
                        max_new_tokens=args.max_new_tokens,
                        num_draft_tokens=4,
                        draft_length=policy,
                        profile=True,  # NOTE: the table shows the time split
                    ),
                    args.device,
                    args.repeats,
                )
                st = out.stats
                rows.append(
                    {
                        "batch": batch,
                        "method": f"speculate, {name}, {policy}",
                        "tokens_per_s": new / secs,
                        "speedup": base_s / secs,
                        "ms_per_step": 1000 * st.time_total / max(st.steps, 1),
                        "mat": st.mat,
                        "other_fraction": st.other_fraction,
                        "split": {
                            k: getattr(st, f"time_{k}") / st.time_total for k in ("draft", "target", "verify")
                        },
                        "exit_histogram": st.exit_histogram,
                        "lossless": bool(torch.equal(out.sequences, ref)),
                    }
                )
                print(rows[-1], flush=True)

    result = {
        "machine": machine_name(args.device),
        "device": args.device,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "args": vars(args),
        "rows": rows,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (args.tag or f"speculate_quick_{args.device.split(':')[0]}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# speculate() vs target.generate() — {result['machine']}",
        "",
        f"Random Llama target: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
        f"{sum(p.numel() for p in target.parameters()) / 1e9:.2f}B parameters, {args.dtype}, layers "
        f">= {args.draft_layers} damped x{args.damp}; draft = its first {args.draft_layers} layers. Greedy, "
        f"prompt {args.prompt_len}, {args.max_new_tokens} new tokens, num_draft_tokens=4, median of "
        f"{args.repeats}. torch {result['torch']}, transformers {result['transformers']}.",
        "",
        "| batch | method | tokens/s | speedup | MAT | ms/step | other | draft / target / verify | lossless |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = " / ".join(f"{100 * v:.0f}%" for v in r["split"].values()) if "split" in r else ""
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r.get('mat', float('nan')):.2f} | {r.get('ms_per_step', float('nan')):.2f} | "
            f"{100 * r.get('other_fraction', 0):.1f}% | {split} | "
            f"{r.get('lossless', '')} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
