// Thin torch binding of the CPU exit head kernel (csrc/include/s2d/exit_head_cpu.h): schema,
// checks, launch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "s2d/exit_head_cpu.h"

namespace {

using s2d::exit_head::DType;

DType to_kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "s2d::exit_head: hidden must be float32, bfloat16 or float16, got ", type);
  }
}

}  // namespace

// Shared by the CPU and CUDA bindings: shape / dtype / device checks.
void exit_head_check(const at::Tensor& hidden, const at::Tensor& norm_weight,
                     const at::Tensor& lm_head_weight, double eps, const at::Tensor& temperature) {
  TORCH_CHECK(hidden.dim() == 2, "s2d::exit_head: hidden must be [N, d]");
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == hidden.size(1),
              "s2d::exit_head: norm_weight must be [d]");
  TORCH_CHECK(lm_head_weight.dim() == 2 && lm_head_weight.size(1) == hidden.size(1) &&
                  lm_head_weight.size(0) >= 1,
              "s2d::exit_head: lm_head_weight must be [V >= 1, d]");
  TORCH_CHECK(hidden.size(1) >= 1, "s2d::exit_head: d must be >= 1");
  TORCH_CHECK(norm_weight.scalar_type() == hidden.scalar_type() &&
                  lm_head_weight.scalar_type() == hidden.scalar_type(),
              "s2d::exit_head: norm_weight and lm_head_weight must have the dtype of hidden");
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == hidden.size(0) &&
                  temperature.scalar_type() == at::kFloat,
              "s2d::exit_head: temperature must be [N] float32");
  TORCH_CHECK(eps >= 0, "s2d::exit_head: eps must be >= 0");
  for (const at::Tensor* t : {&norm_weight, &lm_head_weight, &temperature}) {
    TORCH_CHECK(t->device() == hidden.device(),
                "s2d::exit_head: every tensor must be on the device of hidden");
  }
  TORCH_CHECK(hidden.is_contiguous() && norm_weight.is_contiguous() &&
                  lm_head_weight.is_contiguous() && temperature.is_contiguous(),
              "s2d::exit_head: inputs must be contiguous");
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(const at::Tensor& hidden,
                                                             const at::Tensor& norm_weight,
                                                             const at::Tensor& lm_head_weight,
                                                             double eps,
                                                             const at::Tensor& temperature) {
  exit_head_check(hidden, norm_weight, lm_head_weight, eps, temperature);
  const int64_t rows = hidden.size(0);
  at::Tensor tokens = at::empty({rows}, hidden.options().dtype(at::kLong));
  at::Tensor confidence = at::empty({rows}, hidden.options().dtype(at::kFloat));
  at::Tensor logsumexp = at::empty({rows}, hidden.options().dtype(at::kFloat));
  s2d::exit_head::cpu::exit_head(
      hidden.data_ptr(), norm_weight.data_ptr(), lm_head_weight.data_ptr(),
      to_kernel_dtype(hidden.scalar_type()), rows, hidden.size(1), lm_head_weight.size(0),
      static_cast<float>(eps), temperature.data_ptr<float>(), tokens.data_ptr<int64_t>(),
      confidence.data_ptr<float>(), logsumexp.data_ptr<float>(),
      [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
        at::parallel_for(begin, end, grain, fn);
      });
  return {tokens, confidence, logsumexp};
}

bool exit_head_has_cuda() {
#ifdef S2D_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2d, m) {
  m.def(
      "exit_head(Tensor hidden, Tensor norm_weight, Tensor lm_head_weight, float eps, "
      "Tensor temperature) -> (Tensor, Tensor, Tensor)");
  m.def("exit_head_has_cuda() -> bool", &exit_head_has_cuda);
}

TORCH_LIBRARY_IMPL(s2d, CPU, m) { m.impl("exit_head", &exit_head_cpu); }
