// Host-side entry points of the CUDA exit head (implemented in csrc/exit_head/exit_head_kernels.cu
// and exit_head_reduce_kernels.cu). No torch headers: the torch binding (exit_head_cuda.cpp) owns
// the tensors and the matmuls, see exit_head_chunked.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "s2d/exit_head_common.h"

namespace s2d {
namespace exit_head {

// normed [N, d] in the hidden dtype (one block per row). Every pointer is device memory.
cudaError_t rms_norm_cuda(const void* hidden,       // [N, d]
                          const void* norm_weight,  // [d]
                          DType dtype, int64_t rows, int64_t dim, float eps,
                          void* normed,  // [N, d] out, dtype
                          cudaStream_t stream);

// Number of RowState partials chunk_stats_cuda writes for a chunk of `cols` logits per row.
int64_t chunk_stats_parts(int64_t cols);

// The online state of every row over one chunk of float32 logits [N, cols] (vocabulary ids
// id_offset .. id_offset + cols - 1) into partial[part_begin .. part_begin + parts, N]. N <= 65535.
cudaError_t chunk_stats_cuda(const float* logits, const float* temperature, int64_t rows,
                             int64_t cols, int64_t id_offset, RowState* partial, int64_t part_begin,
                             cudaStream_t stream);

// Merges partial [parts, N] (ids ascending with p) into tokens [N], confidence [N], logsumexp [N].
cudaError_t merge_cuda(const RowState* partial, const float* temperature, int64_t rows,
                       int64_t parts, int64_t vocab, int64_t* tokens, float* confidence,
                       float* logsumexp, cudaStream_t stream);

}  // namespace exit_head
}  // namespace s2d
