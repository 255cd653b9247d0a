// CUDA kernels of the verify op (spec: s2d_ext/ops/verify_reference.py). Framework-free.
//
//   stats_kernel   grid (ceil((K+1) * S / 8), B), 8 warps per block: one warp per item, an item
//                  being one vocabulary chunk (S chunks of stat_chunk_size ids) of one (row,
//                  position) up to the row's bonus position. The warp streams its chunk once with
//                  16-byte loads, kUnroll of them in flight per lane, and writes the chunk's
//                  partial online-softmax state (max, sum-exp relative to that max, smallest
//                  argmax) of the processed scores. Greedy rows only need the argmax, so they skip
//                  the exps.
//   decide_kernel  grid (B): merges each position's S partials (one warp per position), computes
//                  p(draft token), replays the accept tests (a few Philox draws) and records the
//                  emitting position. A greedy row is finished here (its outputs written).
//   race_kernel    grid (C, B), sampled rows only: stage 1 of the two-level exponential race over
//                  one vocabulary chunk of the emitting position. Each lane takes 8 consecutive ids
//                  (16- or 32-byte loads), 8 lanes make one race block of kRaceBlock = 64 ids,
//                  whose weight sums (residual: race A; p: race B) one lane turns into block keys
//                  with the block uniform (stream kStreamSample | kStreamBlockFlag, index = block).
//                  Keeps the best block per race (ties to the smallest block), and whether some
//                  residual block sum is > 0. A chunk is a whole number of 256-id warp steps, so
//                  blocks never straddle chunks.
//   finish_kernel  grid (B), kRaceBlock threads, sampled rows only: merges the chunks, picks race A
//                  if the token is recovered and some residual block sum is > 0, else race B (the
//                  fallback on p), then runs stage 2 inside the winning block: one thread per id
//                  (stream kStreamSample, index = id); ties to the smallest id, ids >= V never win.
//                  Writes out_tokens and num_accepted.
// NOTE: the first pass reads every position of a row at once (a GPU has no reason to wait for the
// previous position's accept test), in small items so that any batch fills the GPU. Everything is
// float32; no [B, K+1, V] probabilities are written. Fixed launch shapes, no host synchronisation
// (CUDA-graph safe).
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
// -inf. NOTE: fmaxf returns its non-NaN operand, so max(NaN, -inf) = -inf; then min(+inf, float
// max) = float max. kDivide = false skips the division when T is 1 (exact), kThreshold = false
// when there is no top-k/top-p threshold: runtime flags made compile-time in the hot loops.
template <bool kDivide, bool kThreshold>
__device__ __forceinline__ float score(float logit, float divisor, float min_logit) {
  float s = kDivide ? __fdiv_rn(logit, divisor) : logit;
  s = fminf(fmaxf(s, neg_inf()), kFloatMax);
  if (kThreshold) s = s < min_logit ? neg_inf() : s;
  return s;
}

__device__ __forceinline__ float processed_score(float logit, float divisor, float min_logit) {
  return score<true, true>(logit, divisor, min_logit);
}

// Online softmax state of a set of scores; the argmax keeps the smallest id on ties.
struct OnlineStat {
  float max;
  float sum;
  int32_t argmax;
};

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

// 16 bytes of logits (4 floats or 8 half/bf16). NOTE: alignas(16), or the compiler may split the
// load into narrower ones.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kCount = 16 / static_cast<int>(sizeof(T));
  T values[kCount];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

__device__ __forceinline__ int64_t clamp_num_draft(int64_t n, int64_t num_spec) {
  return n < 0 ? 0 : (n > num_spec ? num_spec : n);
}

// ---------------------------------------------------------------------------------------------
// First pass: partial online-softmax states per vocabulary chunk
// ---------------------------------------------------------------------------------------------

// 16-byte loads per lane in flight in the first pass (a warp step covers 32 * kUnroll loads).
constexpr int kUnroll = 8;

// Folds n consecutive scores (ids first .. first + n - 1, in order) into a lane's state. The pack's
// max is found first, so the running sum is rescaled at most once per pack; strict > keeps the
// smallest id of a tie, as every lane visits its ids in increasing order.
template <int N, bool kSum>
__device__ __forceinline__ void add_pack(OnlineStat& st, const float (&s)[N], int64_t first) {
  float m = s[0];
#pragma unroll
  for (int i = 1; i < N; ++i) m = fmaxf(m, s[i]);
  if (m > st.max) {
    int index = N - 1;
#pragma unroll
    for (int i = N - 1; i >= 0; --i) index = s[i] == m ? i : index;
    if (kSum) st.sum = st.max == neg_inf() ? 0.0f : st.sum * __expf(st.max - m);
    st.max = m;
    st.argmax = static_cast<int32_t>(first + index);
  }
  if (kSum && st.max != neg_inf()) {
#pragma unroll
    for (int i = 0; i < N; ++i) st.sum += __expf(s[i] - st.max);
  }
}

// One warp's state over ids [begin, end) of one logits row: kSum = false for greedy rows (argmax
// only). Whole warp steps use 16-byte loads when the row is 16-byte aligned; the rest is scalar.
// Every lane's ids increase, in both parts, so ties keep the smallest id.
template <typename T, bool kSum, bool kDivide, bool kThreshold>
__device__ __forceinline__ OnlineStat chunk_stat(const T* row, int64_t begin, int64_t end,
                                                 bool aligned, float divisor, float min_logit) {
  constexpr int kCount = Vec16<T>::kCount;
  constexpr int64_t kStep = 32 * kCount * kUnroll;
  const int lane = threadIdx.x & 31;
  OnlineStat st{neg_inf(), 0.0f, 0};
  int64_t step = begin;
  if (aligned) {
    for (; step + kStep <= end; step += kStep) {
      Vec16<T> packs[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) packs[k] = load16(row + step + (k * 32 + lane) * kCount);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        float s[kCount];
#pragma unroll
        for (int i = 0; i < kCount; ++i) {
          s[i] = score<kDivide, kThreshold>(to_float(packs[k].values[i]), divisor, min_logit);
        }
        add_pack<kCount, kSum>(st, s, step + (k * 32 + lane) * kCount);
      }
    }
  }
  for (int64_t v = step + lane; v < end; v += 32) {
    const float s[1] = {score<kDivide, kThreshold>(to_float(row[v]), divisor, min_logit)};
    add_pack<1, kSum>(st, s, v);
  }
  return st;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(VerifyParams params, float* partial_max, float* partial_sum,
                 int32_t* partial_argmax, int num_stat_chunks, int64_t stat_chunk_size) {
  const int64_t row = blockIdx.y;
  const int64_t positions = params.num_spec + 1;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  // NOTE: every exit below is uniform over the warp, and this kernel has no block barrier.
  if (item >= positions * num_stat_chunks) return;
  const int64_t position = item / num_stat_chunks;
  const int64_t chunk = item % num_stat_chunks;
  if (position > clamp_num_draft(params.num_draft[row], params.num_spec)) return;
  const int64_t vocab = params.vocab;
  const float temperature = params.temperature[row];
  const bool greedy = !(temperature > 0.0f);
  const float min_logit = (!greedy && params.min_logit != nullptr)
                              ? params.min_logit[row * positions + position]
                              : neg_inf();
  const T* logits =
      static_cast<const T*>(params.target_logits) + (row * positions + position) * vocab;
  const int64_t begin = chunk * stat_chunk_size;
  const int64_t end = begin + stat_chunk_size < vocab ? begin + stat_chunk_size : vocab;
  // NOTE: chunks start at multiples of stat_chunk_size (a multiple of 256 ids), so a chunk is
  // 16-byte aligned when its row is.
  const bool aligned = reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  OnlineStat st;
  if (greedy) {
    st = chunk_stat<T, false, false, false>(logits, begin, end, aligned, 1.0f, neg_inf());
  } else if (temperature == 1.0f) {
    st = min_logit == neg_inf()
             ? chunk_stat<T, true, false, false>(logits, begin, end, aligned, 1.0f, min_logit)
             : chunk_stat<T, true, false, true>(logits, begin, end, aligned, 1.0f, min_logit);
  } else {
    st = min_logit == neg_inf()
             ? chunk_stat<T, true, true, false>(logits, begin, end, aligned, temperature, min_logit)
             : chunk_stat<T, true, true, true>(logits, begin, end, aligned, temperature, min_logit);
  }
  st = warp_reduce(st);
  if ((threadIdx.x & 31) == 0) {
    const int64_t at = (row * positions + position) * num_stat_chunks + chunk;
    partial_max[at] = st.max;
    partial_sum[at] = st.sum;
    partial_argmax[at] = st.argmax;
  }
}

// ---------------------------------------------------------------------------------------------
// Accept tests
// ---------------------------------------------------------------------------------------------

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

// Writes a row's outputs: its `emit` accepted drafts, the emitted token, then -1.
__device__ __forceinline__ void write_row(const VerifyParams& params, int64_t row, int64_t emit,
                                          int64_t emitted) {
  const int64_t num_spec = params.num_spec;
  int64_t* out = params.out_tokens + row * (num_spec + 1);
  for (int64_t j = 0; j <= num_spec; ++j) {
    out[j] = j < emit ? params.draft_tokens[row * num_spec + j] : (j == emit ? emitted : -1);
  }
  params.num_accepted[row] = static_cast<int32_t>(emit);
}

// Per row: merges the partial states of every position up to the bonus one into stats [B, P, 3]
// (max, sum-exp, p(draft token)) and argmax [B, P], then replays the accept tests into
// row_emit [B]. Greedy rows are finished here.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    decide_kernel(VerifyParams params, const float* partial_max, const float* partial_sum,
                  const int32_t* partial_argmax, int num_stat_chunks, float* stats, int32_t* argmax,
                  int32_t* row_emit) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int64_t num_spec = params.num_spec;
  const int64_t positions = num_spec + 1;
  const int64_t vocab = params.vocab;
  const int64_t num_draft = clamp_num_draft(params.num_draft[row], num_spec);
  const float temperature = params.temperature[row];
  const bool greedy = !(temperature > 0.0f);
  const float divisor = greedy ? 1.0f : temperature;
  // One warp per position (the loop bound is uniform over the warp, so the shuffles see 32 lanes).
  for (int64_t position = threadIdx.x >> 5; position <= num_draft; position += kWarps) {
    const int64_t base = (row * positions + position) * num_stat_chunks;
    OnlineStat st{neg_inf(), 0.0f, 0x7fffffff};
    for (int c = lane; c < num_stat_chunks; c += 32) {
      st = stat_merge(
          st, OnlineStat{partial_max[base + c], partial_sum[base + c], partial_argmax[base + c]});
    }
    st = warp_reduce(st);
    if (lane != 0) continue;
    const bool dead = st.max == neg_inf();
    const float min_logit = (!greedy && params.min_logit != nullptr)
                                ? params.min_logit[row * positions + position]
                                : neg_inf();
    float p_token = 0.0f;
    if (position < num_draft) {
      const int64_t token = params.draft_tokens[row * num_spec + position];
      if (token >= 0 && token < vocab) {
        const T* logits =
            static_cast<const T*>(params.target_logits) + (row * positions + position) * vocab;
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
  __syncthreads();  // NOTE: makes the stats written by every warp visible to thread 0
  if (threadIdx.x != 0) return;
  const int64_t emit = emit_position(params, stats, argmax, row, num_draft, greedy);
  row_emit[row] = static_cast<int32_t>(emit);
  if (greedy) write_row(params, row, emit, argmax[row * positions + emit]);
}

// ---------------------------------------------------------------------------------------------
// The race at the emitting position (sampled rows)
// ---------------------------------------------------------------------------------------------

// The exponential of a race entry: -log(u), u the clamped race uniform (verify_common.h), so > 0.
// NOTE: logf (about 1 ulp), not __logf: the fast log has an absolute error near 2^-21 around 1,
// larger than -log(u) itself for u close to 1, which could make the exponential 0 or negative.
// The race needs only V / 64 + 64 logs per row, so the accurate one costs nothing noticeable.
__device__ __forceinline__ float race_exponential(uint64_t seed, uint64_t offset, uint32_t stream,
                                                  uint32_t position, uint32_t index) {
  return -logf(race_uniform(seed, offset, stream, position, index));
}

// What the race of a sampled row needs at its emitting position.
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

// The race context of sampled row `row`, whose emitting position is `emit`.
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

// The weights of id v (< V), whose logit is `logit` and draft probability `q` (read only when the
// token is recovered with draft_probs), in race B (p) and race A (the residual max(0, p - q), or p
// without the point-mass draft token; p itself for a bonus token).
template <typename T, bool kHasQ>
__device__ __forceinline__ void race_weights(const RaceContext<T>& ctx, int64_t v, float logit,
                                             float q, float& p, float& residual) {
  // NOTE: uniform over the warp; T = 1 divides exactly, so the division is skipped.
  const float s = ctx.temperature == 1.0f
                      ? score<false, true>(logit, 1.0f, ctx.min_logit)
                      : score<true, true>(logit, ctx.temperature, ctx.min_logit);
  p = ctx.dead ? ctx.uniform_p
               : (s == neg_inf() ? 0.0f : __expf(s - ctx.running_max) * ctx.inv_sum);
  residual = p;
  if (kHasQ) {
    if (ctx.recovered) {
      const float diff = p - q;
      residual = diff > 0.0f ? diff : 0.0f;  // NOTE: also maps a NaN q to 0
    }
  } else if (v == ctx.drop) {
    residual = 0.0f;
  }
}

// The weights of id v read from memory (scalar loads; v < V).
template <typename T, bool kHasQ>
__device__ __forceinline__ void race_weights_at(const RaceContext<T>& ctx, int64_t v, float& p,
                                                float& residual) {
  const float q = (kHasQ && ctx.q_row != nullptr) ? ctx.q_row[v] : 0.0f;
  race_weights<T, kHasQ>(ctx, v, to_float(ctx.logits[v]), q, p, residual);
}

// Ids per lane in a race step, and per warp step (4 race blocks).
constexpr int kRaceIdsPerLane = 8;
constexpr int kRaceStep = 32 * kRaceIdsPerLane;
static_assert(kRaceStep % kRaceBlock == 0 && kRaceBlock % kRaceIdsPerLane == 0,
              "a race block is a whole number of lanes of one warp step");

// 8 consecutive floats of a 16-byte aligned row at id `first` (a multiple of 8).
template <typename T>
__device__ __forceinline__ void load8(const T* row, int64_t first, float (&out)[8]) {
  constexpr int kCount = Vec16<T>::kCount;
#pragma unroll
  for (int k = 0; k < 8 / kCount; ++k) {
    const Vec16<T> pack = load16(row + first + k * kCount);
#pragma unroll
    for (int i = 0; i < kCount; ++i) out[k * kCount + i] = to_float(pack.values[i]);
  }
}

// Stage 1 of the race over one vocabulary chunk. Per row and chunk it writes
//   partial_key   [B, C, 2]  the best block key of race A (residual) and of race B (p),
//   partial_block [B, C, 3]  the block ids of those keys, and 1 if a residual block sum is > 0.
// chunk_size is a multiple of kRaceStep (verify_cuda_plan). Greedy rows write nothing.
template <typename T, bool kHasQ>
__global__ void __launch_bounds__(kThreads)
    race_kernel(VerifyParams params, const float* stats, const int32_t* row_emit,
                float* partial_key, int32_t* partial_block, int64_t chunk_size) {
  const int64_t row = blockIdx.y;
  if (!(params.temperature[row] > 0.0f)) return;  // NOTE: uniform over the block
  const int chunk = blockIdx.x;
  const int num_chunks = gridDim.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t vocab = params.vocab;
  const int64_t num_draft = clamp_num_draft(params.num_draft[row], params.num_spec);
  const int64_t emit = row_emit[row];
  const RaceContext<T> ctx = race_context<T, kHasQ>(params, stats, row, num_draft, emit);
  const bool read_q = kHasQ && ctx.q_row != nullptr;
  const bool aligned = reinterpret_cast<uintptr_t>(ctx.logits) % 16 == 0 &&
                       (!read_q || reinterpret_cast<uintptr_t>(ctx.q_row) % 16 == 0);
  const int64_t begin = static_cast<int64_t>(chunk) * chunk_size;
  const int64_t end = begin + chunk_size < vocab ? begin + chunk_size : vocab;
  // NOTE: real block keys are >= 0 (sums >= 0, exponentials > 0), so the identity never wins.
  KeyIndex best_a{neg_inf(), 0}, best_b{neg_inf(), 0};
  bool any_residual = false;
  // The loop bound is uniform over the warp, so the shuffles below see all 32 lanes.
  for (int64_t step = begin + static_cast<int64_t>(warp) * kRaceStep; step < end;
       step += static_cast<int64_t>(kWarps) * kRaceStep) {
    const int64_t first = step + lane * kRaceIdsPerLane;
    float sum_a = 0.0f, sum_b = 0.0f;
    if (aligned && step + kRaceStep <= end) {
      float logit[8], q[8];
      load8(ctx.logits, first, logit);
      if (read_q) {
        load8(ctx.q_row, first, q);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float p, residual;
        race_weights<T, kHasQ>(ctx, first + i, logit[i], q[i], p, residual);
        sum_a += residual;
        sum_b += p;
      }
    } else {
      for (int i = 0; i < kRaceIdsPerLane; ++i) {
        if (first + i < end) {  // the vocabulary's tail may end inside a block
          float p, residual;
          race_weights_at<T, kHasQ>(ctx, first + i, p, residual);
          sum_a += residual;
          sum_b += p;
        }
      }
    }
    // The 8 lanes of a race block sum their weights (lanes 8b .. 8b + 7 hold block b of the step).
#pragma unroll
    for (int delta = kRaceBlock / kRaceIdsPerLane / 2; delta > 0; delta >>= 1) {
      sum_a += __shfl_xor_sync(0xffffffffu, sum_a, delta);
      sum_b += __shfl_xor_sync(0xffffffffu, sum_b, delta);
    }
    const int64_t block = first / kRaceBlock;
    if (first % kRaceBlock == 0 && first < end) {
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
    finish_kernel(VerifyParams params, const float* stats, const int32_t* row_emit,
                  const float* partial_key, const int32_t* partial_block, int num_chunks) {
  const int64_t row = blockIdx.x;
  // NOTE: greedy rows were finished by decide_kernel; this exit is uniform over the block, and
  // every barrier below (block_reduce, __syncthreads_or) is reached by all threads.
  if (!(params.temperature[row] > 0.0f)) return;
  const int64_t vocab = params.vocab;
  const int64_t num_draft = clamp_num_draft(params.num_draft[row], params.num_spec);
  const int64_t emit = row_emit[row];

  // Stage 1, merged over the chunks: the best block per race (ties to the smallest block, the
  // merge order does not matter) and whether any residual block sum is > 0.
  KeyIndex best_a{neg_inf(), 0}, best_b{neg_inf(), 0};
  bool any_residual = false;
  for (int c = threadIdx.x; c < num_chunks; c += kFinishThreads) {
    const int64_t at = row * num_chunks + c;
    best_a = key_merge(best_a, KeyIndex{partial_key[at * 2], partial_block[at * 3]});
    best_b = key_merge(best_b, KeyIndex{partial_key[at * 2 + 1], partial_block[at * 3 + 1]});
    any_residual = any_residual || partial_block[at * 3 + 2] != 0;
  }
  __shared__ KeyIndex shared[kFinishWarps];
  best_a = block_reduce<kFinishWarps>(best_a, shared);
  best_b = block_reduce<kFinishWarps>(best_b, shared);
  any_residual = __syncthreads_or(any_residual ? 1 : 0) != 0;

  // Stage 2 inside the winning block: thread t races id block * kRaceBlock + t. The index kept is
  // t (ties to the smallest id); ids >= V keep the identity key -inf and never win, as every id
  // < V has a key >= 0 (block < ceil(V / kRaceBlock), so id block * kRaceBlock is always < V).
  const RaceContext<T> ctx = race_context<T, kHasQ>(params, stats, row, num_draft, emit);
  // The fallback: race on p when the token is a bonus or the residual is all zero.
  const bool use_residual = ctx.recovered && any_residual;
  const int64_t block = use_residual ? best_a.index : best_b.index;
  KeyIndex best{neg_inf(), 0};
  const int64_t v = block * kRaceBlock + threadIdx.x;
  if (v < vocab) {
    float p, residual;
    race_weights_at<T, kHasQ>(ctx, v, p, residual);
    const float weight = use_residual ? residual : p;
    const float exponential = race_exponential(ctx.seed, ctx.offset, kStreamSample, ctx.position,
                                               static_cast<uint32_t>(v));
    best = KeyIndex{__fdiv_rn(weight, exponential), static_cast<int32_t>(threadIdx.x)};
  }
  best = block_reduce<kFinishWarps>(best, shared);
  if (threadIdx.x != 0) return;
  int64_t emitted = block * kRaceBlock + best.index;
  emitted = (emitted >= 0 && emitted < vocab) ? emitted : 0;  // never an id out of range
  write_row(params, row, emit, emitted);
}

}  // namespace verify_cuda
}  // namespace s2d
