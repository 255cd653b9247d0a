// CUDA KV-cache compaction kernel (framework-free). One thread per Word (16 bytes when the rows
// allow it) of the output; the gathered slot is read once per word from the (cached) index, and
// out-of-range slots are never read (zeros are written instead).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace s2d {
namespace kv_compact {
namespace cuda {

template <typename Word>
__global__ void kv_compact_kernel(const Word* __restrict__ cache,     // [B, H, S, words]
                                  const int64_t* __restrict__ index,  // [B, S_out]
                                  Word* __restrict__ out,             // [B, H, S_out, words]
                                  int64_t heads, int64_t slots, int64_t slots_out,
                                  int64_t row_words, int64_t total_words) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < total_words;
       w += stride) {
    const int64_t j = w % row_words;
    const int64_t row = w / row_words;  // (b * H + h) * S_out + i
    const int64_t i = row % slots_out;
    const int64_t bh = row / slots_out;
    const int64_t b = bh / heads;
    const int64_t slot = __ldg(index + b * slots_out + i);
    Word value{};
    if (slot >= 0 && slot < slots) value = cache[(bh * slots + slot) * row_words + j];
    out[w] = value;
  }
}

}  // namespace cuda
}  // namespace kv_compact
}  // namespace s2d
