// CUDA kernels of the verify op (spec: s2d_ext/ops/verify_reference.py). Framework-free.
//
//   position_stats_kernel  grid (K+1, B): one block per (row, position) up to the row's bonus
//                          position streams the logits once (16-byte loads): online max / sum-exp
//                          of the processed scores, smallest argmax, p(draft token).
//   race_kernel            grid (C, B): replays the accept tests from the stats (a few Philox
//                          draws), then runs stage 1 of the two-level exponential race over one
//                          vocabulary chunk of the emitting position. A chunk is a whole number of
//                          race blocks (kRaceBlock = 64 ids), so blocks never straddle chunks. One
//                          warp per race block sums its weights for the residual (race A) and for
//                          p (race B), draws the block uniform (stream kStreamSample |
//                          kStreamBlockFlag, index = block) and keeps the best block key per race
//                          (ties to the smallest block), plus whether some residual block sum > 0.
//   finish_kernel          grid (B), kRaceBlock threads: merges the chunks, picks race A if the
//                          token is recovered and some residual block sum is > 0, else race B (the
//                          fallback on p), then runs stage 2 inside the winning block: one thread
//                          per id recomputes the id's weight exactly as race_kernel does and draws
//                          its uniform (stream kStreamSample, index = id); ties to the smallest id,
//                          ids >= V never win. Writes out_tokens and num_accepted.
// Everything is float32; no [B, K+1, V] probabilities are written. Fixed launch shapes, no host
// synchronisation (CUDA-graph safe).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "s2d/philox.h"
#include "s2d/verify_common.h"

namespace s2d {
namespace verify_cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kFloatMax = 3.402823466e+38f;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

// logits / T (a true division, as in the reference), NaN -> -inf, +inf -> float max, masked ->
// -inf.
__device__ __forceinline__ float processed_score(float logit, float divisor, float min_logit) {
  float s = __fdiv_rn(logit, divisor);
  s = s != s ? neg_inf() : s;
  s = s == pos_inf() ? kFloatMax : s;
  return s < min_logit ? neg_inf() : s;
}

// Online softmax state of a set of scores; the argmax keeps the smallest id on ties.
struct OnlineStat {
  float max;
  float sum;
  int32_t argmax;
};

__device__ __forceinline__ void stat_add(OnlineStat& st, float s, int32_t index) {
  if (s == neg_inf()) return;
  if (s > st.max) {
    st.sum = (st.max == neg_inf() ? 0.0f : st.sum * __expf(st.max - s)) + 1.0f;
    st.max = s;
    st.argmax = index;
  } else {
    st.sum += __expf(s - st.max);
    if (s == st.max && index < st.argmax) st.argmax = index;
  }
}

__device__ __forceinline__ OnlineStat stat_merge(const OnlineStat& a, const OnlineStat& b) {
  OnlineStat out;
  out.max = fmaxf(a.max, b.max);
  if (out.max == neg_inf()) {
    out.sum = 0.0f;
    out.argmax = min(a.argmax, b.argmax);
    return out;
  }
  out.sum = (a.max == neg_inf() ? 0.0f : a.sum * __expf(a.max - out.max)) +
            (b.max == neg_inf() ? 0.0f : b.sum * __expf(b.max - out.max));
  out.argmax = a.max > b.max ? a.argmax : (b.max > a.max ? b.argmax : min(a.argmax, b.argmax));
  return out;
}

// (key, index) argmax, ties to the smallest index.
struct KeyIndex {
  float key;
  int32_t index;
};

__device__ __forceinline__ KeyIndex key_merge(const KeyIndex& a, const KeyIndex& b) {
  if (a.key > b.key) return a;
  if (b.key > a.key) return b;
  return a.index <= b.index ? a : b;
}

__device__ __forceinline__ OnlineStat warp_reduce(OnlineStat st) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    OnlineStat other;
    other.max = __shfl_xor_sync(0xffffffffu, st.max, delta);
    other.sum = __shfl_xor_sync(0xffffffffu, st.sum, delta);
    other.argmax = __shfl_xor_sync(0xffffffffu, st.argmax, delta);
    st = stat_merge(st, other);
  }
  return st;
}

__device__ __forceinline__ KeyIndex warp_reduce(KeyIndex ki) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    KeyIndex other;
    other.key = __shfl_xor_sync(0xffffffffu, ki.key, delta);
    other.index = __shfl_xor_sync(0xffffffffu, ki.index, delta);
    ki = key_merge(ki, other);
  }
  return ki;
}

__device__ __forceinline__ OnlineStat merge_any(const OnlineStat& a, const OnlineStat& b) {
  return stat_merge(a, b);
}
__device__ __forceinline__ KeyIndex merge_any(const KeyIndex& a, const KeyIndex& b) {
  return key_merge(a, b);
}

// Block-wide reduction over kNumWarps full warps (blockDim.x == 32 * kNumWarps); every thread
// gets the result. `shared` holds kNumWarps states. Every thread of the block must call it (it
// synchronises); the trailing __syncthreads lets the caller reuse `shared` at once.
template <int kNumWarps, typename State>
__device__ __forceinline__ State block_reduce(State st, State* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  State total = shared[0];
#pragma unroll
  for (int w = 1; w < kNumWarps; ++w) total = merge_any(total, shared[w]);
  __syncthreads();
  return total;
}

// Sum over the 32 lanes of a warp; every lane gets the same bits (each butterfly step adds the
// same two values on both lanes of a pair, and float addition is commutative).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) x += __shfl_xor_sync(0xffffffffu, x, delta);
  return x;
}

// Loads of 16 bytes (4 floats or 8 half/bf16) where the row is aligned, scalars otherwise.
template <typename T>
struct Vec16 {
  static constexpr int kCount = 16 / sizeof(T);
  T values[kCount];
};

template <typename T, typename Fn>
__device__ __forceinline__ void for_each_logit(const T* row, int64_t begin, int64_t end, Fn&& fn) {
  constexpr int kCount = Vec16<T>::kCount;
  const bool aligned = reinterpret_cast<uintptr_t>(row + begin) % 16 == 0;
  int64_t i = begin;
  if (aligned) {
    const int64_t full_end = begin + ((end - begin) / kCount) * kCount;
    for (int64_t v = begin + static_cast<int64_t>(threadIdx.x) * kCount; v < full_end;
         v += static_cast<int64_t>(blockDim.x) * kCount) {
      const Vec16<T> pack = *reinterpret_cast<const Vec16<T>*>(row + v);
#pragma unroll
      for (int k = 0; k < kCount; ++k) fn(to_float(pack.values[k]), v + k);
    }
    i = full_end;
  }
  for (int64_t v = i + threadIdx.x; v < end; v += blockDim.x) fn(to_float(row[v]), v);
}

__device__ __forceinline__ int64_t clamp_num_draft(int64_t n, int64_t num_spec) {
  return n < 0 ? 0 : (n > num_spec ? num_spec : n);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    position_stats_kernel(VerifyParams params, float* stats, int32_t* argmax) {
  const int64_t row = blockIdx.y;
  const int64_t position = blockIdx.x;
  const int64_t num_spec = params.num_spec;
  const int64_t positions = num_spec + 1;
  const int64_t vocab = params.vocab;
  const int64_t num_draft = clamp_num_draft(params.num_draft[row], num_spec);
  if (position > num_draft) return;
  const float temperature = params.temperature[row];
  const bool greedy = !(temperature > 0.0f);
  const float divisor = greedy ? 1.0f : temperature;
  const float min_logit = (!greedy && params.min_logit != nullptr)
                              ? params.min_logit[row * positions + position]
                              : neg_inf();
  const T* logits =
      static_cast<const T*>(params.target_logits) + (row * positions + position) * vocab;
  OnlineStat st{neg_inf(), 0.0f, 0};
  for_each_logit(logits, 0, vocab, [&](float x, int64_t v) {
    stat_add(st, processed_score(x, divisor, min_logit), static_cast<int32_t>(v));
  });
  __shared__ OnlineStat shared[kWarps];
  st = block_reduce<kWarps>(st, shared);
  if (threadIdx.x != 0) return;
  const bool dead = st.max == neg_inf();
  float p_token = 0.0f;
  if (position < num_draft) {
    const int64_t token = params.draft_tokens[row * num_spec + position];
    if (token >= 0 && token < vocab) {
      const float s = processed_score(to_float(logits[token]), divisor, min_logit);
      p_token = dead ? 1.0f / static_cast<float>(vocab)
                     : (s == neg_inf() ? 0.0f : __expf(s - st.max) / st.sum);
    }
  }
  float* out = stats + (row * positions + position) * 3;
  out[0] = st.max;
  out[1] = dead ? static_cast<float>(vocab) : st.sum;
  out[2] = p_token;
  argmax[row * positions + position] = dead ? 0 : st.argmax;
}

// The first rejected position of a row, or num_draft if every draft is accepted.
__device__ __forceinline__ int64_t emit_position(const VerifyParams& params, const float* stats,
                                                 const int32_t* argmax, int64_t row,
                                                 int64_t num_draft, bool greedy) {
  const int64_t num_spec = params.num_spec;
  const int64_t positions = num_spec + 1;
  const uint64_t seed = static_cast<uint64_t>(params.seeds[row]);
  const uint64_t offset = static_cast<uint64_t>(params.offsets[row]);
  for (int64_t j = 0; j < num_draft; ++j) {
    const int64_t token = params.draft_tokens[row * num_spec + j];
    bool accept;
    if (greedy) {
      accept = token == static_cast<int64_t>(argmax[row * positions + j]);
    } else {
      const bool valid = token >= 0 && token < params.vocab;
      const float p = stats[(row * positions + j) * 3 + 2];
      const float q = (valid && params.draft_probs != nullptr)
                          ? params.draft_probs[(row * num_spec + j) * params.vocab + token]
                          : 1.0f;
      const float u = philox_uniform(seed, offset, kStreamAccept, static_cast<uint32_t>(j), 0);
      accept = valid && u * q < p;
    }
    if (!accept) return j;
  }
  return num_draft;
}

// The exponential of a race entry: -log(u), u the clamped race uniform (verify_common.h), so > 0.
// NOTE: logf (about 1 ulp), not __logf: the fast log has an absolute error near 2^-21 around 1,
// larger than -log(u) itself for u close to 1, which could make the exponential 0 or negative.
// The race now needs only V / 64 + 64 logs per row, so the accurate one costs nothing noticeable.
__device__ __forceinline__ float race_exponential(uint64_t seed, uint64_t offset, uint32_t stream,
                                                  uint32_t position, uint32_t index) {
  return -logf(race_uniform(seed, offset, stream, position, index));
}

// What the race of a sampled row needs at its emitting position. race_weights(ctx, v) gives the
// weights of id v; race_kernel (stage 1) and finish_kernel (stage 2) both call it, so both stages
// see bit-identical weights.
template <typename T>
struct RaceContext {
  const T* logits;     // [V] target logits at the emitting position
  const float* q_row;  // [V] draft probs at the emitting position (recovered with q), else nullptr
  int64_t drop;        // the point-mass draft token removed from the residual, or -1
  uint64_t seed;
  uint64_t offset;
  uint32_t position;  // the emitting position (the Philox counter's position field)
  float temperature;  // > 0: sampled rows only
  float min_logit;    // top-k / top-p threshold on the scaled scores, -inf if none
  float running_max;  // max processed score at the position; -inf: dead position (p uniform)
  float inv_sum;      // 1 / sum-exp of the processed scores
  float uniform_p;    // 1 / V, p of every id at a dead position
  bool dead;
  bool recovered;  // emit < num_draft: race A runs on the residual, else on p (bonus)
};

// The race context of sampled row `row`, whose emitting position is `emit` (emit_position).
template <typename T, bool kHasQ>
__device__ __forceinline__ RaceContext<T> race_context(const VerifyParams& params,
                                                       const float* stats, int64_t row,
                                                       int64_t num_draft, int64_t emit) {
  const int64_t num_spec = params.num_spec;
  const int64_t positions = num_spec + 1;
  const int64_t vocab = params.vocab;
  RaceContext<T> ctx;
  ctx.logits = static_cast<const T*>(params.target_logits) + (row * positions + emit) * vocab;
  ctx.recovered = emit < num_draft;
  ctx.q_row = nullptr;
  ctx.drop = -1;
  if (ctx.recovered) {
    if (kHasQ) {
      ctx.q_row = params.draft_probs + (row * num_spec + emit) * vocab;
    } else {
      // q is a point mass on the draft token: the residual is p without it (if it is an id).
      const int64_t token = params.draft_tokens[row * num_spec + emit];
      ctx.drop = (token >= 0 && token < vocab) ? token : -1;
    }
  }
  ctx.seed = static_cast<uint64_t>(params.seeds[row]);
  ctx.offset = static_cast<uint64_t>(params.offsets[row]);
  ctx.position = static_cast<uint32_t>(emit);
  ctx.temperature = params.temperature[row];
  ctx.min_logit =
      params.min_logit != nullptr ? params.min_logit[row * positions + emit] : neg_inf();
  const float* st = stats + (row * positions + emit) * 3;
  ctx.running_max = st[0];
  ctx.inv_sum = 1.0f / st[1];
  ctx.dead = ctx.running_max == neg_inf();
  ctx.uniform_p = 1.0f / static_cast<float>(vocab);
  return ctx;
}

// The weights of id v (< V) in race B (p) and race A (the residual max(0, p - q), or p without the
// point-mass draft token; p itself for a bonus token).
template <typename T, bool kHasQ>
__device__ __forceinline__ void race_weights(const RaceContext<T>& ctx, int64_t v, float& p,
                                             float& residual) {
  const float s = processed_score(to_float(ctx.logits[v]), ctx.temperature, ctx.min_logit);
  p = ctx.dead ? ctx.uniform_p
               : (s == neg_inf() ? 0.0f : __expf(s - ctx.running_max) * ctx.inv_sum);
  residual = p;
  if (kHasQ) {
    if (ctx.recovered) {
      const float diff = p - ctx.q_row[v];
      residual = diff > 0.0f ? diff : 0.0f;  // NOTE: also maps a NaN q to 0
    }
  } else if (v == ctx.drop) {
    residual = 0.0f;
  }
}

// Stage 1 of the race over one vocabulary chunk. Per row and chunk it writes
//   partial_key   [B, C, 2]  the best block key of race A (residual) and of race B (p),
//   partial_block [B, C, 3]  the block ids of those keys, and 1 if a residual block sum is > 0.
// chunk_size is a multiple of kRaceBlock (verify_cuda_plan), so every race block lies in one chunk.
// Greedy rows write the identity (-inf, block 0, no residual) and the finish ignores them.
template <typename T, bool kHasQ>
__global__ void __launch_bounds__(kThreads)
    race_kernel(VerifyParams params, const float* stats, const int32_t* argmax, float* partial_key,
                int32_t* partial_block, int64_t chunk_size) {
  const int64_t row = blockIdx.y;
  const int chunk = blockIdx.x;
  const int num_chunks = gridDim.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t vocab = params.vocab;
  const bool greedy = !(params.temperature[row] > 0.0f);
  // NOTE: real block keys are >= 0 (sums >= 0, exponentials > 0), so the identity never wins.
  KeyIndex best_a{neg_inf(), 0}, best_b{neg_inf(), 0};
  bool any_residual = false;
  if (!greedy) {  // uniform over the thread block: no barrier inside
    const int64_t num_draft = clamp_num_draft(params.num_draft[row], params.num_spec);
    const int64_t emit = emit_position(params, stats, argmax, row, num_draft, false);
    const RaceContext<T> ctx = race_context<T, kHasQ>(params, stats, row, num_draft, emit);
    const int64_t begin = static_cast<int64_t>(chunk) * chunk_size;
    const int64_t end = begin + chunk_size < vocab ? begin + chunk_size : vocab;
    // One warp per race block (the loop condition is warp-uniform, so the shuffles below see all
    // 32 lanes); each lane takes ids base + lane and base + 32 + lane (coalesced loads).
    for (int64_t block = begin / kRaceBlock + warp; block * kRaceBlock < end; block += kWarps) {
      const int64_t base = block * kRaceBlock;
      float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
      for (int k = 0; k < kRaceBlock; k += 32) {
        const int64_t v = base + k + lane;
        if (v < end) {  // the vocabulary's tail block may be shorter than kRaceBlock
          float p, residual;
          race_weights<T, kHasQ>(ctx, v, p, residual);
          sum_a += residual;
          sum_b += p;
        }
      }
      sum_a = warp_sum(sum_a);
      sum_b = warp_sum(sum_b);
      // Every lane draws the same block uniform (cheaper than a broadcast: one per 64 ids).
      const float exponential =
          race_exponential(ctx.seed, ctx.offset, kStreamSample | kStreamBlockFlag, ctx.position,
                           static_cast<uint32_t>(block));
      const int32_t block_id = static_cast<int32_t>(block);
      best_a = key_merge(best_a, KeyIndex{__fdiv_rn(sum_a, exponential), block_id});
      best_b = key_merge(best_b, KeyIndex{__fdiv_rn(sum_b, exponential), block_id});
      any_residual = any_residual || sum_a > 0.0f;
    }
  }
  __shared__ KeyIndex shared[kWarps];
  best_a = block_reduce<kWarps>(best_a, shared);
  best_b = block_reduce<kWarps>(best_b, shared);
  const bool chunk_has_residual = __syncthreads_or(any_residual ? 1 : 0) != 0;
  if (threadIdx.x == 0) {
    const int64_t at = row * num_chunks + chunk;
    partial_key[at * 2] = best_a.key;
    partial_key[at * 2 + 1] = best_b.key;
    partial_block[at * 3] = best_a.index;
    partial_block[at * 3 + 1] = best_b.index;
    partial_block[at * 3 + 2] = chunk_has_residual ? 1 : 0;
  }
}

// One thread per id of the winning race block in stage 2.
constexpr int kFinishThreads = kRaceBlock;
constexpr int kFinishWarps = kFinishThreads / 32;
static_assert(kFinishThreads % 32 == 0, "finish_kernel reduces over whole warps");

template <typename T, bool kHasQ>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(VerifyParams params, const float* stats, const int32_t* argmax,
                  const float* partial_key, const int32_t* partial_block, int num_chunks) {
  const int64_t row = blockIdx.x;
  const int64_t num_spec = params.num_spec;
  const int64_t positions = num_spec + 1;
  const int64_t vocab = params.vocab;
  const bool greedy = !(params.temperature[row] > 0.0f);
  const int64_t num_draft = clamp_num_draft(params.num_draft[row], num_spec);
  const int64_t emit = emit_position(params, stats, argmax, row, num_draft, greedy);
  // NOTE: every branch below depends on the row only (uniform over the thread block), and every
  // barrier (block_reduce, __syncthreads_or) is outside them.

  // Stage 1, merged over the chunks: the best block per race (ties to the smallest block, the
  // merge order does not matter) and whether any residual block sum is > 0.
  KeyIndex best_a{neg_inf(), 0}, best_b{neg_inf(), 0};
  bool any_residual = false;
  if (!greedy) {
    for (int c = threadIdx.x; c < num_chunks; c += kFinishThreads) {
      const int64_t at = row * num_chunks + c;
      best_a = key_merge(best_a, KeyIndex{partial_key[at * 2], partial_block[at * 3]});
      best_b = key_merge(best_b, KeyIndex{partial_key[at * 2 + 1], partial_block[at * 3 + 1]});
      any_residual = any_residual || partial_block[at * 3 + 2] != 0;
    }
  }
  __shared__ KeyIndex shared[kFinishWarps];
  best_a = block_reduce<kFinishWarps>(best_a, shared);
  best_b = block_reduce<kFinishWarps>(best_b, shared);
  any_residual = __syncthreads_or(any_residual ? 1 : 0) != 0;

  // Stage 2 inside the winning block: thread t races id block * kRaceBlock + t. The index kept is
  // t (ties to the smallest id); ids >= V keep the identity key -inf and never win, as every id
  // < V has a key >= 0 (block < ceil(V / kRaceBlock), so id block * kRaceBlock is always < V).
  int64_t block = 0;
  KeyIndex best{neg_inf(), 0};
  if (!greedy) {
    const RaceContext<T> ctx = race_context<T, kHasQ>(params, stats, row, num_draft, emit);
    // The fallback: race on p when the token is a bonus or the residual is all zero.
    const bool use_residual = ctx.recovered && any_residual;
    block = use_residual ? best_a.index : best_b.index;
    const int64_t v = block * kRaceBlock + threadIdx.x;
    if (v < vocab) {
      float p, residual;
      race_weights<T, kHasQ>(ctx, v, p, residual);
      const float weight = use_residual ? residual : p;
      const float exponential = race_exponential(ctx.seed, ctx.offset, kStreamSample, ctx.position,
                                                 static_cast<uint32_t>(v));
      best = KeyIndex{__fdiv_rn(weight, exponential), static_cast<int32_t>(threadIdx.x)};
    }
  }
  best = block_reduce<kFinishWarps>(best, shared);
  if (threadIdx.x != 0) return;

  int64_t emitted;
  if (greedy) {
    emitted = argmax[row * positions + emit];
  } else {
    emitted = block * kRaceBlock + best.index;
    emitted = (emitted >= 0 && emitted < vocab) ? emitted : 0;  // never an id out of range
  }
  int64_t* out = params.out_tokens + row * positions;
  for (int64_t j = 0; j < positions; ++j) {
    out[j] = j < emit ? params.draft_tokens[row * num_spec + j] : (j == emit ? emitted : -1);
  }
  params.num_accepted[row] = static_cast<int32_t>(emit);
}

}  // namespace verify_cuda
}  // namespace s2d
