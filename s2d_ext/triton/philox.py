"""Philox4x32-10 in Triton: the same bits as ``s2d_ext/ops/philox.py`` (the spec) and
``csrc/include/s2d/philox.h``.

uint32 arithmetic throughout (``tl.umulhi`` for the high words), so it runs unchanged on GPUs and
in the interpreter (``TRITON_INTERPRET=1``). Counter layout, as in the spec::

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (index >> 2, (stream << 16) | position, offset & 0xffffffff, offset >> 32)
    word    = index & 3
"""

from __future__ import annotations

import triton
import triton.language as tl

STREAM_ACCEPT = tl.constexpr(0)
STREAM_SAMPLE = tl.constexpr(1)
STREAM_DRAFT = tl.constexpr(2)
STREAM_BLOCK_FLAG = tl.constexpr(0x10)  # the block stage of a two-level race on stream s


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds; every argument is tl.uint32 (tensors broadcast together)."""
    for _ in tl.static_range(10):
        mul0 = tl.full((), 0xD2511F53, tl.uint32)
        mul1 = tl.full((), 0xCD9E8D57, tl.uint32)
        hi0 = tl.umulhi(mul0, c0)
        lo0 = mul0 * c0
        hi1 = tl.umulhi(mul1, c2)
        lo1 = mul1 * c2
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + tl.full((), 0x9E3779B9, tl.uint32)
        k1 = k1 + tl.full((), 0xBB67AE85, tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def split_u64(value):
    """int64 -> (low, high) uint32 words of its two's-complement bits."""
    value = value.to(tl.int64)
    low = (value & 0xFFFFFFFF).to(tl.uint32)
    high = ((value >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return low, high


@triton.jit
def uniform_open01(bits):
    """uint32 -> float32 ``((bits >> 8) + 0.5) * 2**-24``, as in the spec."""
    return ((bits >> 8).to(tl.int32).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def philox_uniform(seed, offset, stream: tl.constexpr, position, index):
    """Uniforms in (0, 1] (see uniform_open01) for int64 seed/offset, int position and index."""
    k0, k1 = split_u64(seed)
    c2, c3 = split_u64(offset)
    index = tl.cast(index, tl.uint32)
    c0 = index >> 2
    c1 = tl.cast(position, tl.uint32) | (stream << 16)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    word = index & 3
    bits = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    return uniform_open01(bits)
