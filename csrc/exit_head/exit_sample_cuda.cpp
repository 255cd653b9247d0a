// Thin torch bindings of the CUDA sampled-drafting ops: exit_sample (RMSNorm kernel, the head as
// one tensor-core matmul with float32 results, the sampling kernel) and sample_logits (the sampling
// kernel on given logits). A sampled row's logits are needed whole (q is written out), so the head
// is not chunked here. The top-k / top-p threshold, only when `filters`, is torch's sort-based
// composition (as s2d_ext.ops.verify computes it), the same definition as the CPU kernel's.
// NOTE: the whole ATen API: the threshold below is a composition of many tensor ops.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "exit_sample_binding.h"
#include "s2d/exit_sample_launch.h"

// Defined in exit_head_cpu.cpp / exit_head_cuda.cpp (same library).
void exit_head_check(const at::Tensor& hidden, const at::Tensor& norm_weight,
                     const at::Tensor& lm_head_weight, double eps, const at::Tensor& temperature);
namespace s2d {
namespace exit_head {
at::Tensor rms_norm_normed(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps);
void head_matmul(at::Tensor& out, const at::Tensor& normed, const at::Tensor& weight);
}  // namespace exit_head
}  // namespace s2d

namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
constexpr float kInf = std::numeric_limits<float>::infinity();

// verify_reference.logit_threshold on [N, Vh] float32 logits: the per-row min_logit [N] of top-k
// then top-p on the scaled scores (-inf where the row is greedy or has neither filter).
at::Tensor filter_threshold(const at::Tensor& logits, const at::Tensor& temperature,
                            const at::Tensor& top_k, const at::Tensor& top_p) {
  const int64_t vocab = logits.size(1);
  const at::Tensor safe_t = at::where(temperature > 0, temperature, at::ones_like(temperature));
  at::Tensor scores =
      at::nan_to_num(logits / safe_t.unsqueeze(1), -kInf, std::numeric_limits<float>::max(), -kInf);
  const at::Tensor dead = scores.amax(-1, true) == -kInf;
  scores = at::where(dead, at::zeros_like(scores), scores);
  const at::Tensor ordered = std::get<0>(at::sort(scores, -1, /*descending=*/true));
  const at::Tensor k = at::where(top_k > 0, top_k.clamp_max(vocab), at::full_like(top_k, vocab));
  const at::Tensor kth = ordered.gather(-1, (k - 1).unsqueeze(1)).squeeze(1);
  const at::Tensor rank = at::arange(vocab, logits.options().dtype(at::kLong));
  const at::Tensor in_top_k = rank.unsqueeze(0) < k.unsqueeze(1);
  const at::Tensor probs = at::softmax(ordered.masked_fill(in_top_k.logical_not(), -kInf), -1);
  const at::Tensor mass_before = at::cumsum(probs, -1) - probs;
  at::Tensor kept = ((mass_before < top_p.unsqueeze(1)) | (top_p >= 1).unsqueeze(1)) & in_top_k;
  kept.select(1, 0).fill_(true);
  const at::Tensor last_kept = kept.sum(-1, true) - 1;
  const at::Tensor top_p_min = ordered.gather(-1, last_kept).squeeze(1);
  const at::Tensor threshold = at::maximum(kth, top_p_min);
  const at::Tensor active = (temperature > 0) & ((top_k > 0) | (top_p < 1));
  return at::where(active, threshold, at::full_like(threshold, -kInf)).contiguous();
}

Outputs sample_tail(const at::Tensor& logits, s2d::exit_sample::SamplePrepared& prepared,
                    bool filters) {
  at::Tensor min_logit;
  if (filters) {
    min_logit = filter_threshold(logits, prepared.temperature, prepared.top_k, prepared.top_p);
    prepared.params.min_logit = min_logit.data_ptr<float>();
  }
  const cudaError_t status = s2d::exit_sample::sample_cuda(
      logits.data_ptr<float>(), prepared.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess,
              "s2d: sampling CUDA launch failed: ", cudaGetErrorString(status));
  return {prepared.tokens, prepared.confidence, prepared.fired};
}

Outputs exit_sample_cuda(const at::Tensor& hidden, const at::Tensor& norm_weight,
                         const at::Tensor& lm_head_weight, double eps,
                         const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& seeds,
                         const at::Tensor& offsets, const at::Tensor& positions,
                         const at::Tensor& threshold, const std::optional<at::Tensor>& vocab_ids,
                         at::Tensor& probs, const at::Tensor& probs_rows, bool filters) {
  exit_head_check(hidden, norm_weight, lm_head_weight, eps, temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t rows = hidden.size(0);
  auto prepared = s2d::exit_sample::sample_prepare(
      "exit_sample", rows, lm_head_weight.size(0), hidden.device(), temperature, top_k, top_p,
      seeds, offsets, positions, threshold, vocab_ids, probs, probs_rows, filters);
  if (rows == 0) return {prepared.tokens, prepared.confidence, prepared.fired};
  const at::Tensor normed = s2d::exit_head::rms_norm_normed(hidden, norm_weight, eps);
  at::Tensor logits = at::empty({rows, lm_head_weight.size(0)}, hidden.options().dtype(at::kFloat));
  s2d::exit_head::head_matmul(logits, normed, lm_head_weight);
  return sample_tail(logits, prepared, filters);
}

Outputs sample_logits_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                           const at::Tensor& top_k, const at::Tensor& top_p,
                           const at::Tensor& seeds, const at::Tensor& offsets,
                           const at::Tensor& positions, const at::Tensor& threshold,
                           const std::optional<at::Tensor>& vocab_ids, at::Tensor& probs,
                           const at::Tensor& probs_rows, bool filters) {
  TORCH_CHECK(logits.dim() == 2, "s2d::sample_logits: logits must be [N, Vh], got ",
              s2d::exit_sample::shape_of(logits));
  const c10::cuda::CUDAGuard guard(logits.device());
  auto prepared = s2d::exit_sample::sample_prepare(
      "sample_logits", logits.size(0), logits.size(1), logits.device(), temperature, top_k, top_p,
      seeds, offsets, positions, threshold, vocab_ids, probs, probs_rows, filters);
  if (logits.size(0) == 0) return {prepared.tokens, prepared.confidence, prepared.fired};
  return sample_tail(logits.to(at::kFloat).contiguous(), prepared, filters);
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) {
  m.impl("exit_sample", &exit_sample_cuda);
  m.impl("sample_logits", &sample_logits_cuda);
}
