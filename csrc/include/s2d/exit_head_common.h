// Pieces of the exit head shared by the CPU and CUDA kernels (host + device, framework-free).
//
// The exit head of a row is: RMSNorm (HF Llama rounding), logits = normed . lm_head rows
// (float32 accumulation), then argmax, max softmax and log-sum-exp of logits / T, reduced
// online over the vocabulary (see s2d_ext/ops/exit_head_reference.py, the spec).
//
// Online state of a vocabulary range, per row (t = T if T > 0 else 1):
//   max = the largest sanitised logit, arg = its smallest id, sum = sum_v exp((l_v - max) / t).
// Then lse = max / t + log(sum) and confidence = exp(max / t - lse) = 1 / sum.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef S2D_HOST_DEVICE
#if defined(__CUDACC__)
#define S2D_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define S2D_HOST_DEVICE inline
#endif
#endif

namespace s2d {
namespace exit_head {

// dtype of hidden / norm_weight / lm_head_weight (all three share it).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RowState {
  float max;    // largest sanitised logit so far (-inf: none yet)
  int64_t arg;  // its smallest vocab id
  float sum;    // sum of exp((logit - max) / t)
};

S2D_HOST_DEVICE RowState empty_state() { return RowState{-INFINITY, 0, 0.0f}; }

// NaN counts as -inf and +inf as the largest finite float (verify_reference.sanitize).
S2D_HOST_DEVICE float sanitize_logit(float logit) {
  if (logit != logit) return -INFINITY;
  return logit > FLT_MAX ? FLT_MAX : logit;
}

// Adds logit `logit` of id `id` (ids arrive in increasing order) to `state`.
S2D_HOST_DEVICE void push_logit(RowState& state, float logit, int64_t id, float t) {
  logit = sanitize_logit(logit);
  if (logit > state.max) {
    // NOTE: the first finite logit starts the sum at 1 (exp(-inf) would be 0 anyway, but
    // (-inf) - (-inf) would be NaN).
    state.sum = state.max == -INFINITY ? 1.0f : state.sum * expf((state.max - logit) / t) + 1.0f;
    state.max = logit;
    state.arg = id;
  } else if (logit != -INFINITY) {
    state.sum += expf((logit - state.max) / t);
  }
}

// Merges `later` (a range of larger ids) into `state`; ties keep the smaller id.
S2D_HOST_DEVICE void merge_state(RowState& state, const RowState& later, float t) {
  if (later.max == -INFINITY) return;
  if (later.max > state.max) {
    const float scale = state.max == -INFINITY ? 0.0f : expf((state.max - later.max) / t);
    state.sum = state.sum * scale + later.sum;
    state.max = later.max;
    state.arg = later.arg;
  } else {
    state.sum += later.sum * expf((later.max - state.max) / t);
  }
}

// Final outputs of a row. A row whose logits are all -inf is uniform (token 0).
S2D_HOST_DEVICE void finish_state(const RowState& state, float t, int64_t vocab, int64_t* token,
                                  float* confidence, float* logsumexp) {
  if (state.max == -INFINITY) {
    *token = 0;
    *confidence = 1.0f / static_cast<float>(vocab);
    *logsumexp = logf(static_cast<float>(vocab));
    return;
  }
  *token = state.arg;
  *confidence = 1.0f / state.sum;
  *logsumexp = state.max / t + logf(state.sum);
}

// The temperature divisor t of a row: T if T > 0 else 1.
S2D_HOST_DEVICE float safe_temperature(float temperature) {
  return temperature > 0.0f ? temperature : 1.0f;
}

}  // namespace exit_head
}  // namespace s2d
