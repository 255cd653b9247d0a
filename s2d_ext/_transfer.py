"""Host-to-device copies that never wait for the device: what the engine and the draft states send over."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device`` without a blocking copy.

    NOTE: on CUDA a copy from pageable memory synchronises the stream; from pinned memory with
    ``non_blocking=True`` it is queued behind the device's work instead.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
