// Host-side entry points of the CUDA exit head (implemented in
// csrc/exit_head/exit_head_kernels.cu). No torch headers: the torch binding (exit_head_cuda.cpp)
// allocates the workspace and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "s2d/exit_head_common.h"

namespace s2d {
namespace exit_head {

// Bytes of device workspace exit_head_cuda needs for these sizes.
size_t exit_head_cuda_workspace_bytes(int64_t rows, int64_t dim, int64_t vocab);

// tokens [N] int64, confidence [N] / logsumexp [N] float32 of the exit head of hidden [N, d]
// (see exit_head_common.h). Every pointer is device memory; inputs contiguous.
cudaError_t exit_head_cuda(const void* hidden,       // [N, d]
                           const void* norm_weight,  // [d]
                           const void* lm_head,      // [V, d]
                           DType dtype, int64_t rows, int64_t dim, int64_t vocab, float eps,
                           const float* temperature,  // [N]
                           void* workspace,           // exit_head_cuda_workspace_bytes(...)
                           int64_t* tokens, float* confidence, float* logsumexp,
                           cudaStream_t stream);

}  // namespace exit_head
}  // namespace s2d
