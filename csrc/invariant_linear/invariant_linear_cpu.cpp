// Thin torch binding of the CPU row-invariant linear kernel
// (csrc/include/s2d/invariant_linear_cpu.h): check, convert the input to float32, launch.
// Also holds the op schema (shared with the CUDA binding) and the invariant_linear_has_cuda query.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "s2d/invariant_linear_cpu.h"

namespace s2d {

// csrc/invariant_linear/invariant_linear_avx2_cpu.cpp: the same kernel built for AVX2+FMA+F16C.
void invariant_linear_columns_avx2(const invariant_linear::Params& params, const float* x_tail,
                                   int64_t n_begin, int64_t n_end);
bool invariant_linear_has_avx2();

}  // namespace s2d

// NOTE: integers are streamed into TORCH_CHECK messages as std::string (see verify_cpu.cpp).
std::string invariant_linear_shape(const at::Tensor& tensor) {
  std::string out = "[";
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    out += (d ? ", " : "") + std::to_string(tensor.size(d));
  }
  return out + "]";
}

// Shared by the CPU and CUDA bindings (no device synchronisation).
void invariant_linear_check(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "s2d::invariant_linear: weight must be [N, K], got ",
              invariant_linear_shape(weight));
  const auto wtype = weight.scalar_type();
  TORCH_CHECK(wtype == at::kFloat || wtype == at::kBFloat16 || wtype == at::kHalf,
              "s2d::invariant_linear: weight must be float32, bfloat16 or float16, got ", wtype);
  TORCH_CHECK(weight.is_contiguous(), "s2d::invariant_linear: weight must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1),
              "s2d::invariant_linear: x must be [..., K=", std::to_string(weight.size(1)),
              "], got ", invariant_linear_shape(x));
  const auto xtype = x.scalar_type();
  TORCH_CHECK(xtype == at::kFloat || xtype == at::kBFloat16 || xtype == at::kHalf,
              "s2d::invariant_linear: x must be float32, bfloat16 or float16, got ", xtype);
  TORCH_CHECK(x.device() == weight.device(),
              "s2d::invariant_linear: x must be on the device of weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "s2d::invariant_linear: bias must be [N=", std::to_string(weight.size(0)),
                "], got ", invariant_linear_shape(*bias));
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()),
                "s2d::invariant_linear: bias must have a floating dtype");
    TORCH_CHECK(bias->device() == weight.device(),
                "s2d::invariant_linear: bias must be on the device of weight");
  }
}

// The output shape: x's leading dims + [N].
std::vector<int64_t> invariant_linear_out_shape(const at::Tensor& x, const at::Tensor& weight) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return shape;
}

s2d::invariant_linear::WeightType invariant_linear_weight_type(const at::Tensor& weight) {
  using s2d::invariant_linear::WeightType;
  switch (weight.scalar_type()) {
    case at::kBFloat16:
      return WeightType::kBFloat16;
    case at::kHalf:
      return WeightType::kFloat16;
    default:
      return WeightType::kFloat32;
  }
}

namespace {

bool use_avx2() {
  // NOTE: S2D_INVARIANT_LINEAR_PORTABLE=1 forces the portable build (tests compare the two).
  static const bool avx2 = [] {
    const char* env = std::getenv("S2D_INVARIANT_LINEAR_PORTABLE");
    return s2d::invariant_linear_has_avx2() && !(env && env[0] == '1');
  }();
  return avx2;
}

at::Tensor invariant_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  invariant_linear_check(x, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0);
  // NOTE: the row count from the leading dims, not reshape(-1, K), which is ambiguous for K = 0.
  const int64_t T =
      K > 0 ? x.numel() / K : c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor rows_in = x.reshape({T, K}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({T, N}, x.options().dtype(at::kFloat));
  if (T > 0 && N > 0) {
    if (K == 0) {
      y.zero_();
      if (bias.has_value()) y.add_(bias->to(at::kFloat));
    } else {
      const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
      // Each row's last K % 8 inputs, zero-padded to 8 (the kernel never reads past a row).
      const int64_t full = K - K % s2d::invariant_linear::kLanes;
      at::Tensor tail = at::zeros({T, s2d::invariant_linear::kLanes}, y.options());
      if (full < K) tail.narrow(1, 0, K - full).copy_(rows_in.narrow(1, full, K - full));
      s2d::invariant_linear::Params params{rows_in.data_ptr<float>(),
                                           weight.data_ptr(),
                                           bias.has_value() ? bias_f.data_ptr<float>() : nullptr,
                                           y.data_ptr<float>(),
                                           T,
                                           K,
                                           N,
                                           invariant_linear_weight_type(weight)};
      const float* x_tail = tail.data_ptr<float>();
      const bool avx2 = use_avx2();
      // NOTE: each task owns whole output columns, so the split never changes a value; the grain
      // keeps a task at >= ~256 KiB of weights.
      const int64_t row_bytes = K * static_cast<int64_t>(weight.element_size());
      const int64_t grain = row_bytes >= 262144 ? 1 : 262144 / row_bytes + 1;
      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        if (avx2) {
          s2d::invariant_linear_columns_avx2(params, x_tail, begin, end);
        } else {
          s2d::invariant_linear_cpu::run_columns(params, x_tail, begin, end);
        }
      });
    }
  }
  return y.to(x.scalar_type()).reshape(invariant_linear_out_shape(x, weight));
}

bool invariant_linear_has_cuda() {
#ifdef S2D_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool invariant_linear_uses_avx2() { return use_avx2(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2d, m) {
  m.def("invariant_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("invariant_linear_has_cuda() -> bool", &invariant_linear_has_cuda);
  m.def("invariant_linear_uses_avx2() -> bool", &invariant_linear_uses_avx2);
}

TORCH_LIBRARY_IMPL(s2d, CPU, m) { m.impl("invariant_linear", &invariant_linear_cpu); }
