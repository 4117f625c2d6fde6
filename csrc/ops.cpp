// Every schema of the sparkct namespace lives here; backends register implementations in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Autograd and fake kernels are attached in Python
// (sparkct/ops/*.py) with torch.library.register_autograd / register_fake.
#include <torch/library.h>

#include <sstream>
#include <string>

#include "build_info.h"
#include "sparse.h"

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

  // ---- fused prototype cross-entropy: DINO's loss (Python face: sparkct/ops/prototype_ce.py) ----
  // student (S, B, D), teacher (T, B, D), w_student / w_teacher (K, D), teacher_bias (K,) or None.
  // Returns (loss in the inputs' dtype, lse_student (S, B), lse_teacher (T, B), stats (2,) = [mean teacher
  // entropy, mean KL(teacher || student) over the pairs]); LSEs and stats in fp32 (fp64 for fp64 input).
  // impl: 0 = fast tiled kernels, 1 = simple reference kernels (the test oracle).
  m.def("prototype_ce(Tensor student, Tensor teacher, Tensor w_student, Tensor w_teacher, Tensor? teacher_bias, "
        "float student_temp, float teacher_temp, bool skip_same, int impl) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients w.r.t. student and w_student (each empty where its flag is false); teacher inputs get none.
  m.def("prototype_ce_backward(Tensor grad, Tensor student, Tensor teacher, Tensor w_student, Tensor w_teacher, "
        "Tensor? teacher_bias, Tensor lse_student, Tensor lse_teacher, float student_temp, float teacher_temp, "
        "bool skip_same, bool student_grad, bool w_grad, int impl) -> (Tensor, Tensor)");

  // ---- sparse masked convolution, packed cell tiles (Python face: sparkct/ops/sparse.py) ----
  // Tables of a boolean cell mask (B, GH, GW), True = visible: cells (A, 3) int32 (b, i, j),
  // nbr (A, 8) int32 (neighbour tile, -1 masked, -2 outside), cell_map (B, GH, GW) int32 (tile or -1).
  m.def("sparse_cell_tables(Tensor mask) -> (Tensor, Tensor, Tensor)");
  // channels_last: the layout of the result (None: the input's layout).
  // dense (B, C, GH*c, GW*c) -> packed (A, C, c, c); its backward is sparse_unpack (no fill).
  m.def("sparse_pack(Tensor x, Tensor cells, Tensor cell_map, bool? channels_last=None) -> Tensor");
  // packed (A, C, c, c) -> dense (B, C, GH*c, GW*c); masked cells get fill (C,) or zeros.
  m.def("sparse_unpack(Tensor packed, Tensor cells, Tensor cell_map, Tensor? fill, bool? channels_last=None) -> Tensor");
  // -> (grad packed = pack(grad), grad fill = per-channel sum over masked cells, or empty).
  m.def("sparse_unpack_backward(Tensor grad, Tensor cells, Tensor cell_map, bool fill_grad, "
        "bool? channels_last=None) -> (Tensor, Tensor)");
  // packed (A, C, c, c) -> (A, C, c+2p, c+2p) with the ring read from neighbour tiles.
  m.def("sparse_halo(Tensor x, Tensor nbr, int pad, float masked_fill, float border_fill) -> Tensor");
  m.def("sparse_halo_backward(Tensor grad, Tensor nbr, int pad) -> Tensor");
  // packed (A, C, ci, ci) -> columns (A*co*co, C*k*k), co = ci/stride, zero outside visible cells.
  m.def("sparse_im2col(Tensor x, Tensor nbr, int kernel, int stride, int pad) -> Tensor");
  m.def("sparse_im2col_backward(Tensor grad_cols, Tensor nbr, int channels, int cell, int kernel, int stride, "
        "int pad, bool channels_last) -> Tensor");
  // Test switch: run the simple per-element kernels (the fast kernels' oracle). Returns the old value.
  m.def("sparse_simple_kernels(bool enable) -> bool", &sparkct::sparse::set_simple_kernels);
}
