"""The machine a measurement ran on, and device synchronisation for timers (used by bench/)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timer measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load_note(load_average: tuple[float, ...] | None = None) -> str:
    """Whether other jobs shared the cores during a measurement, from the 1-minute load average.

    NOTE: a load average above the core count means other jobs competed for the cores.
    """
    load = (load_average or os.getloadavg())[0]
    if load > (os.cpu_count() or 1):
        return f"other jobs shared the cores (load average {load:.1f})"
    return f"no other jobs were running (load average {load:.1f})"


def bench_meta(device: str, threads: int, load_before: tuple[float, ...]) -> dict:
    """The machine block of a kernel benchmark's JSON (bench/exit_head.py, bench/kv_compact.py)."""
    is_cuda = torch.device(device).type == "cuda"
    return {
        "device": device,
        "machine": torch.cuda.get_device_name() if is_cuda else f"{cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "median of --repeats runs" if is_cuda else f"{load_note()}; median of up to --repeats runs",
    }
