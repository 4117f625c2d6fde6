// Index maths of the packed cell-tile layout (sparse masked convolution for SparK), shared by
// csrc/cpu/sparse.cpp and csrc/cuda/sparse.cu so the CPU tests exercise the arithmetic the GPU runs.
//
// Layout. A boolean cell mask (B, GH, GW), True = visible, is the SparK mask on the stride-32 grid.
// The A visible cells, in row-major (b, i, j) order, are the tiles of a packed tensor (A, C, c, c)
// where c = 32 / stride is the cell size at that scale; the same tables serve every scale.
//   cells    (A, 3) int32: (b, i, j) of tile t
//   nbr      (A, 8) int32: tile index of the 8 neighbours (slot order below), or kMasked (a cell
//                          inside the image that is masked) or kOutside (beyond the image border)
//   cell_map (B, GH, GW) int32: tile index of a cell, or kMasked
// Cell-relative coordinates: for a tile of size c, Y in [-c, 2c) names a pixel of the tile (0 <= Y < c)
// or of the neighbour above (Y < 0) / below (Y >= c); all kernels only ever reach one cell away,
// which the Python side guarantees by validating pad <= c and kernel - 1 - pad <= c.
#pragma once

#include <cstdint>

#include "common.h"

namespace sparkct {
namespace sparse {

constexpr int32_t kMasked = -1;   // neighbour cell exists and is masked: reads the "masked" fill
constexpr int32_t kOutside = -2;  // beyond the image border: reads the layer's padding value

// Neighbour slot of the offset (dy, dx) in {-1, 0, 1}^2 \ {(0, 0)}: row-major, skipping the centre:
//   0 1 2
//   3 . 4
//   5 6 7
SPARKCT_HD int nbr_slot(int dy, int dx) {
  const int d = (dy + 1) * 3 + (dx + 1);
  return d < 4 ? d : d - 1;
}

// Floor division for b > 0 (C++ '/' truncates towards zero).
SPARKCT_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// Split a cell-relative coordinate v into the cell offset (returned) and the coordinate inside that
// cell (*local, in [0, c)).
SPARKCT_HD int split_coord(int64_t v, int64_t c, int64_t* local) {
  const int64_t d = floor_div(v, c);
  *local = v - d * c;
  return static_cast<int>(d);
}

// Tile that holds the cell at offset (dy, dx) from tile t: t itself, a neighbour's index, kMasked or
// kOutside. nbr_row points at the 8 entries of tile t.
SPARKCT_HD int64_t offset_tile(const int32_t* nbr_row, int64_t t, int dy, int dx) {
  if (dy == 0 && dx == 0) return t;
  return nbr_row[nbr_slot(dy, dx)];
}

// Source of one element of a padded ("halo") tile: padded coordinate (py, px) of tile t with halo
// width p over cells of size c. Returns the tile to read (or kMasked / kOutside) and the position
// inside it. The im2col gather uses the same function with (py, px) = (stride*o + k).
SPARKCT_HD int64_t halo_source(const int32_t* nbr_row, int64_t t, int64_t py, int64_t px, int64_t c,
                               int64_t p, int64_t* y, int64_t* x) {
  const int dy = split_coord(py - p, c, y);
  const int dx = split_coord(px - p, c, x);
  return offset_tile(nbr_row, t, dy, dx);
}

// The halo as rectangles: along one axis, the padded range that cell offset d in {-1, 0, 1} fills
// is [halo_lo(d), halo_hi(d)), and padded coordinate q there reads coordinate q - halo_shift(d) of
// that cell (its origin sits at d * c, the padded frame starts at -p).
SPARKCT_HD int64_t halo_lo(int d, int64_t c, int64_t p) { return d < 0 ? 0 : (d == 0 ? p : p + c); }
SPARKCT_HD int64_t halo_hi(int d, int64_t c, int64_t p) { return d < 0 ? p : (d == 0 ? p + c : c + 2 * p); }
SPARKCT_HD int64_t halo_shift(int d, int64_t c, int64_t p) { return p + d * c; }

// Halo backward as a gather. The neighbour n at cell offset d from tile t (along one axis) has its
// origin d * c further on, so t's coordinate y is n's padded coordinate y - d * c + p =
// y + back_shift(d); that lies inside n's padded tile for y in [back_lo(d), back_hi(d)).
SPARKCT_HD int64_t back_lo(int d, int64_t c, int64_t p) { return d > 0 ? c - p : 0; }
SPARKCT_HD int64_t back_hi(int d, int64_t c, int64_t p) { return d < 0 ? p : c; }
SPARKCT_HD int64_t back_shift(int d, int64_t c, int64_t p) { return p - d * c; }

// Inverse of the im2col gather along one axis. Input coordinate y (in [0, ci)) of a tile is read,
// through kernel offset k, by output coordinate o of the tile at cell offset d, where
// stride * o + k - pad = y - d * ci. Returns false when no output reads it (stride does not divide),
// else sets d and o (o in [0, ci / stride) by construction of d).
SPARKCT_HD bool col2im_target(int64_t y, int64_t k, int64_t ci, int64_t stride, int64_t pad, int* d,
                              int64_t* o) {
  const int64_t num = y + pad - k;  // = stride * o + d * ci
  const int64_t dd = floor_div(num, ci);
  const int64_t rem = num - dd * ci;
  if (rem % stride != 0) return false;
  *d = static_cast<int>(dd);
  *o = rem / stride;
  return true;
}

// Neighbour code of cell (b, i, j) at offset (dy, dx) from the cell map (B, GH, GW).
SPARKCT_HD int32_t neighbour_code(const int32_t* cell_map, int64_t b, int64_t i, int64_t j, int dy, int dx,
                                  int64_t gh, int64_t gw) {
  const int64_t ii = i + dy, jj = j + dx;
  if (ii < 0 || ii >= gh || jj < 0 || jj >= gw) return kOutside;
  return cell_map[(b * gh + ii) * gw + jj];
}

// Host-side switch (csrc/cpu/sparse.cpp): true = run the simple per-element kernels, the oracle the
// fast ones are tested against on both backends (op sparkct::sparse_simple_kernels).
bool simple_kernels();
bool set_simple_kernels(bool enable);

}  // namespace sparse
}  // namespace sparkct
