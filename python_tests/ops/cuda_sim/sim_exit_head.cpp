// C entry points of the exit head's CUDA reduction and of the sampling kernel (launchers
// csrc/exit_head/exit_head_reduce_kernels.cu and exit_sample_kernels.cu, included unchanged, with
// the host loop of csrc/include/s2d/exit_head_chunked.h) run on the CPU CUDA simulator
// (sim_cuda.h). Built and called by python_tests/ops/test_exit_head_cuda_sim.py:
//   g++ -std=c++17 -O1 -pthread -shared -fPIC -DS2D_CUDA_SIM -I<this dir> -I<repo>/csrc/include
//       -I<repo>/csrc sim_exit_head.cpp
// The matmul of the binding is replaced by copies of precomputed logits.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "exit_head/exit_head_reduce_kernels.cu"
#include "exit_head/exit_sample_kernels.cu"
#include "s2d/exit_head_chunked.h"

// tokens / confidence / logsumexp of logits [N, V] through the chunked loop with chunks of `cols`
// columns (0 = the planned width). Returns the number of partial states, or -1 on failure.
extern "C" int64_t sim_exit_head_chunked(const float* logits, const float* temperature,
                                         int64_t rows, int64_t vocab, int64_t cols, int64_t* tokens,
                                         float* confidence, float* logsumexp) {
  using s2d::exit_head::RowState;
  if (cols <= 0) cols = s2d::exit_head::chunk_cols(rows, vocab);
  const int64_t parts = s2d::exit_head::chunked_parts(rows, vocab, cols);
  // NOTE: poisoned, so that a read of an entry no kernel wrote shows up as a mismatch.
  std::vector<float> buffer(static_cast<size_t>(rows * cols), -12345.0f);
  std::vector<RowState> partial(static_cast<size_t>(parts * rows), RowState{-1.0f, -9, -1.0f});
  try {
    const cudaError_t status = s2d::exit_head::exit_head_chunked(
        rows, vocab, temperature, buffer.data(), partial.data(), tokens, confidence, logsumexp,
        nullptr,
        [&](int64_t begin, int64_t count, float* out) {
          for (int64_t r = 0; r < rows; ++r) {
            std::memcpy(out + r * count, logits + r * vocab + begin, sizeof(float) * count);
          }
        },
        cols);
    if (status != cudaSuccess) return -1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return -1;
  }
  return parts;
}

// The sampling kernel on logits [N, Vh] (shapes and meaning as in s2d::exit_sample::SampleParams).
extern "C" int sim_sample(const float* logits, const float* temperature, const float* min_logit,
                          const float* threshold, const int64_t* seeds, const int64_t* offsets,
                          const int64_t* positions, const int64_t* vocab_ids,
                          const int64_t* probs_rows, float* probs, int64_t* tokens,
                          float* confidence, bool* fired, int64_t rows, int64_t head_vocab,
                          int64_t vocab, int64_t probs_count) {
  s2d::exit_sample::SampleParams p{};
  p.temperature = temperature;
  p.top_k = nullptr;  // NOTE: the CUDA kernel takes the threshold precomputed in min_logit
  p.top_p = nullptr;
  p.seeds = seeds;
  p.offsets = offsets;
  p.positions = positions;
  p.threshold = threshold;
  p.vocab_ids = vocab_ids;
  p.min_logit = min_logit;
  p.probs_rows = probs_rows;
  p.probs = probs;
  p.probs_count = probs_count;
  p.tokens = tokens;
  p.confidence = confidence;
  p.fired = fired;
  p.rows = rows;
  p.head_vocab = head_vocab;
  p.vocab = vocab;
  p.filters = min_logit != nullptr;
  try {
    return s2d::exit_sample::sample_cuda(logits, p, nullptr) == cudaSuccess ? 0 : -1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return -1;
  }
}
