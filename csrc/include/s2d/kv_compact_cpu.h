// CPU KV-cache compaction (framework-free): out[b, h, i] = cache[b, h, index[b, i]], zeros for a
// hole (-1) or any out-of-range index (never read). Rows of D elements are copied as bytes with
// one memcpy each, so every dtype works and the copy is bit exact.
#pragma once

#include <cstdint>
#include <cstring>

namespace s2d {
namespace kv_compact {
namespace cpu {

// ParallelFor: callable (int64_t begin, int64_t end, int64_t grain, F fn) calling fn(b, e).
template <typename ParallelFor>
void kv_compact(const void* cache,     // [B, H, S, D]
                const int64_t* index,  // [B, S_out]
                void* out,             // [B, H, S_out, D]
                int64_t batch, int64_t heads, int64_t slots, int64_t slots_out, int64_t row_bytes,
                ParallelFor&& parallel_for) {
  const char* src = static_cast<const char*>(cache);
  char* dst = static_cast<char*>(out);
  // NOTE: grain keeps each task at >= ~64 KiB of copying, so tiny caches stay on one thread.
  const int64_t bytes_per_head = slots_out * row_bytes;
  const int64_t grain = bytes_per_head >= 65536 ? 1 : 65536 / (bytes_per_head + 1) + 1;
  parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads;
      const char* head_src = src + bh * slots * row_bytes;
      char* head_dst = dst + bh * slots_out * row_bytes;
      const int64_t* row_index = index + b * slots_out;
      for (int64_t i = 0; i < slots_out; ++i) {
        const int64_t slot = row_index[i];
        if (slot >= 0 && slot < slots) {
          std::memcpy(head_dst + i * row_bytes, head_src + slot * row_bytes, row_bytes);
        } else {
          std::memset(head_dst + i * row_bytes, 0, row_bytes);
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace kv_compact
}  // namespace s2d
