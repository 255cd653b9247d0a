"""Philox4x32-10: the torch spec, the C++ header and the Triton port give the same bits."""

from __future__ import annotations

import pytest
import torch

from s2d_ext import _native
from s2d_ext.ops.philox import STREAM_SAMPLE, philox4x32_10, philox_uniform, uniform_open01

# Known answer of Random123 (kat_vectors: philox4x32_10, zero counter and key).
KNOWN_ZERO = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
# Random123 kat_vectors: all-ones counter and key.
KNOWN_ONES = (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


def _random_words(n: int, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    words = torch.randint(0, 2**32, (n, columns), generator=generator, dtype=torch.int64)
    words[0] = 0
    words[1] = 2**32 - 1
    return words


def _torch_words(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.stack(philox4x32_10(*counters.unbind(-1), *keys.unbind(-1)), dim=-1)


def test_known_answers_torch():
    zero = torch.zeros(1, dtype=torch.int64)
    assert tuple(int(w) for w in philox4x32_10(zero, zero, zero, zero, zero, zero)) == KNOWN_ZERO
    ones = torch.full((1,), 2**32 - 1, dtype=torch.int64)
    assert tuple(int(w) for w in philox4x32_10(ones, ones, ones, ones, ones, ones)) == KNOWN_ONES


@pytest.mark.skipif(not _native.has_native("verify"), reason="C++ verify library not built")
def test_cpp_matches_torch():
    counters, keys = _random_words(4096, 4), _random_words(4096, 2)
    cpp = torch.ops.s2d.verify_philox(counters, keys)
    assert torch.equal(cpp, _torch_words(counters, keys))
    zeros = torch.zeros(1, 4, dtype=torch.int64)
    assert tuple(cpp.new_tensor(KNOWN_ZERO).tolist()) == tuple(
        torch.ops.s2d.verify_philox(zeros, zeros[:, :2])[0].tolist()
    )


def test_uniform_range_and_the_atom_at_one():
    bits = torch.tensor([0, 255, 2**31, 2**32 - 257, 2**32 - 256, 2**32 - 1], dtype=torch.int64)
    u = uniform_open01(bits)
    assert bool((u > 0).all())
    # NOTE: (2^24 - 1) + 0.5 rounds up in float32, so the top 256 bit patterns give exactly 1.0;
    # the verify race clamps it (see s2d_ext/ops/verify_reference.exponential_race).
    assert u[-1].item() == 1.0 and u[-2].item() == 1.0 and u[-3].item() < 1.0


def _triton_or_skip():
    if not _native.has_triton():
        pytest.skip("triton not installed")
    from s2d_ext.ops._backend import triton_usable

    if not triton_usable(torch.device("cpu")) and not torch.cuda.is_available():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return "cuda" if torch.cuda.is_available() else "cpu"


if _native.has_triton():
    import triton
    import triton.language as tl

    from s2d_ext.triton.philox import philox4x32_10 as triton_philox
    from s2d_ext.triton.philox import philox_uniform as triton_uniform

    @triton.jit
    def _words_kernel(counter_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        c0 = tl.load(counter_ptr + rows * 4 + 0, mask=mask, other=0).to(tl.uint32)
        c1 = tl.load(counter_ptr + rows * 4 + 1, mask=mask, other=0).to(tl.uint32)
        c2 = tl.load(counter_ptr + rows * 4 + 2, mask=mask, other=0).to(tl.uint32)
        c3 = tl.load(counter_ptr + rows * 4 + 3, mask=mask, other=0).to(tl.uint32)
        k0 = tl.load(key_ptr + rows * 2 + 0, mask=mask, other=0).to(tl.uint32)
        k1 = tl.load(key_ptr + rows * 2 + 1, mask=mask, other=0).to(tl.uint32)
        w0, w1, w2, w3 = triton_philox(c0, c1, c2, c3, k0, k1)
        tl.store(out_ptr + rows * 4 + 0, w0.to(tl.int64), mask=mask)
        tl.store(out_ptr + rows * 4 + 1, w1.to(tl.int64), mask=mask)
        tl.store(out_ptr + rows * 4 + 2, w2.to(tl.int64), mask=mask)
        tl.store(out_ptr + rows * 4 + 3, w3.to(tl.int64), mask=mask)

    @triton.jit
    def _uniform_kernel(seed, offset, position, out_ptr, n, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u = triton_uniform(seed, offset, 1, position + tl.zeros((BLOCK,), tl.int32), index)
        tl.store(out_ptr + index, u, mask=index < n)


def test_triton_matches_torch():
    device = _triton_or_skip()
    n = 256
    counters, keys = _random_words(n, 4), _random_words(n, 2)
    out = torch.empty(n, 4, dtype=torch.int64, device=device)
    _words_kernel[(triton.cdiv(n, 64),)](counters.to(device), keys.to(device), out, n, BLOCK=64)
    assert torch.equal(out.cpu(), _torch_words(counters, keys))

    seed, offset, position = -(2**62) + 12345, 2**40 + 7, 3
    u = torch.empty(n, dtype=torch.float32, device=device)
    _uniform_kernel[(triton.cdiv(n, 64),)](seed, offset, position, u, n, BLOCK=64)
    expected = philox_uniform(
        torch.tensor([seed]), torch.tensor([offset]), STREAM_SAMPLE, position, torch.arange(n)
    )
    assert torch.equal(u.cpu(), expected)
