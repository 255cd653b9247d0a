"""Fused exit head vs torch's norm -> lm_head -> softmax -> max: time and intermediate memory.

    python bench/exit_head.py                    # CPU: the C++ kernel, writes bench/results/exit_head_cpu.*
    python bench/exit_head.py --device cuda      # CUDA (chunked matmul + reduction), Triton: exit_head_cuda.*
    python bench/exit_head.py --quick            # a reduced sweep

The baseline is what a Hugging Face draft does per exit: ``RMSNorm`` (HF Llama), ``lm_head`` in the
model dtype, ``.float()`` logits, ``softmax``, ``max`` / ``argmax`` (plus ``logsumexp``). Intermediate
memory is the bytes of the [N, V] tensors the baseline materialises (logits in the model dtype, float32
logits and float32 probabilities), counted analytically; the fused op materialises no [N, V] tensor,
only its normed rows [N, d] and per-chunk row states, plus on CPU one float32 lm_head tile per thread,
and on CUDA one float32 [N, C] buffer of matmul results (C ids per chunk, at most 8 MiB; see
csrc/include/s2d/exit_head_chunked.h). Every ratio comes from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from s2d_ext._machine import bench_meta, time_ms
from s2d_ext.ops import exit_head

ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-6


def torch_baseline(hidden, norm_weight, lm_head, temperature):
    """HF-style: norm, lm_head in the model dtype, float logits, softmax, max."""
    h32 = hidden.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(hidden.dtype) * norm_weight
    logits = torch.nn.functional.linear(normed, lm_head).float()  # [N, V]
    scaled = logits / temperature[:, None]
    probs = torch.softmax(scaled, dim=-1)  # [N, V]
    confidence, _ = probs.max(dim=-1)
    return logits.argmax(dim=-1), confidence, torch.logsumexp(scaled, dim=-1)


def baseline_intermediate_bytes(rows, vocab, dtype) -> int:
    model_dtype_logits = rows * vocab * torch.tensor([], dtype=dtype).element_size()
    return model_dtype_logits + 2 * rows * vocab * 4  # + float32 logits + float32 probs


def fused_intermediate_bytes(rows, dim, vocab, device, threads) -> int:
    if device == "cuda":
        # NOTE: as exit_head_chunked.h plans it: C columns per chunk, 2048 logits per partial state.
        cols = min(vocab, max(4096, (8 * 2**20) // (4 * rows) // 2048 * 2048))
        parts = sum(-(-min(cols, vocab - begin) // 2048) for begin in range(0, vocab, cols))
        return rows * dim * 4 + rows * cols * 4 + parts * rows * 16
    chunks = -(-vocab // 512)
    tile = 192 * 1024 if rows > 4 else 0  # converted lm_head tile per thread (bf16/f16, N > 4)
    return rows * dim * 4 + chunks * rows * 16 + threads * (tile + 4 * 4 * 48)


def measure(hidden, norm_weight, lm_head, device, backends, repeats, threads) -> dict:
    """Times the baseline and every backend on one shape; hidden [N, d], lm_head [V, d]."""
    (rows, dim), vocab, dtype = hidden.shape, lm_head.shape[0], hidden.dtype
    temperature = torch.ones(rows, device=device)
    entry = {"rows": rows, "dim": dim, "vocab": vocab, "dtype": str(dtype).replace("torch.", "")}
    entry["torch_ms"] = time_ms(
        lambda i: torch_baseline(hidden, norm_weight, lm_head, temperature), device, repeats, budget_s=3.0
    )
    for backend in backends:
        ms = time_ms(
            lambda i, b=backend: exit_head(hidden, norm_weight, lm_head, EPS, temperature, backend=b),
            device,
            repeats,
            budget_s=3.0,
        )
        entry[f"{backend}_ms"] = ms
        entry[f"{backend}_speedup"] = entry["torch_ms"] / ms
    entry["torch_intermediate_bytes"] = baseline_intermediate_bytes(rows, vocab, dtype)
    entry["fused_intermediate_bytes"] = fused_intermediate_bytes(rows, dim, vocab, device, threads)
    weight_bytes = lm_head.numel() * lm_head.element_size()
    entry["weight_gb_per_s"] = weight_bytes / entry[f"{backends[0]}_ms"] / 1e6
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="N in {1, 16}, d = 1024, V = 32000 only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dims, args.vocabs = [1, 16], [1024], [32000]
    dtype = getattr(torch, args.dtype)
    device = args.device
    backends = ["cuda", "triton"] if device == "cuda" else ["cpu"]
    threads = torch.get_num_threads()
    load_before = os.getloadavg()

    results = []
    for vocab in args.vocabs:
        for dim in args.dims:
            gen = torch.Generator().manual_seed(0)
            lm_head = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device=device, dtype=dtype)
            norm_weight = (torch.rand(dim, generator=gen) + 0.5).to(device=device, dtype=dtype)
            for rows in args.rows:
                hidden = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype)
                entry = measure(hidden, norm_weight, lm_head, device, backends, args.repeats, threads)
                results.append(entry)
                print(json.dumps(entry), flush=True)

    meta = bench_meta(device, threads, load_before)
    machine = meta["machine"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"exit_head_{device}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"# exit_head ({device}, {args.dtype})",
        "",
        f"Machine: {machine}; torch {torch.__version__}; {threads} threads; load average before/after: "
        f"{load_before[0]:.2f} / {meta['load_average_after'][0]:.2f}. {meta['note']}.",
        "",
        "Baseline: HF-style RMSNorm -> lm_head (model dtype) -> float -> softmax -> max/argmax"
        " (+ logsumexp).",
        "Intermediate memory: [N, V] tensors the baseline materialises vs the fused op's scratch (analytic).",
        f"Sweep: N {args.rows}, d {args.dims}, V {args.vocabs}, {args.dtype} only.",
        "",
        "| N | d | V | torch ms | "
        + " | ".join(f"{b} ms | {b} speedup" for b in backends)
        + " | lm_head GB/s | torch [N,V] MiB | fused scratch MiB |",
        "|---|---|---|---|" + "---|---|" * len(backends) + "---|---|---|",
    ]
    for e in results:
        cells = " | ".join(f"{e[f'{b}_ms']:.2f} | {e[f'{b}_speedup']:.2f}x" for b in backends)
        lines.append(
            f"| {e['rows']} | {e['dim']} | {e['vocab']} | {e['torch_ms']:.2f} | {cells} | "
            f"{e['weight_gb_per_s']:.1f} | {e['torch_intermediate_bytes'] / 2**20:.2f} | "
            f"{e['fused_intermediate_bytes'] / 2**20:.2f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
