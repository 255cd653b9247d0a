// Launcher of the CUDA sampling kernel (csrc/include/s2d/exit_sample.cuh). No torch headers;
// launches go through S2D_LAUNCH so the CPU CUDA simulator can run it.
#include <cuda_runtime.h>

#include "s2d/cuda_launch.h"
#include "s2d/exit_sample.cuh"
#include "s2d/exit_sample_launch.h"

namespace s2d {
namespace exit_sample {

cudaError_t sample_cuda(const float* logits, const SampleParams& params, cudaStream_t stream) {
  if (params.rows == 0) return cudaSuccess;
  static_assert(kRaceBlock <= cuda::kSampleThreads,
                "stage 2 gives every id of a race block a thread");
  S2D_LAUNCH((cuda::sample_kernel), dim3(static_cast<unsigned>(params.rows)),
             dim3(cuda::kSampleThreads), stream, logits, params);
  return cudaGetLastError();
}

}  // namespace exit_sample
}  // namespace s2d
