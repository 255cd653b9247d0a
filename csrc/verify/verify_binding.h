// Shared by the CPU and CUDA torch bindings of verify (not framework-free: it holds at::Tensors).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "s2d/verify_common.h"

namespace s2d {

// The op's inputs made contiguous (kept alive here), its outputs, and the raw-pointer parameters
// the kernels take.
struct VerifyPrepared {
  at::Tensor logits, tokens, q, threshold, num_draft, temperature, seeds, offsets;
  at::Tensor out_tokens;    // [B, K+1] int64
  at::Tensor num_accepted;  // [B] int32
  VerifyParams params;
  LogitType logit_type;
};

// Checks shapes, dtypes and devices (no device synchronisation), allocates the outputs and fills
// params. Defined in verify_cpu.cpp (same library).
VerifyPrepared verify_prepare(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                              const std::optional<at::Tensor>& draft_probs,
                              const at::Tensor& num_draft, const at::Tensor& temperature,
                              const std::optional<at::Tensor>& min_logit, const at::Tensor& seeds,
                              const at::Tensor& offsets);

}  // namespace s2d
