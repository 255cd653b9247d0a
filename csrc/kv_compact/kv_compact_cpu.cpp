// Thin torch binding of the CPU KV-cache compaction (csrc/include/s2d/kv_compact_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "s2d/kv_compact_cpu.h"

// Shared by the CPU and CUDA bindings.
void kv_compact_check(const at::Tensor& cache, const at::Tensor& index) {
  TORCH_CHECK(cache.dim() == 4, "s2d::kv_compact: cache must be [B, H, S, D]");
  TORCH_CHECK(at::isFloatingType(cache.scalar_type()),
              "s2d::kv_compact: cache must have a floating dtype");
  TORCH_CHECK(
      index.dim() == 2 && index.size(0) == cache.size(0) && index.scalar_type() == at::kLong,
      "s2d::kv_compact: index must be [B, S_out] int64");
  TORCH_CHECK(index.device() == cache.device(),
              "s2d::kv_compact: index must be on the device of cache");
  TORCH_CHECK(cache.is_contiguous() && index.is_contiguous(),
              "s2d::kv_compact: inputs must be contiguous");
}

namespace {

at::Tensor kv_compact_cpu(const at::Tensor& cache, const at::Tensor& index) {
  kv_compact_check(cache, index);
  const int64_t batch = cache.size(0), heads = cache.size(1), slots = cache.size(2);
  const int64_t dim = cache.size(3), slots_out = index.size(1);
  at::Tensor out = at::empty({batch, heads, slots_out, dim}, cache.options());
  if (out.numel() == 0) return out;
  s2d::kv_compact::cpu::kv_compact(cache.data_ptr(), index.data_ptr<int64_t>(), out.data_ptr(),
                                   batch, heads, slots, slots_out,
                                   dim * static_cast<int64_t>(cache.element_size()),
                                   [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
                                     at::parallel_for(begin, end, grain, fn);
                                   });
  return out;
}

bool kv_compact_has_cuda() {
#ifdef S2D_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2d, m) {
  m.def("kv_compact(Tensor cache, Tensor index) -> Tensor");
  m.def("kv_compact_has_cuda() -> bool", &kv_compact_has_cuda);
}

TORCH_LIBRARY_IMPL(s2d, CPU, m) { m.impl("kv_compact", &kv_compact_cpu); }
