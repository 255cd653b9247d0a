// Shim: the CUDA simulator (sim_cuda.h) stands in for <cuda_runtime_api.h>.
#pragma once
#include "sim_cuda.h"
