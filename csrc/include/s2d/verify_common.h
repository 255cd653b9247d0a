// Parameters and scalar helpers of the verify op shared by the CPU and CUDA kernels.
// Framework-free: raw pointers and sizes only (see s2d_ext/ops/verify_reference.py, the spec).
#pragma once

#include <cstdint>
#include <cstring>

#include "s2d/philox.h"

namespace s2d {

// Every pointer is to a contiguous tensor. B = batch, K = num_spec, V = vocab.
struct VerifyParams {
  const void* target_logits;    // [B, K+1, V] float32 / bfloat16 / float16
  const int64_t* draft_tokens;  // [B, K]
  const float* draft_probs;     // [B, K, V] or nullptr (argmax drafting: q is a point mass)
  const int64_t* num_draft;     // [B], clamped to 0..K by the kernels
  const float* temperature;     // [B], <= 0 (or not > 0) = greedy row
  const float* min_logit;       // [B, K+1] top-k/top-p threshold on scaled scores, or nullptr
  const int64_t* seeds;         // [B]
  const int64_t* offsets;       // [B]
  int64_t* out_tokens;          // [B, K+1] output
  int32_t* num_accepted;        // [B] output
  int64_t batch;
  int64_t num_spec;
  int64_t vocab;
};

enum class LogitType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The largest float32 below 1. NOTE: uniform_open01 rounds (2^24 - 1) + 0.5 up to 2^24, so a
// Philox uniform is exactly 1.0 with probability 2^-24; the race clamps it here so that
// -log(u) > 0 (an exact 0 would give a zero-weight token an infinite or NaN key). The clamp is
// statistically exact: P(Exp(1) < 5.96e-8) = 5.96e-8 = the mass of that atom.
constexpr float kRaceMaxUniform = 0.99999994f;  // 1 - 2^-24

// The race is two-level (spec: verify_reference.exponential_race): a block of kRaceBlock
// consecutive ids by their weight sums (uniforms on kStreamSample | kStreamBlockFlag, index =
// block), then an id inside the block (kStreamSample, index = id).
constexpr int kRaceBlock = 64;

// The race uniform of entry `index` (an id, or a block in the first stage) on `stream` at
// `position`, clamped as above.
S2D_HOST_DEVICE float race_uniform(uint64_t seed, uint64_t offset, uint32_t stream,
                                   uint32_t position, uint32_t index) {
  const float u = philox_uniform(seed, offset, stream, position, index);
  return u < kRaceMaxUniform ? u : kRaceMaxUniform;
}

}  // namespace s2d
