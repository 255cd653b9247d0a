// Host-side entry point of the CUDA row-invariant linear layer
// (csrc/invariant_linear/invariant_linear_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "s2d/invariant_linear_common.h"

namespace s2d {
namespace invariant_linear {

// y [T, N] = x [T, K] w[N, K]^T (+ bias), float32 out; device pointers, contiguous tensors.
cudaError_t invariant_linear_cuda(const Params& params, cudaStream_t stream);

}  // namespace invariant_linear
}  // namespace s2d
