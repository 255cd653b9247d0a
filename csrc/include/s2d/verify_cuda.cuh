// CUDA kernels of the verify op (spec: s2d_ext/ops/verify_reference.py). Framework-free.
//
//   position_stats_kernel  grid (K+1, B): one block per (row, position) up to the row's bonus
//                          position streams the logits once (16-byte loads): online max / sum-exp
//                          of the processed scores, smallest argmax, p(draft token).
//   race_kernel            grid (C, B): replays the accept tests from the stats (a few Philox
//                          draws), then runs the exponential race over one vocabulary chunk of the
//                          emitting position: one Philox call per 4 entries, keys for the residual
//                          and for p, block argmax with ties to the smallest id.
//   finish_kernel          grid (B): merges the chunks, writes out_tokens and num_accepted.
// Everything is float32; no [B, K+1, V] probabilities are written.
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

// Block-wide reduction; every thread gets the result.
template <typename State>
__device__ __forceinline__ State block_reduce(State st, State* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  State total = shared[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = merge_any(total, shared[w]);
  __syncthreads();
  return total;
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
  st = block_reduce(st, shared);
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

template <typename T, bool kHasQ>
__global__ void __launch_bounds__(kThreads)
    race_kernel(VerifyParams params, const float* stats, const int32_t* argmax, float* partial_key,
                int32_t* partial_index, int64_t chunk_size) {
  const int64_t row = blockIdx.y;
  const int chunk = blockIdx.x;
  const int num_chunks = gridDim.x;
  const int64_t num_spec = params.num_spec;
  const int64_t positions = num_spec + 1;
  const int64_t vocab = params.vocab;
  const float temperature = params.temperature[row];
  const bool greedy = !(temperature > 0.0f);
  KeyIndex best_a{neg_inf(), 0}, best_b{neg_inf(), 0};
  if (!greedy) {
    const int64_t num_draft = clamp_num_draft(params.num_draft[row], num_spec);
    const int64_t emit = emit_position(params, stats, argmax, row, num_draft, false);
    const bool recovered = emit < num_draft;
    const float min_logit =
        params.min_logit != nullptr ? params.min_logit[row * positions + emit] : neg_inf();
    const float* st = stats + (row * positions + emit) * 3;
    const float running_max = st[0];
    const float inv_sum = 1.0f / st[1];
    const bool dead = running_max == neg_inf();
    const float uniform_p = 1.0f / static_cast<float>(vocab);
    int64_t drop = -1;
    const float* q_row = nullptr;
    if (recovered) {
      if (kHasQ) {
        q_row = params.draft_probs + (row * num_spec + emit) * vocab;
      } else {
        const int64_t token = params.draft_tokens[row * num_spec + emit];
        drop = (token >= 0 && token < vocab) ? token : -1;
      }
    }
    const uint64_t seed = static_cast<uint64_t>(params.seeds[row]);
    const uint64_t offset = static_cast<uint64_t>(params.offsets[row]);
    const uint32_t c1 = (kStreamSample << 16) | static_cast<uint32_t>(emit);
    const T* logits =
        static_cast<const T*>(params.target_logits) + (row * positions + emit) * vocab;
    const int64_t begin = static_cast<int64_t>(chunk) * chunk_size;
    const int64_t end = begin + chunk_size < vocab ? begin + chunk_size : vocab;
    // One Philox call per 4 consecutive entries (index >> 2 = counter, index & 3 = word).
    for (int64_t group = begin + 4 * static_cast<int64_t>(threadIdx.x); group < end;
         group += 4 * static_cast<int64_t>(blockDim.x)) {
      const PhiloxOut words =
          philox4x32_10(static_cast<uint32_t>(group >> 2), c1, static_cast<uint32_t>(offset),
                        static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
                        static_cast<uint32_t>(seed >> 32));
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int64_t v = group + w;
        if (v >= end) break;
        const float s = processed_score(to_float(logits[v]), temperature, min_logit);
        const float p =
            dead ? uniform_p : (s == neg_inf() ? 0.0f : __expf(s - running_max) * inv_sum);
        float residual = p;
        if (kHasQ) {
          if (recovered) {
            const float diff = p - q_row[v];
            residual = diff > 0.0f ? diff : 0.0f;
          }
        } else if (v == drop) {
          residual = 0.0f;
        }
        float u = uniform_open01(words.x[w]);
        u = u < kRaceMaxUniform ? u : kRaceMaxUniform;
        const float exponential = -__logf(u);
        const KeyIndex key_b{__fdiv_rn(p, exponential), static_cast<int32_t>(v)};
        const KeyIndex key_a{__fdiv_rn(residual, exponential), static_cast<int32_t>(v)};
        best_b = key_merge(best_b, key_b);
        best_a = key_merge(best_a, key_a);
      }
    }
  }
  __shared__ KeyIndex shared[kWarps];
  best_a = block_reduce(best_a, shared);
  best_b = block_reduce(best_b, shared);
  if (threadIdx.x == 0) {
    const int64_t out = (row * num_chunks + chunk) * 2;
    partial_key[out] = best_a.key;
    partial_key[out + 1] = best_b.key;
    partial_index[out] = best_a.index;
    partial_index[out + 1] = best_b.index;
  }
}

__global__ void finish_kernel(VerifyParams params, const float* stats, const int32_t* argmax,
                              const float* partial_key, const int32_t* partial_index,
                              int num_chunks) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= params.batch) return;
  const int64_t num_spec = params.num_spec;
  const int64_t positions = num_spec + 1;
  const float temperature = params.temperature[row];
  const bool greedy = !(temperature > 0.0f);
  const int64_t num_draft = clamp_num_draft(params.num_draft[row], num_spec);
  const int64_t emit = emit_position(params, stats, argmax, row, num_draft, greedy);
  int64_t emitted;
  if (greedy) {
    emitted = argmax[row * positions + emit];
  } else {
    KeyIndex best_a{neg_inf(), 0}, best_b{neg_inf(), 0};
    for (int c = 0; c < num_chunks; ++c) {
      const int64_t at = (row * num_chunks + c) * 2;
      best_a = key_merge(best_a, KeyIndex{partial_key[at], partial_index[at]});
      best_b = key_merge(best_b, KeyIndex{partial_key[at + 1], partial_index[at + 1]});
    }
    emitted = (emit < num_draft && best_a.key > 0.0f) ? best_a.index : best_b.index;
    emitted = (emitted >= 0 && emitted < params.vocab) ? emitted : 0;
  }
  int64_t* out = params.out_tokens + row * positions;
  for (int64_t j = 0; j < positions; ++j) {
    out[j] = j < emit ? params.draft_tokens[row * num_spec + j] : (j == emit ? emitted : -1);
  }
  params.num_accepted[row] = static_cast<int32_t>(emit);
}

}  // namespace verify_cuda
}  // namespace s2d
