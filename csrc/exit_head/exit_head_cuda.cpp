// Thin torch binding of the CUDA exit head: RMSNorm kernel, then the head as torch matmuls over
// chunks of the vocabulary (tensor cores, float32 results) reduced chunk by chunk (see
// csrc/include/s2d/exit_head_chunked.h). Never writes the [N, V] logits once V * N exceeds the
// chunk buffer (8 MiB).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "s2d/exit_head_chunked.h"
#include "s2d/exit_head_launch.h"

// Defined in exit_head_cpu.cpp (same library).
void exit_head_check(const at::Tensor& hidden, const at::Tensor& norm_weight,
                     const at::Tensor& lm_head_weight, double eps, const at::Tensor& temperature);

namespace s2d {
namespace exit_head {

DType cuda_dtype(at::ScalarType type) {
  if (type == at::kBFloat16) return DType::kBFloat16;
  if (type == at::kHalf) return DType::kFloat16;
  return DType::kFloat32;
}

// normed [N, d] in the hidden dtype (the reference's rounded values), on the current stream.
at::Tensor rms_norm_normed(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps) {
  at::Tensor normed = at::empty_like(hidden);
  const cudaError_t status =
      rms_norm_cuda(hidden.data_ptr(), norm_weight.data_ptr(), cuda_dtype(hidden.scalar_type()),
                    hidden.size(0), hidden.size(1), static_cast<float>(eps), normed.data_ptr(),
                    c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess,
              "s2d: RMSNorm CUDA launch failed: ", cudaGetErrorString(status));
  return normed;
}

// out [N, C] float32 = normed [N, d] @ weight [C, d]^T, accumulated in float32. NOTE: a bf16 / f16
// product is exact in float32, so only the summation order differs from the reference.
void head_matmul(at::Tensor& out, const at::Tensor& normed, const at::Tensor& weight) {
  if (normed.scalar_type() == at::kFloat) {
    at::mm_out(out, normed, weight.t());
  } else {
    at::mm_out(out, normed, weight.t(), at::kFloat);
  }
}

}  // namespace exit_head
}  // namespace s2d

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cuda(const at::Tensor& hidden,
                                                              const at::Tensor& norm_weight,
                                                              const at::Tensor& lm_head_weight,
                                                              double eps,
                                                              const at::Tensor& temperature) {
  exit_head_check(hidden, norm_weight, lm_head_weight, eps, temperature);
  TORCH_CHECK(hidden.size(0) <= 65535, "s2d::exit_head: CUDA takes at most 65535 rows");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t rows = hidden.size(0);
  const int64_t vocab = lm_head_weight.size(0);
  const auto options = hidden.options();
  at::Tensor tokens = at::empty({rows}, options.dtype(at::kLong));
  at::Tensor confidence = at::empty({rows}, options.dtype(at::kFloat));
  at::Tensor logsumexp = at::empty({rows}, options.dtype(at::kFloat));
  if (rows == 0) return {tokens, confidence, logsumexp};
  const at::Tensor normed = s2d::exit_head::rms_norm_normed(hidden, norm_weight, eps);
  const int64_t cols = s2d::exit_head::chunk_cols(rows, vocab);
  at::Tensor buffer = at::empty({rows * cols}, options.dtype(at::kFloat));
  const int64_t parts = s2d::exit_head::chunked_parts(rows, vocab);
  at::Tensor partial =
      at::empty({parts * rows * static_cast<int64_t>(sizeof(s2d::exit_head::RowState))},
                options.dtype(at::kByte));
  const cudaError_t status = s2d::exit_head::exit_head_chunked(
      rows, vocab, temperature.data_ptr<float>(), buffer.data_ptr<float>(),
      static_cast<s2d::exit_head::RowState*>(partial.data_ptr()), tokens.data_ptr<int64_t>(),
      confidence.data_ptr<float>(), logsumexp.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream(), [&](int64_t begin, int64_t count, float*) {
        at::Tensor out = buffer.narrow(0, 0, rows * count).view({rows, count});
        s2d::exit_head::head_matmul(out, normed, lm_head_weight.narrow(0, begin, count));
      });
  TORCH_CHECK(status == cudaSuccess,
              "s2d::exit_head CUDA launch failed: ", cudaGetErrorString(status));
  return {tokens, confidence, logsumexp};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) { m.impl("exit_head", &exit_head_cuda); }
