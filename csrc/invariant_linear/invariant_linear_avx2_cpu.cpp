// The AVX2+FMA+F16C build of the CPU row-invariant linear kernel
// (csrc/include/s2d/invariant_linear_cpu.h), chosen at run time by invariant_linear_cpu.cpp when
// the CPU has those extensions. Framework-free; no torch headers.
//
// NOTE: the standard headers are included before the target pragma so that only this file's own
// (namespaced) kernel code is compiled for AVX2, never an inline std:: function shared with the
// portable build.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "s2d/invariant_linear_common.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define S2D_INVARIANT_LINEAR_NS invariant_linear_cpu_avx2
#define S2D_INVARIANT_LINEAR_AVX2 1
#include "s2d/invariant_linear_cpu.h"

namespace s2d {

void invariant_linear_columns_avx2(const invariant_linear::Params& params, const float* x_tail,
                                   int64_t n_begin, int64_t n_end) {
  invariant_linear_cpu_avx2::run_columns(params, x_tail, n_begin, n_end);
}

}  // namespace s2d

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace s2d {

bool invariant_linear_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

}  // namespace s2d

#else  // not x86: only the portable build exists

namespace s2d {

void invariant_linear_columns_avx2(const invariant_linear::Params&, const float*, int64_t,
                                   int64_t) {}
bool invariant_linear_has_avx2() { return false; }

}  // namespace s2d

#endif
