// C entry point of the verify launcher (csrc/verify/verify_kernels.cu, included unchanged) run on
// the CPU CUDA simulator (sim_cuda.h). Built and called by
// python_tests/ops/test_verify_cuda_sim.py:
//   g++ -std=c++17 -O1 -pthread -shared -fPIC -DS2D_CUDA_SIM -I<this dir> -I<repo>/csrc/include
//       -I<repo>/csrc sim_verify.cpp
#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

#include "verify/verify_kernels.cu"

// Runs verify on host buffers (shapes as in s2d::VerifyParams). `chunk_size` > 0 (a multiple of
// 256) overrides verify_cuda_plan's race split, `stat_chunk_size` > 0 (a multiple of 256) the first
// pass's. Returns the number of race chunks used, or -1 if the simulator failed (message on
// stderr).
extern "C" int sim_verify(const void* logits, int logit_type, const int64_t* draft_tokens,
                          const float* draft_probs, const int64_t* num_draft,
                          const float* temperature, const float* min_logit, const int64_t* seeds,
                          const int64_t* offsets, int64_t* out_tokens, int32_t* num_accepted,
                          int64_t batch, int64_t num_spec, int64_t vocab, int num_sms,
                          int64_t chunk_size, int64_t stat_chunk_size) {
  const s2d::VerifyParams params{logits,    draft_tokens, draft_probs, num_draft,  temperature,
                                 min_logit, seeds,        offsets,     out_tokens, num_accepted,
                                 batch,     num_spec,     vocab};
  int num_chunks;
  int64_t planned_chunk_size;
  s2d::verify_cuda_plan(batch, vocab, num_sms, &num_chunks, &planned_chunk_size);
  if (chunk_size > 0) {
    num_chunks = static_cast<int>((vocab + chunk_size - 1) / chunk_size);
  } else {
    chunk_size = planned_chunk_size;
  }
  if (stat_chunk_size <= 0) stat_chunk_size = s2d::kStatChunkSize;
  const int num_stat_chunks = s2d::verify_cuda_stat_chunks(vocab, stat_chunk_size);
  const int64_t positions = num_spec + 1;
  const int64_t partials = batch * positions * num_stat_chunks;
  // NOTE: poisoned workspaces, so that a read of an entry no kernel wrote shows up as a mismatch.
  std::vector<float> partial_max(partials, -12345.0f), partial_sum(partials, -12345.0f);
  std::vector<int32_t> partial_argmax(partials, -999);
  std::vector<float> stats(batch * positions * 3, -12345.0f);
  std::vector<int32_t> argmax(batch * positions, -999), row_emit(batch, -999);
  std::vector<float> partial_key(batch * num_chunks * 2, 777.0f);
  std::vector<int32_t> partial_block(batch * num_chunks * 3, 1 << 30);
  s2d::VerifyCudaWorkspace workspace{};
  workspace.partial_max = partial_max.data();
  workspace.partial_sum = partial_sum.data();
  workspace.partial_argmax = partial_argmax.data();
  workspace.stats = stats.data();
  workspace.argmax = argmax.data();
  workspace.row_emit = row_emit.data();
  workspace.partial_key = partial_key.data();
  workspace.partial_block = partial_block.data();
  workspace.num_stat_chunks = num_stat_chunks;
  workspace.stat_chunk_size = stat_chunk_size;
  workspace.num_chunks = num_chunks;
  workspace.chunk_size = chunk_size;
  try {
    if (s2d::verify_cuda_launch(params, static_cast<s2d::LogitType>(logit_type), workspace,
                                nullptr) != cudaSuccess) {
      return -1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return -1;
  }
  return num_chunks;
}
