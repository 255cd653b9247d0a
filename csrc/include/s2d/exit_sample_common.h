// Parameters of the sampled-drafting ops (exit_sample, sample_logits) shared by the CPU and CUDA
// kernels. Framework-free: raw pointers and sizes. Spec: s2d_ext/ops/exit_sample_reference.py.
//
// A row of a draft step at one exit: scores = sanitize(logits / T) over the head vocabulary (all V
// ids, or a reduced draft vocabulary of Vh ascending ids), processed q = softmax after top-k /
// top-p (T > 0) or a one-hot of the argmax (T == 0), confidence = max q (T > 0) or the raw top
// probability (T == 0), fired = confidence >= threshold. A fired row writes q into its row of the
// [M, V] probs buffer and, when T > 0, samples its token from q by the two-level exponential race
// over the full id space on stream kStreamDraft. Every other row returns the argmax id.
//
// Memory safety without value checks (the op's validate=False, or a direct torch.ops call): a row
// whose probs row is outside [0, M) writes nothing and returns the argmax id, and a head id outside
// [0, V) is never written (q is only ever touched inside its own [V] row). The outputs of such
// out-of-contract input are unspecified; memory outside the buffers is never read or written.
#pragma once

#include <cstdint>

#include "s2d/philox.h"
#include "s2d/verify_common.h"

namespace s2d {
namespace exit_sample {

struct SampleParams {
  const float* temperature;   // [N], T <= 0 (or NaN) = greedy row
  const int64_t* top_k;       // [N], 0 = off
  const float* top_p;         // [N], 1 = off
  const int64_t* seeds;       // [N] Philox key
  const int64_t* offsets;     // [N] Philox counter offset
  const int64_t* positions;   // [N] draft position (< 2^16)
  const float* threshold;     // [N] fire when confidence >= threshold
  const int64_t* vocab_ids;   // [Vh] ascending ids of the head rows, or nullptr (row h is id h)
  const float* min_logit;     // [N] precomputed top-k/top-p threshold on the scores, or nullptr
  const int64_t* probs_rows;  // [N] row of `probs` that row i writes when it fires
  float* probs;               // [M, V] float32
  int64_t probs_count;        // M
  int64_t* tokens;            // [N] out
  float* confidence;          // [N] out
  bool* fired;                // [N] out
  int64_t rows;
  int64_t head_vocab;  // Vh
  int64_t vocab;       // V, the width of a probs row
  bool filters;        // false: no row uses top-k / top-p (their threshold is skipped)
};

S2D_HOST_DEVICE int64_t head_id(const SampleParams& p, int64_t h) {
  return p.vocab_ids != nullptr ? p.vocab_ids[h] : h;
}

// Row i's [V] row of probs, or nullptr when probs_rows[i] is outside [0, M).
S2D_HOST_DEVICE float* probs_row(const SampleParams& p, int64_t i) {
  const int64_t r = p.probs_rows[i];
  return r >= 0 && r < p.probs_count ? p.probs + r * p.vocab : nullptr;
}

S2D_HOST_DEVICE bool valid_id(const SampleParams& p, int64_t id) { return id >= 0 && id < p.vocab; }

// Number of 64-id blocks of the race's first stage over V ids.
S2D_HOST_DEVICE int64_t race_blocks(int64_t vocab) { return (vocab + kRaceBlock - 1) / kRaceBlock; }

}  // namespace exit_sample
}  // namespace s2d
