// Launcher of the CUDA row-invariant linear layer (kernel in
// csrc/include/s2d/invariant_linear.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/cuda_launch.h"
#include "s2d/invariant_linear.cuh"
#include "s2d/invariant_linear_launch.h"

namespace s2d {
namespace invariant_linear {
namespace {

template <typename W>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const int64_t blocks = (p.out_features + cuda::kWarpsPerBlock - 1) / cuda::kWarpsPerBlock;
  S2D_LAUNCH((cuda::invariant_linear_kernel<W>), dim3(static_cast<unsigned>(blocks)),
             dim3(cuda::kThreads), stream, p.x, static_cast<const W*>(p.w), p.bias, p.y, p.rows,
             p.in_features, p.out_features);
  return cudaGetLastError();
}

}  // namespace

cudaError_t invariant_linear_cuda(const Params& params, cudaStream_t stream) {
  if (params.rows == 0 || params.out_features == 0) return cudaSuccess;
  switch (params.weight_type) {
    case WeightType::kBFloat16:
      return launch<__nv_bfloat16>(params, stream);
    case WeightType::kFloat16:
      return launch<__half>(params, stream);
    default:
      return launch<float>(params, stream);
  }
}

}  // namespace invariant_linear
}  // namespace s2d
