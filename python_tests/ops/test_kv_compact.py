"""kv_compact: every backend against the reference (bit exact), plus input checks."""

from __future__ import annotations

import pytest
import torch

from python_tests.conftest import DEVICES, backends_for
from s2d_ext.ops import kv_compact, kv_compact_layers

CASES = [(device, backend) for device in DEVICES for backend in backends_for("kv_compact", device)]


def make_case(batch, heads, slots, dim, slots_out, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(batch, heads, slots, dim, generator=gen).to(device=device, dtype=dtype)
    index = torch.randint(-1, slots, (batch, slots_out), generator=gen).to(device)
    return cache, index


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("batch", "heads", "slots", "dim", "slots_out"), [(2, 3, 7, 5, 4), (1, 2, 33, 64, 40), (3, 1, 5, 1, 5)]
)
def test_matches_reference(device, backend, dtype, batch, heads, slots, dim, slots_out):
    cache, index = make_case(batch, heads, slots, dim, slots_out, dtype, device)
    out = kv_compact(cache, index, backend=backend)
    expected = kv_compact(cache, index, backend="reference")
    assert out.shape == (batch, heads, slots_out, dim) and out.dtype == dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_semantics(device):
    cache = torch.arange(2 * 2 * 4 * 3, dtype=torch.float32, device=device).reshape(2, 2, 4, 3)
    index = torch.tensor([[3, -1, 0], [1, 1, -1]], device=device)
    out = kv_compact(cache, index, backend="reference")
    for b in range(2):
        for h in range(2):
            for i in range(3):
                slot = index[b, i].item()
                want = cache[b, h, slot] if slot >= 0 else torch.zeros(3, device=device)
                assert torch.equal(out[b, h, i], want)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_out_of_range_is_a_hole_in_the_kernels(device, backend):
    """The wrapper rejects out-of-range slots; the kernels themselves never read them."""
    cache, _ = make_case(2, 2, 6, 8, 4, torch.float32, device)
    index = torch.tensor([[0, 6, -7, 5], [2**40, -1, 1, -(2**40)]], device=device)
    if backend == "triton":
        from s2d_ext.triton.kv_compact import kv_compact_triton  # noqa: F401  (registers the op)
    op = torch.ops.s2d.kv_compact_triton if backend == "triton" else torch.ops.s2d.kv_compact
    out = op(cache, index)
    expected = torch.zeros_like(out)
    expected[0, :, 0], expected[0, :, 3], expected[1, :, 2] = cache[0, :, 0], cache[0, :, 5], cache[1, :, 1]
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("device", "backend"), CASES + [(d, "reference") for d in DEVICES])
def test_empty_and_non_contiguous(device, backend):
    cache, index = make_case(2, 3, 5, 4, 0, torch.float32, device)
    assert kv_compact(cache, index, backend=backend).shape == (2, 3, 0, 4)
    cache, index = make_case(2, 3, 5, 4, 3, torch.float32, device)
    strided = cache.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert torch.equal(
        kv_compact(strided, index, backend=backend), kv_compact(cache, index, backend="reference")
    )


@pytest.mark.parametrize("device", DEVICES)
def test_layers(device):
    index = torch.tensor([[2, 0], [-1, 1]], device=device)
    caches = [make_case(2, h, 4, 8, 1, torch.float32, device, seed=h)[0] for h in (1, 2)]
    outs = kv_compact_layers(caches, index)
    for cache, out in zip(caches, outs, strict=True):
        assert torch.equal(out, kv_compact(cache, index, backend="reference"))
    with pytest.raises(TypeError, match="caches"):
        kv_compact_layers(caches[0], index)


BAD_INPUTS = [
    ({"cache": "kv"}, TypeError, "cache"),
    ({"cache": torch.zeros(2, 4, 8)}, ValueError, "cache"),
    ({"cache": torch.zeros(2, 1, 4, 8, dtype=torch.int32)}, TypeError, "cache"),
    ({"index": torch.zeros(2, 3, dtype=torch.int32)}, TypeError, "index"),
    ({"index": torch.zeros(2, 3, 1, dtype=torch.int64)}, ValueError, "index"),
    ({"index": torch.zeros(3, 3, dtype=torch.int64)}, ValueError, "index"),
    ({"index": torch.tensor([[0, 4], [0, 0]])}, ValueError, "index"),
    ({"index": torch.tensor([[0, -2], [0, 0]])}, ValueError, "index"),
    ({"backend": "fpga"}, ValueError, "backend"),
]


@pytest.mark.parametrize(("change", "error", "name"), BAD_INPUTS)
def test_bad_inputs(change, error, name):
    args = {"cache": torch.zeros(2, 1, 4, 8), "index": torch.zeros(2, 3, dtype=torch.int64), **change}
    with pytest.raises(error, match=name):
        kv_compact(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch():
    with pytest.raises(ValueError, match="index"):
        kv_compact(torch.zeros(2, 1, 4, 8, device="cuda"), torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck(device, backend):
    cache, index = make_case(2, 3, 7, 5, 4, torch.float32, device)
    if backend == "triton":
        from s2d_ext.triton.kv_compact import kv_compact_triton  # noqa: F401  (registers the op)
    op = torch.ops.s2d.kv_compact_triton if backend == "triton" else torch.ops.s2d.kv_compact
    torch.library.opcheck(
        op, (cache, index), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static")
    )


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_torch_compile(device, backend):
    cache, index = make_case(2, 3, 7, 5, 4, torch.float32, device)

    def compact_and_scale(c, i):
        return kv_compact(c, i, backend=backend) * 2

    torch._dynamo.reset()
    # NOTE: not fullgraph: s2d_ext._native.has_native (shared file) is not traceable yet.
    compiled = torch.compile(compact_and_scale, backend="aot_eager")
    torch.testing.assert_close(compiled(cache, index), compact_and_scale(cache, index))
