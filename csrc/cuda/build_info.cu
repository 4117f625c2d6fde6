// Records, at load time, the CUDA version and archs these kernels were compiled for, and how to
// ask the loaded runtime/driver for theirs (sparkct._ext compares them with torch's).
#include <cuda_runtime.h>

#include "build_info.h"

#define SPARKCT_STR2(...) #__VA_ARGS__
#define SPARKCT_STR(...) SPARKCT_STR2(__VA_ARGS__)

namespace {

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

struct Register {
  Register() {
    auto& info = sparkct::cuda_build_info();
    info.cuda_version = CUDART_VERSION;
#ifdef __CUDA_ARCH_LIST__
    info.archs = SPARKCT_STR(__CUDA_ARCH_LIST__);
#endif
    info.runtime_version = &runtime_version;
    info.driver_version = &driver_version;
  }
} register_cuda_build_info;

}  // namespace
