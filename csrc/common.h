// Shared by csrc/cpu and csrc/cuda: small inline maths that both backends run, so the CPU tests
// exercise the same index and reduction arithmetic the GPU kernels use.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SPARKCT_HD __host__ __device__ __forceinline__
#else
#define SPARKCT_HD inline
#endif

namespace sparkct {

// Integer ceil-division for grid/tile counts.
SPARKCT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace sparkct
