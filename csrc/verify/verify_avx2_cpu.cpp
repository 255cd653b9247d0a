// The AVX2+FMA build of the CPU verify kernel (csrc/include/s2d/verify_cpu.h), chosen at run
// time by verify_cpu.cpp when the CPU has AVX2 and FMA. Framework-free; no torch headers.
//
// NOTE: the standard headers are included before the target pragma so that only this file's own
// (namespaced) kernel code is compiled for AVX2, never an inline std:: function shared with
// the portable build.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "s2d/verify_common.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define S2D_VERIFY_CPU_NS verify_cpu_avx2
#define S2D_VERIFY_AVX2_INTRINSICS 1
#include "s2d/verify_cpu.h"

namespace s2d {

void verify_cpu_rows_avx2(const VerifyParams& params, LogitType logit_type, int64_t row_begin,
                          int64_t row_end) {
  verify_cpu_avx2::rows(params, logit_type, row_begin, row_end);
}

}  // namespace s2d

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace s2d {

bool verify_cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // namespace s2d

#else  // not x86: only the portable build exists

namespace s2d {

void verify_cpu_rows_avx2(const VerifyParams&, LogitType, int64_t, int64_t) {}
bool verify_cpu_has_avx2() { return false; }

}  // namespace s2d

#endif
