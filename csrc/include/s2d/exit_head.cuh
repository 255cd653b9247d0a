// CUDA exit head kernels (framework-free). Three launches, never writing the [N, V] logits:
//   1. rms_norm_kernel: one block per row writes normed [N, d] float32 (values rounded to the
//      input dtype exactly as HF Llama's RMSNorm rounds them).
//   2. head_partial_kernel: grid (vocab chunks, row blocks of ROWS). Each warp streams a
//      contiguous run of lm_head rows with 16-byte loads, computes ROWS dot products per vocab
//      row (lane-strided float32 sums + xor-shuffle reduction) and keeps each row's online
//      state; the block merges its warps in id order and writes one RowState per (chunk, row).
//   3. merge_kernel: one thread per row merges the chunks in id order and writes the outputs.
// Every reduction has a fixed order, so results are deterministic for given shapes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/exit_head_common.h"

namespace s2d {
namespace exit_head {
namespace cuda {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int64_t kChunkVocab = 256;  // vocab rows per block of head_partial_kernel

template <typename T>
struct Scalar;

template <>
struct Scalar<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float round(float x) { return x; }
};

template <>
struct Scalar<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ float round(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
};

template <>
struct Scalar<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ float round(float x) {
    return __half2float(__float2half_rn(x));
  }
};

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  return value;
}

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ hidden,  // [N, d]
                                const T* __restrict__ weight,  // [d]
                                float* __restrict__ normed,    // [N, d] out
                                int64_t dim, float eps) {
  __shared__ float warp_totals[kWarps];
  const int64_t row = blockIdx.x;
  const T* h = hidden + row * dim;
  float sum_squares = 0.0f;
  for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) {
    const float x = Scalar<T>::to_float(h[k]);
    sum_squares += x * x;
  }
  sum_squares = warp_sum(sum_squares);
  if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x >> 5] = sum_squares;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_totals[w];
  // NOTE: 1/sqrtf (correctly rounded) rather than rsqrtf (2 ulp), closer to torch.rsqrt.
  const float inv_rms = 1.0f / sqrtf(total / static_cast<float>(dim) + eps);
  for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) {
    const float scaled = Scalar<T>::round(Scalar<T>::to_float(h[k]) * inv_rms);
    normed[row * dim + k] = Scalar<T>::round(scaled * Scalar<T>::to_float(weight[k]));
  }
}

// VEC: lm_head rows and normed rows are 16-byte aligned and d is a multiple of 16 / sizeof(T).
template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(kThreads)
    head_partial_kernel(const float* __restrict__ normed,       // [N, d]
                        const T* __restrict__ weight,           // [V, d]
                        const float* __restrict__ temperature,  // [N]
                        int64_t rows, int64_t dim, int64_t vocab,
                        RowState* __restrict__ partial) {  // [chunks, N] out
  __shared__ RowState warp_states[kWarps][ROWS];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t chunk = blockIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * ROWS;
  const int live_rows = static_cast<int>(rows - row0 < ROWS ? rows - row0 : ROWS);
  const int64_t begin = chunk * kChunkVocab;
  const int64_t end = begin + kChunkVocab < vocab ? begin + kChunkVocab : vocab;
  const int64_t per_warp = (end - begin + kWarps - 1) / kWarps;
  const int64_t warp_begin = begin + warp * per_warp;
  const int64_t warp_end = warp_begin + per_warp < end ? warp_begin + per_warp : end;

  float t[ROWS];
  const float* x[ROWS];
  RowState state[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    // NOTE: rows past the end read the last live row (in bounds) and are never written.
    const int64_t row = row0 + (r < live_rows ? r : live_rows - 1);
    t[r] = safe_temperature(temperature[row]);
    x[r] = normed + row * dim;
    state[r] = empty_state();
  }

  for (int64_t v = warp_begin; v < warp_end; ++v) {
    const T* w = weight + v * dim;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    if constexpr (VEC) {
      constexpr int kVec = 16 / sizeof(T);
      for (int64_t k = static_cast<int64_t>(lane) * kVec; k < dim; k += 32 * kVec) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(w + k));
        const T* values = reinterpret_cast<const T*>(&raw);
        float wf[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) wf[j] = Scalar<T>::to_float(values[j]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
          for (int j = 0; j < kVec; j += 4) {
            const float4 xv = *reinterpret_cast<const float4*>(x[r] + k + j);
            acc[r] += wf[j] * xv.x + wf[j + 1] * xv.y + wf[j + 2] * xv.z + wf[j + 3] * xv.w;
          }
        }
      }
    } else {
      for (int64_t k = lane; k < dim; k += 32) {
        const float wf = Scalar<T>::to_float(w[k]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] += wf * x[r][k];
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) push_logit(state[r], warp_sum(acc[r]), v, t[r]);
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) warp_states[warp][r] = state[r];
  }
  __syncthreads();
  if (threadIdx.x < live_rows) {
    const int r = threadIdx.x;
    const float row_t = safe_temperature(temperature[row0 + r]);
    RowState merged = warp_states[0][r];
    for (int w = 1; w < kWarps; ++w) merge_state(merged, warp_states[w][r], row_t);
    partial[chunk * rows + row0 + r] = merged;
  }
}

__global__ void merge_kernel(const RowState* __restrict__ partial,   // [chunks, N]
                             const float* __restrict__ temperature,  // [N]
                             int64_t rows, int64_t chunks, int64_t vocab,
                             int64_t* __restrict__ tokens, float* __restrict__ confidence,
                             float* __restrict__ logsumexp) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float t = safe_temperature(temperature[row]);
  RowState state = partial[row];
  for (int64_t c = 1; c < chunks; ++c) merge_state(state, partial[c * rows + row], t);
  finish_state(state, t, vocab, tokens + row, confidence + row, logsumexp + row);
}

}  // namespace cuda
}  // namespace exit_head
}  // namespace s2d
