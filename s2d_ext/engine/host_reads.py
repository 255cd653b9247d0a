"""The engine's device-to-host reads, all through :func:`read`, so a test (or a profiler) can count them.

Per decoding step the engine reads one packed int64 tensor: the emitted tokens, the accept counts, the
drafts proposed and their exits (plus the log-probabilities, bit-cast, when a request asks for them).
Host-to-device copies go through :func:`to_device` (:mod:`s2d_ext._transfer`), from pinned memory and
non-blocking on CUDA, so they never wait for the device either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from s2d_ext._transfer import to_device

__all__ = ["bits_to_floats", "count_reads", "host_list", "read", "to_device"]

_counters: list[list[int]] = []


def read(tensor: torch.Tensor) -> list:
    """``tensor.tolist()`` on the host: the one synchronising read of a step."""
    for counter in _counters:
        counter[0] += 1
    return tensor.cpu().tolist()


@contextlib.contextmanager
def count_reads() -> Iterator[list[int]]:
    """``with count_reads() as n:`` ... ``n[0]`` is the number of :func:`read` calls inside."""
    counter = [0]
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def host_list(tensor: torch.Tensor) -> list:
    """``tolist()`` of a tensor that already lives on the host (made from host values): not a read."""
    if tensor.device.type != "cpu":
        raise ValueError("host_list is for host tensors; device tensors go through read()")
    return tensor.tolist()


def bits_to_floats(values: list[int]) -> list[float]:
    """int64 words of a float64 block (the read packs log-probabilities that way) back to floats."""
    return torch.tensor(values, dtype=torch.int64).view(torch.float64).tolist()
