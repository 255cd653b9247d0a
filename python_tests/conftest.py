"""Test set-up shared by every test file.

Triton kernels run on the CPU in CI through the interpreter; that switch must be set before
triton is first imported, so it is set here, at collection time, when no GPU is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from s2d_ext.ops._backend import available_backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(op: str, device: str) -> list[str]:
    """Every non-reference backend of ``op`` runnable on ``device`` here."""
    return [b for b in available_backends(op, torch.device(device)) if b != "reference"]


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
