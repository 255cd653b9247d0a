// CUDA kernels of the exit head (framework-free). The exit head on CUDA is
//   1. rms_norm_kernel: one block per row writes normed [N, d] in the hidden dtype (values rounded
//      exactly as HF Llama's RMSNorm rounds them), so bf16 / f16 rows feed the tensor cores as is;
//   2. the head as torch matmuls over chunks of the vocabulary, each into one float32 [N, C] buffer
//      (never [N, V] for a large V; see exit_head_chunked.h), each followed by
//   3. chunk_stats_kernel (exit_head_reduce.cuh): the online (max, argmax, sum-exp) of the chunk;
//   4. merge_kernel (exit_head_reduce.cuh): the chunks merged in id order -> the outputs.
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

template <typename T>
struct Scalar;

template <>
struct Scalar<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float round(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Scalar<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ float round(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

template <>
struct Scalar<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ float round(float x) {
    return __half2float(__float2half_rn(x));
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  return value;
}

// One block (kThreads) per row: normed = (h * rsqrt(mean(h^2) + eps)).to(T) * weight, rounded to T.
template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ hidden,  // [N, d]
                                const T* __restrict__ weight,  // [d]
                                T* __restrict__ normed,        // [N, d] out
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
    normed[row * dim + k] = Scalar<T>::from_float(scaled * Scalar<T>::to_float(weight[k]));
  }
}

}  // namespace cuda
}  // namespace exit_head
}  // namespace s2d
