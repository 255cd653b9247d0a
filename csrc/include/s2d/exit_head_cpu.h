// CPU exit head: RMSNorm once per row, then a stream over the vocabulary in tiles, never
// materialising the [N, V] logits. Framework-free: raw pointers, sizes and a parallel-for.
//
// Work split: the vocabulary is cut into fixed chunks (independent of the thread count); each
// chunk reduces its logits of every row into a RowState, and the chunks are merged in id order
// afterwards, so results do not depend on the number of threads. Within a chunk the lm_head tile
// (kTileBytes of float32) is converted once and shared by every row (register-blocked
// 4 rows x 3 vocab dot products), so the weight is read once per tile for any N.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "s2d/exit_head_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define S2D_EXIT_HEAD_X86 1
#endif

namespace s2d {
namespace exit_head {
namespace cpu {

constexpr int kRowBlock = 4;                // rows per register block
constexpr int kVocabBlock = 3;              // vocab rows per register block
constexpr int64_t kChunkVocab = 512;        // vocab rows per parallel work item
constexpr int64_t kTileBytes = 192 * 1024;  // float32 lm_head tile kept hot in L2

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bf16_to_float(uint16_t bits) {
  return bits_to_float(static_cast<uint32_t>(bits) << 16);
}

// Round to nearest even, like torch's float -> bfloat16.
inline float round_to_bf16(float value) {
  if (value != value) return value;
  uint32_t bits = float_to_bits(value);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return bits_to_float(bits & 0xFFFF0000u);
}

// IEEE half <-> float, bit exact with round to nearest even (the FP16 library's branch-free
// formulation, as used by c10::Half).
inline float f16_to_float(uint16_t half) {
  const uint32_t w = static_cast<uint32_t>(half) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

inline uint16_t float_to_f16_bits(float value) {
  float base = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float round_to_f16(float value) { return f16_to_float(float_to_f16_bits(value)); }

inline float load_as_float(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::kFloat16:
      return f16_to_float(static_cast<const uint16_t*>(data)[i]);
    default:
      return static_cast<const float*>(data)[i];
  }
}

inline float round_to_dtype(float value, DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return round_to_bf16(value);
    case DType::kFloat16:
      return round_to_f16(value);
    default:
      return value;
  }
}

// normed[r] = (h * rsqrt(mean(h^2) + eps)).to(dtype) * norm_weight, rounded to dtype, as float.
inline void rms_norm_row(const void* hidden, const void* norm_weight, DType dtype, int64_t row,
                         int64_t dim, float eps, float* normed) {
  double sum_squares = 0.0;  // NOTE: double, so the mean is not worse than torch's pairwise sum
  for (int64_t k = 0; k < dim; ++k) {
    const float h = load_as_float(hidden, dtype, row * dim + k);
    sum_squares += static_cast<double>(h) * h;
  }
  const float mean = static_cast<float>(sum_squares / static_cast<double>(dim));
  const float inv_rms = 1.0f / std::sqrt(mean + eps);
  for (int64_t k = 0; k < dim; ++k) {
    const float h = load_as_float(hidden, dtype, row * dim + k);
    const float scaled = round_to_dtype(h * inv_rms, dtype);
    normed[k] = round_to_dtype(scaled * load_as_float(norm_weight, dtype, k), dtype);
  }
}

// ---- dot-product blocks: out[r * ldo + v] = dot(a[r], b[v]) for r < NR, v < NV -------------
// `b` holds float32 rows (kind kFloat32) or raw bf16 / f16 rows converted in registers (used when
// one register block covers every row, so a converted tile would be read only once).

template <DType Kind>
inline float load_weight(const void* b, int64_t i) {
  return load_as_float(b, Kind, i);
}

template <int NR, int NV, DType Kind>
void dot_block_generic(const float* a, const void* b, int64_t dim, float* out, int64_t ldo) {
  constexpr int kLanes = 8;
  float acc[NR][NV][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= dim; k += kLanes) {
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < NV; ++v)
        for (int l = 0; l < kLanes; ++l)
          acc[r][v][l] += a[r * dim + k + l] * load_weight<Kind>(b, v * dim + k + l);
  }
  for (int r = 0; r < NR; ++r) {
    for (int v = 0; v < NV; ++v) {
      float total = 0.0f;
      for (int l = 0; l < kLanes; ++l) total += acc[r][v][l];
      for (int64_t kk = k; kk < dim; ++kk)
        total += a[r * dim + kk] * load_weight<Kind>(b, v * dim + kk);
      out[r * ldo + v] = total;
    }
  }
}

#ifdef S2D_EXIT_HEAD_X86
__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 x) {
  const __m128 lo = _mm256_castps256_ps128(x);
  const __m128 hi = _mm256_extractf128_ps(x, 1);
  __m128 sum = _mm_add_ps(lo, hi);
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 0x55));
  return _mm_cvtss_f32(sum);
}

template <DType Kind>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* b, int64_t i) {
  if constexpr (Kind == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(b) + i);
  } else {
    const __m128i raw =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(b) + i));
    if constexpr (Kind == DType::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    } else {
      return _mm256_cvtph_ps(raw);
    }
  }
}

// Same 8-lane accumulation for every block shape and weight kind, so a logit does not depend on
// which block computed it.
template <int NR, int NV, DType Kind>
__attribute__((target("avx2,fma,f16c"))) void dot_block_avx2(const float* a, const void* b,
                                                             int64_t dim, float* out, int64_t ldo) {
  __m256 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= dim; k += 8) {
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load8<Kind>(b, v * dim + k);
    for (int r = 0; r < NR; ++r) {
      const __m256 av = _mm256_loadu_ps(a + r * dim + k);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int v = 0; v < NV; ++v) {
      float total = horizontal_sum(acc[r][v]);
      for (int64_t kk = k; kk < dim; ++kk)
        total += a[r * dim + kk] * load_weight<Kind>(b, v * dim + kk);
      out[r * ldo + v] = total;
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) inline void convert_tile_avx2(const void* src, DType dtype,
                                                                       int64_t count, float* dst) {
  int64_t i = 0;
  if (dtype == DType::kBFloat16) {
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8<DType::kBFloat16>(src, i));
  } else {
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8<DType::kFloat16>(src, i));
  }
  for (; i < count; ++i) dst[i] = load_as_float(src, dtype, i);
}
#endif

using DotBlockFn = void (*)(const float*, const void*, int64_t, float*, int64_t);

struct Kernels {
  DotBlockFn dot[3][kRowBlock + 1][kVocabBlock + 1];  // [weight kind][rows][vocab rows]
  bool avx2;
};

template <int NR, int NV, DType Kind>
void fill_kernel(Kernels& kernels) {
  DotBlockFn& slot = kernels.dot[static_cast<int>(Kind)][NR][NV];
#ifdef S2D_EXIT_HEAD_X86
  if (kernels.avx2) {
    slot = &dot_block_avx2<NR, NV, Kind>;
    return;
  }
#endif
  slot = &dot_block_generic<NR, NV, Kind>;
}

template <int NR, DType Kind>
void fill_row(Kernels& kernels) {
  fill_kernel<NR, 1, Kind>(kernels);
  fill_kernel<NR, 2, Kind>(kernels);
  fill_kernel<NR, 3, Kind>(kernels);
}

template <DType Kind>
void fill_kind(Kernels& kernels) {
  fill_row<1, Kind>(kernels);
  fill_row<2, Kind>(kernels);
  fill_row<3, Kind>(kernels);
  fill_row<4, Kind>(kernels);
}

inline const Kernels& kernels() {
  static const Kernels table = [] {
    Kernels k{};
#ifdef S2D_EXIT_HEAD_X86
    k.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#endif
    fill_kind<DType::kFloat32>(k);
    fill_kind<DType::kBFloat16>(k);
    fill_kind<DType::kFloat16>(k);
    return k;
  }();
  return table;
}

inline void convert_tile(const void* src, DType dtype, int64_t count, float* dst) {
#ifdef S2D_EXIT_HEAD_X86
  if (kernels().avx2) {
    convert_tile_avx2(src, dtype, count, dst);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) dst[i] = load_as_float(src, dtype, i);
}

// Vocab rows per tile: the float32 tile fills about kTileBytes, a multiple of kVocabBlock.
inline int64_t tile_vocab(int64_t dim) {
  const int64_t rows = kTileBytes / (dim * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(kVocabBlock, rows / kVocabBlock * kVocabBlock);
}

inline int64_t num_chunks(int64_t vocab) { return (vocab + kChunkVocab - 1) / kChunkVocab; }

// Reduces vocab ids [begin, end) of every row into states[0..rows).
inline void reduce_chunk(const float* normed, const void* lm_head, DType dtype, int64_t rows,
                         int64_t dim, int64_t begin, int64_t end, const float* temperature,
                         RowState* states, std::vector<float>& tile_buffer,
                         std::vector<float>& logits) {
  const Kernels& k = kernels();
  const int64_t tile = tile_vocab(dim);
  // NOTE: convert a 16-bit tile to float32 only when several row blocks will read it.
  const bool convert = dtype != DType::kFloat32 && rows > kRowBlock;
  const DType weight_kind = convert ? DType::kFloat32 : dtype;
  const size_t weight_size = weight_kind == DType::kFloat32 ? sizeof(float) : sizeof(uint16_t);
  if (convert) tile_buffer.resize(static_cast<size_t>(tile * dim));
  logits.resize(static_cast<size_t>(kRowBlock * tile));
  for (int64_t r = 0; r < rows; ++r) states[r] = empty_state();
  for (int64_t tile_begin = begin; tile_begin < end; tile_begin += tile) {
    const int64_t tile_rows = std::min(tile, end - tile_begin);
    const char* weights;
    if (convert) {
      const uint16_t* src = static_cast<const uint16_t*>(lm_head) + tile_begin * dim;
      convert_tile(src, dtype, tile_rows * dim, tile_buffer.data());
      weights = reinterpret_cast<const char*>(tile_buffer.data());
    } else {
      weights = static_cast<const char*>(lm_head) + tile_begin * dim * weight_size;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
      for (int64_t v0 = 0; v0 < tile_rows; v0 += kVocabBlock) {
        const int nv = static_cast<int>(std::min<int64_t>(kVocabBlock, tile_rows - v0));
        k.dot[static_cast<int>(weight_kind)][nr][nv](
            normed + r0 * dim, weights + v0 * dim * weight_size, dim, logits.data() + v0, tile);
      }
      for (int r = 0; r < nr; ++r) {
        const float t = safe_temperature(temperature[r0 + r]);
        RowState& state = states[r0 + r];
        const float* row_logits = logits.data() + r * tile;
        for (int64_t v = 0; v < tile_rows; ++v) push_logit(state, row_logits[v], tile_begin + v, t);
      }
    }
  }
}

// Writes the logits of vocab ids [begin, end) of every row r to out[r * ldo + v].
// Same tiles and dot blocks as reduce_chunk, so a logit is bit for bit the one exit_head reduces.
inline void logits_chunk(const float* normed, const void* lm_head, DType dtype, int64_t rows,
                         int64_t dim, int64_t begin, int64_t end, float* out, int64_t ldo,
                         std::vector<float>& tile_buffer) {
  const Kernels& k = kernels();
  const int64_t tile = tile_vocab(dim);
  const bool convert = dtype != DType::kFloat32 && rows > kRowBlock;
  const DType weight_kind = convert ? DType::kFloat32 : dtype;
  const size_t weight_size = weight_kind == DType::kFloat32 ? sizeof(float) : sizeof(uint16_t);
  if (convert) tile_buffer.resize(static_cast<size_t>(tile * dim));
  for (int64_t tile_begin = begin; tile_begin < end; tile_begin += tile) {
    const int64_t tile_rows = std::min(tile, end - tile_begin);
    const char* weights;
    if (convert) {
      const uint16_t* src = static_cast<const uint16_t*>(lm_head) + tile_begin * dim;
      convert_tile(src, dtype, tile_rows * dim, tile_buffer.data());
      weights = reinterpret_cast<const char*>(tile_buffer.data());
    } else {
      weights = static_cast<const char*>(lm_head) + tile_begin * dim * weight_size;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
      for (int64_t v0 = 0; v0 < tile_rows; v0 += kVocabBlock) {
        const int nv = static_cast<int>(std::min<int64_t>(kVocabBlock, tile_rows - v0));
        k.dot[static_cast<int>(weight_kind)][nr][nv](normed + r0 * dim,
                                                     weights + v0 * dim * weight_size, dim,
                                                     out + r0 * ldo + tile_begin + v0, ldo);
      }
    }
  }
}

// normed [N, d] float32 (rms_norm_row of every row) and the float32 logits [N, V] of the head.
template <typename ParallelFor>
void head_logits(const void* hidden, const void* norm_weight, const void* lm_head, DType dtype,
                 int64_t rows, int64_t dim, int64_t vocab, float eps, float* normed, float* logits,
                 ParallelFor&& parallel_for) {
  if (rows == 0) return;
  parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row(hidden, norm_weight, dtype, r, dim, eps, normed + r * dim);
  });
  parallel_for(0, num_chunks(vocab), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile_buffer;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunkVocab;
      logits_chunk(normed, lm_head, dtype, rows, dim, first, std::min(vocab, first + kChunkVocab),
                   logits, vocab, tile_buffer);
    }
  });
}

// ParallelFor: callable (int64_t begin, int64_t end, int64_t grain, F fn) calling fn(b, e)
// over disjoint sub-ranges (at::parallel_for in the torch binding).
template <typename ParallelFor>
void exit_head(const void* hidden,       // [N, d]
               const void* norm_weight,  // [d]
               const void* lm_head,      // [V, d]
               DType dtype, int64_t rows, int64_t dim, int64_t vocab, float eps,
               const float* temperature,  // [N]
               int64_t* tokens,           // [N] out
               float* confidence,         // [N] out
               float* logsumexp,          // [N] out
               ParallelFor&& parallel_for) {
  if (rows == 0) return;
  std::vector<float> normed(static_cast<size_t>(rows * dim));
  parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row(hidden, norm_weight, dtype, r, dim, eps, normed.data() + r * dim);
  });
  const int64_t chunks = num_chunks(vocab);
  std::vector<RowState> partial(static_cast<size_t>(chunks * rows));
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile_buffer, logits;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunkVocab;
      reduce_chunk(normed.data(), lm_head, dtype, rows, dim, first,
                   std::min(vocab, first + kChunkVocab), temperature, partial.data() + c * rows,
                   tile_buffer, logits);
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    const float t = safe_temperature(temperature[r]);
    RowState state = partial[static_cast<size_t>(r)];
    for (int64_t c = 1; c < chunks; ++c) merge_state(state, partial[c * rows + r], t);
    finish_state(state, t, vocab, tokens + r, confidence + r, logsumexp + r);
  }
}

}  // namespace cpu
}  // namespace exit_head
}  // namespace s2d
