// A/B harness of the CPU verify kernel: a base revision's csrc/include/s2d/verify_cpu.h against the
// working tree's, in one process. Driven by tools/verify_cpu_ab.py, which extracts the base header.
//   1. fuzz: random configurations (dtypes, vocabularies, temperatures, thresholds, non-finite
//      logits, dead positions, out-of-range drafts, q set so that u q(x) is within 1e-7..50% of
//      p(x)); the two kernels must emit the same tokens bit for bit.
//   2. timing: B=16, K=5, V=32000, sampled, float32 (the comparison case), inputs rotated
//      over 6 copies (135 MB), rows handed to OpenMP threads as the binding does; the two kernels
//      alternate in rounds, so that the machine's drift hits both alike.
// NOTE: verify_common.h and philox.h come from the working tree for both.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "s2d/verify_common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define S2D_VERIFY_AVX2_INTRINSICS 1
#define S2D_VERIFY_CPU_NS vbase
#include "base/s2d/verify_cpu.h"
#undef S2D_VERIFY_CPU_NS
#define S2D_VERIFY_CPU_NS vwork
#include "s2d/verify_cpu.h"
#pragma GCC pop_options

namespace {

uint16_t to_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

using RowsFn = void (*)(const s2d::VerifyParams&, s2d::LogitType, int64_t, int64_t);

void run_rows(RowsFn rows, const s2d::VerifyParams& params, s2d::LogitType type) {
  std::atomic<int64_t> next{0};
#pragma omp parallel
  for (int64_t r = next.fetch_add(1); r < params.batch; r = next.fetch_add(1)) {
    rows(params, type, r, r + 1);
  }
}

int fuzz(int trials) {
  std::mt19937_64 rng(12345);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const int64_t vocabs[] = {1, 2, 15, 16, 17, 100, 2047, 2048, 2049, 4100, 32000, 50257};
  const float scales[] = {0.5f, 2.f, 5.f, 30.f};
  const float temperatures[] = {1.f, 1.f, 0.7f, 1.3f, 0.f};
  const float specials[] = {-INFINITY, INFINITY, NAN, 3e38f, -3e38f};
  const double eps[] = {0,    1e-7, -1e-7,  1e-5, -1e-5, 1e-3, -1e-3,
                        0.03, 0.06, 0.0615, 0.07, -0.03, 0.5};
  long mismatches = 0, rows_total = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t V = vocabs[rng() % 12], K = 1 + rng() % 6, B = 1 + rng() % 6;
    const int dtype = rng() % 3;  // float32, bfloat16, float16
    std::vector<float> logits(static_cast<size_t>(B * (K + 1) * V));
    const float scale = scales[rng() % 4];
    for (float& x : logits) x = normal(rng) * scale;
    if (rng() % 4 == 0) {
      for (int n = 0; n < 5; ++n) logits[rng() % logits.size()] = specials[rng() % 5];
    }
    if (rng() % 8 == 0) {
      const size_t pos = rng() % (B * (K + 1));
      std::fill(logits.begin() + pos * V, logits.begin() + (pos + 1) * V, -INFINITY);
    }
    std::vector<uint16_t> half(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      if (dtype == 1) half[i] = to_bf16(logits[i]), logits[i] = from_bf16(half[i]);
      if (dtype == 2) half[i] = _cvtss_sh(logits[i], 0), logits[i] = _cvtsh_ss(half[i]);
    }
    const bool use_threshold = rng() % 3 == 0, with_q = rng() % 2;
    std::vector<float> temperature(B), min_logit(B * (K + 1), -INFINITY);
    std::vector<int64_t> num_draft(B), seeds(B), offsets(B), tokens(B * K);
    std::vector<float> q(with_q ? static_cast<size_t>(B * K * V) : 0);
    for (int64_t b = 0; b < B; ++b) {
      temperature[b] = temperatures[rng() % 5];
      num_draft[b] = rng() % 3 ? K : static_cast<int64_t>(rng() % (K + 1));
      seeds[b] = static_cast<int64_t>(rng());
      offsets[b] = rng() % 1000;
      const float t = temperature[b] > 0 ? temperature[b] : 1.f;
      for (int64_t j = 0; j <= K; ++j) {
        const float* row = &logits[(b * (K + 1) + j) * V];
        std::vector<double> s(V);
        for (int64_t v = 0; v < V; ++v) {
          float x = row[v] / t;
          s[v] = x != x ? -INFINITY : (x == INFINITY ? 3.4028235e38f : x);
        }
        float threshold = -INFINITY;
        if (use_threshold) {
          std::vector<double> sorted(s);
          std::sort(sorted.begin(), sorted.end(), std::greater<double>());
          threshold = static_cast<float>(sorted[rng() % std::min<int64_t>(V, 50)]);
        }
        min_logit[b * (K + 1) + j] = threshold;
        if (j == K) break;
        int64_t token = rng() % 2 ? std::max_element(s.begin(), s.end()) - s.begin()
                                  : static_cast<int64_t>(rng() % V);
        if (rng() % 50 == 0) token = rng() % 2 ? -1 : V;
        tokens[b * K + j] = token;
        if (!with_q) continue;
        float* q_row = &q[(b * K + j) * V];
        for (int64_t v = 0; v < V; ++v) q_row[v] = static_cast<float>(unif(rng) / V);
        double max = -INFINITY, sum = 0;
        for (double x : s) max = x >= threshold ? std::max(max, x) : max;
        for (double x : s) sum += x >= threshold && max > -INFINITY ? std::exp(x - max) : 0.0;
        if (token >= 0 && token < V && max > -INFINITY && s[token] >= threshold) {
          const double p = std::exp(s[token] - max) / sum;
          const float u = s2d::philox_uniform(seeds[b], offsets[b], s2d::kStreamAccept, j, 0);
          q_row[token] = static_cast<float>(p / u * (1 + eps[rng() % 13]));
        }
      }
    }
    std::vector<int64_t> out_base(B * (K + 1)), out_work(B * (K + 1));
    std::vector<int32_t> accepted_base(B), accepted_work(B);
    s2d::VerifyParams params{dtype ? static_cast<const void*>(half.data()) : logits.data(),
                             tokens.data(),
                             with_q ? q.data() : nullptr,
                             num_draft.data(),
                             temperature.data(),
                             use_threshold ? min_logit.data() : nullptr,
                             seeds.data(),
                             offsets.data(),
                             out_base.data(),
                             accepted_base.data(),
                             B,
                             K,
                             V};
    const auto type = static_cast<s2d::LogitType>(dtype);
    s2d::vbase::rows(params, type, 0, B);
    params.out_tokens = out_work.data();
    params.num_accepted = accepted_work.data();
    s2d::vwork::rows(params, type, 0, B);
    rows_total += B;
    if (out_base != out_work || accepted_base != accepted_work) {
      if (++mismatches <= 5) {
        std::printf("MISMATCH trial %d: V=%ld K=%ld B=%ld dtype=%d threshold=%d q=%d\n", trial,
                    static_cast<long>(V), static_cast<long>(K), static_cast<long>(B), dtype,
                    use_threshold, with_q);
      }
    }
  }
  std::printf("fuzz: %d configurations, %ld rows: %ld differ\n", trials, rows_total, mismatches);
  return mismatches == 0 ? 0 : 1;
}

void timing(int rounds) {
  constexpr int64_t B = 16, K = 5, V = 32000, kCopies = 6;
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  struct Copy {
    std::vector<float> logits, q;
    std::vector<int64_t> tokens, seeds, num_draft, offsets, out;
    std::vector<float> temperature;
    std::vector<int32_t> accepted;
    s2d::VerifyParams params;
  };
  std::vector<Copy> copies(kCopies);
  double bytes = 0;
  for (int c = 0; c < kCopies; ++c) {
    Copy& copy = copies[c];
    copy.logits.resize(B * (K + 1) * V);
    copy.q.resize(B * K * V);
    copy.tokens.resize(B * K);
    for (float& x : copy.logits) x = normal(rng) * 2.f;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < K; ++j) {
        // q = softmax(logits + 0.5 noise), the token drawn from q (as bench/verify.py).
        float* q = &copy.q[(b * K + j) * V];
        const float* l = &copy.logits[(b * (K + 1) + j) * V];
        double sum = 0;
        for (int64_t v = 0; v < V; ++v) sum += q[v] = std::exp(l[v] + 0.5f * normal(rng));
        double u = std::uniform_real_distribution<double>(0, sum)(rng), acc = 0;
        int64_t token = V - 1;
        for (int64_t v = 0; v < V; ++v) {
          q[v] = static_cast<float>(q[v] / sum);
          if ((acc += q[v] * sum) >= u && token == V - 1) token = v;
        }
        copy.tokens[b * K + j] = token;
      }
    }
    copy.seeds.resize(B);
    for (int64_t b = 0; b < B; ++b) copy.seeds[b] = b + 1000 * c;
    copy.num_draft.assign(B, K);
    copy.offsets.assign(B, 0);
    copy.temperature.assign(B, 1.f);
    copy.out.resize(B * (K + 1));
    copy.accepted.resize(B);
    copy.params = {copy.logits.data(),
                   copy.tokens.data(),
                   copy.q.data(),
                   copy.num_draft.data(),
                   copy.temperature.data(),
                   nullptr,
                   copy.seeds.data(),
                   copy.offsets.data(),
                   copy.out.data(),
                   copy.accepted.data(),
                   B,
                   K,
                   V};
    s2d::vwork::rows(copy.params, s2d::LogitType::kFloat32, 0, B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t e = copy.accepted[b];
      bytes += (e + 1) * V * 4.0 + (e < K ? V * 4.0 : 0.0);  // bench/verify.py's C++ accounting
    }
  }
  bytes /= kCopies;
  const RowsFn kernels[2] = {&s2d::vbase::rows, &s2d::vwork::rows};
  std::vector<double> ms[2];
  for (int round = 0; round < rounds; ++round) {
    for (int k = 0; k < 2; ++k) {
      const int calls = 60;
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < calls; ++i) {
        run_rows(kernels[k], copies[i % kCopies].params, s2d::LogitType::kFloat32);
      }
      const auto stop = std::chrono::steady_clock::now();
      ms[k].push_back(std::chrono::duration<double, std::milli>(stop - start).count() / calls);
    }
  }
  for (auto& m : ms) std::sort(m.begin(), m.end());
  const double base = ms[0][rounds / 2], work = ms[1][rounds / 2];
  std::printf("timing (B=16 K=5 V=32000 sampled fp32, %d threads, median of %d rounds):\n",
              omp_get_max_threads(), rounds);
  std::printf("  base %.3f ms (%.1f GB/s)  work %.3f ms (%.1f GB/s)  speedup %.3fx\n", base,
              bytes / base / 1e6, work, bytes / work / 1e6, base / work);
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 15;
  const int status = trials > 0 ? fuzz(trials) : 0;
  if (rounds > 0) timing(rounds);
  return status;
}
