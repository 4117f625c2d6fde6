// Shared by csrc/cpu and csrc/cuda: small inline maths that both backends run, so the CPU tests
// exercise the same index and reduction arithmetic the GPU kernels use.
#pragma once

// The kernels test for NaN (x != x, isnan) to propagate it; host fast-math (-ffast-math, -Ofast,
// -ffinite-math-only) folds those tests to "false" and would turn NaN inputs into wrong finite results.
// setup.py rejects such flags in SPARKCT_*_FLAGS; this catches every other route (CFLAGS, CXXFLAGS, ...).
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "sparkct must not be compiled with fast-math / finite-math-only: its NaN checks would be folded away"
#endif

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

// The plain dot product of the simple (oracle) kernels: one sequential sum in T, the obviously correct
// order the tiled fast paths are tested against.
template <class T>
SPARKCT_HD T simple_dot(const T* a, const T* b, int64_t d) {
  T acc = 0;
  for (int64_t k = 0; k < d; ++k) acc += a[k] * b[k];
  return acc;
}

}  // namespace sparkct
