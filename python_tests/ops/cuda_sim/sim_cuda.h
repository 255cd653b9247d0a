// A tiny CPU simulator of the CUDA subset used by csrc/include/s2d/verify_cuda.cuh, so CI (no GPU)
// can run the unchanged kernels and launcher (python_tests/ops/test_verify_cuda_sim.py).
//
// What it emulates: a launch runs its blocks one after another; each block runs one OS thread per
// CUDA thread (1-D blocks of whole warps); threadIdx/blockIdx/blockDim/gridDim; __syncthreads and
// __syncthreads_or as real block barriers; __shfl_xor_sync through a per-warp exchange + barrier
// (full mask only); __shared__ as function-local statics (blocks never overlap); bf16/fp16 loads.
// What it cannot show: GPU memory ordering and races between blocks, warp-synchronous code that
// relies on lockstep without a sync, the precision of the fast intrinsics (__expf here is expf),
// register/shared-memory limits, and any timing. A barrier that not every thread of its block or
// warp reaches (divergent sync) fails the launch after kBarrierTimeout instead of hanging.
#pragma once

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(max_threads)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim, gridDim;

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace s2d_cuda_sim {

constexpr auto kBarrierTimeout = std::chrono::seconds(20);

struct BarrierBroken : std::runtime_error {
  BarrierBroken() : std::runtime_error("barrier broken (divergent sync or a failed thread)") {}
};

// A reusable barrier for `count` threads (std::barrier is C++20). Breaking it (timeout or another
// thread's failure) makes every waiter, present and future, throw BarrierBroken.
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (broken_) throw BarrierBroken();
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    released_.wait_for(lock, kBarrierTimeout, [&] { return generation_ != generation || broken_; });
    if (generation_ == generation) {
      broken_ = true;
      released_.notify_all();
      throw BarrierBroken();
    }
  }
  void break_barrier() {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
    released_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const unsigned count_;
  unsigned arrived_ = 0;
  uint64_t generation_ = 0;
  bool broken_ = false;
};

// State shared by the threads of the block being run.
struct Block {
  explicit Block(unsigned threads) : block_barrier(threads), exchange(threads), votes(threads) {
    for (unsigned w = 0; w < threads / 32; ++w)
      warp_barriers.push_back(std::make_unique<Barrier>(32));
  }
  void break_all() {
    block_barrier.break_barrier();
    for (auto& barrier : warp_barriers) barrier->break_barrier();
  }
  Barrier block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<uint64_t> exchange;  // one shuffle slot per thread
  std::vector<int> votes;          // one __syncthreads_or vote per thread
};
inline Block* current_block = nullptr;

// Runs kernel(args...) on grid x block; throws std::runtime_error if a thread failed.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, cudaStream_t /*stream*/, Args... args) {
  if (block.y != 1 || block.z != 1 || grid.z != 1 || block.x == 0 || block.x % 32 != 0) {
    throw std::runtime_error("sim: 1-D blocks of whole warps and 2-D grids only");
  }
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block state(block.x);
      current_block = &state;
      std::mutex error_mutex;
      std::string error;
      std::vector<std::thread> threads;
      threads.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, t] {
          threadIdx = uint3{t, 0, 0};
          blockIdx = uint3{bx, by, 0};
          try {
            kernel(args...);
          } catch (const std::exception& e) {
            {
              std::lock_guard<std::mutex> lock(error_mutex);
              if (error.empty() || dynamic_cast<const BarrierBroken*>(&e) == nullptr)
                error = e.what();
            }
            state.break_all();
          }
        });
      }
      for (auto& thread : threads) thread.join();
      current_block = nullptr;
      if (!error.empty()) {
        throw std::runtime_error("sim: block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                 "): " + error);
      }
    }
  }
}

}  // namespace s2d_cuda_sim

inline void __syncthreads() { s2d_cuda_sim::current_block->block_barrier.arrive_and_wait(); }

inline int __syncthreads_or(int predicate) {
  s2d_cuda_sim::Block& block = *s2d_cuda_sim::current_block;
  block.votes[threadIdx.x] = predicate;
  block.block_barrier.arrive_and_wait();
  int any = 0;
  for (unsigned t = 0; t < blockDim.x; ++t) any |= block.votes[t] != 0;
  block.block_barrier.arrive_and_wait();  // NOTE: nobody votes again before everyone has read
  return any;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu)
    throw std::runtime_error("sim: __shfl_xor_sync supports the full mask only");
  s2d_cuda_sim::Block& block = *s2d_cuda_sim::current_block;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  block.exchange[threadIdx.x] = bits;
  block.warp_barriers[warp]->arrive_and_wait();
  const uint64_t other = block.exchange[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  block.warp_barriers[warp]->arrive_and_wait();  // NOTE: slots are reused by the next shuffle
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline float __expf(float x) { return std::exp(x); }  // NOTE: exact, unlike the GPU's fast exp
inline void __threadfence_block() {}  // NOTE: the barrier after it orders the block's memory here
inline float __logf(float x) { return std::log(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
template <typename T>
T min(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float __half2float(__half h) {
  const int exponent = (h.x >> 10) & 0x1f;
  const int mantissa = h.x & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude = mantissa != 0 ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return (h.x & 0x8000) != 0 ? -magnitude : magnitude;
}
