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
  // Rows are [z0; z1] (NT-Xent) or z0 (bank given: MoCo, z1 the row-wise positives). Columns are
  // the rows themselves (cols and bank None), every rank's gathered [z0_k; z1_k] with this rank's
  // rows at col_offset (cols), or the bank. Returns (loss in z0's dtype, per-row LSE in fp32 --
  // fp64 for fp64 input -- saved for the backward). allow_tf32: fp32 GEMMs may use TF32 (CUDA).
  // impl: 0 = fast tiled kernels, 1 = simple reference kernels (the test oracle).
  m.def("info_nce(Tensor z0, Tensor z1, Tensor? cols, Tensor? bank, float temperature, int col_offset, "
        "bool allow_tf32, int impl) -> (Tensor, Tensor)");
  // Gradients w.r.t. z0, z1 and (if other_grad) cols or bank; the third output is empty otherwise.
  m.def("info_nce_backward(Tensor grad, Tensor z0, Tensor z1, Tensor? cols, Tensor? bank, Tensor lse, "
        "float temperature, int col_offset, bool other_grad, bool allow_tf32, int impl) "
        "-> (Tensor, Tensor, Tensor)");

  // ---- sparse masked convolution, packed cell tiles (Python face: sparkct/ops/sparse.py) ----
}
