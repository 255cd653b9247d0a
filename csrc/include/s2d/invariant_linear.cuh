// CUDA row-invariant linear kernel (framework-free); the computation is specified in
// invariant_linear_common.h, here with a warp's 32 lanes in place of the CPU's 8:
//
//   lane l (l = 0..31) accumulates acc_l = fma(w[n, k], x[t, k], acc_l) for k = l, l + 32, ...
//   in increasing k, from 0; s = the xor-butterfly sum of the 32 lanes (offsets 16, 8, 4, 2, 1);
//   y[t, n] = s + bias[n] (when there is a bias).
//
// One warp per output column n, rows in blocks of kRows (a register accumulator each). Every
// (t, n) pair runs the same operations whatever T, the row block or the grid, so a verify forward
// over T tokens gives each token what a one-token forward gives (bits may differ from the CPU's,
// whose lane count differs). The weight row is read once per row block (from L2 after the first),
// with coalesced loads: consecutive lanes read consecutive k.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace s2d {
namespace invariant_linear {
namespace cuda {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kRows = 4;

template <typename W>
__device__ __forceinline__ float weight_to_float(W w);
template <>
__device__ __forceinline__ float weight_to_float<float>(float w) {
  return w;
}
template <>
__device__ __forceinline__ float weight_to_float<__nv_bfloat16>(__nv_bfloat16 w) {
  return __bfloat162float(w);
}
template <>
__device__ __forceinline__ float weight_to_float<__half>(__half w) {
  return __half2float(w);
}

template <typename W>
__global__ void __launch_bounds__(kThreads)
    invariant_linear_kernel(const float* __restrict__ x,     // [T, K]
                            const W* __restrict__ w,         // [N, K]
                            const float* __restrict__ bias,  // [N] or nullptr
                            float* __restrict__ y,           // [T, N]
                            int64_t rows, int64_t in_features, int64_t out_features) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  // NOTE: no early return: every lane of the block stays for the shuffles (full mask).
  const bool column = n < out_features;
  const W* w_row = w + (column ? n : 0) * in_features;
  for (int64_t t0 = 0; t0 < rows; t0 += kRows) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    if (column) {
      for (int64_t k = lane; k < in_features; k += 32) {
        const float wk = weight_to_float<W>(w_row[k]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (t0 + r < rows) acc[r] = fmaf(wk, x[(t0 + r) * in_features + k], acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
      }
    }
    if (column && lane == 0) {
      const float b = bias ? bias[n] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (t0 + r < rows) y[(t0 + r) * out_features + n] = bias ? acc[r] + b : acc[r];
      }
    }
  }
}

}  // namespace cuda
}  // namespace invariant_linear
}  // namespace s2d
