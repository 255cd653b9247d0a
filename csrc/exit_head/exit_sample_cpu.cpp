// Thin torch bindings of the CPU sampled-drafting kernel (csrc/include/s2d/exit_sample_cpu.h):
// exit_sample (final RMSNorm + head + sampling, fused) and sample_logits (sampling from given
// logits). Also holds the ops' schemas (shared with the CUDA binding).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "exit_sample_binding.h"
#include "s2d/exit_head_cpu.h"
#include "s2d/exit_sample_cpu.h"

// Defined in exit_head_cpu.cpp (same library).
void exit_head_check(const at::Tensor& hidden, const at::Tensor& norm_weight,
                     const at::Tensor& lm_head_weight, double eps, const at::Tensor& temperature);

namespace s2d {
namespace exit_sample {

std::string shape_of(const at::Tensor& tensor) {
  std::string out = "[";
  for (int64_t d = 0; d < tensor.dim(); ++d)
    out += (d ? ", " : "") + std::to_string(tensor.size(d));
  return out + "]";
}

namespace {

void check_row_tensor(const char* op, const at::Tensor& tensor, const char* name,
                      at::ScalarType dtype, int64_t rows, const at::Device& device) {
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == rows, "s2d::", op, ": ", name,
              " must have shape [N=", std::to_string(rows), "], got ", shape_of(tensor));
  TORCH_CHECK(tensor.scalar_type() == dtype, "s2d::", op, ": ", name, " must be ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.device() == device, "s2d::", op, ": ", name, " must be on ", device, ", got ",
              tensor.device());
}

}  // namespace

SamplePrepared sample_prepare(const char* op, int64_t rows, int64_t head_vocab,
                              const at::Device& device, const at::Tensor& temperature,
                              const at::Tensor& top_k, const at::Tensor& top_p,
                              const at::Tensor& seeds, const at::Tensor& offsets,
                              const at::Tensor& positions, const at::Tensor& threshold,
                              const std::optional<at::Tensor>& vocab_ids, at::Tensor& probs,
                              const at::Tensor& probs_rows, bool filters) {
  check_row_tensor(op, temperature, "temperature", at::kFloat, rows, device);
  check_row_tensor(op, top_k, "top_k", at::kLong, rows, device);
  check_row_tensor(op, top_p, "top_p", at::kFloat, rows, device);
  check_row_tensor(op, seeds, "seeds", at::kLong, rows, device);
  check_row_tensor(op, offsets, "offsets", at::kLong, rows, device);
  check_row_tensor(op, positions, "positions", at::kLong, rows, device);
  check_row_tensor(op, threshold, "threshold", at::kFloat, rows, device);
  check_row_tensor(op, probs_rows, "probs_rows", at::kLong, rows, device);
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat && probs.is_contiguous(),
              "s2d::", op, ": probs must be a contiguous [M, V] float32 tensor, got ",
              shape_of(probs));
  TORCH_CHECK(probs.device() == device, "s2d::", op, ": probs must be on ", device);
  const int64_t vocab = probs.size(1);
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t{1} << 31), "s2d::", op,
              ": probs must have 1 to 2^31 - 1 columns (V), got ", shape_of(probs));
  TORCH_CHECK(head_vocab >= 1, "s2d::", op, ": the head vocabulary must hold at least one id");
  if (vocab_ids.has_value()) {
    TORCH_CHECK(vocab_ids->dim() == 1 && vocab_ids->size(0) == head_vocab &&
                    vocab_ids->scalar_type() == at::kLong && vocab_ids->device() == device,
                "s2d::", op, ": vocab_ids must be an int64 [Vh=", std::to_string(head_vocab),
                "] tensor on ", device, ", got ", shape_of(*vocab_ids));
  } else {
    TORCH_CHECK(head_vocab == vocab, "s2d::", op, ": without vocab_ids the head vocabulary (",
                std::to_string(head_vocab), ") must equal the width of probs (",
                std::to_string(vocab), ")");
  }
  SamplePrepared prepared;
  prepared.temperature = temperature.contiguous();
  prepared.top_k = top_k.contiguous();
  prepared.top_p = top_p.contiguous();
  prepared.seeds = seeds.contiguous();
  prepared.offsets = offsets.contiguous();
  prepared.positions = positions.contiguous();
  prepared.threshold = threshold.contiguous();
  prepared.vocab_ids = vocab_ids.has_value() ? vocab_ids->contiguous() : at::Tensor();
  prepared.probs_rows = probs_rows.contiguous();
  const auto options = temperature.options();
  prepared.tokens = at::empty({rows}, options.dtype(at::kLong));
  prepared.confidence = at::empty({rows}, options.dtype(at::kFloat));
  prepared.fired = at::empty({rows}, options.dtype(at::kBool));
  SampleParams& p = prepared.params;
  p.temperature = prepared.temperature.data_ptr<float>();
  p.top_k = prepared.top_k.data_ptr<int64_t>();
  p.top_p = prepared.top_p.data_ptr<float>();
  p.seeds = prepared.seeds.data_ptr<int64_t>();
  p.offsets = prepared.offsets.data_ptr<int64_t>();
  p.positions = prepared.positions.data_ptr<int64_t>();
  p.threshold = prepared.threshold.data_ptr<float>();
  p.vocab_ids = prepared.vocab_ids.defined() ? prepared.vocab_ids.data_ptr<int64_t>() : nullptr;
  p.min_logit = nullptr;
  p.probs_rows = prepared.probs_rows.data_ptr<int64_t>();
  p.probs = probs.data_ptr<float>();
  p.probs_count = probs.size(0);
  p.tokens = prepared.tokens.data_ptr<int64_t>();
  p.confidence = prepared.confidence.data_ptr<float>();
  p.fired = prepared.fired.data_ptr<bool>();
  p.rows = rows;
  p.head_vocab = head_vocab;
  p.vocab = vocab;
  p.filters = filters;
  return prepared;
}

}  // namespace exit_sample
}  // namespace s2d

namespace {

using s2d::exit_head::DType;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const auto kParallelFor = [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
  at::parallel_for(begin, end, grain, fn);
};

DType kernel_dtype(at::ScalarType type) {
  if (type == at::kBFloat16) return DType::kBFloat16;
  if (type == at::kHalf) return DType::kFloat16;
  return DType::kFloat32;
}

Outputs exit_sample_cpu(const at::Tensor& hidden, const at::Tensor& norm_weight,
                        const at::Tensor& lm_head_weight, double eps, const at::Tensor& temperature,
                        const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& seeds,
                        const at::Tensor& offsets, const at::Tensor& positions,
                        const at::Tensor& threshold, const std::optional<at::Tensor>& vocab_ids,
                        at::Tensor& probs, const at::Tensor& probs_rows, bool filters) {
  exit_head_check(hidden, norm_weight, lm_head_weight, eps, temperature);
  const int64_t rows = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t head_vocab = lm_head_weight.size(0);
  auto prepared = s2d::exit_sample::sample_prepare(
      "exit_sample", rows, head_vocab, hidden.device(), temperature, top_k, top_p, seeds, offsets,
      positions, threshold, vocab_ids, probs, probs_rows, filters);
  if (rows == 0) return {prepared.tokens, prepared.confidence, prepared.fired};
  std::vector<float> normed(static_cast<size_t>(rows * dim));
  std::vector<float> logits(static_cast<size_t>(rows * head_vocab));
  s2d::exit_head::cpu::head_logits(hidden.data_ptr(), norm_weight.data_ptr(),
                                   lm_head_weight.data_ptr(), kernel_dtype(hidden.scalar_type()),
                                   rows, dim, head_vocab, static_cast<float>(eps), normed.data(),
                                   logits.data(), kParallelFor);
  s2d::exit_sample::cpu::sample_rows(logits.data(), prepared.params, kParallelFor);
  return {prepared.tokens, prepared.confidence, prepared.fired};
}

Outputs sample_logits_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                          const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& seeds,
                          const at::Tensor& offsets, const at::Tensor& positions,
                          const at::Tensor& threshold, const std::optional<at::Tensor>& vocab_ids,
                          at::Tensor& probs, const at::Tensor& probs_rows, bool filters) {
  TORCH_CHECK(logits.dim() == 2, "s2d::sample_logits: logits must be [N, Vh], got ",
              s2d::exit_sample::shape_of(logits));
  const auto type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
              "s2d::sample_logits: logits must be float32, bfloat16 or float16, got ", type);
  auto prepared = s2d::exit_sample::sample_prepare(
      "sample_logits", logits.size(0), logits.size(1), logits.device(), temperature, top_k, top_p,
      seeds, offsets, positions, threshold, vocab_ids, probs, probs_rows, filters);
  if (logits.size(0) == 0) return {prepared.tokens, prepared.confidence, prepared.fired};
  const at::Tensor values = logits.to(at::kFloat).contiguous();
  s2d::exit_sample::cpu::sample_rows(values.data_ptr<float>(), prepared.params, kParallelFor);
  return {prepared.tokens, prepared.confidence, prepared.fired};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2d, m) {
  m.def(
      "exit_sample(Tensor hidden, Tensor norm_weight, Tensor lm_head_weight, float eps, "
      "Tensor temperature, Tensor top_k, Tensor top_p, Tensor seeds, Tensor offsets, "
      "Tensor positions, Tensor threshold, Tensor? vocab_ids, Tensor(a!) probs, Tensor probs_rows, "
      "bool filters) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sample_logits(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seeds, "
      "Tensor offsets, Tensor positions, Tensor threshold, Tensor? vocab_ids, Tensor(a!) probs, "
      "Tensor probs_rows, bool filters) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(s2d, CPU, m) {
  m.impl("exit_sample", &exit_sample_cpu);
  m.impl("sample_logits", &sample_logits_cpu);
}
