// Thin torch binding of the CUDA row-invariant linear launcher.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "s2d/invariant_linear_launch.h"

// Defined in invariant_linear_cpu.cpp (same library).
void invariant_linear_check(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias);
std::vector<int64_t> invariant_linear_out_shape(const at::Tensor& x, const at::Tensor& weight);
s2d::invariant_linear::WeightType invariant_linear_weight_type(const at::Tensor& weight);

namespace {

at::Tensor invariant_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  invariant_linear_check(x, weight, bias);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t K = weight.size(1), N = weight.size(0);
  // NOTE: the row count from the leading dims, not reshape(-1, K), which is ambiguous for K = 0.
  const int64_t T =
      K > 0 ? x.numel() / K : c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor rows_in = x.reshape({T, K}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({T, N}, x.options().dtype(at::kFloat));
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const s2d::invariant_linear::Params params{rows_in.data_ptr<float>(),
                                             weight.data_ptr(),
                                             bias.has_value() ? bias_f.data_ptr<float>() : nullptr,
                                             y.data_ptr<float>(),
                                             T,
                                             K,
                                             N,
                                             invariant_linear_weight_type(weight)};
  const cudaError_t status = s2d::invariant_linear::invariant_linear_cuda(
      params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess,
              "s2d::invariant_linear CUDA launch failed: ", cudaGetErrorString(status));
  return y.to(x.scalar_type()).reshape(invariant_linear_out_shape(x, weight));
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) { m.impl("invariant_linear", &invariant_linear_cuda); }
