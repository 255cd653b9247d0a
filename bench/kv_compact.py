"""kv_compact vs torch.gather / index_select: time and effective bandwidth (small sweep).

    python bench/kv_compact.py                   # CPU C++ kernel -> bench/results/kv_compact_cpu.*
    python bench/kv_compact.py --device cuda     # CUDA kernel and Triton -> kv_compact_cuda.*

Each case compacts one layer's cache [B, H, S, D] to S_out = 7/8 S slots with 1/16 holes.
Effective bandwidth = (bytes read + bytes written) / time = 2 * B * H * S_out * D * element size / time.
Baselines: ``gather`` (torch.gather on the expanded index + masked_fill for holes, the reference) and
``index_select`` (per batch row, on clamped slots, then masked_fill). Ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from s2d_ext._machine import bench_meta, time_ms
from s2d_ext.ops import kv_compact
from s2d_ext.ops.kv_compact_reference import kv_compact_reference

ROOT = Path(__file__).resolve().parent.parent


def index_select_baseline(cache, index):
    slots = cache.shape[2]
    valid = (index >= 0) & (index < slots)
    safe = torch.where(valid, index, torch.zeros_like(index))
    out = torch.stack([cache[b].index_select(1, safe[b]) for b in range(cache.shape[0])])
    return out.masked_fill(~valid[:, None, :, None], 0)


def measure(cache, index, device, backends, repeats) -> dict[str, float]:
    """Milliseconds of each baseline and backend; cache [B, H, S, D], index [B, S_out]."""
    timings = {
        "gather": time_ms(lambda i: kv_compact_reference(cache, index), device, repeats),
        "index_select": time_ms(lambda i: index_select_baseline(cache, index), device, repeats),
    }
    for backend in backends:
        timings[backend] = time_ms(lambda i, b=backend: kv_compact(cache, index, backend=b), device, repeats)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    backends = ["cuda", "triton"] if device == "cuda" else ["cpu"]
    shapes = [(1, 8, 1024, 128), (4, 8, 1024, 128), (1, 32, 4096, 128), (8, 8, 2048, 64)]
    load_before = os.getloadavg()
    results = []
    for batch, heads, slots, dim in shapes:
        gen = torch.Generator().manual_seed(0)
        cache = torch.randn(batch, heads, slots, dim, generator=gen).to(device=device, dtype=dtype)
        slots_out = slots * 7 // 8
        index = torch.stack(
            [torch.randperm(slots, generator=gen)[:slots_out].sort().values for _ in range(batch)]
        )
        index[torch.rand(index.shape, generator=gen) < 1 / 16] = -1
        index = index.to(device)
        moved = 2 * batch * heads * slots_out * dim * cache.element_size()
        entry = {"B": batch, "H": heads, "S": slots, "D": dim, "S_out": slots_out, "dtype": args.dtype}
        timings = measure(cache, index, device, backends, args.repeats)
        for name, ms in timings.items():
            entry[f"{name}_ms"] = ms
            entry[f"{name}_gb_per_s"] = moved / ms / 1e6
        for backend in backends:
            entry[f"{backend}_vs_gather"] = timings["gather"] / timings[backend]
            entry[f"{backend}_vs_index_select"] = timings["index_select"] / timings[backend]
        results.append(entry)
        print(json.dumps(entry), flush=True)

    meta = bench_meta(device, torch.get_num_threads(), load_before)
    machine = meta["machine"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kv_compact_{device}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    names = ["gather", "index_select", *backends]
    lines = [
        f"# kv_compact ({device}, {args.dtype})",
        "",
        f"Machine: {machine}; torch {torch.__version__}; {meta['threads']} threads; load average "
        f"before/after: {load_before[0]:.2f} / {meta['load_average_after'][0]:.2f}. {meta['note']}.",
        "S_out = 7/8 S, 1/16 of the output slots are holes. GB/s = 2 * bytes of the output / time.",
        "",
        "| B | H | S | D | "
        + " | ".join(f"{n} ms (GB/s)" for n in names)
        + " | "
        + " | ".join(f"{b} vs gather | {b} vs index_select" for b in backends)
        + " |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|" * len(backends),
    ]
    for e in results:
        cells = " | ".join(f"{e[f'{n}_ms']:.3f} ({e[f'{n}_gb_per_s']:.1f})" for n in names)
        ratios = " | ".join(
            f"{e[f'{b}_vs_gather']:.2f}x | {e[f'{b}_vs_index_select']:.2f}x" for b in backends
        )
        lines.append(f"| {e['B']} | {e['H']} | {e['S']} | {e['D']} | {cells} | {ratios} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
