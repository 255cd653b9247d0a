"""Philox4x32-10 in plain PyTorch: the readable spec of the random numbers every backend draws.

Every random decision in s2d ops is a pure function of ``(seed, offset, stream, position,
index)``.  The C++/CUDA version lives in ``csrc/include/s2d/philox.h`` and the Triton one in
``s2d_ext/triton/philox.py``; all three produce the same bits.

Counter layout::

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (index >> 2, (stream << 16) | position, offset & 0xffffffff, offset >> 32)
    word    = index & 3                       # which of the four outputs is used

Streams: ``STREAM_ACCEPT`` (the accept/reject uniform of a draft position, index 0),
``STREAM_SAMPLE`` (the exponential race that samples the recovered or bonus token, index = vocab
id) and ``STREAM_DRAFT`` (draft-side sampling). A race on stream ``s`` draws its block stage on
stream ``s | STREAM_BLOCK_FLAG`` (index = block number; see ``verify_reference.exponential_race``).
"""

from __future__ import annotations

import torch

STREAM_ACCEPT = 0
STREAM_SAMPLE = 1
STREAM_DRAFT = 2
STREAM_BLOCK_FLAG = 0x10  # the block stage of a two-level race on stream s uses stream s | 0x10

_MASK32 = 0xFFFFFFFF
_MUL0 = 0xD2511F53
_MUL1 = 0xCD9E8D57
_WEYL0 = 0x9E3779B9
_WEYL1 = 0xBB67AE85


def philox4x32_10(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten Philox rounds on int64 tensors holding uint32 values (broadcastable shapes)."""
    # NOTE: int64 holds every 32x32-bit product exactly only below 2**63; the product of two
    # uint32 values can reach 2**64, so the high word is assembled from 16-bit halves instead.
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_MUL0, c0)
        hi1, lo1 = _mulhilo32(_MUL1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _WEYL0) & _MASK32
        k1 = (k1 + _WEYL1) & _MASK32
    return c0, c1, c2, c3


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Schoolbook 32x32 -> 64 with 16-bit limbs; every partial product fits in int64.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p0 = a_lo * b_lo
    p1 = a_lo * b_hi
    p2 = a_hi * b_lo
    p3 = a_hi * b_hi
    cross = (p0 >> 16) + (p1 & 0xFFFF) + (p2 & 0xFFFF)
    lo = ((cross & 0xFFFF) << 16) | (p0 & 0xFFFF)
    hi = p3 + (p1 >> 16) + (p2 >> 16) + (cross >> 16)
    return hi & _MASK32, lo & _MASK32


def uniform_open01(bits: torch.Tensor) -> torch.Tensor:
    """Map uint32 values (in int64) to float32 in (0, 1]: ``((bits >> 8) + 0.5) * 2**-24``.

    NOTE: the largest value rounds to exactly 1.0 in float32 (probability 2**-24); samplers that
    divide by ``-log(u)`` clamp it first (see ``verify_reference.exponential_race``).
    """
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def philox_uniform(
    seed: torch.Tensor,
    offset: torch.Tensor,
    stream: int,
    position: torch.Tensor | int,
    index: torch.Tensor | int,
) -> torch.Tensor:
    """Uniforms in (0, 1] for the given counters; all arguments broadcast together.

    Parameters
    ----------
    seed, offset : torch.Tensor
        int64 per-row key and counter offset (any broadcastable shape).
    stream : int
        One of ``STREAM_ACCEPT``, ``STREAM_SAMPLE``, ``STREAM_DRAFT``, optionally ``| STREAM_BLOCK_FLAG``.
    position, index : torch.Tensor or int
        Draft position (< 2**16) and vocabulary index (< 2**32).
    """
    device = seed.device
    seed = seed.to(torch.int64)
    offset = offset.to(torch.int64, copy=False)
    position = torch.as_tensor(position, dtype=torch.int64, device=device)
    index = torch.as_tensor(index, dtype=torch.int64, device=device)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2, c3 = offset & _MASK32, (offset >> 32) & _MASK32
    c0 = index >> 2
    c1 = (stream << 16) | position
    words = philox4x32_10(c0, c1, c2, c3, k0, k1)
    word = index & 3
    word, *_ = torch.broadcast_tensors(word, words[0])
    bits = torch.where(
        word == 0, words[0], torch.where(word == 1, words[1], torch.where(word == 2, words[2], words[3]))
    )
    return uniform_open01(bits)
