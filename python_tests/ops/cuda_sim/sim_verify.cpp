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
// kRaceBlock) overrides verify_cuda_plan's vocabulary split. Returns the number of chunks used,
// or -1 if the simulator failed (message on stderr).
extern "C" int sim_verify(const void* logits, int logit_type, const int64_t* draft_tokens,
                          const float* draft_probs, const int64_t* num_draft,
                          const float* temperature, const float* min_logit, const int64_t* seeds,
                          const int64_t* offsets, int64_t* out_tokens, int32_t* num_accepted,
                          int64_t batch, int64_t num_spec, int64_t vocab, int num_sms,
                          int64_t chunk_size) {
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
  const int64_t positions = num_spec + 1;
  // NOTE: poisoned workspaces, so that a read of an entry no kernel wrote shows up as a mismatch.
  std::vector<float> stats(batch * positions * 3, -12345.0f);
  std::vector<int32_t> argmax(batch * positions, -999);
  std::vector<float> partial_key(batch * num_chunks * 2, 777.0f);
  std::vector<int32_t> partial_block(batch * num_chunks * 3, 1 << 30);
  const s2d::VerifyCudaWorkspace workspace{stats.data(),         argmax.data(), partial_key.data(),
                                           partial_block.data(), num_chunks,    chunk_size};
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
