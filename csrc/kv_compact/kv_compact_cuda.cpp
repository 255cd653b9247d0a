// Thin torch binding of the CUDA KV-cache compaction launcher.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "s2d/kv_compact_launch.h"

// Defined in kv_compact_cpu.cpp (same library).
void kv_compact_check(const at::Tensor& cache, const at::Tensor& index);

namespace {

at::Tensor kv_compact_cuda(const at::Tensor& cache, const at::Tensor& index) {
  kv_compact_check(cache, index);
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t batch = cache.size(0), heads = cache.size(1), slots = cache.size(2);
  const int64_t dim = cache.size(3), slots_out = index.size(1);
  at::Tensor out = at::empty({batch, heads, slots_out, dim}, cache.options());
  if (out.numel() == 0) return out;
  const cudaError_t status = s2d::kv_compact::kv_compact_cuda(
      cache.data_ptr(), index.data_ptr<int64_t>(), out.data_ptr(), batch, heads, slots, slots_out,
      dim * static_cast<int64_t>(cache.element_size()), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess,
              "s2d::kv_compact CUDA launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) { m.impl("kv_compact", &kv_compact_cuda); }
