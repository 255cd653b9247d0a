"""Opt-in time split of the engine's steps (``profile=True``).

Off (the default), nothing is timed and nothing synchronises. On, every lap synchronises each CUDA device
the models use so that a bucket holds its own kernels: this costs several syncs per step, so a profiled
run is slower than an unprofiled one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

BUCKETS = ("draft", "target", "verify", "other")


class Clock:
    """Splits wall time into :data:`BUCKETS`; a no-op unless ``enabled``."""

    def __init__(self, devices: Iterable[torch.device], enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
        self.spent = dict.fromkeys(BUCKETS, 0.0)
        self.start = self.last = time.perf_counter()

    def reset(self) -> None:
        self.spent = dict.fromkeys(BUCKETS, 0.0)
        self.start = self.last = time.perf_counter()

    def lap(self, bucket: str) -> None:
        if not self.enabled:
            return
        for device in self.cuda:
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.spent[bucket] += now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return sum(self.spent.values())
