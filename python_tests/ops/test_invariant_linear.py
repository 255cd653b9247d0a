"""invariant_linear: every backend against the reference (float32 rounding), row invariance bit for bit,
the AVX2 and portable CPU builds bit for bit, non-finite inputs, odd shapes and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from python_tests.conftest import DEVICES, backends_for
from s2d_ext.ops import invariant_linear

CASES = [(device, backend) for device in DEVICES for backend in backends_for("invariant_linear", device)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, K, N): K below, at and past one 8-lane group and the Triton K block, N not a multiple of any block
SHAPES = [(1, 1, 1), (3, 7, 5), (7, 8, 37), (13, 13, 3), (4, 70, 45), (2, 1037, 33), (5, 19, 7), (6, 70, 45)]


def make_case(rows, k, n, x_dtype, w_dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(device=device, dtype=x_dtype)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(device=device, dtype=w_dtype)
    b = torch.randn(n, generator=gen).to(device) if bias else None
    return x, weight, b


def tolerance(x_dtype):
    # NOTE: float32 accumulation in another order than torch's; a bf16 / fp16 output rounds once more.
    return {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[x_dtype]


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
def test_matches_reference(device, backend, x_dtype, w_dtype, rows, k, n):
    x, weight, bias = make_case(rows, k, n, x_dtype, w_dtype, device)
    out = invariant_linear(x, weight, bias, backend=backend)
    expected = invariant_linear(x, weight, bias, backend="reference")
    assert out.shape == (rows, n) and out.dtype == x_dtype
    scale = expected.float().abs().max().clamp(min=1.0)
    assert (out.float() - expected.float()).abs().max() <= tolerance(x_dtype) * scale


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_row_invariance(device, backend, w_dtype):
    """Row t's output is the same bits alone, in any slice, and with the rows in another order."""
    x, weight, bias = make_case(11, 203, 29, torch.float32, w_dtype, device)
    full = invariant_linear(x, weight, bias, backend=backend)
    for t in range(11):
        assert torch.equal(invariant_linear(x[t : t + 1], weight, bias, backend=backend), full[t : t + 1])
    for lo, hi in [(0, 2), (3, 7), (2, 11), (5, 9), (1, 6), (4, 10), (0, 8)]:  # 2-9 rows: every block plan
        assert torch.equal(invariant_linear(x[lo:hi], weight, bias, backend=backend), full[lo:hi])
    order = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(invariant_linear(x[order], weight, bias, backend=backend), full[order])


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_leading_dims_and_bias_dtype(device, backend):
    x, weight, _ = make_case(6, 24, 10, torch.bfloat16, torch.bfloat16, device)
    bias = torch.randn(10, device=device).bfloat16()
    out = invariant_linear(x.view(2, 3, 24), weight, bias, backend=backend)
    assert out.shape == (2, 3, 10)
    assert torch.equal(out.view(6, 10), invariant_linear(x, weight, bias, backend=backend))


@pytest.mark.parametrize(("device", "backend"), CASES + [(d, "reference") for d in DEVICES])
def test_empty_and_non_contiguous(device, backend):
    x, weight, bias = make_case(0, 9, 4, torch.float32, torch.float32, device)
    assert invariant_linear(x, weight, bias, backend=backend).shape == (0, 4)
    x, weight, _ = make_case(3, 9, 0, torch.float32, torch.float32, device, bias=False)
    assert invariant_linear(x, weight, backend=backend).shape == (3, 0)
    x, weight, bias = make_case(3, 0, 4, torch.float32, torch.float32, device)
    assert torch.equal(invariant_linear(x, weight, bias, backend=backend), bias.expand(3, 4))
    x, weight, bias = make_case(5, 16, 12, torch.float32, torch.float32, device)
    strided = weight.t().contiguous().t()  # same values, column-major
    out = invariant_linear(x[:, ::1], strided, bias, backend=backend)
    assert torch.allclose(out, invariant_linear(x, weight, bias, backend="reference"), atol=1e-5)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_non_finite(device, backend):
    """An infinite or NaN weight or input: that output is the reference's; the others are unchanged."""
    x, weight, bias = make_case(3, 20, 6, torch.float32, torch.float32, device)
    weight[1, 4], weight[2, 0], x[2, 7] = float("inf"), float("nan"), float("-inf")
    out = invariant_linear(x, weight, bias, backend=backend)
    expected = invariant_linear(x, weight, bias, backend="reference")
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(out[finite], expected[finite], atol=1e-5)


_BUILD_BITS = textwrap.dedent(
    """
    import sys, torch
    import s2d_ext._native  # noqa: F401
    torch.manual_seed(0)
    outs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(37, 1037) / 32).to(dtype)
        for rows in (1, 5, 6, 9):  # every block plan
            outs.append(torch.ops.s2d.invariant_linear(torch.randn(rows, 1037), w, torch.randn(37)))
    torch.save((torch.ops.s2d.invariant_linear_uses_avx2(), outs), sys.argv[1])
    """
)


@pytest.mark.skipif("cpu" not in backends_for("invariant_linear", "cpu"), reason="no C++ kernels built")
def test_avx2_and_portable_builds_agree_to_the_bit(tmp_path):
    results = []
    for portable in ("0", "1"):
        path = tmp_path / f"out{portable}.pt"
        env = dict(os.environ, S2D_INVARIANT_LINEAR_PORTABLE=portable)
        subprocess.run([sys.executable, "-c", _BUILD_BITS, str(path)], check=True, env=env)
        results.append(torch.load(path))
    (avx2, fast), (portable_avx2, portable) = results
    assert not portable_avx2
    if not avx2:
        pytest.skip("this CPU has no AVX2 + FMA + F16C: only the portable build runs")
    for a, b in zip(fast, portable, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in backends_for("invariant_linear", "cpu"), reason="no C++ kernels built")
def test_opcheck():
    x, weight, bias = make_case(3, 16, 5, torch.bfloat16, torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.s2d.invariant_linear, (x, weight, bias))
    torch.library.opcheck(torch.ops.s2d.invariant_linear, (x.float(), weight.float(), None))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    x, weight, bias = make_case(2, 8, 4, torch.float32, torch.float32, device)
    with pytest.raises(TypeError, match="x must have dtype"):
        invariant_linear(x.long(), weight)
    with pytest.raises(TypeError, match="weight must have dtype"):
        invariant_linear(x, weight.double())
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        invariant_linear(x, weight[None])
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K=8\]"):
        invariant_linear(x[:, :5], weight)
    with pytest.raises(ValueError, match="bias must be a floating"):
        invariant_linear(x, weight, bias[:3])
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        invariant_linear(x, [[1.0]])
    with pytest.raises(ValueError, match="backend"):
        invariant_linear(x, weight, backend="gpu")


@pytest.mark.skipif("cpu" not in backends_for("invariant_linear", "cpu"), reason="no C++ kernels built")
def test_bad_input_cpp_binding():
    """The op itself (validate nothing in Python) refuses what its kernel cannot read."""
    x, weight, bias = make_case(2, 8, 4, torch.float32, torch.float32, "cpu")
    op = torch.ops.s2d.invariant_linear
    with pytest.raises(RuntimeError, match="weight must be \\[N, K\\]"):
        op(x, weight[None], None)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        op(x, torch.randn(8, 4).t(), None)
    with pytest.raises(RuntimeError, match="x must be"):
        op(x[:, :3], weight, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, weight, bias[:2])
    with pytest.raises(RuntimeError, match="weight must be float32, bfloat16 or float16"):
        op(x, weight.double(), None)
