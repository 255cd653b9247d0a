// Thin torch binding of the CPU verify kernel (csrc/include/s2d/verify_cpu.h): check, then launch.
// Also holds the op schema (shared with the CUDA binding) and the verify_has_cuda query.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "s2d/verify_cpu.h"
#include "verify_binding.h"

namespace {

// NOTE: the messages below stream integers and shapes only as std::string (std::to_string,
// shape_of). On the lent H100 machine's image (torch 2.11 CUDA 13 wheel, GCC 13.3), any
// extension that streams an integer or tensor.sizes() into TORCH_CHECK's message crashed with
// SIGSEGV instead of raising: a minimal torch.utils.cpp_extension.load_inline function did too,
// while strings, literals and dtypes streamed fine. So this is that image's bug, worked around.
std::string num(int64_t value) { return std::to_string(value); }

// "[3, 17]".
std::string shape_of(const at::Tensor& tensor) {
  std::string out = "[";
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    out += (d ? ", " : "") + std::to_string(tensor.size(d));
  }
  return out + "]";
}

void check_row_tensor(const at::Tensor& tensor, const char* name, at::ScalarType dtype,
                      int64_t batch, const at::Device& device) {
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == batch, "s2d::verify: ", name,
              " must have shape [B=", num(batch), "], got ", shape_of(tensor));
  TORCH_CHECK(tensor.scalar_type() == dtype, "s2d::verify: ", name, " must be ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.device() == device, "s2d::verify: ", name, " must be on ", device, ", got ",
              tensor.device());
}

}  // namespace

namespace s2d {

// csrc/verify/verify_avx2_cpu.cpp: the same kernel built for AVX2+FMA.
void verify_cpu_rows_avx2(const VerifyParams& params, LogitType logit_type, int64_t row_begin,
                          int64_t row_end);
bool verify_cpu_has_avx2();

namespace {

// Shape/dtype/device checks shared by the CPU and CUDA bindings (no device synchronisation).
void verify_check_inputs(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                         const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft,
                         const at::Tensor& temperature, const std::optional<at::Tensor>& min_logit,
                         const at::Tensor& seeds, const at::Tensor& offsets) {
  TORCH_CHECK(target_logits.dim() == 3, "s2d::verify: target_logits must be [B, K+1, V], got ",
              shape_of(target_logits));
  const auto logit_dtype = target_logits.scalar_type();
  TORCH_CHECK(logit_dtype == at::kFloat || logit_dtype == at::kBFloat16 || logit_dtype == at::kHalf,
              "s2d::verify: target_logits must be float32, bfloat16 or float16, got ", logit_dtype);
  const int64_t batch = target_logits.size(0);
  const int64_t positions = target_logits.size(1);
  const int64_t vocab = target_logits.size(2);
  TORCH_CHECK(positions >= 1 && positions <= 65536,
              "s2d::verify: target_logits needs 1..65536 positions (dim 1), got ", num(positions));
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t{1} << 31),
              "s2d::verify: the vocabulary (dim 2 of target_logits) must be in [1, 2^31), got ",
              num(vocab));
  const at::Device device = target_logits.device();
  TORCH_CHECK(draft_tokens.dim() == 2 && draft_tokens.size(0) == batch &&
                  draft_tokens.size(1) == positions - 1,
              "s2d::verify: draft_tokens must have shape [B, K] = [", num(batch), ", ",
              num(positions - 1), "], got ", shape_of(draft_tokens));
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong, "s2d::verify: draft_tokens must be int64");
  TORCH_CHECK(draft_tokens.device() == device, "s2d::verify: draft_tokens must be on ", device);
  if (draft_probs.has_value()) {
    TORCH_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == batch &&
                    draft_probs->size(1) == positions - 1 && draft_probs->size(2) == vocab,
                "s2d::verify: draft_probs must have shape [B, K, V] = [", num(batch), ", ",
                num(positions - 1), ", ", num(vocab), "], got ", shape_of(*draft_probs));
    TORCH_CHECK(draft_probs->scalar_type() == at::kFloat,
                "s2d::verify: draft_probs must be float32");
    TORCH_CHECK(draft_probs->device() == device, "s2d::verify: draft_probs must be on ", device);
  }
  check_row_tensor(num_draft, "num_draft", at::kLong, batch, device);
  check_row_tensor(temperature, "temperature", at::kFloat, batch, device);
  check_row_tensor(seeds, "seeds", at::kLong, batch, device);
  check_row_tensor(offsets, "offsets", at::kLong, batch, device);
  if (min_logit.has_value()) {
    TORCH_CHECK(
        min_logit->dim() == 2 && min_logit->size(0) == batch && min_logit->size(1) == positions,
        "s2d::verify: min_logit must have shape [B, K+1] = [", num(batch), ", ", num(positions),
        "], got ", shape_of(*min_logit));
    TORCH_CHECK(min_logit->scalar_type() == at::kFloat, "s2d::verify: min_logit must be float32");
    TORCH_CHECK(min_logit->device() == device, "s2d::verify: min_logit must be on ", device);
  }
}

}  // namespace

LogitType verify_logit_type(const at::Tensor& target_logits) {
  switch (target_logits.scalar_type()) {
    case at::kBFloat16:
      return LogitType::kBFloat16;
    case at::kHalf:
      return LogitType::kFloat16;
    default:
      return LogitType::kFloat32;
  }
}

VerifyPrepared verify_prepare(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                              const std::optional<at::Tensor>& draft_probs,
                              const at::Tensor& num_draft, const at::Tensor& temperature,
                              const std::optional<at::Tensor>& min_logit, const at::Tensor& seeds,
                              const at::Tensor& offsets) {
  verify_check_inputs(target_logits, draft_tokens, draft_probs, num_draft, temperature, min_logit,
                      seeds, offsets);
  const int64_t batch = target_logits.size(0);
  const int64_t positions = target_logits.size(1);
  VerifyPrepared prepared;
  prepared.out_tokens = at::empty({batch, positions}, target_logits.options().dtype(at::kLong));
  prepared.num_accepted = at::empty({batch}, target_logits.options().dtype(at::kInt));
  prepared.logits = target_logits.contiguous();
  prepared.tokens = draft_tokens.contiguous();
  prepared.q = draft_probs.has_value() ? draft_probs->contiguous() : at::Tensor();
  prepared.threshold = min_logit.has_value() ? min_logit->contiguous() : at::Tensor();
  prepared.num_draft = num_draft.contiguous();
  prepared.temperature = temperature.contiguous();
  prepared.seeds = seeds.contiguous();
  prepared.offsets = offsets.contiguous();

  VerifyParams& params = prepared.params;
  params.target_logits = prepared.logits.data_ptr();
  params.draft_tokens = prepared.tokens.data_ptr<int64_t>();
  params.draft_probs = prepared.q.defined() ? prepared.q.data_ptr<float>() : nullptr;
  params.num_draft = prepared.num_draft.data_ptr<int64_t>();
  params.temperature = prepared.temperature.data_ptr<float>();
  params.min_logit = prepared.threshold.defined() ? prepared.threshold.data_ptr<float>() : nullptr;
  params.seeds = prepared.seeds.data_ptr<int64_t>();
  params.offsets = prepared.offsets.data_ptr<int64_t>();
  params.out_tokens = prepared.out_tokens.data_ptr<int64_t>();
  params.num_accepted = prepared.num_accepted.data_ptr<int32_t>();
  params.batch = batch;
  params.num_spec = positions - 1;
  params.vocab = target_logits.size(2);
  prepared.logit_type = verify_logit_type(target_logits);
  return prepared;
}

}  // namespace s2d

namespace {

std::tuple<at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits,
                                              const at::Tensor& draft_tokens,
                                              const std::optional<at::Tensor>& draft_probs,
                                              const at::Tensor& num_draft,
                                              const at::Tensor& temperature,
                                              const std::optional<at::Tensor>& min_logit,
                                              const at::Tensor& seeds, const at::Tensor& offsets) {
  TORCH_CHECK(target_logits.device().is_cpu(), "s2d::verify (CPU kernel): tensors must be on CPU");
  s2d::VerifyPrepared prepared = s2d::verify_prepare(
      target_logits, draft_tokens, draft_probs, num_draft, temperature, min_logit, seeds, offsets);
  const int64_t batch = prepared.params.batch;
  if (batch == 0) return {prepared.out_tokens, prepared.num_accepted};
  const s2d::VerifyParams& params = prepared.params;
  const s2d::LogitType logit_type = prepared.logit_type;
  // NOTE: S2D_VERIFY_PORTABLE=1 forces the portable build (tests run it in a subprocess).
  static const bool use_avx2 = s2d::verify_cpu_has_avx2() && !std::getenv("S2D_VERIFY_PORTABLE");
  // NOTE: rows are handed out one at a time, not in fixed ranges: a row's cost grows with its
  // number of accepted drafts (one pass over V per position), so fixed ranges leave a thread idle.
  std::atomic<int64_t> next_row{0};
  at::parallel_for(0, batch, 1, [&](int64_t, int64_t) {
    for (int64_t row = next_row.fetch_add(1); row < batch; row = next_row.fetch_add(1)) {
      if (use_avx2) {
        s2d::verify_cpu_rows_avx2(params, logit_type, row, row + 1);
      } else {
        s2d::verify_cpu::rows(params, logit_type, row, row + 1);
      }
    }
  });
  return {prepared.out_tokens, prepared.num_accepted};
}

// Raw Philox4x32-10 words of csrc/include/s2d/philox.h, for the bit-equality tests.
// counters [N, 4] int64 and keys [N, 2] int64 hold uint32 values; returns [N, 4] int64.
at::Tensor verify_philox(const at::Tensor& counters, const at::Tensor& keys) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4 && counters.scalar_type() == at::kLong,
              "s2d::verify_philox: counters must be [N, 4] int64");
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 2 && keys.scalar_type() == at::kLong &&
                  keys.size(0) == counters.size(0),
              "s2d::verify_philox: keys must be [N, 2] int64");
  const at::Tensor c = counters.contiguous();
  const at::Tensor k = keys.contiguous();
  at::Tensor out = at::empty({c.size(0), 4}, c.options());
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    const s2d::PhiloxOut words = s2d::philox4x32_10(
        static_cast<uint32_t>(cp[4 * i]), static_cast<uint32_t>(cp[4 * i + 1]),
        static_cast<uint32_t>(cp[4 * i + 2]), static_cast<uint32_t>(cp[4 * i + 3]),
        static_cast<uint32_t>(kp[2 * i]), static_cast<uint32_t>(kp[2 * i + 1]));
    for (int w = 0; w < 4; ++w) op[4 * i + w] = words.x[w];
  }
  return out;
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
  m.def("verify_philox(Tensor counters, Tensor keys) -> Tensor");
}

TORCH_LIBRARY_IMPL(s2d, CPU, m) {
  m.impl("verify", &verify_cpu);
  m.impl("verify_philox", &verify_philox);
}
