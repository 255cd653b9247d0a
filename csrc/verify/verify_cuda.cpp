// Thin torch binding of the CUDA verify kernels (csrc/verify/verify_kernels.cu): check, then
// launch. Only c10/cuda/CUDAStream.h and c10/cuda/CUDAGuard.h from the CUDA side of torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "s2d/verify_cuda.h"
#include "verify_binding.h"

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
  TORCH_CHECK(target_logits.is_cuda(),
              "s2d::verify (CUDA kernel): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard device_guard(target_logits.device());
  s2d::VerifyPrepared prepared = s2d::verify_prepare(
      target_logits, draft_tokens, draft_probs, num_draft, temperature, min_logit, seeds, offsets);
  const int64_t batch = prepared.params.batch;
  const int64_t positions = prepared.params.num_spec + 1;
  const int64_t vocab = prepared.params.vocab;
  if (batch == 0) return {prepared.out_tokens, prepared.num_accepted};
  // NOTE: the stats and race grids put the batch in grid.y (at most 65535 blocks).
  TORCH_CHECK(batch <= 65535,
              "s2d::verify (CUDA kernel): target_logits batch (dim 0) must be <= ", "65535, got ",
              batch, "; split the batch");

  int num_chunks = 1;
  int64_t chunk_size = vocab;
  s2d::verify_cuda_plan(batch, vocab, multiprocessor_count(target_logits.get_device()), &num_chunks,
                        &chunk_size);
  const auto float_options = target_logits.options().dtype(at::kFloat);
  const auto int_options = target_logits.options().dtype(at::kInt);
  at::Tensor stats = at::empty({batch, positions, 3}, float_options);
  at::Tensor argmax = at::empty({batch, positions}, int_options);
  at::Tensor partial_key = at::empty({batch, num_chunks, 2}, float_options);
  at::Tensor partial_block = at::empty({batch, num_chunks, 3}, int_options);

  s2d::VerifyCudaWorkspace workspace{stats.data_ptr<float>(),
                                     argmax.data_ptr<int32_t>(),
                                     partial_key.data_ptr<float>(),
                                     partial_block.data_ptr<int32_t>(),
                                     num_chunks,
                                     chunk_size};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t error =
      s2d::verify_cuda_launch(prepared.params, prepared.logit_type, workspace, stream);
  TORCH_CHECK(error == cudaSuccess, "s2d::verify CUDA launch failed: ", cudaGetErrorString(error));
  return {prepared.out_tokens, prepared.num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) { m.impl("verify", &verify_cuda); }
