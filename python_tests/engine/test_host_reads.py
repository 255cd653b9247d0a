"""A step reads the device exactly once (the packed tokens / accept counts); the engine's own code, the
target runner included, does no other synchronising read. Counted on a CPU model with a torch function
mode that sees every call that would synchronise on a GPU (item, tolist, bool, int, float, cpu,
nonzero, boolean-mask indexing), attributed to the file that made it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import s2d_ext
from s2d_ext.draft.hf_draft import HFDraft
from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine, SamplingParams, host_reads

from ..driver.tiny_models import make_draft_model, make_target

PACKAGE = Path(s2d_ext.__file__).parent
SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.unique,
    torch.unique,
    torch.masked_select,
}


class SyncCounter(TorchFunctionMode):
    """Counts would-be synchronisations by the part of the code base that made them."""

    def __init__(self):
        super().__init__()
        self.by_part: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncs = func in SYNCING
        if func is torch.Tensor.__getitem__ and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            syncs = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if syncs:
            part = _part(sys._getframe(1))
            self.by_part[part] = self.by_part.get(part, 0) + 1
        return func(*args, **kwargs)


def _part(frame) -> str:
    """The part of the code base a call belongs to. NOTE: the target runner (target.py) is shared: a
    draft that runs through it (HFDraft) owns those calls, so the first caller outside it decides."""
    first = _file_part(frame.f_code.co_filename)
    if first != "runner":
        return first
    while frame is not None:
        part = _file_part(frame.f_code.co_filename)
        if part not in ("runner", "torch", "transformers", "other"):
            return part
        frame = frame.f_back
    return "engine"


def _file_part(filename: str) -> str:
    path = Path(filename)
    if PACKAGE in path.parents:
        rel = path.relative_to(PACKAGE)
        if rel.name == "host_reads.py":
            return "engine read"
        if rel.name in ("target.py", "_cache_compat.py"):
            return "runner"
        return rel.parts[0]  # engine, draft, ops, ...
    return "torch" if "torch" in path.parts else ("transformers" if "transformers" in path.parts else "other")


@pytest.mark.parametrize("draft_kind", ["sorted", "hf"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_device_read_per_step(draft_kind, temperature):
    target = make_target("llama", seed=3)
    draft = (
        SortedDraft.truncate(target, 2, exits=(1, 2))
        if draft_kind == "sorted"
        else HFDraft(make_draft_model(target))
    )
    engine = Engine(draft, target)
    for i in range(4):
        engine.add_request(
            [3 + i, 4, 5 + i], SamplingParams(max_new_tokens=200, temperature=temperature, seed=i)
        )
    engine.step()  # admission + the first step
    for _ in range(5):
        counter = SyncCounter()
        with host_reads.count_reads() as reads, counter:
            outputs = engine.step()
        assert outputs, "every step emits tokens"
        assert reads[0] == 1
        # NOTE: the draft's propose / advance and the ops' validating wrappers still synchronise (their
        # counts are in counter.by_part["draft"] / ["ops"]); the engine's own code does not.
        assert counter.by_part.get("engine", 0) == 0, counter.by_part


def test_joins_and_leaves_do_not_read_the_device_in_the_engine():
    """With a SortedDraft (whose state the engine slices itself). NOTE: an HFDraft row leaving costs one
    read of its runner's live counts, which only the draft knows."""
    target = make_target("llama", seed=3)
    engine = Engine(SortedDraft.truncate(target, 2), target)
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    engine.step()
    counter = SyncCounter()
    with counter:
        engine.add_request([7, 8], SamplingParams(max_new_tokens=30))
        engine.add_request([9, 9, 9, 9], SamplingParams(max_new_tokens=30))
        while engine.has_unfinished():
            engine.step()
    assert counter.by_part.get("engine", 0) == 0, counter.by_part


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sorted_draft_reads_the_device_once_per_exit_decision(temperature):
    """Regression budget: a SortedDraft step read the device 199 (greedy) / 236 (sampled) times at batch 8
    with 3 exits; now each (draft token, exit group) costs at most 4 reads (its window, whether the group
    runs, the rows still drafting, whether the token loop goes on) plus one read of the call's checks, and
    the ops wrappers one read per call."""
    target = make_target("llama", seed=1, layers=4)
    draft = SortedDraft.truncate(target, 3, exits=(1, 2, 3), thresholds=(0.3, 0.3, 0.0))
    engine = Engine(draft, target)
    for i in range(8):
        engine.add_request(
            list(range(3, 9 + i)), SamplingParams(max_new_tokens=40, temperature=temperature, seed=i)
        )
    engine.step()
    engine.step()
    counter = SyncCounter()
    with counter:
        engine.step()
    k, groups = 5 + 2 + 2, 3  # the heuristic policy's longest draft after two steps
    assert counter.by_part.get("draft", 0) <= 4 * k * groups + 4, counter.by_part
    assert counter.by_part.get("ops", 0) <= 2, counter.by_part
