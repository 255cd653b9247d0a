// Thin torch binding of the CUDA verify kernels (csrc/verify/verify_kernels.cu): check, then
// launch. Only c10/cuda/CUDAStream.h and c10/cuda/CUDAGuard.h from the CUDA side of torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "s2d/verify_cuda.h"

namespace s2d {
// Defined in verify_cpu.cpp (same library).
void verify_check_inputs(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                         const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft,
                         const at::Tensor& temperature, const std::optional<at::Tensor>& min_logit,
                         const at::Tensor& seeds, const at::Tensor& offsets);
LogitType verify_logit_type(const at::Tensor& target_logits);
}  // namespace s2d

namespace {

int multiprocessor_count(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 1;
  }
  return count;
}

std::tuple<at::Tensor, at::Tensor> verify_cuda(const at::Tensor& target_logits,
                                               const at::Tensor& draft_tokens,
                                               const std::optional<at::Tensor>& draft_probs,
                                               const at::Tensor& num_draft,
                                               const at::Tensor& temperature,
                                               const std::optional<at::Tensor>& min_logit,
                                               const at::Tensor& seeds, const at::Tensor& offsets) {
  s2d::verify_check_inputs(target_logits, draft_tokens, draft_probs, num_draft, temperature,
                           min_logit, seeds, offsets);
  TORCH_CHECK(target_logits.is_cuda(),
              "s2d::verify (CUDA kernel): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard device_guard(target_logits.device());
  const int64_t batch = target_logits.size(0);
  const int64_t positions = target_logits.size(1);
  const int64_t vocab = target_logits.size(2);
  auto out_tokens = at::empty({batch, positions}, target_logits.options().dtype(at::kLong));
  auto num_accepted = at::empty({batch}, target_logits.options().dtype(at::kInt));
  if (batch == 0) return {out_tokens, num_accepted};

  const at::Tensor logits = target_logits.contiguous();
  const at::Tensor tokens = draft_tokens.contiguous();
  const at::Tensor q = draft_probs.has_value() ? draft_probs->contiguous() : at::Tensor();
  const at::Tensor threshold = min_logit.has_value() ? min_logit->contiguous() : at::Tensor();
  const at::Tensor num_draft_c = num_draft.contiguous();
  const at::Tensor temperature_c = temperature.contiguous();
  const at::Tensor seeds_c = seeds.contiguous();
  const at::Tensor offsets_c = offsets.contiguous();

  int num_chunks = 1;
  int64_t chunk_size = vocab;
  s2d::verify_cuda_plan(batch, vocab, multiprocessor_count(target_logits.get_device()), &num_chunks,
                        &chunk_size);
  const auto float_options = target_logits.options().dtype(at::kFloat);
  const auto int_options = target_logits.options().dtype(at::kInt);
  at::Tensor stats = at::empty({batch, positions, 3}, float_options);
  at::Tensor argmax = at::empty({batch, positions}, int_options);
  at::Tensor partial_key = at::empty({batch, num_chunks, 2}, float_options);
  at::Tensor partial_index = at::empty({batch, num_chunks, 2}, int_options);

  s2d::VerifyParams params;
  params.target_logits = logits.data_ptr();
  params.draft_tokens = tokens.data_ptr<int64_t>();
  params.draft_probs = q.defined() ? q.data_ptr<float>() : nullptr;
  params.num_draft = num_draft_c.data_ptr<int64_t>();
  params.temperature = temperature_c.data_ptr<float>();
  params.min_logit = threshold.defined() ? threshold.data_ptr<float>() : nullptr;
  params.seeds = seeds_c.data_ptr<int64_t>();
  params.offsets = offsets_c.data_ptr<int64_t>();
  params.out_tokens = out_tokens.data_ptr<int64_t>();
  params.num_accepted = num_accepted.data_ptr<int32_t>();
  params.batch = batch;
  params.num_spec = positions - 1;
  params.vocab = vocab;
  s2d::VerifyCudaWorkspace workspace{stats.data_ptr<float>(),
                                     argmax.data_ptr<int32_t>(),
                                     partial_key.data_ptr<float>(),
                                     partial_index.data_ptr<int32_t>(),
                                     num_chunks,
                                     chunk_size};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t error =
      s2d::verify_cuda_launch(params, s2d::verify_logit_type(target_logits), workspace, stream);
  TORCH_CHECK(error == cudaSuccess, "s2d::verify CUDA launch failed: ", cudaGetErrorString(error));
  return {out_tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) { m.impl("verify", &verify_cuda); }
