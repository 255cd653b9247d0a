// Host-side entry point of the CUDA KV-cache compaction (csrc/kv_compact/kv_compact_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace s2d {
namespace kv_compact {

// out[b, h, i] = cache[b, h, index[b, i]] (zeros for -1 / out of range). Device pointers,
// contiguous tensors; row_bytes = D * element size.
cudaError_t kv_compact_cuda(const void* cache,     // [B, H, S, D]
                            const int64_t* index,  // [B, S_out]
                            void* out,             // [B, H, S_out, D]
                            int64_t batch, int64_t heads, int64_t slots, int64_t slots_out,
                            int64_t row_bytes, cudaStream_t stream);

}  // namespace kv_compact
}  // namespace s2d
