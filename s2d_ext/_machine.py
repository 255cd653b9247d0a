"""The machine a measurement ran on, and device synchronisation for timers (used by bench/)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: torch CPU threads of the CLI and the bench unless ``--threads`` says otherwise.
#: NOTE: measured in bench/results/threads_cpu.md: on this 2-core host with other jobs running, a SmolLM2-135M
#: decode step took 11x longer with torch's default of 2 threads than with 1. torch's OpenMP runtime
#: (libgomp) makes every op wait at a barrier for all its threads, and idle threads spin there; when the
#: scheduler hands one thread's core to another job, every op waits for that thread's next time slice while
#: the other spins. With OMP_WAIT_POLICY=PASSIVE (set before torch is imported) 2 threads ran like 1. Batch-1
#: decoding of models this size is memory-bound, so a second thread has little to gain even on an idle host.
DEFAULT_CPU_THREADS = 1


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


def time_ms(
    fn: Callable[[int], object], device: str | torch.device, repeats: int, budget_s: float = 2.0
) -> float:
    """Median time of one call ``fn(i)`` in ms, after one warm-up call ``fn(0)``.

    ``i`` counts the calls from 1, so ``fn`` can rotate among several input copies (larger than the
    caches). On CUDA, events around each call give the GPU's time from the call's first launch to its
    last kernel's end (launch gaps included, host syncs of the call too); on the CPU, the wall clock.
    Stops early once ``budget_s`` is spent and at least 3 calls were timed.
    """
    is_cuda = torch.device(device).type == "cuda"
    fn(0)
    sync(device)
    samples = []
    start_all = time.perf_counter()
    for i in range(repeats):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i + 1)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn(i + 1)
            samples.append((time.perf_counter() - start_s) * 1e3)
        if time.perf_counter() - start_all > budget_s and len(samples) >= 3:
            break
    return statistics.median(samples)


def cuda_graph_ms(fn: Callable[[int], object], calls: int, replays: int = 20) -> float:
    """GPU time per call of ``fn(0)``, ..., ``fn(calls - 1)`` captured in one CUDA graph, in ms.

    NOTE: replaying a graph removes the host's launch overhead, so this is the kernels' own time
    (the figure a server that captures its decode step sees). The median over ``replays`` replays.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, the allocator grows
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)
