"""invariant_linear's CUDA kernel runs on a CPU CUDA simulator, against the reference (CI has no GPU).

python_tests/ops/cuda_sim/ emulates the CUDA subset the kernel uses (one OS thread per CUDA thread, real
warp shuffles; see sim_cuda.h for what it cannot show). sim_invariant_linear.cpp includes the unchanged
launcher csrc/invariant_linear/invariant_linear_kernels.cu. Cases: fp32 / bf16 / fp16 weights, K below
and past one warp's 32 lanes, a row count past the kernel's 4-row block, N not a multiple of the block's
4 warps, bias or none; the kernel's outputs match the reference to float32 rounding, and each row's bits
are the same alone as in the batch (row invariance).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from s2d_ext.ops.invariant_linear_reference import invariant_linear_reference

REPO = Path(__file__).resolve().parents[2]
SIM_DIR = Path(__file__).resolve().parent / "cuda_sim"
WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # s2d::invariant_linear::WeightType


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> ctypes.CDLL:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot build the CUDA simulator")
    library = tmp_path_factory.mktemp("cuda_sim") / "libs2d_invariant_linear_sim.so"
    command = [
        "g++", "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas",
        "-DS2D_CUDA_SIM", f"-I{SIM_DIR}", f"-I{REPO / 'csrc' / 'include'}", f"-I{REPO / 'csrc'}",
        str(SIM_DIR / "sim_invariant_linear.cpp"), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA simulator failed:\n{result.stderr[-4000:]}")
    lib = ctypes.CDLL(str(library))
    pointer = ctypes.c_void_p
    lib.sim_invariant_linear.argtypes = [pointer, pointer, ctypes.c_int, pointer, pointer]
    lib.sim_invariant_linear.argtypes += [ctypes.c_int64] * 3
    lib.sim_invariant_linear.restype = ctypes.c_int
    return lib


def run_sim(lib, x, weight, bias):
    rows, k = x.shape
    n = weight.shape[0]
    x = x.float().contiguous()
    weight = weight.contiguous()
    y = torch.full((rows, n), -12345.0)  # NOTE: poisoned: an output no thread wrote shows up
    bias_ptr = bias.float().contiguous().data_ptr() if bias is not None else None
    status = lib.sim_invariant_linear(
        x.data_ptr(), weight.data_ptr(), WEIGHT_TYPES[weight.dtype], bias_ptr, y.data_ptr(), rows, k, n
    )
    assert status == 0
    return y


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("rows", "k", "n", "has_bias"), [(1, 5, 3, True), (6, 33, 5, False), (9, 70, 7, True)]
)
def test_matches_reference(sim, w_dtype, rows, k, n, has_bias):
    gen = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=gen)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(w_dtype)
    bias = torch.randn(n, generator=gen) if has_bias else None
    y = run_sim(sim, x, weight, bias)
    expected = invariant_linear_reference(x, weight, bias)
    assert torch.allclose(y, expected, atol=2e-5, rtol=2e-5)
    for t in range(rows):
        assert torch.equal(run_sim(sim, x[t : t + 1], weight, bias), y[t : t + 1])
