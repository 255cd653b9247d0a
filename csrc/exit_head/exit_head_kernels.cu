// Launcher of the exit head's RMSNorm (kernel in csrc/include/s2d/exit_head.cuh). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/cuda_launch.h"
#include "s2d/exit_head.cuh"
#include "s2d/exit_head_launch.h"

namespace s2d {
namespace exit_head {
namespace {

template <typename T>
cudaError_t launch_rms_norm(const void* hidden, const void* norm_weight, int64_t rows, int64_t dim,
                            float eps, void* normed, cudaStream_t stream) {
  S2D_LAUNCH((cuda::rms_norm_kernel<T>), dim3(static_cast<unsigned>(rows)), dim3(cuda::kThreads),
             stream, static_cast<const T*>(hidden), static_cast<const T*>(norm_weight),
             static_cast<T*>(normed), dim, eps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_cuda(const void* hidden, const void* norm_weight, DType dtype, int64_t rows,
                          int64_t dim, float eps, void* normed, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return launch_rms_norm<__nv_bfloat16>(hidden, norm_weight, rows, dim, eps, normed, stream);
    case DType::kFloat16:
      return launch_rms_norm<__half>(hidden, norm_weight, rows, dim, eps, normed, stream);
    default:
      return launch_rms_norm<float>(hidden, norm_weight, rows, dim, eps, normed, stream);
  }
}

}  // namespace exit_head
}  // namespace s2d
