// Thin torch binding of the CUDA exit head launcher (csrc/exit_head/exit_head_kernels.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "s2d/exit_head_launch.h"

// Defined in exit_head_cpu.cpp (same library).
void exit_head_check(const at::Tensor& hidden, const at::Tensor& norm_weight,
                     const at::Tensor& lm_head_weight, double eps, const at::Tensor& temperature);

namespace {

using s2d::exit_head::DType;

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cuda(const at::Tensor& hidden,
                                                              const at::Tensor& norm_weight,
                                                              const at::Tensor& lm_head_weight,
                                                              double eps,
                                                              const at::Tensor& temperature) {
  exit_head_check(hidden, norm_weight, lm_head_weight, eps, temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t rows = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocab = lm_head_weight.size(0);
  at::Tensor tokens = at::empty({rows}, hidden.options().dtype(at::kLong));
  at::Tensor confidence = at::empty({rows}, hidden.options().dtype(at::kFloat));
  at::Tensor logsumexp = at::empty({rows}, hidden.options().dtype(at::kFloat));
  if (rows == 0) return {tokens, confidence, logsumexp};
  const size_t workspace_bytes = s2d::exit_head::exit_head_cuda_workspace_bytes(rows, dim, vocab);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, hidden.options().dtype(at::kByte));
  DType dtype = DType::kFloat32;
  if (hidden.scalar_type() == at::kBFloat16) dtype = DType::kBFloat16;
  if (hidden.scalar_type() == at::kHalf) dtype = DType::kFloat16;
  const cudaError_t status = s2d::exit_head::exit_head_cuda(
      hidden.data_ptr(), norm_weight.data_ptr(), lm_head_weight.data_ptr(), dtype, rows, dim, vocab,
      static_cast<float>(eps), temperature.data_ptr<float>(), workspace.data_ptr(),
      tokens.data_ptr<int64_t>(), confidence.data_ptr<float>(), logsumexp.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess,
              "s2d::exit_head CUDA launch failed: ", cudaGetErrorString(status));
  return {tokens, confidence, logsumexp};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) { m.impl("exit_head", &exit_head_cuda); }
