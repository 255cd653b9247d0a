// C entry point of the row-invariant linear launcher
// (csrc/invariant_linear/invariant_linear_kernels.cu, included unchanged) run on the CPU CUDA
// simulator (sim_cuda.h). Built and called by python_tests/ops/test_invariant_linear_cuda_sim.py:
//   g++ -std=c++17 -O1 -pthread -shared -fPIC -DS2D_CUDA_SIM -I<this dir> -I<repo>/csrc/include
//       -I<repo>/csrc sim_invariant_linear.cpp
#include <cstdint>
#include <cstdio>
#include <exception>

#include "invariant_linear/invariant_linear_kernels.cu"

// y [T, N] float32 from x [T, K] float32 and w [N, K] of weight_type (0 fp32, 1 bf16, 2 fp16);
// bias may be null. Returns 0, or -1 if the simulator failed (message on stderr).
extern "C" int sim_invariant_linear(const float* x, const void* w, int weight_type,
                                    const float* bias, float* y, int64_t rows, int64_t in_features,
                                    int64_t out_features) {
  const s2d::invariant_linear::Params params{
      x,    w,           bias,         y,
      rows, in_features, out_features, static_cast<s2d::invariant_linear::WeightType>(weight_type)};
  try {
    return s2d::invariant_linear::invariant_linear_cuda(params, nullptr) == cudaSuccess ? 0 : -1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return -1;
  }
}
