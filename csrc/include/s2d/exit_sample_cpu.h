// CPU kernel of sampled drafting at one exit (exit_sample, sample_logits), framework-free.
//
// Spec: s2d_ext/ops/exit_sample_reference.py; parameters: exit_sample_common.h. One row at a time
// (the binding hands rows to threads), from the row's float32 logits over the head vocabulary:
//   1. the raw max and argmax (every row; greedy rows also their raw sum-exp -> confidence);
//   2. sampled rows: the scores s = sanitize(l / T) into a scratch, their top-k / top-p threshold
//      (only for rows that use a filter: nth_element for top-k, a sort for top-p), and the kept
//      sum-exp Z -> confidence = 1 / Z;
//   3. only where the row fires: its probs row (V floats) becomes q, and a sampled row's token is
//      the two-level exponential race over the q it just wrote (block sums in id order, then a
//      race over the winning block's 64 ids).
// A row that does not fire writes nothing and draws no random number, so the exits a token passes
// cost their head and one sweep of its logits, nothing more.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "s2d/exit_sample_common.h"
#include "s2d/philox.h"
#include "s2d/verify_common.h"

namespace s2d {
namespace exit_sample {
namespace cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kFloatMax = std::numeric_limits<float>::max();

// NaN -> -inf, +inf -> the largest float (verify_reference.sanitize, per element).
inline float sanitize(float x) {
  if (x != x) return -kInf;
  return x > kFloatMax ? kFloatMax : x;
}

// Per-thread buffers, reused across rows.
struct RowScratch {
  std::vector<float> scores;      // [Vh] processed scores of a sampled row
  std::vector<float> order;       // [Vh] scores sorted for the top-k / top-p threshold
  std::vector<float> block_sums;  // [race_blocks(V)] the race's stage-1 weights
};

// The top-k then top-p threshold on a row's scores (verify_reference.logit_threshold on one row):
// scores below it are removed. `scores` holds no NaN (sanitised).
inline float filter_threshold(const float* scores, int64_t count, int64_t top_k, float top_p,
                              std::vector<float>& order) {
  const int64_t k = top_k > 0 ? std::min<int64_t>(top_k, count) : count;
  order.assign(scores, scores + count);
  const auto descending = std::greater<float>();
  if (!(top_p < 1.0f)) {
    // Top-k only: the k-th largest score.
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), descending);
    return order[k - 1];
  }
  std::partial_sort(order.begin(), order.begin() + k, order.end(), descending);
  const float kth = order[k - 1];
  // softmax over the k largest, then keep the tokens whose larger tokens hold less than top_p.
  const float top = order[0];
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) total += static_cast<double>(std::exp(order[i] - top));
  const float inv_total = static_cast<float>(1.0 / total);
  // NOTE: as torch.cumsum on a CPU float tensor: double accumulation, each prefix rounded to float;
  // a token is counted when the mass strictly before it is below top_p (the first always is).
  double running = 0.0;
  int64_t kept = 0;
  for (int64_t i = 0; i < k; ++i) {
    const float prob = std::exp(order[i] - top) * inv_total;
    running += prob;
    const float mass_before = static_cast<float>(running) - prob;
    if (i == 0 || mass_before < top_p) ++kept;
  }
  const float top_p_min = order[kept - 1];
  return std::max(kth, top_p_min);
}

// The race over the V ids of `q` (a probs row) given its block sums: stage 1 picks a block of
// kRaceBlock ids by its weight sum, stage 2 an id inside it (verify_reference.exponential_race on
// stream kStreamDraft).
inline int64_t race(const float* q, int64_t vocab, const float* block_sums, uint64_t seed,
                    uint64_t offset, uint32_t position) {
  const int64_t blocks = race_blocks(vocab);
  int64_t best_block = 0;
  float best_key = -kInf;
  for (int64_t b = 0; b < blocks; ++b) {
    if (!(block_sums[b] > 0.0f)) continue;  // key 0: never the winner while some block has mass
    const float u = race_uniform(seed, offset, kStreamDraft | kStreamBlockFlag, position,
                                 static_cast<uint32_t>(b));
    const float key = block_sums[b] / -std::log(u);
    if (key > best_key) {
      best_key = key;
      best_block = b;
    }
  }
  const int64_t begin = best_block * kRaceBlock;
  const int64_t end = std::min<int64_t>(vocab, begin + kRaceBlock);
  int64_t best = begin;
  best_key = -kInf;
  for (int64_t v = begin; v < end; ++v) {
    const float u = race_uniform(seed, offset, kStreamDraft, position, static_cast<uint32_t>(v));
    const float key = q[v] / -std::log(u);
    if (key > best_key) {
      best_key = key;
      best = v;
    }
  }
  return best;
}

// Row i of a step, from its float32 logits [Vh] over the head vocabulary.
inline void sample_row(const float* logits, int64_t i, const SampleParams& p, RowScratch& scratch) {
  const int64_t head_vocab = p.head_vocab;
  float raw_max = -kInf;
  int64_t arg = 0;
  for (int64_t h = 0; h < head_vocab; ++h) {
    const float l = sanitize(logits[h]);
    if (l > raw_max) {
      raw_max = l;
      arg = h;
    }
  }
  // NOTE: a row whose logits are all -inf is uniform over the head vocabulary (scores all 0).
  const bool dead = raw_max == -kInf;
  const float temperature = p.temperature[i];
  const bool greedy = !(temperature > 0.0f);
  float* q = probs_row(p, i);
  float confidence;
  if (greedy) {
    if (dead) {
      confidence = 1.0f / static_cast<float>(head_vocab);
    } else {
      float sum = 0.0f;
      for (int64_t h = 0; h < head_vocab; ++h) {
        const float l = sanitize(logits[h]);
        if (l != -kInf) sum += std::exp(l - raw_max);
      }
      confidence = 1.0f / sum;
    }
    const bool fired = confidence >= p.threshold[i];
    p.confidence[i] = confidence;
    p.fired[i] = fired;
    p.tokens[i] = head_id(p, arg);
    if (fired && q != nullptr) {
      std::memset(q, 0, sizeof(float) * static_cast<size_t>(p.vocab));
      if (valid_id(p, head_id(p, arg))) q[head_id(p, arg)] = 1.0f;
    }
    return;
  }
  scratch.scores.resize(static_cast<size_t>(head_vocab));
  float* scores = scratch.scores.data();
  float top = -kInf;
  for (int64_t h = 0; h < head_vocab; ++h) {
    // NOTE: a true division, as in the reference, so that a threshold token compares equal.
    const float s = dead ? 0.0f : sanitize(logits[h] / temperature);
    scores[h] = s;
    top = std::max(top, s);
  }
  float min_logit = -kInf;
  if (p.min_logit != nullptr) {
    min_logit = p.min_logit[i];
  } else if (p.filters && (p.top_k[i] > 0 || p.top_p[i] < 1.0f)) {
    min_logit = filter_threshold(scores, head_vocab, p.top_k[i], p.top_p[i], scratch.order);
  }
  // scores[h] becomes exp(s - top) for kept ids, 0 for removed ones: q = scores / sum.
  float sum = 0.0f;
  for (int64_t h = 0; h < head_vocab; ++h) {
    const float s = scores[h];
    const float e = s >= min_logit && s != -kInf ? std::exp(s - top) : 0.0f;
    scores[h] = e;
    sum += e;
  }
  confidence = 1.0f / sum;
  const bool fired = confidence >= p.threshold[i];
  p.confidence[i] = confidence;
  p.fired[i] = fired;
  if (!fired || q == nullptr) {
    p.tokens[i] = head_id(p, arg);
    return;
  }
  std::memset(q, 0, sizeof(float) * static_cast<size_t>(p.vocab));
  const int64_t blocks = race_blocks(p.vocab);
  scratch.block_sums.assign(static_cast<size_t>(blocks), 0.0f);
  float* block_sums = scratch.block_sums.data();
  for (int64_t h = 0; h < head_vocab; ++h) {
    const float e = scores[h];
    if (e == 0.0f) continue;
    const int64_t id = head_id(p, h);
    if (!valid_id(p, id)) continue;
    const float prob = e / sum;
    q[id] = prob;
    // NOTE: ids ascend, so each block's sum adds its ids in id order, as a sweep of q would.
    block_sums[id / kRaceBlock] += prob;
  }
  p.tokens[i] = race(q, p.vocab, block_sums, static_cast<uint64_t>(p.seeds[i]),
                     static_cast<uint64_t>(p.offsets[i]), static_cast<uint32_t>(p.positions[i]));
}

// Every row of a step; `logits` [N, Vh] float32. ParallelFor as in exit_head_cpu.h.
template <typename ParallelFor>
void sample_rows(const float* logits, const SampleParams& p, ParallelFor&& parallel_for) {
  parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    for (int64_t i = begin; i < end; ++i) sample_row(logits + i * p.head_vocab, i, p, scratch);
  });
}

}  // namespace cpu
}  // namespace exit_sample
}  // namespace s2d
