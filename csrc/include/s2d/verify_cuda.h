// Host-side interface of the CUDA verify kernels (csrc/verify/verify_kernels.cu). No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "s2d/verify_common.h"

namespace s2d {

// Device workspaces the caller allocates (B = batch, P = K+1, C = num_chunks):
//   stats         [B, P, 3] float32  (max, sum-exp, p(draft token))
//   argmax        [B, P]    int32
//   partial_key   [B, C, 2] float32  stage 1 of the race per vocabulary chunk: the best block key
//                                    of the residual race (A) and of the race on p (B)
//   partial_block [B, C, 3] int32    the block ids of those two keys, and 1 if some residual block
//                                    sum of the chunk is > 0 (else 0)
struct VerifyCudaWorkspace {
  float* stats;
  int32_t* argmax;
  float* partial_key;
  int32_t* partial_block;
  int num_chunks;
  int64_t chunk_size;  // vocabulary entries per chunk, a multiple of kRaceBlock (64)
};

// How to split the vocabulary of the race (grid (C, B)) for a device with `num_sms` SMs: chunks of
// whole race blocks (kRaceBlock ids), at most 64 of them. Depends on (batch, vocab, num_sms) only.
void verify_cuda_plan(int64_t batch, int64_t vocab, int num_sms, int* num_chunks,
                      int64_t* chunk_size);

// Launches the three kernels on `stream`; returns the launch error, if any.
cudaError_t verify_cuda_launch(const VerifyParams& params, LogitType logit_type,
                               const VerifyCudaWorkspace& workspace, cudaStream_t stream);

}  // namespace s2d
