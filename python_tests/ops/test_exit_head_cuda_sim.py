"""The CUDA exit head's chunked reduction and the CUDA sampling kernel run on the CPU CUDA simulator,
against the references (CI has no GPU; see python_tests/ops/cuda_sim/sim_cuda.h for what it cannot show).

sim_exit_head.cpp includes the unchanged launchers csrc/exit_head/exit_head_reduce_kernels.cu and
exit_sample_kernels.cu and the host loop of csrc/include/s2d/exit_head_chunked.h; the binding's tensor-core
matmul is replaced by copies of logits computed here. So what runs is the plan, the chunk loop, the chunk
reduction, the merge and the sampling kernel, for several chunks and parts, odd widths, ties, dead rows,
top-k / top-p thresholds and reduced vocabularies.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from s2d_ext.ops.exit_head_reference import exit_head_reference
from s2d_ext.ops.exit_sample_reference import sample_logits_reference
from s2d_ext.ops.verify_reference import logit_threshold, sanitize

REPO = Path(__file__).resolve().parents[2]
SIM_DIR = Path(__file__).resolve().parent / "cuda_sim"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> ctypes.CDLL:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot build the CUDA simulator")
    library = tmp_path_factory.mktemp("cuda_sim") / "libs2d_exit_head_sim.so"
    command = [
        "g++", "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-DS2D_CUDA_SIM",
        f"-I{SIM_DIR}", f"-I{REPO / 'csrc' / 'include'}", f"-I{REPO / 'csrc'}",
        str(SIM_DIR / "sim_exit_head.cpp"), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA simulator failed:\n{result.stderr[-4000:]}")
    lib = ctypes.CDLL(str(library))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sim_exit_head_chunked.argtypes = [pointer, pointer, i64, i64, i64, pointer, pointer, pointer]
    lib.sim_exit_head_chunked.restype = i64
    lib.sim_sample.argtypes = [pointer] * 13 + [i64] * 3
    lib.sim_sample.restype = ctypes.c_int
    return lib


def address(tensor):
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def run_chunked(lib, logits, temperature, cols):
    rows, vocab = logits.shape
    tokens = torch.full((rows,), -7, dtype=torch.int64)
    confidence = torch.full((rows,), -7.0)
    lse = torch.full((rows,), -7.0)
    parts = lib.sim_exit_head_chunked(
        address(logits), address(temperature), rows, vocab, cols, address(tokens), address(confidence),
        address(lse),
    )  # fmt: skip
    assert parts > 0, "the simulator failed (see stderr)"
    return tokens, confidence, lse, parts


# name: (rows, vocab, chunk columns (0 = the plan's), tied logits, dead rows)
REDUCE_CASES = {
    "one_chunk_planned": (3, 1000, 0, False, ()),
    "chunks_and_parts": (2, 5003, 2048 + 512, False, ()),  # 2 chunks, 3 + 1 parts, odd tail
    "ties_across_chunks": (2, 4500, 1024, True, ()),
    "dead_row": (3, 700, 256, False, (1,)),
    "tiny_vocab": (2, 5, 0, False, ()),
}


@pytest.mark.parametrize("name", list(REDUCE_CASES))
def test_chunked_exit_head_matches_reference(sim, name):
    rows, vocab, cols, tied, dead = REDUCE_CASES[name]
    gen = torch.Generator().manual_seed(list(REDUCE_CASES).index(name))
    logits = torch.randn(rows, vocab, generator=gen) * 3
    if tied:  # a few distinct values: the maximum repeats, in several chunks and parts
        logits = logits.round().clamp(max=2.0)
    logits[list(dead)] = float("nan")
    temperature = torch.rand(rows, generator=gen) * 2
    temperature[0] = 0.0
    tokens, confidence, lse, parts = run_chunked(sim, logits, temperature, cols)
    # The statistics of the logits themselves (exit_head_reference's definitions, past the head).
    scores = sanitize(logits)
    want_tokens = scores.argmax(-1)
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = scores / safe_t[:, None]
    want_lse = torch.logsumexp(scaled, -1)
    want_confidence = torch.exp(scaled.amax(-1) - want_lse)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(confidence, want_confidence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    width = cols or min(vocab, 2**21 // rows // 2048 * 2048)
    expected_parts = sum(-(-min(width, vocab - b) // 2048) for b in range(0, vocab, width))
    assert parts == expected_parts


def test_chunked_exit_head_equals_exit_head_reference(sim):
    """End to end with the real head logits: the same outputs as the spec (RMSNorm + head + stats)."""
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 24, generator=gen) * 3
    norm_weight = torch.rand(24, generator=gen) + 0.5
    head = torch.randn(3001, 24, generator=gen)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])
    from s2d_ext.ops.exit_head_reference import exit_head_logits

    logits = exit_head_logits(hidden, norm_weight, head, 1e-6).contiguous()
    tokens, confidence, lse, _ = run_chunked(sim, logits, temperature, 1024)
    want = exit_head_reference(hidden, norm_weight, head, 1e-6, temperature)
    assert torch.equal(tokens, want[0])
    torch.testing.assert_close(confidence, want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want[2], rtol=1e-5, atol=1e-5)


def run_sample(lib, logits, settings, vocab_ids, vocab, filters, probs=None, probs_rows=None):
    rows, head_vocab = logits.shape
    probs = torch.full((rows + 2, vocab), -7.0) if probs is None else probs
    probs_rows = torch.arange(rows) + 2 if probs_rows is None else probs_rows
    tokens = torch.full((rows,), -7, dtype=torch.int64)
    confidence = torch.full((rows,), -7.0)
    fired = torch.zeros(rows, dtype=torch.bool)
    min_logit = None
    if filters:
        min_logit = logit_threshold(
            logits[:, None, :], settings["temperature"], settings["top_k"], settings["top_p"]
        )[:, 0].contiguous()
    status = lib.sim_sample(
        address(logits), address(settings["temperature"]), address(min_logit), address(settings["threshold"]),
        address(settings["seeds"]), address(settings["offsets"]), address(settings["positions"]),
        address(vocab_ids), address(probs_rows), address(probs), address(tokens), address(confidence),
        address(fired), rows, head_vocab, vocab, probs.shape[0],
    )  # fmt: skip
    assert status == 0, "the simulator failed (see stderr)"
    return tokens, confidence, fired, probs, probs_rows


# name: (rows, head vocab, vocab (> head: a reduced vocabulary), filters)
SAMPLE_CASES = {
    "full_vocab": (6, 300, 300, False),
    "full_vocab_filters": (6, 301, 301, True),
    "subset": (5, 90, 1000, False),
    "subset_filters": (5, 90, 1000, True),
    "vocab_lt_64": (4, 37, 37, True),
}


@pytest.mark.parametrize("name", list(SAMPLE_CASES))
def test_sample_kernel_matches_reference(sim, name):
    rows, head_vocab, vocab, filters = SAMPLE_CASES[name]
    gen = torch.Generator().manual_seed(100 + list(SAMPLE_CASES).index(name))
    logits = torch.randn(rows, head_vocab, generator=gen) * 3
    logits[rows - 1] = float("-inf")  # a dead row: uniform over the head vocabulary
    vocab_ids = (
        torch.randperm(vocab, generator=gen)[:head_vocab].sort().values if vocab > head_vocab else None
    )
    settings = dict(
        temperature=torch.tensor([0.0, 0.7, 1.0, 1.5, 2.0, 0.9])[:rows],
        top_k=torch.tensor([0, 5, 0, 20, 3, 7])[:rows],
        top_p=torch.tensor([1.0, 1.0, 0.8, 0.9, 1.0, 0.5])[:rows],
        threshold=torch.tensor([0.0, 0.0, 0.0, 0.9, 0.0, 0.0])[:rows],
        seeds=torch.randint(-(2**62), 2**62, (rows,), generator=gen),
        offsets=torch.randint(0, 2**40, (rows,), generator=gen),
        positions=torch.randint(0, 2**16, (rows,), generator=gen),
    )
    tokens, confidence, fired, probs, probs_rows = run_sample(
        sim, logits, settings, vocab_ids, vocab, filters
    )
    ref_probs = torch.full((rows + 2, vocab), -7.0)
    args = [
        settings[k] for k in ("temperature", "top_k", "top_p", "seeds", "offsets", "positions", "threshold")
    ]
    want_tokens, want_confidence, want_fired = sample_logits_reference(
        logits, *args, vocab_ids, ref_probs, probs_rows, filters
    )
    assert torch.equal(fired, want_fired)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(confidence, want_confidence, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-7)


def test_sample_kernel_writes_only_inside_probs_without_value_checks(sim):
    # Regression: out-of-range probs_rows / vocab_ids (validate=False, or a direct op call) wrote outside
    # probs (and segfaulted on the CPU for an id of 2**36); now such a row or id writes nothing.
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, generator=gen) * 3
    settings = dict(
        temperature=torch.tensor([0.0, 1.0, 1.0]),
        top_k=torch.zeros(3, dtype=torch.int64),
        top_p=torch.ones(3),
        threshold=torch.zeros(3),
        seeds=torch.tensor([1, 2, 3]),
        offsets=torch.zeros(3, dtype=torch.int64),
        positions=torch.zeros(3, dtype=torch.int64),
    )
    base = torch.full((6, 8), -7.0)
    probs = base[1:4]  # M = 3: rows 0 and 4-5 of base are outside it
    vocab_ids = torch.tensor([0, 3, 10, 2**36])  # the last two are no ids of V = 8
    rows = torch.tensor([-1, 1, 3])  # row 0 and row 2 point outside probs
    run_sample(sim, logits, settings, vocab_ids, 8, False, probs=probs, probs_rows=rows)
    assert torch.equal(base[0], torch.full((8,), -7.0)) and torch.equal(base[4:], torch.full((2, 8), -7.0))
    assert torch.equal(probs[0], torch.full((8,), -7.0)) and torch.equal(probs[2], torch.full((8,), -7.0))
    assert float(probs[1].sum()) <= 1.0 + 1e-6 and bool((probs[1] >= 0).all())  # ids 0 and 3 only
    assert torch.equal(probs[1][[1, 2, 4, 5, 6, 7]], torch.zeros(6))
