// S2D_LAUNCH: the one spelling of a kernel launch in our CUDA launchers (csrc/<op>/*_kernels.cu).
//
//   S2D_LAUNCH((kernel<T, flag>), grid, block, stream, arg0, arg1, ...);
//
// Under nvcc this expands to exactly `kernel<T, flag><<<grid, block, 0, stream>>>(arg0, arg1,
// ...)`. With S2D_CUDA_SIM defined it calls the CPU simulator of python_tests/ops/cuda_sim instead,
// so CI (no GPU) can run the unchanged launcher and kernels. NOTE: the kernel goes in parentheses
// because a template-id such as `race_kernel<T, true>` holds a comma, which would otherwise split
// the macro arguments.
#pragma once

#define S2D_LAUNCH_UNPAREN(...) __VA_ARGS__

#if defined(S2D_CUDA_SIM)
#define S2D_LAUNCH(kernel, grid, block, stream, ...) \
  ::s2d_cuda_sim::launch(S2D_LAUNCH_UNPAREN kernel, grid, block, stream, __VA_ARGS__)
#else
#define S2D_LAUNCH(kernel, grid, block, stream, ...) \
  S2D_LAUNCH_UNPAREN kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif
