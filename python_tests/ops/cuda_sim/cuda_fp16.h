// Shim: the CUDA simulator (sim_cuda.h) stands in for <cuda_fp16.h>.
#pragma once
#include "sim_cuda.h"
