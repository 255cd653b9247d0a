// CUDA kernel of sampled drafting at one exit (framework-free; spec:
// s2d_ext/ops/exit_sample_reference.py, parameters: exit_sample_common.h).
//
// sample_kernel: one block of kSampleThreads per row, over the row's float32 logits [Vh] (from a
// tensor-core matmul in the binding). Block reductions go through shared memory in a fixed order,
// so results are deterministic:
//   1. the raw max and its smallest head row;
//   2. the kept sum-exp of the scores (top-k / top-p threshold precomputed in min_logit, or none):
//      confidence = 1 / sum (the top's own term is 1), fired = confidence >= threshold;
//   3. only a fired row: its probs row is zeroed, then q scattered into it (a one-hot for T == 0);
//   4. only a fired sampled row: the two-level race over the q just written (block sums of 64 ids
//   in
//      id order, one Philox draw per block on kStreamDraft | kStreamBlockFlag, then one per id of
//      the winning block on kStreamDraft). Barriers separate the writes from the reads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/exit_sample_common.h"
#include "s2d/philox.h"
#include "s2d/verify_common.h"

namespace s2d {
namespace exit_sample {
namespace cuda {

constexpr int kSampleThreads = 256;

__device__ __forceinline__ float sanitize(float x) {
  if (x != x) return -INFINITY;
  return x > 3.402823466e+38f ? 3.402823466e+38f : x;
}

// Block-wide (max, smallest index at the max) over one value per thread; every thread gets it.
__device__ __forceinline__ void block_argmax(float& value, int64_t& index, float* values,
                                             int64_t* indices) {
  values[threadIdx.x] = value;
  indices[threadIdx.x] = index;
  __syncthreads();
  for (int stride = kSampleThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      const float other = values[threadIdx.x + stride];
      const int64_t other_index = indices[threadIdx.x + stride];
      if (other > values[threadIdx.x] ||
          (other == values[threadIdx.x] && other_index < indices[threadIdx.x])) {
        values[threadIdx.x] = other;
        indices[threadIdx.x] = other_index;
      }
    }
    __syncthreads();
  }
  value = values[0];
  index = indices[0];
  __syncthreads();
}

__device__ __forceinline__ float block_sum(float value, float* values) {
  values[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kSampleThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) values[threadIdx.x] += values[threadIdx.x + stride];
    __syncthreads();
  }
  const float total = values[0];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const float* __restrict__ logits,  // [N, Vh] float32
                  SampleParams p) {
  __shared__ float values[kSampleThreads];
  __shared__ int64_t indices[kSampleThreads];
  const int64_t row = blockIdx.x;
  const int64_t head_vocab = p.head_vocab;
  const float* base = logits + row * head_vocab;
  const float temperature = p.temperature[row];
  const bool greedy = !(temperature > 0.0f);

  // 1. raw max and smallest argmax (each thread's ids ascend, so strict > keeps its first).
  float raw_max = -INFINITY;
  int64_t arg = 0;
  for (int64_t h = threadIdx.x; h < head_vocab; h += kSampleThreads) {
    const float l = sanitize(base[h]);
    if (l > raw_max) {
      raw_max = l;
      arg = h;
    }
  }
  if (raw_max == -INFINITY) arg = head_vocab;  // NOTE: an all -inf thread must not win a tie
  block_argmax(raw_max, arg, values, indices);
  const bool dead = raw_max == -INFINITY;
  if (dead) arg = 0;
  const float divisor = greedy ? 1.0f : temperature;
  // NOTE: division by T > 0 is monotone, so the largest score is the scaled largest logit.
  const float top = dead ? 0.0f : (greedy ? raw_max : sanitize(raw_max / divisor));
  const float min_logit = (greedy || p.min_logit == nullptr) ? -INFINITY : p.min_logit[row];

  // 2. the kept sum-exp.
  float partial = 0.0f;
  for (int64_t h = threadIdx.x; h < head_vocab; h += kSampleThreads) {
    const float s = dead ? 0.0f : sanitize(base[h] / divisor);
    if (s >= min_logit && s != -INFINITY) partial += expf(s - top);
  }
  const float total = block_sum(partial, values);
  const float confidence = 1.0f / total;
  const bool fired = confidence >= p.threshold[row];
  const int64_t token_id = head_id(p, arg);
  if (threadIdx.x == 0) {
    p.confidence[row] = confidence;
    p.fired[row] = fired;
  }
  // NOTE: a probs row outside [0, M) writes nothing (exit_sample_common.h); uniform across the
  // block.
  float* q = probs_row(p, row);
  if (!fired || q == nullptr) {
    if (threadIdx.x == 0) p.tokens[row] = token_id;
    return;  // NOTE: uniform across the block (every thread holds the same fired)
  }

  // 3. the probs row becomes q.
  for (int64_t v = threadIdx.x; v < p.vocab; v += kSampleThreads) q[v] = 0.0f;
  __syncthreads();
  if (greedy) {
    if (threadIdx.x == 0) {
      if (valid_id(p, token_id)) q[token_id] = 1.0f;
      p.tokens[row] = token_id;
    }
    return;
  }
  for (int64_t h = threadIdx.x; h < head_vocab; h += kSampleThreads) {
    const float s = dead ? 0.0f : sanitize(base[h] / divisor);
    const int64_t id = head_id(p, h);
    if (s >= min_logit && s != -INFINITY && valid_id(p, id)) q[id] = expf(s - top) / total;
  }
  __threadfence_block();
  __syncthreads();

  // 4. the race over q: stage 1 over blocks of kRaceBlock ids, ties to the smallest block.
  const uint64_t seed = static_cast<uint64_t>(p.seeds[row]);
  const uint64_t offset = static_cast<uint64_t>(p.offsets[row]);
  const uint32_t position = static_cast<uint32_t>(p.positions[row]);
  const int64_t blocks = race_blocks(p.vocab);
  float best_key = -INFINITY;
  int64_t best_block = blocks;
  for (int64_t b = threadIdx.x; b < blocks; b += kSampleThreads) {
    const int64_t end = (b + 1) * kRaceBlock < p.vocab ? (b + 1) * kRaceBlock : p.vocab;
    float sum = 0.0f;
    for (int64_t v = b * kRaceBlock; v < end; ++v) sum += q[v];
    if (!(sum > 0.0f)) continue;
    const float u = race_uniform(seed, offset, kStreamDraft | kStreamBlockFlag, position,
                                 static_cast<uint32_t>(b));
    const float key = sum / -logf(u);
    if (key > best_key) {
      best_key = key;
      best_block = b;
    }
  }
  block_argmax(best_key, best_block, values, indices);
  // Stage 2: the ids of the winning block (kRaceBlock <= kSampleThreads: one id per thread).
  const int64_t id = best_block * kRaceBlock + threadIdx.x;
  float key = -INFINITY;
  int64_t chosen = p.vocab;
  if (static_cast<int>(threadIdx.x) < kRaceBlock && id < p.vocab) {
    const float u = race_uniform(seed, offset, kStreamDraft, position, static_cast<uint32_t>(id));
    key = q[id] / -logf(u);
    chosen = id;
  }
  block_argmax(key, chosen, values, indices);
  if (threadIdx.x == 0) p.tokens[row] = chosen < p.vocab ? chosen : token_id;
}

}  // namespace cuda
}  // namespace exit_sample
}  // namespace s2d
