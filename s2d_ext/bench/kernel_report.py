"""One report of the kernel benchmarks (verify, exit_head, kv_compact) against the memory bandwidth.

    s2d bench kernels                          # or: python -m s2d_ext.bench.kernel_report
    python -m s2d_ext.bench.kernel_report --rerun   # in a checkout: first re-run the three benchmarks

It reads ``bench/results/{verify,exit_head,kv_compact}_<device>.json`` (``--out``; the checkout's
``bench/verify.py``, ``bench/exit_head.py`` and ``bench/kv_compact.py`` write them), measures this machine's
read bandwidth (a torch reduction over 256 MiB, best of 5), and writes ``kernels_<device>.md`` beside them
with each result's effective bandwidth and its share of the measured one. Where a benchmark measured the
bandwidth in its own run (verify does), that figure is used for its rows, since it is the one taken in the
same run as the timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from s2d_ext._machine import cpu_name

RESULTS = Path("bench") / "results"


def measure_read_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """GB/s of a full read of ``mib`` MiB of float32 (sum), best of ``repeats``."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def _rows(results: Path, device: str) -> list[dict]:
    """(kernel, shape, ms, GB/s, bandwidth of the same run or None) from each benchmark's JSON."""
    rows = []
    verify = results / f"verify_{device}.json"
    if verify.exists():
        data = json.loads(verify.read_text())
        for r in data["rows"]:
            if r["backend"] == "reference":
                continue
            shape = f"B={r['B']} K={r['K']} V={r['V']} {r['mode']} {r['dtype']}"
            rows.append(
                dict(
                    kernel=f"verify ({r['backend']})",
                    shape=shape,
                    ms=r["ms"],
                    gbs=r["GB/s"],
                    bandwidth=data.get("measured_bandwidth_GBs"),
                )
            )
    exit_head = results / f"exit_head_{device}.json"
    if exit_head.exists():
        for r in json.loads(exit_head.read_text())["results"]:
            shape = f"N={r['rows']} d={r['dim']} V={r['vocab']} {r['dtype']}"
            ms = r.get(f"{device}_ms", r.get("cpu_ms"))
            rows.append(
                dict(
                    kernel=f"exit_head ({device})",
                    shape=shape,
                    ms=ms,
                    gbs=r["weight_gb_per_s"],
                    bandwidth=None,
                )
            )
    kv = results / f"kv_compact_{device}.json"
    if kv.exists():
        for r in json.loads(kv.read_text())["results"]:
            shape = f"B={r['B']} H={r['H']} S={r['S']}->{r['S_out']} D={r['D']} {r['dtype']}"
            ms = r.get(f"{device}_ms", r.get("cpu_ms"))
            gbs = r.get(f"{device}_gb_per_s", r.get("cpu_gb_per_s"))
            rows.append(dict(kernel=f"kv_compact ({device})", shape=shape, ms=ms, gbs=gbs, bandwidth=None))
    return rows


def write_kernel_report(out: Path = RESULTS, device: str = "cpu") -> Path:
    """Writes ``<out>/kernels_<device>.md`` from the benchmark JSONs in ``out``; returns its path."""
    out = Path(out)
    rows = _rows(out, device)
    if not rows:
        raise FileNotFoundError(
            f"no kernel benchmark results in {out} (verify_{device}.json, exit_head_{device}.json, "
            f"kv_compact_{device}.json): run bench/verify.py, bench/exit_head.py and bench/kv_compact.py "
            "from a source checkout, or pass --out FOLDER"
        )
    measured = measure_read_bandwidth(device)
    machine = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    lines = [
        f"# Kernel report ({device})",
        "",
        f"Machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        f"Read bandwidth measured by this report: **{measured:.1f} GB/s** (sum over 256 MiB of float32).",
        "Share = the kernel's effective bandwidth (bytes it must read / time) over the bandwidth measured in "
        "the same run as its timing (verify measures its own), else over this report's measurement.",
        "exit_head counts the lm_head weight it streams; kv_compact the bytes it reads and writes.",
        "",
        "| kernel | shape | ms | GB/s | share of bandwidth |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        bandwidth = row["bandwidth"] or measured
        share = row["gbs"] / bandwidth if bandwidth else 0.0
        lines.append(
            f"| {row['kernel']} | {row['shape']} | {row['ms']:.3f} | {row['gbs']:.2f} | {share:.0%} |"
        )
    path = out / f"kernels_{device}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (./bench/results)")
    parser.add_argument(
        "--rerun", action="store_true", help="re-run the three benchmarks first (from a source checkout)"
    )
    args = parser.parse_args()
    if args.rerun:
        for script in ("verify.py", "exit_head.py", "kv_compact.py"):
            path = Path("bench") / script
            if not path.is_file():
                raise SystemExit(f"error: --rerun runs {path} of a source checkout; run it from the checkout")
            subprocess.check_call([sys.executable, str(path), "--device", args.device])
    print(f"wrote {write_kernel_report(args.out, args.device)}")


if __name__ == "__main__":
    main()
