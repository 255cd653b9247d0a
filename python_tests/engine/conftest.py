"""Engine tests run many tiny forwards: one intra-op thread avoids thread-pool spin on busy CI cores."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
