"""verify's CUDA kernels run on a CPU CUDA simulator, against the reference (CI has no GPU).

python_tests/ops/cuda_sim/ emulates the CUDA subset the kernels use (one OS thread per CUDA thread,
real block barriers and warp shuffles; see sim_cuda.h for what it cannot show). sim_verify.cpp
includes the unchanged launcher csrc/verify/verify_kernels.cu, whose launches go through S2D_LAUNCH
(csrc/include/s2d/cuda_launch.h). The cases are tiny (every CUDA thread is an OS thread) and cover:
several vocabulary chunks, V not a multiple of the 64-id race block, V < 64, K = 0, greedy and sampled
rows mixed, tied maxima (lowest-id argmax), draft_probs None and given, top-k/top-p thresholds, an
all -inf row, bf16 and fp16 logits. Bit-exact token equality is expected, as for the C++ CPU backend.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from s2d_ext.ops.verify_reference import logit_threshold, verify_reference

REPO = Path(__file__).resolve().parents[2]
SIM_DIR = Path(__file__).resolve().parent / "cuda_sim"
LOGIT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # s2d::LogitType


def build_simulator(out_dir: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile cuda_sim/sim_verify.cpp (with the real launcher and kernels) into a shared library."""
    library = out_dir / "libs2d_verify_sim.so"
    command = [
        "g++", "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas",
        "-DS2D_CUDA_SIM", *extra_flags, f"-I{SIM_DIR}", f"-I{REPO / 'csrc' / 'include'}",
        f"-I{REPO / 'csrc'}", str(SIM_DIR / "sim_verify.cpp"), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA simulator failed:\n{result.stderr[-4000:]}")
    lib = ctypes.CDLL(str(library))
    pointer = ctypes.c_void_p
    # logits, logit_type, 9 pointers (draft_tokens .. num_accepted), batch, num_spec, vocab, num_sms,
    # race chunk, first-pass chunk
    lib.sim_verify.argtypes = [pointer, ctypes.c_int] + [pointer] * 9 + [ctypes.c_int64] * 3
    lib.sim_verify.argtypes += [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.sim_verify.restype = ctypes.c_int
    return lib


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> ctypes.CDLL:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot build the CUDA simulator")
    return build_simulator(tmp_path_factory.mktemp("cuda_sim"))


def sim_verify(
    lib, logits, tokens, draft_probs, num_draft, temperature, min_logit, seeds, offsets, chunk, stat_chunk
):
    """Run the CUDA launcher on the simulator; returns (out_tokens [B, K+1], num_accepted [B], chunks)."""
    batch, positions, vocab = logits.shape
    out_tokens = torch.full((batch, positions), -7, dtype=torch.int64)  # poisoned: every entry is written
    num_accepted = torch.full((batch,), -7, dtype=torch.int32)

    def address(tensor):
        return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())

    inputs = [logits, tokens, draft_probs, num_draft, temperature, min_logit, seeds, offsets]
    inputs = [None if t is None else t.contiguous() for t in inputs]
    # NOTE: raw pointers below: the dtypes must be exactly those of s2d::VerifyParams.
    expected_dtypes = [logits.dtype, torch.int64, torch.float32, torch.int64, torch.float32, torch.float32]
    expected_dtypes += [torch.int64, torch.int64]
    assert all(t is None or t.dtype == d for t, d in zip(inputs, expected_dtypes, strict=True))
    num_chunks = lib.sim_verify(
        address(inputs[0]), LOGIT_TYPES[logits.dtype], *map(address, inputs[1:]), address(out_tokens),
        address(num_accepted), batch, positions - 1, vocab, 1, chunk, stat_chunk,
    )  # fmt: skip
    assert num_chunks > 0, "the simulator failed (see stderr)"
    return out_tokens, num_accepted, num_chunks


def make_case(
    batch, num_spec, vocab, *, with_q, dtype, greedy_rows, dead_rows, top_k, top_p, tied_logits, seed
):
    """Random inputs with drafts sampled near the target (so that some are accepted, some not)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_spec + 1, vocab, generator=generator) * 3.0
    if tied_logits:  # a few distinct values: the maximum is tied, argmax must pick the lowest id
        logits = logits.round().clamp(max=2.0)
    logits[list(dead_rows)] = float("-inf")
    logits = logits.to(dtype)
    near_target = logits.float()[:, :num_spec] + torch.randn(batch, num_spec, vocab, generator=generator)
    q = torch.softmax(near_target.nan_to_num(0.0, neginf=0.0), dim=-1)
    tokens = torch.multinomial(q.reshape(-1, vocab), 1, generator=generator).reshape(batch, num_spec)
    if not with_q:  # argmax drafting: the draft token is q's argmax
        tokens, q = q.argmax(-1), None
    if num_spec > 0 and batch > 1:
        tokens[1, 0] = -3  # out-of-range draft token: always rejected
    num_draft = torch.randint(0, num_spec + 1, (batch,), generator=generator)
    num_draft[0] = num_spec
    temperature = 0.5 + torch.rand(batch, generator=generator)
    temperature[list(greedy_rows)] = 0.0
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=generator)
    offsets = torch.randint(0, 2**40, (batch,), generator=generator)
    min_logit = None
    if top_k or top_p < 1.0:
        top_ks = torch.full((batch,), top_k, dtype=torch.int64)
        top_ps = torch.full((batch,), top_p, dtype=torch.float32)
        min_logit = logit_threshold(logits, temperature, top_ks, top_ps).contiguous()
    return logits, tokens, q, num_draft, temperature, min_logit, seeds, offsets


DEFAULT_OPTIONS = dict(
    dtype=torch.float32, greedy_rows=(), dead_rows=(), top_k=0, top_p=1.0, tied_logits=False
)
CASES = {
    # name: (batch, num_spec, vocab, race chunk, first-pass chunk (0 = verify_cuda_plan's), options).
    # Race chunks and first-pass chunks are multiples of 256 ids; the first pass uses 16-byte loads in
    # warp steps of 1024 (float32) or 2048 (16-bit) ids, the race in steps of 256 ids, both only where
    # the row is 16-byte aligned (V * element size a multiple of 16): "vector" cases cover them.
    "chunks2_tail": (3, 3, 300, 256, 256, dict(with_q=True)),
    "chunks2_argmax": (3, 3, 300, 256, 256, dict(with_q=False)),
    "vocab_lt_64": (3, 2, 37, 0, 0, dict(with_q=True)),
    "vocab_lt_64_argmax": (3, 2, 37, 0, 0, dict(with_q=False)),
    "vocab_65_bonus_only": (2, 0, 65, 0, 0, dict(with_q=False)),
    "greedy_mixed_dead_row": (4, 2, 600, 256, 256, dict(with_q=True, greedy_rows=(0, 3), dead_rows=(2,))),
    "dead_row_argmax": (3, 2, 100, 0, 0, dict(with_q=False, dead_rows=(0,), greedy_rows=(1,))),
    "top_k_top_p": (3, 3, 520, 256, 256, dict(with_q=True, top_k=20, top_p=0.9)),
    "top_k_argmax": (3, 2, 150, 0, 0, dict(with_q=False, top_k=5, greedy_rows=(2,))),
    "bf16_chunks": (3, 3, 520, 256, 256, dict(with_q=True, dtype=torch.bfloat16, top_p=0.8)),
    "fp16": (2, 2, 90, 0, 0, dict(with_q=False, dtype=torch.float16)),
    "argmax_ties_greedy": (3, 1, 300, 0, 256, dict(with_q=False, greedy_rows=(0, 1, 2), tied_logits=True)),
    "vector_f32": (3, 2, 2600, 1024, 2048, dict(with_q=True, greedy_rows=(2,))),
    "vector_f32_argmax_top_k": (2, 2, 2600, 0, 0, dict(with_q=False, top_k=50)),
    "vector_bf16": (2, 1, 4400, 2048, 2048, dict(with_q=True, dtype=torch.bfloat16, greedy_rows=(1,))),
    "vector_ties_greedy": (2, 1, 2048, 0, 1024, dict(with_q=False, greedy_rows=(0, 1), tied_logits=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernels_match_reference(sim, name):
    batch, num_spec, vocab, chunk, stat_chunk, options = CASES[name]
    options = DEFAULT_OPTIONS | options
    # NOTE: one seed per case (each simulated launch costs thousands of OS threads), distinct per case.
    inputs = make_case(batch, num_spec, vocab, seed=list(CASES).index(name), **options)
    expected_tokens, expected_accepted = verify_reference(*inputs)
    out_tokens, num_accepted, num_chunks = sim_verify(sim, *inputs, chunk=chunk, stat_chunk=stat_chunk)
    assert num_chunks == (-(-vocab // chunk) if chunk else 1)
    torch.testing.assert_close(out_tokens, expected_tokens, rtol=0, atol=0)
    torch.testing.assert_close(num_accepted, expected_accepted, rtol=0, atol=0)
