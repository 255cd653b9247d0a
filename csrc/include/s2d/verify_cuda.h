// Host-side interface of the CUDA verify kernels (csrc/verify/verify_kernels.cu). No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "s2d/verify_common.h"

namespace s2d {

// Device workspaces the caller allocates (B = batch, P = K+1, S = num_stat_chunks, C = num_chunks):
//   partial_max, partial_sum  [B, P, S] float32  first pass, per vocabulary chunk of
//   stat_chunk_size partial_argmax            [B, P, S] int32    ids: the chunk's max, sum-exp
//   relative to it, argmax stats                     [B, P, 3] float32  merged: max, sum-exp,
//   p(draft token) argmax                    [B, P]    int32 row_emit                  [B] int32
//   the emitting position (= num_accepted) partial_key               [B, C, 2] float32  stage 1 of
//   the race per vocabulary chunk: the best
//                                                block key of the residual race (A) and of the race
//                                                on p (B)
//   partial_block             [B, C, 3] int32    the block ids of those two keys, and 1 if some
//                                                residual block sum of the chunk is > 0 (else 0)
struct VerifyCudaWorkspace {
  float* partial_max;
  float* partial_sum;
  int32_t* partial_argmax;
  float* stats;
  int32_t* argmax;
  int32_t* row_emit;
  float* partial_key;
  int32_t* partial_block;
  int num_stat_chunks;
  int64_t stat_chunk_size;  // ids per first-pass chunk, a multiple of 256
  int num_chunks;
  int64_t chunk_size;  // ids per race chunk, a multiple of 256 (4 race blocks of kRaceBlock)
};

// The vocabulary split of both passes for a device with `num_sms` SMs. Depends on (batch, vocab,
// num_sms) only. First pass: chunks of kStatChunkSize ids. Race (grid (C, B)): at most 64 chunks of
// whole 256-id steps, enough to fill the GPU about 4 times over.
constexpr int64_t kStatChunkSize = 4096;
void verify_cuda_plan(int64_t batch, int64_t vocab, int num_sms, int* num_chunks,
                      int64_t* chunk_size);
inline int verify_cuda_stat_chunks(int64_t vocab, int64_t stat_chunk_size) {
  return static_cast<int>((vocab + stat_chunk_size - 1) / stat_chunk_size);
}

// Launches the four kernels on `stream`; returns the launch error, if any.
cudaError_t verify_cuda_launch(const VerifyParams& params, LogitType logit_type,
                               const VerifyCudaWorkspace& workspace, cudaStream_t stream);

}  // namespace s2d
