// Every schema of the sparkct namespace lives here; backends register implementations in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Autograd and fake kernels are attached in Python
// (sparkct/ops/*.py) with torch.library.register_autograd / register_fake.
#include <torch/library.h>

#include <sstream>
#include <string>

#include "build_info.h"

#ifndef SPARKCT_TORCH_VERSION
#define SPARKCT_TORCH_VERSION "unknown"
#endif

namespace sparkct {

CudaBuildInfo& cuda_build_info() {
  static CudaBuildInfo info;
  return info;
}

// JSON, read by sparkct._ext.build_info().
static std::string build_info() {
  const auto& c = cuda_build_info();
  std::ostringstream s;
  s << "{\"torch_version\": \"" << SPARKCT_TORCH_VERSION << "\""
    << ", \"cuda_version\": " << c.cuda_version
    << ", \"cuda_archs\": \"" << c.archs << "\""
    << ", \"cuda_runtime_version\": " << (c.runtime_version ? c.runtime_version() : 0)
    << ", \"cuda_driver_version\": " << (c.driver_version ? c.driver_version() : 0)
    << ", \"openmp\": " <<
#ifdef _OPENMP
       "true"
#else
       "false"
#endif
    << "}";
  return s.str();
}

}  // namespace sparkct

TORCH_LIBRARY(sparkct, m) {
  m.def("build_info() -> str", &sparkct::build_info);

  // ---- fused InfoNCE (Python face: sparkct/ops/info_nce.py) ----

  // ---- sparse masked convolution, packed cell tiles (Python face: sparkct/ops/sparse.py) ----
}
