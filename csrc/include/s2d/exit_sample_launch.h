// Host-side entry point of the CUDA sampling kernel (csrc/exit_head/exit_sample_kernels.cu). No
// torch headers: the binding (exit_sample_cuda.cpp) computes the logits and the top-k / top-p
// threshold with torch and calls this.
#pragma once

#include <cuda_runtime_api.h>

#include "s2d/exit_sample_common.h"

namespace s2d {
namespace exit_sample {

// Every pointer of `params` and `logits` ([N, Vh] float32) is device memory. N <= 2^31 - 1.
cudaError_t sample_cuda(const float* logits, const SampleParams& params, cudaStream_t stream);

}  // namespace exit_sample
}  // namespace s2d
