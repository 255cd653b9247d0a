// Launchers of the CUDA exit head (kernels in csrc/include/s2d/exit_head.cuh). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/exit_head.cuh"
#include "s2d/exit_head_launch.h"

namespace s2d {
namespace exit_head {
namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

int64_t num_chunks(int64_t vocab) { return (vocab + cuda::kChunkVocab - 1) / cuda::kChunkVocab; }

template <typename T, int ROWS>
void launch_partial(const float* normed, const T* weight, const float* temperature, int64_t rows,
                    int64_t dim, int64_t vocab, RowState* partial, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_chunks(vocab)),
                  static_cast<unsigned>((rows + ROWS - 1) / ROWS));
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(weight) % 16 == 0 && dim % kVec == 0;
  if (vec) {
    cuda::head_partial_kernel<T, ROWS, true><<<grid, cuda::kThreads, 0, stream>>>(
        normed, weight, temperature, rows, dim, vocab, partial);
  } else {
    cuda::head_partial_kernel<T, ROWS, false><<<grid, cuda::kThreads, 0, stream>>>(
        normed, weight, temperature, rows, dim, vocab, partial);
  }
}

template <typename T>
cudaError_t run(const T* hidden, const T* norm_weight, const T* lm_head, int64_t rows, int64_t dim,
                int64_t vocab, float eps, const float* temperature, void* workspace,
                int64_t* tokens, float* confidence, float* logsumexp, cudaStream_t stream) {
  const int64_t chunks = num_chunks(vocab);
  RowState* partial = static_cast<RowState*>(workspace);
  float* normed = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                           align_up(sizeof(RowState) * chunks * rows));
  cuda::rms_norm_kernel<T><<<static_cast<unsigned>(rows), cuda::kThreads, 0, stream>>>(
      hidden, norm_weight, normed, dim, eps);
  // NOTE: ROWS rows share each lm_head row load; small N (decode) uses fewer so no work is wasted.
  if (rows == 1) {
    launch_partial<T, 1>(normed, lm_head, temperature, rows, dim, vocab, partial, stream);
  } else if (rows == 2) {
    launch_partial<T, 2>(normed, lm_head, temperature, rows, dim, vocab, partial, stream);
  } else if (rows <= 4) {
    launch_partial<T, 4>(normed, lm_head, temperature, rows, dim, vocab, partial, stream);
  } else {
    launch_partial<T, 8>(normed, lm_head, temperature, rows, dim, vocab, partial, stream);
  }
  constexpr int kMergeThreads = 128;
  cuda::merge_kernel<<<static_cast<unsigned>((rows + kMergeThreads - 1) / kMergeThreads),
                       kMergeThreads, 0, stream>>>(partial, temperature, rows, chunks, vocab,
                                                   tokens, confidence, logsumexp);
  return cudaGetLastError();
}

}  // namespace

size_t exit_head_cuda_workspace_bytes(int64_t rows, int64_t dim, int64_t vocab) {
  return align_up(sizeof(RowState) * num_chunks(vocab) * rows) + sizeof(float) * rows * dim;
}

cudaError_t exit_head_cuda(const void* hidden, const void* norm_weight, const void* lm_head,
                           DType dtype, int64_t rows, int64_t dim, int64_t vocab, float eps,
                           const float* temperature, void* workspace, int64_t* tokens,
                           float* confidence, float* logsumexp, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return run(static_cast<const __nv_bfloat16*>(hidden),
                 static_cast<const __nv_bfloat16*>(norm_weight),
                 static_cast<const __nv_bfloat16*>(lm_head), rows, dim, vocab, eps, temperature,
                 workspace, tokens, confidence, logsumexp, stream);
    case DType::kFloat16:
      return run(static_cast<const __half*>(hidden), static_cast<const __half*>(norm_weight),
                 static_cast<const __half*>(lm_head), rows, dim, vocab, eps, temperature, workspace,
                 tokens, confidence, logsumexp, stream);
    default:
      return run(static_cast<const float*>(hidden), static_cast<const float*>(norm_weight),
                 static_cast<const float*>(lm_head), rows, dim, vocab, eps, temperature, workspace,
                 tokens, confidence, logsumexp, stream);
  }
}

}  // namespace exit_head
}  // namespace s2d
