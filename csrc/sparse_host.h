// Host-side argument checks and layout choices of the sparse ops, shared by csrc/cpu/sparse.cpp and
// csrc/cuda/sparse.cu so both backends accept and reject exactly the same calls.
#pragma once

#include <ATen/ATen.h>

#include "sparse.h"

namespace sparkct {
namespace sparse {

constexpr int64_t kMaxKernel = 15;  // im2col keeps the k*k offsets of a row in fixed arrays

// The packed/dense layout a kernel writes: NHWC when the input's strides say channels-last (ATen's
// suggest_memory_format, which also decides for tensors that are contiguous both ways, e.g. 1x1
// tiles, by their actual strides), else NCHW. sparkct/ops/sparse.py mirrors this in the fake kernels.
inline bool is_channels_last(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat format_of(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline void check_float(const at::Tensor& x, const char* what) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), what, " must be a floating-point tensor, got ", x.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device() == b.device(), what, " is on ", b.device(), " but the data is on ", a.device());
}

inline void check_table(const at::Tensor& t, int64_t cols, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kInt, what, " must be int32 (from sparse_cell_tables), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, what, " must have shape (A, ", cols, "), got ", t.sizes());
}

inline void check_cell_map_shape(const at::Tensor& cell_map) {
  TORCH_CHECK(cell_map.scalar_type() == at::kInt && cell_map.dim() == 3,
              "cell_map must be an int32 (B, GH, GW) tensor (from sparse_cell_tables), got ",
              cell_map.scalar_type(), " ", cell_map.sizes());
}

// Cell size of a dense map x (B, C, H, W) on the grid of cell_map (B, GH, GW).
inline int64_t cell_size(const at::Tensor& x, const at::Tensor& cell_map) {
  check_cell_map_shape(cell_map);
  TORCH_CHECK(x.dim() == 4, "dense map must be (B, C, H, W), got ", x.sizes());
  const int64_t gh = cell_map.size(1), gw = cell_map.size(2);
  TORCH_CHECK(cell_map.size(0) == x.size(0) && gh > 0 && gw > 0 && x.size(2) % gh == 0 && x.size(3) % gw == 0 &&
                  x.size(2) / gh == x.size(3) / gw && x.size(2) > 0,
              "dense map ", x.sizes(), " is not a whole number of square cells of the grid ", cell_map.sizes());
  return x.size(2) / gh;
}

inline void check_halo_args(const at::Tensor& x, const at::Tensor& nbr, int64_t p) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) == x.size(3) && x.size(2) > 0, "packed must be (A, C, c, c), got ",
              x.sizes());
  check_float(x, "packed");
  check_table(nbr, 8, "nbr");
  check_same_device(x, nbr, "nbr");
  TORCH_CHECK(nbr.size(0) == x.size(0), "nbr has ", nbr.size(0), " rows for ", x.size(0), " tiles");
  TORCH_CHECK(p >= 0 && p <= x.size(2), "halo width ", p, " must be in [0, cell size ", x.size(2), "]");
}

inline void check_halo_grad_args(const at::Tensor& g, const at::Tensor& nbr, int64_t p) {
  TORCH_CHECK(p >= 0 && g.dim() == 4 && g.size(2) == g.size(3) && g.size(2) > 2 * p,
              "grad must be (A, C, c + 2*pad, c + 2*pad) with pad = ", p, ", got ", g.sizes());
  check_float(g, "grad");
  check_table(nbr, 8, "nbr");
  check_same_device(g, nbr, "nbr");
  const int64_t c = g.size(2) - 2 * p;
  TORCH_CHECK(nbr.size(0) == g.size(0), "nbr has ", nbr.size(0), " rows for ", g.size(0), " tiles");
  TORCH_CHECK(p <= c, "halo width ", p, " must be in [0, cell size ", c, "]");
}

// A k x k conv of stride s and padding p on cells of size ci reaches at most one cell away and maps a
// cell onto ci / s outputs.
inline void check_conv_geometry(int64_t ci, int64_t k, int64_t s, int64_t p) {
  TORCH_CHECK(k >= 1 && k <= kMaxKernel, "kernel size ", k, " must be in [1, ", kMaxKernel, "]");
  TORCH_CHECK(s >= 1 && ci % s == 0, "stride ", s, " must divide the cell size ", ci);
  TORCH_CHECK(p >= 0 && p <= ci && k - 1 - p <= ci, "kernel ", k, " with padding ", p,
              " reaches beyond the neighbouring cells of a ", ci, "x", ci, " cell");
}

// grad_cols of im2col over A tiles of size ci with C channels: (A * (ci / s)^2, C * k * k).
inline void check_im2col_grad_args(const at::Tensor& g, const at::Tensor& nbr, int64_t C, int64_t ci, int64_t k,
                                   int64_t s, int64_t p) {
  check_float(g, "grad_cols");
  check_table(nbr, 8, "nbr");
  check_same_device(g, nbr, "nbr");
  check_conv_geometry(ci, k, s, p);
  const int64_t A = nbr.size(0), co = ci / s;
  TORCH_CHECK(g.dim() == 2 && g.size(0) == A * co * co && g.size(1) == C * k * k, "grad_cols must be (",
              A * co * co, ", ", C * k * k, "), got ", g.sizes());
}

inline void check_fill(const at::Tensor& in, const at::Tensor& fill) {
  TORCH_CHECK(fill.numel() == in.size(1), "fill must have one value per channel (", in.size(1), "), got ",
              fill.sizes());
  TORCH_CHECK(fill.scalar_type() == in.scalar_type(), "fill dtype ", fill.scalar_type(), " differs from packed dtype ",
              in.scalar_type());
  check_same_device(in, fill, "fill");
}

}  // namespace sparse
}  // namespace sparkct
