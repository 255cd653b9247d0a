// Thin torch binding of the CUDA verify kernels (csrc/verify/verify_kernels.cu): check, then
// launch. Only c10/cuda/CUDAStream.h and c10/cuda/CUDAGuard.h from the CUDA side of torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

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

// Ids per first-pass chunk: s2d::kStatChunkSize, or S2D_VERIFY_STAT_CHUNK (a multiple of 256, read
// once per process), for tuning sweeps.
int64_t stat_chunk_size_setting() {
  static const int64_t size = [] {
    const char* text = std::getenv("S2D_VERIFY_STAT_CHUNK");
    const int64_t value = text != nullptr ? std::atoll(text) : 0;
    return value >= 256 && value % 256 == 0 ? value : s2d::kStatChunkSize;
  }();
  return size;
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
              std::to_string(batch), "; split the batch");

  int num_chunks = 1;
  int64_t chunk_size = vocab;
  s2d::verify_cuda_plan(batch, vocab, multiprocessor_count(target_logits.get_device()), &num_chunks,
                        &chunk_size);
  const int64_t stat_chunk_size = stat_chunk_size_setting();
  const int num_stat_chunks = s2d::verify_cuda_stat_chunks(vocab, stat_chunk_size);
  const int64_t items = positions * num_stat_chunks;
  TORCH_CHECK((items + 7) / 8 <= 0x7fffffff,
              "s2d::verify (CUDA kernel): target_logits has too many positions x vocabulary "
              "chunks for one launch (",
              std::to_string(items), ")");
  // NOTE: two allocations (floats, ints) sliced into the seven workspaces: fewer allocator calls.
  const int64_t partials = batch * positions * num_stat_chunks;
  const int64_t float_count = 2 * partials + batch * positions * 3 + batch * num_chunks * 2;
  const int64_t int_count = partials + batch * positions + batch + batch * num_chunks * 3;
  at::Tensor floats = at::empty({float_count}, target_logits.options().dtype(at::kFloat));
  at::Tensor ints = at::empty({int_count}, target_logits.options().dtype(at::kInt));
  float* f = floats.data_ptr<float>();
  int32_t* i = ints.data_ptr<int32_t>();
  s2d::VerifyCudaWorkspace workspace{};
  workspace.partial_max = f;
  workspace.partial_sum = f + partials;
  workspace.stats = f + 2 * partials;
  workspace.partial_key = f + 2 * partials + batch * positions * 3;
  workspace.partial_argmax = i;
  workspace.argmax = i + partials;
  workspace.row_emit = i + partials + batch * positions;
  workspace.partial_block = i + partials + batch * positions + batch;
  workspace.num_stat_chunks = num_stat_chunks;
  workspace.stat_chunk_size = stat_chunk_size;
  workspace.num_chunks = num_chunks;
  workspace.chunk_size = chunk_size;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t error =
      s2d::verify_cuda_launch(prepared.params, prepared.logit_type, workspace, stream);
  TORCH_CHECK(error == cudaSuccess, "s2d::verify CUDA launch failed: ", cudaGetErrorString(error));
  return {prepared.out_tokens, prepared.num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2d, CUDA, m) { m.impl("verify", &verify_cuda); }
