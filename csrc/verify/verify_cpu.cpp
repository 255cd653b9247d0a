// Thin torch binding of the CPU verify kernel: check, then launch. Schema and exports only.
#include <torch/library.h>
#include <ATen/core/Tensor.h>

namespace {

std::tuple<at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits,
                                              const at::Tensor& draft_tokens,
                                              const std::optional<at::Tensor>& draft_probs,
                                              const at::Tensor& num_draft,
                                              const at::Tensor& temperature,
                                              const std::optional<at::Tensor>& min_logit,
                                              const at::Tensor& seeds, const at::Tensor& offsets) {
  TORCH_CHECK(false, "s2d::verify CPU kernel not implemented yet");
}

bool verify_has_cuda() {
#ifdef S2D_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2d, m) {
  m.def(
      "verify(Tensor target_logits, Tensor draft_tokens, Tensor? draft_probs, Tensor num_draft, "
      "Tensor temperature, Tensor? min_logit, Tensor seeds, Tensor offsets) -> (Tensor, Tensor)");
  m.def("verify_has_cuda() -> bool", &verify_has_cuda);
}

TORCH_LIBRARY_IMPL(s2d, CPU, m) { m.impl("verify", &verify_cpu); }
