// Facts about how the extension was built. The CUDA translation units fill in the CUDA part from a
// static initializer, so a CPU-only build (csrc/cuda left out) reports "no CUDA" with no #ifdef.
#pragma once

#include <string>

namespace sparkct {

struct CudaBuildInfo {
  int cuda_version = 0;          // CUDART_VERSION the kernels were compiled against, 0 = none
  std::string archs;             // __CUDA_ARCH_LIST__, e.g. "800,900"
  int (*runtime_version)() = nullptr;  // cudaRuntimeGetVersion of the loaded runtime
  int (*driver_version)() = nullptr;   // cudaDriverGetVersion (0 if no driver)
};

// Function-local static: safe to call from other translation units' static initializers.
CudaBuildInfo& cuda_build_info();

}  // namespace sparkct
