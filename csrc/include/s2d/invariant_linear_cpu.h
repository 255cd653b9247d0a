// CPU row-invariant linear kernel (framework-free); the computation is specified in
// invariant_linear_common.h.
//
// Included twice: plainly (portable C++, 8 lanes emulated with std::fma) and, by
// csrc/invariant_linear/invariant_linear_avx2_cpu.cpp, under an AVX2+FMA+F16C target pragma with
// S2D_INVARIANT_LINEAR_AVX2 defined (one __m256 per lane group). Distinct namespaces
// (S2D_INVARIANT_LINEAR_NS) keep the two builds' symbols apart. Both compute the same bits.
//
// Blocking: a task owns a range of output columns n; for each block of kColBlock columns it runs
// the rows in blocks of kRowBlock, so a weight row is read from memory once and from L1/L2 for the
// further row blocks. Each (t, n) pair keeps its own 8-lane accumulator whatever the blocking.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "s2d/invariant_linear_common.h"

#if defined(S2D_INVARIANT_LINEAR_AVX2)
#include <immintrin.h>
#endif

#ifndef S2D_INVARIANT_LINEAR_NS
#define S2D_INVARIANT_LINEAR_NS invariant_linear_cpu
#endif

namespace s2d {
namespace S2D_INVARIANT_LINEAR_NS {

using invariant_linear::kLanes;
using invariant_linear::Params;
using invariant_linear::WeightType;

#if defined(S2D_INVARIANT_LINEAR_AVX2)

struct Vec {
  __m256 v;
};
inline Vec zero() { return {_mm256_setzero_ps()}; }
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec load_x(const float* p) { return {_mm256_loadu_ps(p)}; }
template <WeightType kType>
inline Vec load_w(const void* base, int64_t offset) {
  if constexpr (kType == WeightType::kFloat32) {
    return {_mm256_loadu_ps(static_cast<const float*>(base) + offset)};
  } else if constexpr (kType == WeightType::kBFloat16) {
    const __m128i raw = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + offset));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))};
  } else {
    const __m128i raw = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + offset));
    return {_mm256_cvtph_ps(raw)};
  }
}
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), as the portable build.
inline float lane_sum(Vec a) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1));
  return _mm_cvtss_f32(sum);
}

#else

struct Vec {
  float v[kLanes];
};
inline Vec zero() { return Vec{}; }
inline Vec fma(Vec a, Vec b, Vec c) {
  Vec out;
  for (int l = 0; l < kLanes; ++l) out.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
  return out;
}
inline Vec load_x(const float* p) {
  Vec out;
  std::memcpy(out.v, p, sizeof(out.v));
  return out;
}
template <WeightType kType>
inline Vec load_w(const void* base, int64_t offset) {
  Vec out;
  if constexpr (kType == WeightType::kFloat32) {
    std::memcpy(out.v, static_cast<const float*>(base) + offset, sizeof(out.v));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
    for (int l = 0; l < kLanes; ++l) {
      out.v[l] = kType == WeightType::kBFloat16 ? invariant_linear::bf16_to_float(p[l])
                                                : invariant_linear::half_to_float(p[l]);
    }
  }
  return out;
}
inline float lane_sum(Vec a) {
  const float* l = a.v;
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

#endif

template <WeightType kType>
constexpr int64_t weight_bytes() {
  return kType == WeightType::kFloat32 ? 4 : 2;
}

// The last, partial group of 8 k's of one weight row, zero-padded (never reads past the row).
template <WeightType kType>
inline Vec load_w_tail(const void* row, int64_t k0, int64_t count) {
  alignas(32) unsigned char buffer[kLanes * 4] = {};
  std::memcpy(buffer, static_cast<const unsigned char*>(row) + k0 * weight_bytes<kType>(),
              static_cast<size_t>(count * weight_bytes<kType>()));
  return load_w<kType>(buffer, 0);
}

// cols x rows accumulators over the whole K; x_tail holds each row's zero-padded last group.
template <WeightType kType, int kCols, int kRows>
inline void block(const Params& p, const float* x_tail, int64_t n0, int64_t t0) {
  const int64_t K = p.in_features;
  const int64_t full = K - K % kLanes;
  Vec acc[kCols][kRows];
  for (int c = 0; c < kCols; ++c)
    for (int r = 0; r < kRows; ++r) acc[c][r] = zero();
  for (int64_t k = 0; k < full; k += kLanes) {
    Vec w[kCols];
    for (int c = 0; c < kCols; ++c) w[c] = load_w<kType>(p.w, (n0 + c) * K + k);
    for (int r = 0; r < kRows; ++r) {
      const Vec x = load_x(p.x + (t0 + r) * K + k);
      for (int c = 0; c < kCols; ++c) acc[c][r] = fma(w[c], x, acc[c][r]);
    }
  }
  if (full < K) {
    Vec w[kCols];
    const unsigned char* base = static_cast<const unsigned char*>(p.w);
    for (int c = 0; c < kCols; ++c)
      w[c] = load_w_tail<kType>(base + (n0 + c) * K * weight_bytes<kType>(), full, K - full);
    for (int r = 0; r < kRows; ++r) {
      const Vec x = load_x(x_tail + (t0 + r) * kLanes);
      for (int c = 0; c < kCols; ++c) acc[c][r] = fma(w[c], x, acc[c][r]);
    }
  }
  for (int c = 0; c < kCols; ++c) {
    const float b = p.bias ? p.bias[n0 + c] : 0.0f;
    for (int r = 0; r < kRows; ++r) {
      const float s = lane_sum(acc[c][r]);
      p.y[(t0 + r) * p.out_features + n0 + c] = p.bias ? s + b : s;
    }
  }
}

// Every row of columns [n0, n0 + kCols) with 3 or 4 columns: rows in blocks of up to 12 / kCols,
// the last ones split evenly. NOTE: a lone trailing row (5 = 4 + 1) would run latency-bound (kCols
// accumulators only) and cost half a 4-row block again; 5 = 3 + 2, 6 = 3 + 3, 7 = 4 + 3 instead.
template <WeightType kType, int kCols>
inline void columns(const Params& p, const float* x_tail, int64_t n0) {
  static_assert(kCols == 3 || kCols == 4, "3 or 4 columns");
  int64_t t = 0, left = p.rows;
  if (kCols == 3) {
    for (; left > 7; left -= 4, t += 4) block<kType, kCols, 4>(p, x_tail, n0, t);
  }
  switch (left) {
    case 7:
      block<kType, kCols, 4>(p, x_tail, n0, t);
      block<kType, kCols, 3>(p, x_tail, n0, t + 4);
      break;
    case 6:
      block<kType, kCols, 3>(p, x_tail, n0, t);
      block<kType, kCols, 3>(p, x_tail, n0, t + 3);
      break;
    case 5:
      block<kType, kCols, 3>(p, x_tail, n0, t);
      block<kType, kCols, 2>(p, x_tail, n0, t + 3);
      break;
    case 4:
      block<kType, kCols, 4>(p, x_tail, n0, t);
      break;
    case 3:
      block<kType, kCols, 3>(p, x_tail, n0, t);
      break;
    case 2:
      block<kType, kCols, 2>(p, x_tail, n0, t);
      break;
    case 1:
      block<kType, kCols, 1>(p, x_tail, n0, t);
      break;
    default:
      break;
  }
}

// Every row of columns [n0, n0 + 2): for 5 or 6 rows, one block of them all (10 or 12
// accumulators).
template <WeightType kType>
inline void two_columns(const Params& p, const float* x_tail, int64_t n0) {
  if (p.rows == 6) {
    block<kType, 2, 6>(p, x_tail, n0, 0);
  } else {
    block<kType, 2, 5>(p, x_tail, n0, 0);
  }
}

// Every row of one column n (the columns left over at the end of a range).
template <WeightType kType>
inline void one_column(const Params& p, const float* x_tail, int64_t n) {
  int64_t t = 0;
  for (; t + 8 <= p.rows; t += 8) block<kType, 1, 8>(p, x_tail, n, t);
  for (; t + 4 <= p.rows; t += 4) block<kType, 1, 4>(p, x_tail, n, t);
  for (; t < p.rows; ++t) block<kType, 1, 1>(p, x_tail, n, t);
}

// Output columns [n_begin, n_end) of every row. x_tail: [T, 8] float32, each row's last
// K % 8 inputs zero-padded (unused when K % 8 == 0).
template <WeightType kType>
void columns_range(const Params& p, const float* x_tail, int64_t n_begin, int64_t n_end) {
  // NOTE: up to 12 accumulators (of the 16 AVX2 registers), each weight row read from memory once:
  // 4 columns x 1-3 rows (more loads in flight for the memory-bound GEMV), 2 columns x 5-6 rows
  // (one block: a verify of 4-5 drafts), else 3 columns x blocks of up to 4 rows.
  int64_t n = n_begin;
  if (p.rows <= 3) {
    for (; n + 4 <= n_end; n += 4) columns<kType, 4>(p, x_tail, n);
  } else if (p.rows <= 6 && p.rows >= 5) {
    for (; n + 2 <= n_end; n += 2) two_columns<kType>(p, x_tail, n);
  } else {
    for (; n + 3 <= n_end; n += 3) columns<kType, 3>(p, x_tail, n);
  }
  for (; n < n_end; ++n) one_column<kType>(p, x_tail, n);
}

inline void run_columns(const Params& p, const float* x_tail, int64_t n_begin, int64_t n_end) {
  switch (p.weight_type) {
    case WeightType::kFloat32:
      columns_range<WeightType::kFloat32>(p, x_tail, n_begin, n_end);
      break;
    case WeightType::kBFloat16:
      columns_range<WeightType::kBFloat16>(p, x_tail, n_begin, n_end);
      break;
    case WeightType::kFloat16:
      columns_range<WeightType::kFloat16>(p, x_tail, n_begin, n_end);
      break;
  }
}

}  // namespace S2D_INVARIANT_LINEAR_NS
}  // namespace s2d
