// Launcher of the CUDA KV-cache compaction (kernel in csrc/include/s2d/kv_compact.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/kv_compact.cuh"
#include "s2d/kv_compact_launch.h"

namespace s2d {
namespace kv_compact {
namespace {

template <typename Word>
cudaError_t launch(const void* cache, const int64_t* index, void* out, int64_t batch, int64_t heads,
                   int64_t slots, int64_t slots_out, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t total = batch * heads * slots_out * row_words;
  constexpr int kThreads = 256;
  // NOTE: a grid-stride loop; 65535 * 8 blocks is plenty to fill any current GPU.
  const int64_t blocks_needed = (total + kThreads - 1) / kThreads;
  const unsigned blocks =
      static_cast<unsigned>(blocks_needed < 65535 * 8 ? blocks_needed : 65535 * 8);
  cuda::kv_compact_kernel<Word><<<blocks, kThreads, 0, stream>>>(
      static_cast<const Word*>(cache), index, static_cast<Word*>(out), heads, slots, slots_out,
      row_words, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t kv_compact_cuda(const void* cache, const int64_t* index, void* out, int64_t batch,
                            int64_t heads, int64_t slots, int64_t slots_out, int64_t row_bytes,
                            cudaStream_t stream) {
  if (batch * heads * slots_out * row_bytes == 0) return cudaSuccess;
  // The widest word that divides the row and both base addresses.
  const uintptr_t alignment = reinterpret_cast<uintptr_t>(cache) |
                              reinterpret_cast<uintptr_t>(out) | static_cast<uintptr_t>(row_bytes);
  if (alignment % 16 == 0)
    return launch<uint4>(cache, index, out, batch, heads, slots, slots_out, row_bytes, stream);
  if (alignment % 8 == 0)
    return launch<uint2>(cache, index, out, batch, heads, slots, slots_out, row_bytes, stream);
  if (alignment % 4 == 0)
    return launch<uint32_t>(cache, index, out, batch, heads, slots, slots_out, row_bytes, stream);
  if (alignment % 2 == 0)
    return launch<uint16_t>(cache, index, out, batch, heads, slots, slots_out, row_bytes, stream);
  return launch<uint8_t>(cache, index, out, batch, heads, slots, slots_out, row_bytes, stream);
}

}  // namespace kv_compact
}  // namespace s2d
