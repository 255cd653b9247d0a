// CUDA launchers of the verify op (kernels in csrc/include/s2d/verify_cuda.cuh). No torch headers,
// so CI compiles this file with nvcc alone.
#include "s2d/cuda_launch.h"
#include "s2d/verify_cuda.cuh"
#include "s2d/verify_cuda.h"

namespace s2d {

void verify_cuda_plan(int64_t batch, int64_t vocab, int num_sms, int* num_chunks,
                      int64_t* chunk_size) {
  // NOTE: enough thread blocks to fill the GPU about 4 times over, at least 4096 entries each.
  const int64_t min_chunk = 4096;
  int64_t chunks = (4 * static_cast<int64_t>(num_sms) + batch - 1) / (batch > 0 ? batch : 1);
  const int64_t max_chunks = (vocab + min_chunk - 1) / min_chunk;
  chunks = chunks < 1 ? 1 : (chunks > max_chunks ? max_chunks : chunks);
  chunks = chunks > 64 ? 64 : chunks;
  int64_t size = (vocab + chunks - 1) / chunks;
  // NOTE: whole 256-id warp steps per chunk (4 race blocks), so that no block of the race's first
  // stage straddles two chunks (race_kernel sums each block in 8 lanes of one warp step).
  const int64_t step = verify_cuda::kRaceStep;
  size = (size + step - 1) / step * step;
  *chunk_size = size;
  *num_chunks = static_cast<int>((vocab + size - 1) / size);
}

template <typename T>
static void launch_typed(const VerifyParams& params, const VerifyCudaWorkspace& ws,
                         cudaStream_t stream) {
  using namespace verify_cuda;
  const int64_t items = (params.num_spec + 1) * ws.num_stat_chunks;
  const dim3 stats_grid(static_cast<unsigned>((items + kWarps - 1) / kWarps),
                        static_cast<unsigned>(params.batch));
  S2D_LAUNCH((stats_kernel<T>), stats_grid, kThreads, stream, params, ws.partial_max,
             ws.partial_sum, ws.partial_argmax, ws.num_stat_chunks, ws.stat_chunk_size);
  const dim3 row_grid(static_cast<unsigned>(params.batch));
  S2D_LAUNCH((decide_kernel<T>), row_grid, kThreads, stream, params, ws.partial_max, ws.partial_sum,
             ws.partial_argmax, ws.num_stat_chunks, ws.stats, ws.argmax, ws.row_emit);
  const dim3 race_grid(static_cast<unsigned>(ws.num_chunks), static_cast<unsigned>(params.batch));
  if (params.draft_probs != nullptr) {
    S2D_LAUNCH((race_kernel<T, true>), race_grid, kThreads, stream, params, ws.stats, ws.row_emit,
               ws.partial_key, ws.partial_block, ws.chunk_size);
    S2D_LAUNCH((finish_kernel<T, true>), row_grid, kFinishThreads, stream, params, ws.stats,
               ws.row_emit, ws.partial_key, ws.partial_block, ws.num_chunks);
  } else {
    S2D_LAUNCH((race_kernel<T, false>), race_grid, kThreads, stream, params, ws.stats, ws.row_emit,
               ws.partial_key, ws.partial_block, ws.chunk_size);
    S2D_LAUNCH((finish_kernel<T, false>), row_grid, kFinishThreads, stream, params, ws.stats,
               ws.row_emit, ws.partial_key, ws.partial_block, ws.num_chunks);
  }
}

cudaError_t verify_cuda_launch(const VerifyParams& params, LogitType logit_type,
                               const VerifyCudaWorkspace& workspace, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  switch (logit_type) {
    case LogitType::kFloat32:
      launch_typed<float>(params, workspace, stream);
      break;
    case LogitType::kBFloat16:
      launch_typed<__nv_bfloat16>(params, workspace, stream);
      break;
    case LogitType::kFloat16:
      launch_typed<__half>(params, workspace, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace s2d
