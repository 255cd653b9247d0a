// Counter-based random numbers shared by every backend (C++, CUDA; Triton and the
// PyTorch reference re-implement the same function bit for bit).
//
// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11).
// A draw is a pure function of (key, counter), so a row's random numbers depend only on
// its own seed/offset and on the position being decided, never on the batch layout.
//
// Counter layout used by s2d ops (see s2d_ext/ops/philox.py, the readable spec):
//   key     = (seed_lo, seed_hi)                      per-row int64 seed
//   counter = (block, (stream << 16) | position, offset_lo, offset_hi)
//   stream  = kStreamAccept   : c0 = 0, word 0 -> the accept/reject uniform at a position
//             kStreamSample   : c0 = v >> 2, word v & 3 -> the race uniform of vocab entry v
//             kStreamDraft    : like kStreamSample, for draft-side sampling
//             s | kStreamBlockFlag : the block stage of a two-level race on stream s, index = block
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define S2D_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define S2D_HOST_DEVICE inline
#endif

namespace s2d {

constexpr uint32_t kStreamAccept = 0;
constexpr uint32_t kStreamSample = 1;
constexpr uint32_t kStreamDraft = 2;
constexpr uint32_t kStreamBlockFlag = 0x10;

struct PhiloxOut {
  uint32_t x[4];
};

S2D_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

S2D_HOST_DEVICE PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                        uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return PhiloxOut{{c0, c1, c2, c3}};
}

// Maps 32 random bits to a float in (0, 1]: ((x >> 8) + 0.5) * 2^-24, identical on every backend.
// Never 0. NOTE: the top value (2^24 - 0.5) * 2^-24 rounds to exactly 1.0 in float32 (probability
// 2^-24), so a sampler that divides by -log(u) clamps u below 1 first (kRaceMaxUniform, verify).
S2D_HOST_DEVICE float uniform_open01(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// The uniform for (seed, offset, stream, position, index), per the layout above.
S2D_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset, uint32_t stream,
                                     uint32_t position, uint32_t index) {
  const PhiloxOut out =
      philox4x32_10(index >> 2, (stream << 16) | position, static_cast<uint32_t>(offset),
                    static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
                    static_cast<uint32_t>(seed >> 32));
  return uniform_open01(out.x[index & 3]);
}

}  // namespace s2d
