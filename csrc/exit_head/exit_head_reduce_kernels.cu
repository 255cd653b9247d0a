// Launchers of the exit head's chunk reduction (kernels in csrc/include/s2d/exit_head_reduce.cuh).
// No torch headers; launches go through S2D_LAUNCH so the CPU CUDA simulator can run them.
#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/cuda_launch.h"
#include "s2d/exit_head_launch.h"
#include "s2d/exit_head_reduce.cuh"

namespace s2d {
namespace exit_head {

int64_t chunk_stats_parts(int64_t cols) {
  return (cols + cuda::kReduceCols - 1) / cuda::kReduceCols;
}

cudaError_t chunk_stats_cuda(const float* logits, const float* temperature, int64_t rows,
                             int64_t cols, int64_t id_offset, RowState* partial, int64_t part_begin,
                             cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(chunk_stats_parts(cols)), static_cast<unsigned>(rows));
  S2D_LAUNCH((cuda::chunk_stats_kernel), grid, dim3(cuda::kReduceThreads), stream, logits,
             temperature, rows, cols, id_offset, partial, part_begin);
  return cudaGetLastError();
}

cudaError_t merge_cuda(const RowState* partial, const float* temperature, int64_t rows,
                       int64_t parts, int64_t vocab, int64_t* tokens, float* confidence,
                       float* logsumexp, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((rows + cuda::kMergeThreads - 1) / cuda::kMergeThreads));
  S2D_LAUNCH((cuda::merge_kernel), grid, dim3(cuda::kMergeThreads), stream, partial, temperature,
             rows, parts, vocab, tokens, confidence, logsumexp);
  return cudaGetLastError();
}

}  // namespace exit_head
}  // namespace s2d
