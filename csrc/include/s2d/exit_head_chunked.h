// The CUDA exit head's host loop: the head as matmuls over chunks of the vocabulary, each into one
// reused float32 buffer [N, C] and reduced at once by chunk_stats_cuda, then merge_cuda. The matmul
// is a callback (the torch binding passes torch's tensor-core matmul with a float32 result; the
// CUDA-simulator test passes a copy of precomputed logits), so this loop is framework-free.
//
// NOTE: why chunks: torch's composition writes the [N, V] logits (bf16) and then reads them several
// times (max, logsumexp); here the logits of a chunk are written once in float32 and read once, and
// the buffer is bounded (kChunkBufferBytes) instead of growing with N * V.
#pragma once

#include <algorithm>
#include <cstdint>

#include "s2d/exit_head_launch.h"

namespace s2d {
namespace exit_head {

constexpr int64_t kChunkBufferBytes = int64_t{8} << 20;  // the [N, C] float32 buffer's bound
constexpr int64_t kMinChunkCols = 4096;
constexpr int64_t kChunkColsAlign = 2048;  // a whole number of chunk_stats blocks

// C: the vocabulary columns of one chunk for N rows (at most V).
inline int64_t chunk_cols(int64_t rows, int64_t vocab) {
  const int64_t fit = kChunkBufferBytes / (4 * std::max<int64_t>(rows, 1));
  const int64_t cols = std::max(kMinChunkCols, fit / kChunkColsAlign * kChunkColsAlign);
  return std::min(cols, vocab);
}

// RowState partials the whole loop writes (`cols`: the chunk width, 0 = chunk_cols(rows, vocab)).
inline int64_t chunked_parts(int64_t rows, int64_t vocab, int64_t cols = 0) {
  if (cols <= 0) cols = chunk_cols(rows, vocab);
  int64_t parts = 0;
  for (int64_t begin = 0; begin < vocab; begin += cols) {
    parts += chunk_stats_parts(std::min(cols, vocab - begin));
  }
  return parts;
}

// ChunkLogits: callable (int64_t begin, int64_t count, float* out) that writes the float32 logits
// of vocabulary ids [begin, begin + count) of every row to out [N, count] (stream-ordered before
// the reduction launched next on `stream`). `buffer` holds N * cols floats, `partial`
// chunked_parts(N, V, cols) states; `cols` = 0 takes chunk_cols(N, V) (tests pass small widths).
template <class ChunkLogits>
cudaError_t exit_head_chunked(int64_t rows, int64_t vocab, const float* temperature, float* buffer,
                              RowState* partial, int64_t* tokens, float* confidence,
                              float* logsumexp, cudaStream_t stream, ChunkLogits&& chunk_logits,
                              int64_t cols = 0) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0) cols = chunk_cols(rows, vocab);
  int64_t part = 0;
  for (int64_t begin = 0; begin < vocab; begin += cols) {
    const int64_t count = std::min(cols, vocab - begin);
    chunk_logits(begin, count, buffer);
    const cudaError_t status =
        chunk_stats_cuda(buffer, temperature, rows, count, begin, partial, part, stream);
    if (status != cudaSuccess) return status;
    part += chunk_stats_parts(count);
  }
  return merge_cuda(partial, temperature, rows, part, vocab, tokens, confidence, logsumexp, stream);
}

}  // namespace exit_head
}  // namespace s2d
