// Shared by the CPU and CUDA torch bindings of exit_sample / sample_logits (not framework-free: it
// holds at::Tensors). Defined in exit_sample_cpu.cpp (same library).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "s2d/exit_sample_common.h"

namespace s2d {
namespace exit_sample {

// The per-row inputs made contiguous (kept alive here), the outputs, and the raw parameters.
struct SamplePrepared {
  at::Tensor temperature, top_k, top_p, seeds, offsets, positions, threshold, vocab_ids, probs_rows;
  at::Tensor tokens;      // [N] int64
  at::Tensor confidence;  // [N] float32
  at::Tensor fired;       // [N] bool
  SampleParams params;
};

// Checks shapes, dtypes and devices of the per-row arguments and of probs (no device
// synchronisation), allocates the outputs and fills params (min_logit = nullptr). `op` names the
// op in messages; `rows` / `head_vocab` come from the logits or the head.
SamplePrepared sample_prepare(const char* op, int64_t rows, int64_t head_vocab,
                              const at::Device& device, const at::Tensor& temperature,
                              const at::Tensor& top_k, const at::Tensor& top_p,
                              const at::Tensor& seeds, const at::Tensor& offsets,
                              const at::Tensor& positions, const at::Tensor& threshold,
                              const std::optional<at::Tensor>& vocab_ids, at::Tensor& probs,
                              const at::Tensor& probs_rows, bool filters);

// "[3, 17]" (streams no integer into TORCH_CHECK: see verify_cpu.cpp).
std::string shape_of(const at::Tensor& tensor);

}  // namespace exit_sample
}  // namespace s2d
