// CPU kernel of the verify op (speculative-sampling verification), framework-free.
//
// Spec: s2d_ext/ops/verify_reference.py. One row at a time (the binding hands rows to threads):
//   pass 1, position j = 0, 1, ...: one read of the logits at j gives the online max / sum-exp of
//           the processed scores (greedy rows: max + argmax only) and p(x_j); the accept test
//           u * q(x_j) < p(x_j) decides whether to go on. Stops at the first rejection or at the
//           bonus position num_draft. Sampled rows first try a cheap pass (approx_accept: the
//           sum-exp to within a few percent, enough for most accept tests) and run the exact one
//           only where that leaves the verdict unsure and at the emitting position, whose exps
//           stay in a per-thread scratch (V floats, in cache) for pass 2.
//   pass 2, sampled rows only, at the emitting position: the two-level exponential race on the
//           residual max(0, p - q) (or p minus the point-mass draft token, or p for the bonus
//           token), with p read from the scratch: one sweep of the scratch (and of the q row)
//           gives the weight sum of every block of 64 ids, a race over the V / 64 blocks picks
//           one, a race over its 64 ids picks the token. The logits are not read again.
// Probabilities are never materialised; everything is reduced in float32.
//
// Speed: the hot loops use explicit 8-wide vectors (GCC/Clang vector extensions) with two
// independent accumulators, exp/log are polynomials (Cephes), Philox runs on 8 counters at once,
// and pass 1 prefetches the next chunk while it computes exps. The binding picks an AVX2+FMA
// build of the same code at run time where the CPU has it (see the NOTE below); the default
// build stays portable.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "s2d/philox.h"
#include "s2d/verify_common.h"

#if defined(__GNUC__) || defined(__clang__)
#define S2D_CPU_INLINE inline __attribute__((always_inline))
#define S2D_CPU_NOINLINE inline __attribute__((noinline))
#else
#define S2D_CPU_INLINE inline
#define S2D_CPU_NOINLINE inline
#endif

// NOTE: this header is compiled twice: as s2d::verify_cpu (portable flags) and, by
// csrc/verify/verify_avx2_cpu.cpp, as s2d::verify_cpu_avx2 under `#pragma GCC target("avx2,fma")`
// with S2D_VERIFY_AVX2_INTRINSICS; distinct namespaces keep the two builds' symbols apart.
#ifndef S2D_VERIFY_CPU_NS
#define S2D_VERIFY_CPU_NS verify_cpu
#endif

namespace s2d {
namespace S2D_VERIFY_CPU_NS {

constexpr int kChunk = 2048;  // scores buffered per pass-1 chunk (8 KiB, stays in L1)
// kRaceBlock (verify_common.h): 64 ids per race block = 16 Philox counters x 4 words.
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kFloatMax = std::numeric_limits<float>::max();

S2D_CPU_INLINE float from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

S2D_CPU_INLINE uint32_t to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// 8-wide vectors (GCC/Clang vector extensions): AVX2 registers in the AVX2 build, SSE pairs in
// the portable one. NOTE: explicit vectors, because the auto-vectoriser gave up on these loops.
typedef float VecF __attribute__((vector_size(32)));
typedef int32_t VecI __attribute__((vector_size(32)));
typedef uint32_t VecU __attribute__((vector_size(32)));
typedef uint64_t VecU64 __attribute__((vector_size(32)));
typedef uint16_t VecH __attribute__((vector_size(16)));
constexpr int kVec = 8;

S2D_CPU_INLINE VecF splat(float x) { return VecF{} + x; }
S2D_CPU_INLINE VecI splat_int(int32_t x) { return VecI{} + x; }
S2D_CPU_INLINE VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
S2D_CPU_INLINE void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }
// a > b ? a : b and a < b ? a : b, NaN in a giving b: exactly MAXPS / MINPS.
S2D_CPU_INLINE VecF vmax(VecF a, VecF b) {
#if defined(S2D_VERIFY_AVX2_INTRINSICS)
  return (VecF)_mm256_max_ps((__m256)a, (__m256)b);
#else
  return a > b ? a : b;
#endif
}
S2D_CPU_INLINE VecF vmin(VecF a, VecF b) {
#if defined(S2D_VERIFY_AVX2_INTRINSICS)
  return (VecF)_mm256_min_ps((__m256)a, (__m256)b);
#else
  return a < b ? a : b;
#endif
}
S2D_CPU_INLINE VecU widen_u16(const uint16_t* p) {
  VecH h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, VecU);
}

// Logit loaders: storage type -> float32, branch-free so that they vectorise.
struct Float32Logits {
  using Storage = float;
  static S2D_CPU_INLINE float load(float x) { return x; }
  static S2D_CPU_INLINE VecF load8(const float* p) { return load_vec(p); }
};

struct BFloat16Logits {
  using Storage = uint16_t;
  static S2D_CPU_INLINE float load(uint16_t x) { return from_bits(static_cast<uint32_t>(x) << 16); }
  static S2D_CPU_INLINE VecF load8(const uint16_t* p) { return (VecF)(widen_u16(p) << 16); }
};

struct Float16Logits {
  using Storage = uint16_t;
  static S2D_CPU_INLINE float load(uint16_t x) {
    const uint32_t h = x;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t exp_mantissa = h & 0x7fffu;
    // NOTE: shifting exponent+mantissa into float position and scaling by 2^(127-15) handles
    // normal and subnormal halves alike; inf/NaN keep an all-ones exponent.
    float magnitude = from_bits(exp_mantissa << 13) * 5.192296858534828e+33f;  // 2^112
    magnitude = exp_mantissa >= 0x7c00u ? from_bits((exp_mantissa << 13) | 0x7f800000u) : magnitude;
    return from_bits(to_bits(magnitude) | sign);
  }
  static S2D_CPU_INLINE VecF load8(const uint16_t* p) {
    const VecU h = widen_u16(p);
    const VecU sign = (h & 0x8000u) << 16;
    const VecU exp_mantissa = h & 0x7fffu;
    VecF magnitude = (VecF)(exp_mantissa << 13) * 5.192296858534828e+33f;
    const VecF special = (VecF)((exp_mantissa << 13) | 0x7f800000u);
    magnitude = exp_mantissa >= 0x7c00u ? special : magnitude;
    return (VecF)((VecU)magnitude | sign);
  }
};

// NaN -> -inf, +inf -> float32 max (the reference's sanitize, per element).
S2D_CPU_INLINE float sanitize(float s) {
  s = s != s ? -kInf : s;
  return s == kInf ? kFloatMax : s;
}

// exp(x), meant for x <= 0; exactly 0 below -87 (and for -inf). Cephes expf polynomial.
S2D_CPU_INLINE float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  const float xc = underflow ? -87.0f : x;
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest integer
  const float n = shifted - 12582912.0f;
  const int32_t exponent = static_cast<int32_t>(n);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const float result = y * from_bits(static_cast<uint32_t>(exponent + 127) << 23);
  return underflow ? 0.0f : result;
}

// NaN -> -inf (vmax keeps the second operand for NaN), +inf -> float32 max.
S2D_CPU_INLINE VecF sanitize(VecF s) { return vmin(vmax(s, splat(-kInf)), splat(kFloatMax)); }

// exp(x) for x <= 0, 8 lanes; exactly 0 below -87, for -inf and for NaN. As 2^t, t = x log2(e):
// t = n + f with n integer and |f| <= 1/2, 2^f by a degree-6 polynomial (relative error < 1e-7
// on [-87, 0], as the scalar Cephes version), times 2^n by adding n to the exponent bits.
// NOTE: cheaper than the scalar version's ln 2 range reduction (7 multiply-adds instead of 11),
// and it runs once per logit of every position pass 1 reads. NOTE: x is not clamped: below -87
// (and for -inf or NaN) the lanes compute garbage that the final mask turns into 0, which saves
// an op and a live constant in the hot loop (fewer constants keep its accumulators in registers).
S2D_CPU_INLINE VecF exp_nonpositive(VecF x) {
  const VecI keep = x >= -87.0f;
  const VecF shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23 + round(t)
  const VecF n = shifted - 12582912.0f;
  VecF f = x * 1.44269504088896341f - n;
  f = x * 1.925963033500011e-8f + f;  // the rest of log2(e) beyond float precision
  VecF y = splat(1.535336188319500e-4f);
  y = y * f + 1.339887440266574e-3f;
  y = y * f + 9.618437357674640e-3f;
  y = y * f + 5.550332471162809e-2f;
  y = y * f + 2.402264791363012e-1f;
  y = y * f + 6.931472028550421e-1f;
  y = y * f + 1.0f;
  // NOTE: y * 2^n by adding n << 23 to y's bits. `shifted` holds n (an integer in [-126, 0]) in
  // its low mantissa bits above 0x4b400000, and every set bit of 0x4b400000 shifts out of the
  // 32-bit lane, so shifted's bits << 23 are n << 23. x >= -87 keeps t >= -125.6, so where
  // n = -126, f > 0 and y > 1: the result stays a normal float.
  return (VecF)(((VecI)y + ((VecI)shifted << 23)) & keep);
}

// log(u) for normal floats u in (0, 1], 8 lanes. Cephes logf polynomial.
S2D_CPU_INLINE VecF log_unit(VecF u) {
  const VecU bits = (VecU)u;
  const VecI exponent = (VecI)(bits >> 23) - 126;
  const VecF m = (VecF)((bits & 0x007fffffu) | 0x3f000000u);
  const VecI small = m < 0.707106781186547524f;
  const VecF x = small ? m + m - 1.0f : m - 1.0f;
  const VecF e = __builtin_convertvector(exponent + small, VecF);  // small is -1 where true
  const VecF z = x * x;
  VecF y = splat(7.0376836292e-2f);
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return x + y + e * 0.693359375f;
}

// (hi, lo) of the 32x32 -> 64-bit products m * a, per lane.
S2D_CPU_INLINE void mulhilo(uint32_t m, VecU a, VecU& hi, VecU& lo) {
#if defined(S2D_VERIFY_AVX2_INTRINSICS)
  const __m256i wide_m = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32((__m256i)a, wide_m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64((__m256i)a, 32), wide_m);
  lo = (VecU)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = (VecU)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
#else
  const VecU64 wide_m = VecU64{} + m;
  const VecU64 even = ((VecU64)a & 0xffffffffull) * wide_m;
  const VecU64 odd = ((VecU64)a >> 32) * wide_m;
  lo = (VecU)((even & 0xffffffffull) | (odd << 32));
  hi = (VecU)((even >> 32) | (odd & 0xffffffff00000000ull));
#endif
}

// Philox4x32-10 on 2 x 8 counters (c0 per lane; c1..c3 and the key shared). NOTE: two
// independent groups per round, because one group alone is bound by the multiply latency.
S2D_CPU_INLINE void philox_vec(const VecU (&c0_init)[2], uint32_t c1_init, uint32_t c2_init,
                               uint32_t c3_init, uint32_t k0, uint32_t k1, VecU (&out)[2][4]) {
  VecU c0[2], c1[2], c2[2], c3[2];
  for (int g = 0; g < 2; ++g) {
    c0[g] = c0_init[g];
    c1[g] = VecU{} + c1_init;
    c2[g] = VecU{} + c2_init;
    c3[g] = VecU{} + c3_init;
  }
  for (int round = 0; round < 10; ++round) {
    for (int g = 0; g < 2; ++g) {
      VecU hi0, lo0, hi1, lo1;
      mulhilo(0xD2511F53u, c0[g], hi0, lo0);
      mulhilo(0xCD9E8D57u, c2[g], hi1, lo1);
      const VecU n0 = hi1 ^ c1[g] ^ k0;
      const VecU n2 = hi0 ^ c3[g] ^ k1;
      c0[g] = n0;
      c1[g] = lo1;
      c2[g] = n2;
      c3[g] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int g = 0; g < 2; ++g) {
    out[g][0] = c0[g];
    out[g][1] = c1[g];
    out[g][2] = c2[g];
    out[g][3] = c3[g];
  }
}

// Words w0..w3 of counters l = 0..7 -> bits of vocab entries 4 l + w in order (4 vectors of 8).
S2D_CPU_INLINE void words_to_entries(const VecU (&w)[4], VecU (&entries)[4]) {
  const VecU a = __builtin_shufflevector(w[0], w[1], 0, 8, 1, 9, 2, 10, 3, 11);
  const VecU b = __builtin_shufflevector(w[2], w[3], 0, 8, 1, 9, 2, 10, 3, 11);
  const VecU c = __builtin_shufflevector(w[0], w[1], 4, 12, 5, 13, 6, 14, 7, 15);
  const VecU d = __builtin_shufflevector(w[2], w[3], 4, 12, 5, 13, 6, 14, 7, 15);
  entries[0] = __builtin_shufflevector(a, b, 0, 1, 8, 9, 2, 3, 10, 11);
  entries[1] = __builtin_shufflevector(a, b, 4, 5, 12, 13, 6, 7, 14, 15);
  entries[2] = __builtin_shufflevector(c, d, 0, 1, 8, 9, 2, 3, 10, 11);
  entries[3] = __builtin_shufflevector(c, d, 4, 5, 12, 13, 6, 7, 14, 15);
}

// Processed (scaled, sanitised, top-k/top-p masked) score of one logit.
template <bool kDivide, bool kThreshold>
S2D_CPU_INLINE float processed_score(float logit, float temperature, float min_logit) {
  // NOTE: a true division, as in the reference, so that the threshold token compares equal.
  const float s = sanitize(kDivide ? logit / temperature : logit);
  return kThreshold && s < min_logit ? -kInf : s;
}

template <bool kDivide, bool kThreshold>
S2D_CPU_INLINE VecF processed_score(VecF logit, float temperature, float min_logit) {
  const VecF s = sanitize(kDivide ? logit / temperature : logit);
  return kThreshold ? (s < min_logit ? splat(-kInf) : s) : s;
}

S2D_CPU_INLINE float horizontal_max(VecF v) {
  float top = v[0];
  for (int l = 1; l < kVec; ++l) top = v[l] > top ? v[l] : top;
  return top;
}

S2D_CPU_INLINE float horizontal_sum(VecF v) {
  float total = 0.0f;
  for (int l = 0; l < kVec; ++l) total += v[l];
  return total;
}

struct PositionStats {
  float max;  // max processed score
  float sum;  // sum of exp(score - max)
  bool dead;  // every score -inf: the position is uniform
};

// Per-thread scratch of pass 1, kept for pass 2 (see RowScratch in verify_rows).
struct Scratch {
  float* exps;        // [round_up(V, kChunk)] exp(score - chunk_ref[v / kChunk]), last position
  float* chunk_ref;   // [ceil(V / kChunk)] the running max each chunk's exps are relative to
  float* block_sums;  // [round_up(ceil(V / kRaceBlock), kRaceBlock)] the race's stage-1 weights
};

// `count` rounded up to a multiple of 2 kVec, the length score_chunk pads a chunk's scores to.
S2D_CPU_INLINE int64_t padded_count(int64_t count) {
  return (count + 2 * kVec - 1) & ~static_cast<int64_t>(2 * kVec - 1);
}

// Bytes of the next chunk of logits to prefetch while the chunk at `start` computes: a whole
// chunk, but nothing past `prefetch_ahead` ids from the position's start (the last the row reads).
template <class Storage>
S2D_CPU_INLINE int64_t next_chunk_bytes(int64_t prefetch_ahead, int64_t start) {
  int64_t next_count = prefetch_ahead - start - kChunk;
  next_count = next_count < 0 ? 0 : (next_count > kChunk ? kChunk : next_count);
  return next_count * static_cast<int64_t>(sizeof(Storage));
}

// Processed scores of one chunk (count <= kChunk ids) into `out`, -inf padded up to a multiple of
// 2 kVec; returns their max.
// NOTE: this and exp_chunk are functions of their own, not inlined into the row loop: inlined,
// GCC ran out of vector registers there and kept the loops' accumulators on the stack, which put
// a store-to-load round trip on every iteration's dependency chain.
template <class Logits, bool kDivide, bool kThreshold>
S2D_CPU_NOINLINE float score_chunk(const typename Logits::Storage* chunk, int64_t count,
                                   float temperature, float threshold, float* out) {
  const int64_t full = count & ~static_cast<int64_t>(2 * kVec - 1);
  VecF max0 = splat(-kInf), max1 = splat(-kInf);
  for (int64_t i = 0; i < full; i += 2 * kVec) {
    const VecF s0 =
        processed_score<kDivide, kThreshold>(Logits::load8(chunk + i), temperature, threshold);
    const VecF s1 = processed_score<kDivide, kThreshold>(Logits::load8(chunk + i + kVec),
                                                         temperature, threshold);
    store_vec(out + i, s0);
    store_vec(out + i + kVec, s1);
    max0 = vmax(max0, s0);
    max1 = vmax(max1, s1);
  }
  const int64_t padded = padded_count(count);
  float chunk_max = horizontal_max(vmax(max0, max1));
  for (int64_t i = full; i < padded; ++i) {
    const float s = i < count ? processed_score<kDivide, kThreshold>(Logits::load(chunk[i]),
                                                                     temperature, threshold)
                              : -kInf;
    out[i] = s;
    chunk_max = s > chunk_max ? s : chunk_max;
  }
  return chunk_max;
}

// A software prefetch spread over a compute loop: each step() fetches the next 64-byte line of
// [start, start + bytes), until it is covered.
// NOTE: the loops below step once per 2 kVec scores, so they cover all of the next float32 chunk
// of logits, or a 16-bit one in the first half of the loop.
struct LinePrefetch {
  const char* line;
  const char* end;
  S2D_CPU_INLINE LinePrefetch(const char* start, int64_t bytes)
      : line(start), end(start + (bytes > 0 ? bytes : 0)) {}
  S2D_CPU_INLINE void step() {
    if (line < end) {
      __builtin_prefetch(line);
      line += 64;
    }
  }
};

// exp(score - shift) of `padded` (a multiple of 2 kVec) scores in place; returns their sum.
// Meanwhile prefetches the first `prefetch_bytes` bytes from `prefetch` (may be 0).
S2D_CPU_NOINLINE float exp_chunk(float* scores, int64_t padded, float shift, const char* prefetch,
                                 int64_t prefetch_bytes) {
  const VecF shift8 = splat(shift);
  VecF sum0 = splat(0.0f), sum1 = splat(0.0f);
  LinePrefetch next(prefetch, prefetch_bytes);
  for (int64_t i = 0; i < padded; i += 2 * kVec) {
    next.step();
    const VecF e0 = exp_nonpositive(load_vec(scores + i) - shift8);
    const VecF e1 = exp_nonpositive(load_vec(scores + i + kVec) - shift8);
    store_vec(scores + i, e0);
    store_vec(scores + i + kVec, e1);
    sum0 += e0;
    sum1 += e1;
  }
  return horizontal_sum(sum0 + sum1);
}

// Pass 1 of a sampled row at one position: online max and sum-exp over the vocabulary, one chunk
// of kChunk scores at a time (scores into the scratch, then the max, then exps in place, from L1).
// NOTE: the exps stay in the scratch, so that pass 2 (the race) at the emitting position reads
// neither the logits again nor recomputes an exp per entry: p_v = exps[v] * scale of its chunk.
template <class Logits, bool kDivide, bool kThreshold>
S2D_CPU_INLINE PositionStats sampled_stats(const typename Logits::Storage* logits, int64_t vocab,
                                           float temperature, float min_logit,
                                           const Scratch& scratch, int64_t prefetch_ahead) {
  using Storage = typename Logits::Storage;
  const float threshold = kThreshold ? min_logit : -kInf;
  float running_max = -kInf;
  float running_sum = 0.0f;
  for (int64_t start = 0, chunk_index = 0; start < vocab; start += kChunk, ++chunk_index) {
    const int64_t count = vocab - start < kChunk ? vocab - start : kChunk;
    const Storage* chunk = logits + start;
    float* out = scratch.exps + start;
    const float chunk_max =
        score_chunk<Logits, kDivide, kThreshold>(chunk, count, temperature, threshold, out);
    const int64_t padded = padded_count(count);
    if (chunk_max == -kInf) {
      // NOTE: zeros, not exp(-inf - running_max): that is NaN while running_max is still -inf.
      for (int64_t i = 0; i < padded; i += kVec) store_vec(out + i, splat(0.0f));
      scratch.chunk_ref[chunk_index] = -kInf;
      continue;
    }
    if (chunk_max > running_max) {
      running_sum *= exp_nonpositive(running_max - chunk_max);
      running_max = chunk_max;
    }
    scratch.chunk_ref[chunk_index] = running_max;
    // NOTE: the exps are pure compute, during which the hardware prefetcher alone leaves memory
    // idle; so the next chunk of logits (possibly the next position's) is fetched meanwhile.
    running_sum +=
        exp_chunk(out, padded, running_max, reinterpret_cast<const char*>(chunk + kChunk),
                  next_chunk_bytes<Storage>(prefetch_ahead, start));
  }
  PositionStats stats;
  stats.dead = running_max == -kInf;
  stats.max = stats.dead ? 0.0f : running_max;
  stats.sum = stats.dead ? static_cast<float>(vocab) : running_sum;
  return stats;
}

// ---- The approximate accept test -------------------------------------------------------------
// A draft token is accepted when u q(x) < p(x) = exp(s_x - max) / Z. Deciding that needs Z only to
// the precision that separates u q(x) from p(x), which is seldom close: a pass that computes Z to
// within a few percent with a cheap exp, and p(x) from it, settles most accept tests; pass 1 runs
// exactly (sampled_stats) only where the verdict is unsure and at the emitting position, whose
// exps the race needs. This leaves the tokens bit for bit those of the exact test.
// NOTE: why it pays: the exact pass costs about 20 vector ops per 8 logits, and it ran at every
// position a row reads, so the kernel was bound by compute at about half the memory bandwidth;
// the cheap pass (about 6 ops per 8 besides the scores) is bound by memory, and the exact pass
// now runs at one position per row, on logits the cheap pass has just brought into the cache.
//
// Why the verdict is safe (all ratios are to the true real-number values):
// - the cheap exp 2^n (1 + f), for t = x / ln 2 = n + f with 0 <= f < 1, is 1 to 1.06148 times
//   2^t ((1 + f) / 2^f peaks at f = 1 / ln 2 - 1), less the truncation to an integer and the
//   rounding of x * 2^23 / ln 2 + 127 * 2^23 near 2^30 (both within 2e-5 relative); x below -87
//   counts 2^-125.5, which is nothing against Z >= 1 (the max's own term);
// - its chunk sums are float sums of at most 128 terms per lane (within 2e-5), added up in double;
// - the exact pass's Z has the polynomial exp's error (1e-7) plus float rounding along a chain of
//   at most 132 + 3 * ceil(V / kChunk) operations: within 1.2e-4 while V <= kApproxMaxVocab;
// - exp(s_x - max) is the same float in both (same std::exp call on the same operands).
// So p_exact / p_approx = Z_approx / Z_exact lies in [1 - 2^-12, 1.06148 (1 + 2^-12)], and
// kApproxSlack = 2^-10 leaves four times that margin.
constexpr double kApproxExpMaxRatio = 1.06148;
constexpr double kApproxSlack = 1.0 / 1024;
constexpr int64_t kApproxMaxVocab = int64_t{1} << 20;  // beyond it every position runs exactly

enum class Verdict : int { kAccept, kReject, kUnsure };

// The cheap exp: 2^n (1 + f) for x / ln 2 = n + f, 0 <= f < 1 (bounds above), x clamped to -87.
// NOTE: x * 2^23 / ln 2 + 127 * 2^23, truncated to an integer, is the bit pattern of 2^n (1 + f):
// n lands in the exponent field, f in the mantissa.
S2D_CPU_INLINE VecF cheap_exp(VecF x) {
  const VecF clamped = vmax(x, splat(-87.0f));
  return (VecF) __builtin_convertvector(clamped * 12102203.161561485f + 1065353216.0f, VecI);
}

S2D_CPU_INLINE float cheap_exp(float x) {
  const float clamped = x > -87.0f ? x : -87.0f;
  return from_bits(
      static_cast<uint32_t>(static_cast<int32_t>(clamped * 12102203.161561485f + 1065353216.0f)));
}

// sum of the cheap exp(score - shift) over `padded` (a multiple of 2 kVec) scores <= shift; also
// prefetches as exp_chunk does.
S2D_CPU_NOINLINE float approx_exp_sum(const float* scores, int64_t padded, float shift,
                                      const char* prefetch, int64_t prefetch_bytes) {
  const VecF shift8 = splat(shift);
  VecF sum0 = splat(0.0f), sum1 = splat(0.0f);
  LinePrefetch next(prefetch, prefetch_bytes);
  for (int64_t i = 0; i < padded; i += 2 * kVec) {
    next.step();
    sum0 += cheap_exp(load_vec(scores + i) - shift8);
    sum1 += cheap_exp(load_vec(scores + i + kVec) - shift8);
  }
  return horizontal_sum(sum0 + sum1);
}

// The cheap pass over one chunk in a single loop (processed scores, their max and the sum of the
// cheap exp(score - shift)), against a shift fixed beforehand: the running max of the earlier
// chunks. Returns the chunk's max; `sum` is valid only if max - shift <= kApproxHeadroom (the
// caller checks: larger scores would overflow the exponent field). NOTE: fl(max - shift) rather
// than max <= shift + headroom, whose sum may round up by a whole ulp of a large shift.
constexpr float kApproxHeadroom = 64.0f;  // e^64 * 2048 ids stays far below the float max

template <class Logits, bool kDivide, bool kThreshold>
S2D_CPU_NOINLINE float approx_chunk(const typename Logits::Storage* chunk, int64_t count,
                                    float temperature, float threshold, float shift, float& sum) {
  const int64_t full = count & ~static_cast<int64_t>(2 * kVec - 1);
  const VecF shift8 = splat(shift);
  VecF max0 = splat(-kInf), max1 = splat(-kInf);
  VecF sum0 = splat(0.0f), sum1 = splat(0.0f);
  for (int64_t i = 0; i < full; i += 2 * kVec) {
    // NOTE: this loop is bound by memory; 1 KiB ahead keeps enough lines in flight.
    __builtin_prefetch(reinterpret_cast<const char*>(chunk + i) + 1024);
    const VecF s0 =
        processed_score<kDivide, kThreshold>(Logits::load8(chunk + i), temperature, threshold);
    const VecF s1 = processed_score<kDivide, kThreshold>(Logits::load8(chunk + i + kVec),
                                                         temperature, threshold);
    max0 = vmax(max0, s0);
    max1 = vmax(max1, s1);
    sum0 += cheap_exp(s0 - shift8);
    sum1 += cheap_exp(s1 - shift8);
  }
  float chunk_max = horizontal_max(vmax(max0, max1));
  float total = horizontal_sum(sum0 + sum1);
  for (int64_t i = full; i < count; ++i) {
    const float s =
        processed_score<kDivide, kThreshold>(Logits::load(chunk[i]), temperature, threshold);
    chunk_max = s > chunk_max ? s : chunk_max;
    total += cheap_exp(s - shift);
  }
  sum = total;
  return chunk_max;
}

// The cheap pass at one position and the verdict on `uq` = u * q(x) for `token` (in range).
template <class Logits, bool kDivide, bool kThreshold>
S2D_CPU_INLINE Verdict approx_accept(const typename Logits::Storage* logits, int64_t token,
                                     int64_t vocab, float temperature, float min_logit, float uq,
                                     const Scratch& scratch, int64_t prefetch_ahead) {
  using Storage = typename Logits::Storage;
  const float threshold = kThreshold ? min_logit : -kInf;
  float running_max = -kInf;
  double running_sum = 0.0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t count = vocab - start < kChunk ? vocab - start : kChunk;
    const Storage* chunk = logits + start;
    if (running_max != -kInf) {
      // NOTE: one loop over the chunk against the running max so far, which the rest of the
      // vocabulary seldom exceeds by much; when it does, the chunk is redone below (from cache).
      float chunk_sum;
      const float chunk_max = approx_chunk<Logits, kDivide, kThreshold>(
          chunk, count, temperature, threshold, running_max, chunk_sum);
      if (chunk_max - running_max <= kApproxHeadroom) {
        running_sum += chunk_sum;
        if (chunk_max > running_max) {
          running_sum *= std::exp(static_cast<double>(running_max) - chunk_max);
          running_max = chunk_max;
        }
        continue;
      }
    }
    // Until a finite score is seen, and for chunks whose max jumps: scores first, then exps.
    float* scores = scratch.exps + start;
    const float chunk_max =
        score_chunk<Logits, kDivide, kThreshold>(chunk, count, temperature, threshold, scores);
    if (chunk_max == -kInf) continue;
    if (chunk_max > running_max) {
      running_sum *= std::exp(static_cast<double>(running_max) - chunk_max);
      running_max = chunk_max;
    }
    const int64_t padded = padded_count(count);
    running_sum +=
        approx_exp_sum(scores, padded, running_max, reinterpret_cast<const char*>(chunk + kChunk),
                       next_chunk_bytes<Storage>(prefetch_ahead, start));
  }
  if (running_max == -kInf) return Verdict::kUnsure;  // every score -inf: left to the exact pass
  // NOTE: exactly token_prob's numerator (same call, same operands: the max is the same float).
  const float s = processed_score<true, true>(Logits::load(logits[token]), temperature, min_logit);
  if (s == -kInf) return Verdict::kReject;  // p(x) = 0 exactly: never accepted
  const double p_approx = static_cast<double>(std::exp(s - running_max)) / running_sum;
  if (uq < p_approx * (1.0 - kApproxSlack)) return Verdict::kAccept;
  if (uq >= p_approx * kApproxExpMaxRatio * (1.0 + kApproxSlack)) return Verdict::kReject;
  return Verdict::kUnsure;
}

S2D_CPU_INLINE VecI lane_iota(int32_t first) { return VecI{0, 1, 2, 3, 4, 5, 6, 7} + first; }

// Lane-wise (key, index) argmax update; a lane keeps its first maximum (strict >).
S2D_CPU_INLINE void argmax_update(VecF key, VecI index, VecF& best, VecI& best_index) {
  const VecI better = key > best;
  best = better ? key : best;
  best_index = better ? index : best_index;
}

// Best (key, index) over lanes, ties to the smallest index.
S2D_CPU_INLINE void argmax_combine(VecF best, VecI best_index, float& top, int64_t& top_index) {
  for (int l = 0; l < kVec; ++l) {
    if (best[l] > top || (best[l] == top && best_index[l] < top_index)) {
      top = best[l];
      top_index = best_index[l];
    }
  }
}

// Greedy rows: argmax of the sanitised raw logits, ties to the smallest id (0 if all -inf).
template <class Logits>
S2D_CPU_INLINE int64_t greedy_argmax(const typename Logits::Storage* logits, int64_t vocab) {
  VecF best0 = splat(-kInf), best1 = splat(-kInf);
  VecI index0 = splat_int(0), index1 = splat_int(0);
  const int64_t full = vocab & ~static_cast<int64_t>(2 * kVec - 1);
  VecI lanes0 = lane_iota(0), lanes1 = lane_iota(kVec);
  for (int64_t i = 0; i < full; i += 2 * kVec) {
    argmax_update(sanitize(Logits::load8(logits + i)), lanes0, best0, index0);
    argmax_update(sanitize(Logits::load8(logits + i + kVec)), lanes1, best1, index1);
    lanes0 += 2 * kVec;
    lanes1 += 2 * kVec;
  }
  float top = -kInf;
  int64_t top_index = 0;
  argmax_combine(best0, index0, top, top_index);
  argmax_combine(best1, index1, top, top_index);
  for (int64_t i = full; i < vocab; ++i) {
    const float s = sanitize(Logits::load(logits[i]));
    if (s > top) {
      top = s;
      top_index = i;
    }
  }
  return top == -kInf ? 0 : top_index;
}

// p(token) at a position whose stats are known (token already checked to be in range).
template <class Logits>
S2D_CPU_INLINE float token_prob(const typename Logits::Storage* logits, int64_t token,
                                int64_t vocab, float temperature, float min_logit,
                                const PositionStats& stats) {
  if (stats.dead) return 1.0f / static_cast<float>(vocab);
  const float s = processed_score<true, true>(Logits::load(logits[token]), temperature, min_logit);
  if (s == -kInf) return 0.0f;
  return std::exp(s - stats.max) / stats.sum;
}

// What a race runs on: weights w_v >= 0 from pass 1's exps (p, or the residual max(0, p - q), or p
// without the point-mass draft token).
enum class RaceWeights : int { kTarget = 0, kResidual = 1, kDropToken = 2 };

struct RaceSource {
  const float* exps;     // [V] pass-1 exps of the emitting position (Scratch::exps)
  const float* scale;    // [ceil(V / kChunk)] exps -> p factor per chunk; nullptr: dead position
  float uniform_p;       // p of every entry at a dead position (1 / V)
  const float* draft_q;  // [V] q row of the rejected draft (kResidual)
  int64_t drop_token;    // the point-mass draft token (kDropToken)
};

// p of id v at the emitting position, from pass 1's exps and the factor of v's chunk.
S2D_CPU_INLINE float race_p(const RaceSource& source, int64_t v) {
  return source.scale ? source.exps[v] * source.scale[v / kChunk] : source.uniform_p;
}

// p of ids v .. v + 7 (v a multiple of 8, so all in one chunk).
S2D_CPU_INLINE VecF race_p8(const RaceSource& source, int64_t v) {
  return source.scale ? load_vec(source.exps + v) * source.scale[v / kChunk]
                      : splat(source.uniform_p);
}

// The race weight of id v (scalar) or of ids v .. v + 7 (vector).
template <RaceWeights kWeights>
S2D_CPU_INLINE float race_weight(const RaceSource& source, int64_t v) {
  const float p = race_p(source, v);
  if (kWeights == RaceWeights::kResidual) {
    const float diff = p - source.draft_q[v];
    return diff > 0.0f ? diff : 0.0f;
  }
  if (kWeights == RaceWeights::kDropToken) return v == source.drop_token ? 0.0f : p;
  return p;
}

template <RaceWeights kWeights>
S2D_CPU_INLINE VecF race_weight8(const RaceSource& source, int64_t v) {
  const VecF p = race_p8(source, v);
  if (kWeights == RaceWeights::kResidual) {
    const VecF diff = p - load_vec(source.draft_q + v);
    return diff > 0.0f ? diff : splat(0.0f);
  }
  if (kWeights == RaceWeights::kDropToken) {
    return lane_iota(static_cast<int32_t>(v)) == static_cast<int32_t>(source.drop_token)
               ? splat(0.0f)
               : p;
  }
  return p;
}

S2D_CPU_INLINE float horizontal_sum_of(const VecF (&v)[8]) {
  const VecF total = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  return horizontal_sum(total);
}

// Stage 1 input: the weight sum of every block of kRaceBlock ids into sums[0, num_blocks).
// Returns whether any weight is positive (else the caller falls back to the race on p).
template <RaceWeights kWeights>
S2D_CPU_INLINE bool block_sums(const RaceSource& source, int64_t vocab, float* sums) {
  bool any_positive = false;
  for (int64_t start = 0, block = 0; start < vocab; start += kRaceBlock, ++block) {
    const int64_t count = vocab - start < kRaceBlock ? vocab - start : kRaceBlock;
    float sum = 0.0f;
    if (count == kRaceBlock) {
      // NOTE: this sweep is bound by reading the q row; the prefetcher alone gets about 10 GB/s
      // from one core, prefetching 8 KiB ahead about 13.5.
      if (kWeights == RaceWeights::kResidual && start + kChunk + kRaceBlock <= vocab) {
        for (int line = 0; line < kRaceBlock; line += 16) {
          __builtin_prefetch(source.draft_q + start + kChunk + line);
        }
      }
      VecF parts[8];
      for (int k = 0; k < 8; ++k) parts[k] = race_weight8<kWeights>(source, start + kVec * k);
      sum = horizontal_sum_of(parts);
    } else {
      for (int64_t v = start; v < start + count; ++v) sum += race_weight<kWeights>(source, v);
    }
    sums[block] = sum;
    any_positive |= sum > 0.0f;
  }
  return any_positive;
}

// One exponential race: argmax_i w[i] / -log(u_i) over i < count, ties to the smallest i, with
// u_i the clamped Philox uniform of (stream, position, index first + i). `weights` must be
// readable up to round_up(count, kRaceBlock); entries from count on never win.
S2D_CPU_INLINE int64_t race_array(const float* weights, int64_t count, int64_t first,
                                  uint32_t stream, uint64_t seed, uint64_t offset,
                                  uint32_t position) {
  const uint32_t c1 = (stream << 16) | position;
  const uint32_t c2 = static_cast<uint32_t>(offset);
  const uint32_t c3 = static_cast<uint32_t>(offset >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  VecF best = splat(-kInf);
  VecI best_index = splat_int(0);
  for (int64_t start = 0; start < count; start += kRaceBlock) {
    // Index first + start + 4 c + w uses word w of counter ((first + start) >> 2) + c.
    VecU entry_bits[8];
    {
      const VecU counter0 = (VecU)lane_iota(0) + static_cast<uint32_t>((first + start) >> 2);
      const VecU counters[2] = {counter0, counter0 + 8u};
      VecU words[2][4];
      philox_vec(counters, c1, c2, c3, k0, k1, words);
      for (int half = 0; half < 2; ++half) {
        VecU entries[4];
        words_to_entries(words[half], entries);
        for (int k = 0; k < 4; ++k) entry_bits[4 * half + k] = entries[k];
      }
    }
    for (int k = 0; k < 8; ++k) {
      const VecI index = lane_iota(static_cast<int32_t>(start) + kVec * k);
      const VecF u0 =
          (__builtin_convertvector((VecI)(entry_bits[k] >> 8), VecF) + 0.5f) * (1.0f / 16777216.0f);
      const VecF u = vmin(u0, splat(kRaceMaxUniform));
      // NOTE: key = w * (1 / E) rather than w / E (ulp-level difference from the reference, i.e.
      // only float-precision ties can differ).
      const VecF key = load_vec(weights + start + kVec * k) * (splat(-1.0f) / log_unit(u));
      argmax_update(index < static_cast<int32_t>(count) ? key : splat(-kInf), index, best,
                    best_index);
    }
  }
  float top = -kInf;
  int64_t top_index = 0;
  argmax_combine(best, best_index, top, top_index);
  return top_index;
}

// Both stages of the race on kWeights; false (nothing drawn) when every weight is 0.
template <RaceWeights kWeights>
S2D_CPU_INLINE bool two_level_race(const RaceSource& source, int64_t vocab, float* sums,
                                   uint64_t seed, uint64_t offset, uint32_t position,
                                   int64_t& token) {
  if (!block_sums<kWeights>(source, vocab, sums)) return false;
  const int64_t num_blocks = (vocab + kRaceBlock - 1) / kRaceBlock;
  const int64_t block =
      race_array(sums, num_blocks, 0, kStreamSample | kStreamBlockFlag, seed, offset, position);
  const int64_t start = block * kRaceBlock;
  const int64_t count = vocab - start < kRaceBlock ? vocab - start : kRaceBlock;
  alignas(32) float weights[kRaceBlock];
  for (int64_t i = 0; i < count; ++i) weights[i] = race_weight<kWeights>(source, start + i);
  for (int64_t i = count; i < kRaceBlock; ++i) weights[i] = 0.0f;
  token = start + race_array(weights, count, start, kStreamSample, seed, offset, position);
  return true;
}

// Pass 2 at the emitting position: the race on the residual (recovered token) or on p (bonus
// token, and the fallback when the residual is all zero). Returns a token id in [0, V).
template <RaceWeights kWeights>
S2D_CPU_INLINE int64_t race(const RaceSource& source, int64_t vocab, float* sums, uint64_t seed,
                            uint64_t offset, uint32_t position) {
  int64_t token = 0;
  if (two_level_race<kWeights>(source, vocab, sums, seed, offset, position, token)) return token;
  // NOTE: the residual is all zero (p == q up to rounding): sample p, with the same uniforms. p
  // always has a positive weight (its max is exp(0) / sum), so this race draws.
  two_level_race<RaceWeights::kTarget>(source, vocab, sums, seed, offset, position, token);
  return token;
}

// One row, both passes; writes the emitting position and the emitted token.
template <class Logits, bool kDivide, bool kThreshold>
S2D_CPU_INLINE void verify_sampled_row(const VerifyParams& params, int64_t row,
                                       const Scratch& scratch, int64_t num_draft,
                                       int64_t& emit_position, int64_t& emitted) {
  using Storage = typename Logits::Storage;
  const int64_t num_spec = params.num_spec;
  const int64_t vocab = params.vocab;
  const Storage* logits =
      static_cast<const Storage*>(params.target_logits) + row * (num_spec + 1) * vocab;
  const int64_t* tokens = params.draft_tokens + row * num_spec;
  const float temperature = params.temperature[row] > 0.0f ? params.temperature[row] : 1.0f;
  const uint64_t seed = static_cast<uint64_t>(params.seeds[row]);
  const uint64_t offset = static_cast<uint64_t>(params.offsets[row]);
  const bool approximate = vocab <= kApproxMaxVocab;
  int64_t j = 0;
  PositionStats stats;
  for (;; ++j) {
    const float min_logit = kThreshold ? params.min_logit[row * (num_spec + 1) + j] : -kInf;
    const Storage* position_logits = logits + j * vocab;
    // Prefetch up to the end of the bonus position's logits, the last this row may read.
    const int64_t prefetch_ahead = (num_draft + 1 - j) * vocab;
    const int64_t token = j < num_draft ? tokens[j] : -1;
    if (j == num_draft || token < 0 || token >= vocab) {
      // Every draft accepted (bonus token at j), or an out-of-range draft: rejected, never read.
      stats = sampled_stats<Logits, kDivide, kThreshold>(position_logits, vocab, temperature,
                                                         min_logit, scratch, prefetch_ahead);
      break;
    }
    const float q =
        params.draft_probs ? params.draft_probs[(row * num_spec + j) * vocab + token] : 1.0f;
    const float u = philox_uniform(seed, offset, kStreamAccept, static_cast<uint32_t>(j), 0);
    const float uq = u * q;
    const Verdict verdict = approximate ? approx_accept<Logits, kDivide, kThreshold>(
                                              position_logits, token, vocab, temperature, min_logit,
                                              uq, scratch, prefetch_ahead)
                                        : Verdict::kUnsure;
    if (verdict == Verdict::kAccept) continue;
    stats = sampled_stats<Logits, kDivide, kThreshold>(position_logits, vocab, temperature,
                                                       min_logit, scratch, prefetch_ahead);
    if (verdict == Verdict::kReject) break;
    const float p =
        token_prob<Logits>(position_logits, token, vocab, temperature, min_logit, stats);
    if (!(uq < p)) break;
  }
  // exps -> p factors, per chunk, in place.
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  const float inv_sum = 1.0f / stats.sum;
  for (int64_t c = 0; c < num_chunks; ++c) {
    scratch.chunk_ref[c] = exp_nonpositive(scratch.chunk_ref[c] - stats.max) * inv_sum;
  }
  RaceSource source;
  source.exps = scratch.exps;
  source.scale = stats.dead ? nullptr : scratch.chunk_ref;
  source.uniform_p = 1.0f / static_cast<float>(vocab);
  source.draft_q = nullptr;
  source.drop_token = -1;
  const uint32_t position = static_cast<uint32_t>(j);
  if (j == num_draft) {
    emitted = race<RaceWeights::kTarget>(source, vocab, scratch.block_sums, seed, offset, position);
  } else if (params.draft_probs) {
    source.draft_q = params.draft_probs + (row * num_spec + j) * vocab;
    emitted =
        race<RaceWeights::kResidual>(source, vocab, scratch.block_sums, seed, offset, position);
  } else if (tokens[j] >= 0 && tokens[j] < vocab) {
    source.drop_token = tokens[j];
    emitted =
        race<RaceWeights::kDropToken>(source, vocab, scratch.block_sums, seed, offset, position);
  } else {
    // An out-of-range draft was rejected without being read: nothing to remove from p.
    emitted = race<RaceWeights::kTarget>(source, vocab, scratch.block_sums, seed, offset, position);
  }
  emit_position = j;
}

template <class Logits, bool kDivide>
S2D_CPU_INLINE void verify_sampled_row(const VerifyParams& params, int64_t row,
                                       const Scratch& scratch, int64_t num_draft,
                                       int64_t& emit_position, int64_t& emitted) {
  if (params.min_logit) {
    verify_sampled_row<Logits, kDivide, true>(params, row, scratch, num_draft, emit_position,
                                              emitted);
  } else {
    verify_sampled_row<Logits, kDivide, false>(params, row, scratch, num_draft, emit_position,
                                               emitted);
  }
}

template <class Logits>
S2D_CPU_INLINE void verify_row(const VerifyParams& params, int64_t row, const Scratch& scratch) {
  using Storage = typename Logits::Storage;
  const int64_t num_spec = params.num_spec;
  const int64_t vocab = params.vocab;
  int64_t num_draft = params.num_draft[row];
  num_draft = num_draft < 0 ? 0 : (num_draft > num_spec ? num_spec : num_draft);
  const int64_t* tokens = params.draft_tokens + row * num_spec;
  const float temperature = params.temperature[row];
  int64_t emit_position = 0, emitted = 0;
  if (!(temperature > 0.0f)) {
    const Storage* logits =
        static_cast<const Storage*>(params.target_logits) + row * (num_spec + 1) * vocab;
    for (emit_position = 0;; ++emit_position) {
      emitted = greedy_argmax<Logits>(logits + emit_position * vocab, vocab);
      if (emit_position == num_draft || tokens[emit_position] != emitted) break;
    }
  } else if (temperature == 1.0f) {
    verify_sampled_row<Logits, false>(params, row, scratch, num_draft, emit_position, emitted);
  } else {
    verify_sampled_row<Logits, true>(params, row, scratch, num_draft, emit_position, emitted);
  }
  int64_t* out = params.out_tokens + row * (num_spec + 1);
  for (int64_t j = 0; j <= num_spec; ++j) {
    out[j] = j < emit_position ? tokens[j] : (j == emit_position ? emitted : -1);
  }
  params.num_accepted[row] = static_cast<int32_t>(emit_position);
}

template <class Logits>
void verify_rows(const VerifyParams& params, int64_t row_begin, int64_t row_end) {
  // NOTE: one scratch per thread, kept between calls (V floats: 128 KiB at V = 32000), so that a
  // call neither allocates nor faults in fresh pages.
  thread_local std::vector<float> storage;
  const int64_t num_chunks = (params.vocab + kChunk - 1) / kChunk;
  const int64_t num_blocks = (params.vocab + kRaceBlock - 1) / kRaceBlock;
  const int64_t padded_blocks = (num_blocks + kRaceBlock - 1) / kRaceBlock * kRaceBlock;
  const size_t needed = static_cast<size_t>(num_chunks * kChunk + num_chunks + padded_blocks);
  if (storage.size() < needed) storage.resize(needed);
  Scratch scratch;
  scratch.exps = storage.data();
  scratch.chunk_ref = scratch.exps + num_chunks * kChunk;
  scratch.block_sums = scratch.chunk_ref + num_chunks;
  for (int64_t row = row_begin; row < row_end; ++row) verify_row<Logits>(params, row, scratch);
}

// Verifies rows [row_begin, row_end) of `params` (call from several threads on disjoint ranges).
inline void rows(const VerifyParams& params, LogitType logit_type, int64_t row_begin,
                 int64_t row_end) {
  switch (logit_type) {
    case LogitType::kFloat32:
      verify_rows<Float32Logits>(params, row_begin, row_end);
      break;
    case LogitType::kBFloat16:
      verify_rows<BFloat16Logits>(params, row_begin, row_end);
      break;
    case LogitType::kFloat16:
      verify_rows<Float16Logits>(params, row_begin, row_end);
      break;
  }
}

}  // namespace S2D_VERIFY_CPU_NS
}  // namespace s2d
