// CUDA reduction of the exit head's float32 logits, one chunk of the vocabulary at a time
// (framework-free; the logits come from a tensor-core matmul, see exit_head_chunked.h).
//   chunk_stats_kernel: grid (ceil(C / kReduceCols), N), kReduceThreads threads. A block reduces
//     kReduceCols logits of one row: each thread pushes its strided (coalesced) logits in id order,
//     then a shared-memory tree merges the threads, ties to the smaller id. One RowState per block.
//   merge_kernel: one thread per row merges the partial states in id order -> token, confidence,
//     logsumexp (exit_head_common.h).
// Every reduction has a fixed order: results are deterministic for given shapes.
#pragma once

#include <cstdint>

#include "s2d/exit_head_common.h"

namespace s2d {
namespace exit_head {
namespace cuda {

constexpr int kReduceThreads = 256;
constexpr int64_t kReduceCols = 2048;  // logits per block of chunk_stats_kernel
constexpr int kMergeThreads = 128;

// Merges `other` into `state` whatever their id ranges: the larger max wins, equal maxima keep the
// smaller argmax (merge_state assumes `other` holds only larger ids).
S2D_HOST_DEVICE void merge_any(RowState& state, const RowState& other, float t) {
  if (other.max == -INFINITY) return;
  if (state.max == -INFINITY) {
    state = other;
    return;
  }
  if (other.max > state.max) {
    state.sum = state.sum * expf((state.max - other.max) / t) + other.sum;
    state.max = other.max;
    state.arg = other.arg;
  } else {
    state.sum += other.sum * expf((other.max - state.max) / t);
    if (other.max == state.max && other.arg < state.arg) state.arg = other.arg;
  }
}

__global__ void __launch_bounds__(kReduceThreads)
    chunk_stats_kernel(const float* __restrict__ logits,       // [N, cols] one vocabulary chunk
                       const float* __restrict__ temperature,  // [N]
                       int64_t rows, int64_t cols,
                       int64_t id_offset,               // vocabulary id of column 0
                       RowState* __restrict__ partial,  // [parts, N] out
                       int64_t part_begin) {            // first part of this chunk
  __shared__ RowState states[kReduceThreads];
  const int64_t row = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kReduceCols;
  const int64_t end = begin + kReduceCols < cols ? begin + kReduceCols : cols;
  const float t = safe_temperature(temperature[row]);
  const float* values = logits + row * cols;
  RowState state = empty_state();
  for (int64_t c = begin + threadIdx.x; c < end; c += kReduceThreads) {
    push_logit(state, values[c], id_offset + c, t);
  }
  states[threadIdx.x] = state;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      merge_any(states[threadIdx.x], states[threadIdx.x + stride], t);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[(part_begin + blockIdx.x) * rows + row] = states[0];
}

__global__ void merge_kernel(const RowState* __restrict__ partial,   // [parts, N], ids ascending
                             const float* __restrict__ temperature,  // [N]
                             int64_t rows, int64_t parts, int64_t vocab,
                             int64_t* __restrict__ tokens, float* __restrict__ confidence,
                             float* __restrict__ logsumexp) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float t = safe_temperature(temperature[row]);
  RowState state = partial[row];
  for (int64_t p = 1; p < parts; ++p) merge_state(state, partial[p * rows + row], t);
  finish_state(state, t, vocab, tokens + row, confidence + row, logsumexp + row);
}

}  // namespace cuda
}  // namespace exit_head
}  // namespace s2d
