// The row-invariant linear layer (framework-free): y[t, n] = sum_k x[t, k] * w[n, k] + bias[n].
//
// Every output element is computed by one fixed sequence of operations that depends only on k's
// count (in_features), never on how many rows there are, where a row sits in the batch, which
// block or thread computed it, or which CPU build ran it:
//
//   lane l (l = 0..7) accumulates acc_l = fma(w[n, k], x[t, k], acc_l) for k = l, l + 8, l + 16,
//   ... in increasing k (the last group of 8 zero-padded), starting from +0; s = ((acc_0 + acc_4) +
//   (acc_2 + acc_6)) + ((acc_1 + acc_5) + (acc_3 + acc_7)); y[t, n] = s + bias[n]  (when there is a
//   bias), in float32.
//
// So a verify forward over T tokens gives each token exactly what a one-token forward gives
// (T-invariance, as batch-invariant inference does on GPUs), and the AVX2 and portable builds
// agree to the bit (std::fma is the fused multiply-add that vfmadd computes).
//
// Weights are float32, bfloat16 or float16 ([N, K], row-major, as nn.Linear stores them); the
// input x is float32 ([T, K]; the binding converts other dtypes once, elementwise). Each weight
// element is read once per block of up to kRowBlock rows: for the few rows of a decode or verify
// step the weights stream from memory once, which is what makes the step cost flat in T.
#pragma once

#include <cstdint>
#include <cstring>

namespace s2d {
namespace invariant_linear {

enum class WeightType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kLanes = 8;

struct Params {
  const float* x;        // [T, K] float32
  const void* w;         // [N, K] WeightType
  const float* bias;     // [N] float32 or nullptr
  float* y;              // [T, N] float32
  int64_t rows;          // T
  int64_t in_features;   // K
  int64_t out_features;  // N
  WeightType weight_type;
};

// Exact IEEE half -> float (subnormals, infinities and NaNs included); F16C's vcvtph2ps agrees.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalise.
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace invariant_linear
}  // namespace s2d
