// CPU kernels of the packed cell-tile layout (sparse masked convolution for SparK).
//
// Every kernel has two forms: a simple per-element loop over arbitrary strides built directly on the
// shared index functions of csrc/sparse.h (the oracle; selected with sparkct::sparse_simple_kernels),
// and a fast form that normalizes the tensor to NCHW- or NHWC-contiguous and copies contiguous runs
// (rows of a tile in NCHW, rows of c*C values in NHWC), parallel over planes/rows with
// at::parallel_for. Every backward is a gather (each output element pulls what it owes), so no two
// threads ever write the same element and the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <tuple>

#include "sparse.h"
#include "sparse_host.h"

namespace sparkct {
namespace sparse {

namespace {
std::atomic<bool> g_simple{false};
}  // namespace

bool simple_kernels() { return g_simple.load(std::memory_order_relaxed); }
bool set_simple_kernels(bool enable) { return g_simple.exchange(enable); }

namespace {

using at::Tensor;

// Items per parallel chunk so that each chunk has about 16k elements of work.
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, work_per_item)); }

// Tables come from sparse_cell_tables, but the ops are public: check every entry once (O(A)) so a
// bad table is an error, not an out-of-bounds read.
void check_nbr_values(const Tensor& nbr, int64_t A) {
  const int32_t* p = nbr.data_ptr<int32_t>();
  for (int64_t n = 0; n < nbr.numel(); ++n)
    TORCH_CHECK(p[n] >= kOutside && p[n] < A, "nbr entry ", p[n], " is out of range for ", A, " tiles");
}

void check_cells_values(const Tensor& cells, int64_t B, int64_t gh, int64_t gw) {
  const int32_t* p = cells.data_ptr<int32_t>();
  for (int64_t t = 0; t < cells.size(0); ++t)
    TORCH_CHECK(p[3 * t] >= 0 && p[3 * t] < B && p[3 * t + 1] >= 0 && p[3 * t + 1] < gh && p[3 * t + 2] >= 0 &&
                    p[3 * t + 2] < gw,
                "cells entry ", t, " = (", p[3 * t], ", ", p[3 * t + 1], ", ", p[3 * t + 2],
                ") is outside the grid (", B, ", ", gh, ", ", gw, ")");
}

// ---------------------------------------------------------------------------------------------
// tables

std::tuple<Tensor, Tensor, Tensor> cell_tables_cpu(const Tensor& mask_) {
  TORCH_CHECK(mask_.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask_.scalar_type());
  TORCH_CHECK(mask_.dim() == 3, "mask must be (B, GH, GW), got ", mask_.sizes());
  const Tensor mask = mask_.contiguous();
  const int64_t B = mask.size(0), gh = mask.size(1), gw = mask.size(2);
  Tensor cell_map = at::empty({B, gh, gw}, mask.options().dtype(at::kInt));
  const bool* m = mask.data_ptr<bool>();
  int32_t* cm = cell_map.data_ptr<int32_t>();
  int64_t A = 0;
  for (int64_t n = 0; n < mask.numel(); ++n) {
    if (m[n]) {
      TORCH_CHECK(A < INT32_MAX, "more than 2^31 - 1 visible cells");
      cm[n] = static_cast<int32_t>(A++);
    } else {
      cm[n] = kMasked;
    }
  }
  Tensor cells = at::empty({A, 3}, cell_map.options());
  Tensor nbr = at::empty({A, 8}, cell_map.options());
  int32_t* ce = cells.data_ptr<int32_t>();
  int32_t* nb = nbr.data_ptr<int32_t>();
  for (int64_t n = 0; n < mask.numel(); ++n) {
    if (!m[n]) continue;
    const int64_t t = cm[n], b = n / (gh * gw), i = (n / gw) % gh, j = n % gw;
    ce[3 * t] = static_cast<int32_t>(b);
    ce[3 * t + 1] = static_cast<int32_t>(i);
    ce[3 * t + 2] = static_cast<int32_t>(j);
    for (int dy = -1; dy <= 1; ++dy)
      for (int dx = -1; dx <= 1; ++dx)
        if (dy != 0 || dx != 0) nb[8 * t + nbr_slot(dy, dx)] = neighbour_code(cm, b, i, j, dy, dx, gh, gw);
  }
  return {cells, nbr, cell_map};
}

// ---------------------------------------------------------------------------------------------
// pack / unpack

template <typename T>
void pack_simple(const Tensor& x, const int32_t* cells, Tensor& out, int64_t c) {
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = out.size(0), C = out.size(1);
  const auto xs = x.strides();
  const auto os = out.strides();
  at::parallel_for(0, A, grain(C * c * c), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = cells[3 * t], i = cells[3 * t + 1], j = cells[3 * t + 2];
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t y = 0; y < c; ++y)
          for (int64_t x = 0; x < c; ++x)
            op[t * os[0] + ch * os[1] + y * os[2] + x * os[3]] =
                xp[b * xs[0] + ch * xs[1] + (i * c + y) * xs[2] + (j * c + x) * xs[3]];
    }
  });
}

// Same layout on both sides: contiguous rows, memcpy (NHWC: c*C values per tile row; NCHW: c values).
template <typename T>
void pack_fast(const Tensor& x, const int32_t* cells, Tensor& out, int64_t c, bool cl) {
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = out.size(0), C = out.size(1), H = x.size(2), W = x.size(3);
  if (cl) {
    at::parallel_for(0, A * c, grain(c * C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / c, y = r % c;
        const int64_t b = cells[3 * t], i = cells[3 * t + 1], j = cells[3 * t + 2];
        std::memcpy(op + r * c * C, xp + ((b * H + i * c + y) * W + j * c) * C, sizeof(T) * c * C);
      }
    });
  } else {
    at::parallel_for(0, A * C, grain(c * c), [&](int64_t p0, int64_t p1) {
      for (int64_t pl = p0; pl < p1; ++pl) {
        const int64_t t = pl / C, ch = pl % C;
        const int64_t b = cells[3 * t], i = cells[3 * t + 1], j = cells[3 * t + 2];
        const T* src = xp + ((b * C + ch) * H + i * c) * W + j * c;
        T* dst = op + pl * c * c;
        for (int64_t y = 0; y < c; ++y) std::memcpy(dst + y * c, src + y * W, sizeof(T) * c);
      }
    });
  }
}

// Changing layout (e.g. an NCHW image into NHWC tiles): any input strides, the output written in
// its memory order.
template <typename T>
void pack_transpose(const Tensor& x, const int32_t* cells, Tensor& out, int64_t c, bool cl) {
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = out.size(0), C = out.size(1);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  if (cl) {
    at::parallel_for(0, A * c, grain(c * C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / c, y = r % c;
        const T* src = xp + cells[3 * t] * s0 + (cells[3 * t + 1] * c + y) * s2 + cells[3 * t + 2] * c * s3;
        T* dst = op + r * c * C;
        for (int64_t xx = 0; xx < c; ++xx)
          for (int64_t ch = 0; ch < C; ++ch) dst[xx * C + ch] = src[xx * s3 + ch * s1];
      }
    });
  } else {
    at::parallel_for(0, A * C, grain(c * c), [&](int64_t p0, int64_t p1) {
      for (int64_t pl = p0; pl < p1; ++pl) {
        const int64_t t = pl / C, ch = pl % C;
        const T* src = xp + cells[3 * t] * s0 + ch * s1 + cells[3 * t + 1] * c * s2 + cells[3 * t + 2] * c * s3;
        T* dst = op + pl * c * c;
        for (int64_t y = 0; y < c; ++y)
          for (int64_t xx = 0; xx < c; ++xx) dst[y * c + xx] = src[y * s2 + xx * s3];
      }
    });
  }
}

Tensor pack_cpu(const Tensor& x_, const Tensor& cells_, const Tensor& cell_map, std::optional<bool> channels_last) {
  check_float(x_, "x");
  check_table(cells_, 3, "cells");
  const int64_t c = cell_size(x_, cell_map);
  const bool in_cl = is_channels_last(x_);
  const bool cl = channels_last.value_or(in_cl);
  const Tensor cells = cells_.contiguous();
  const int64_t A = cells.size(0), C = x_.size(1);
  check_cells_values(cells, x_.size(0), x_.size(2) / c, x_.size(3) / c);
  Tensor out = at::empty({A, C, c, c}, x_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  const int32_t* ce = cells.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "sparse_pack", [&] {
    if (simple_kernels()) {
      pack_simple<scalar_t>(x_, ce, out, c);
    } else if (cl == in_cl) {
      const Tensor x = x_.contiguous(format_of(cl));
      pack_fast<scalar_t>(x, ce, out, c, cl);
    } else {
      pack_transpose<scalar_t>(x_, ce, out, c, cl);
    }
  });
  return out;
}

template <typename T>
void unpack_simple(const Tensor& in, const int32_t* cm, const T* fill, Tensor& out, int64_t c) {
  const T* ip = in.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t B = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), gh = H / c, gw = W / c;
  const auto is = in.strides();
  const auto os = out.strides();
  at::parallel_for(0, B * C, grain(H * W), [&](int64_t p0, int64_t p1) {
    for (int64_t pl = p0; pl < p1; ++pl) {
      const int64_t b = pl / C, ch = pl % C;
      for (int64_t Y = 0; Y < H; ++Y)
        for (int64_t X = 0; X < W; ++X) {
          const int64_t t = cm[(b * gh + Y / c) * gw + X / c];
          op[b * os[0] + ch * os[1] + Y * os[2] + X * os[3]] =
              t >= 0 ? ip[t * is[0] + ch * is[1] + (Y % c) * is[2] + (X % c) * is[3]]
                     : (fill ? fill[ch] : T(0));
        }
    }
  });
}

template <typename T>
void unpack_fast(const Tensor& in, const int32_t* cm, const T* fill, Tensor& out, int64_t c, bool cl) {
  const T* ip = in.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t B = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), gh = H / c, gw = W / c;
  if (cl) {  // one output row (b, Y) = gw cells of c*C contiguous values
    at::parallel_for(0, B * H, grain(W * C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, Y = r % H, i = Y / c, y = Y % c;
        for (int64_t j = 0; j < gw; ++j) {
          const int64_t t = cm[(b * gh + i) * gw + j];
          T* dst = op + (r * W + j * c) * C;
          if (t >= 0) {
            std::memcpy(dst, ip + (t * c + y) * c * C, sizeof(T) * c * C);
          } else if (fill) {
            for (int64_t x = 0; x < c; ++x) std::memcpy(dst + x * C, fill, sizeof(T) * C);
          } else {
            std::fill(dst, dst + c * C, T(0));
          }
        }
      }
    });
  } else {  // one output plane (b, ch)
    at::parallel_for(0, B * C, grain(H * W), [&](int64_t p0, int64_t p1) {
      for (int64_t pl = p0; pl < p1; ++pl) {
        const int64_t b = pl / C, ch = pl % C;
        const T v = fill ? fill[ch] : T(0);
        T* plane = op + pl * H * W;
        for (int64_t i = 0; i < gh; ++i)
          for (int64_t j = 0; j < gw; ++j) {
            const int64_t t = cm[(b * gh + i) * gw + j];
            T* dst = plane + i * c * W + j * c;
            if (t >= 0) {
              const T* src = ip + (t * C + ch) * c * c;
              for (int64_t y = 0; y < c; ++y) std::memcpy(dst + y * W, src + y * c, sizeof(T) * c);
            } else {
              for (int64_t y = 0; y < c; ++y) std::fill(dst + y * W, dst + y * W + c, v);
            }
          }
      }
    });
  }
}

// Changing layout: any packed strides, the dense output written in its memory order.
template <typename T>
void unpack_transpose(const Tensor& in, const int32_t* cm, const T* fill, Tensor& out, int64_t c, bool cl) {
  const T* ip = in.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t B = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), gh = H / c, gw = W / c;
  const int64_t s0 = in.stride(0), s1 = in.stride(1), s2 = in.stride(2), s3 = in.stride(3);
  if (cl) {
    at::parallel_for(0, B * H, grain(W * C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, Y = r % H, i = Y / c, y = Y % c;
        for (int64_t j = 0; j < gw; ++j) {
          const int64_t t = cm[(b * gh + i) * gw + j];
          T* dst = op + (r * W + j * c) * C;
          for (int64_t xx = 0; xx < c; ++xx)
            for (int64_t ch = 0; ch < C; ++ch)
              dst[xx * C + ch] = t >= 0 ? ip[t * s0 + ch * s1 + y * s2 + xx * s3] : (fill ? fill[ch] : T(0));
        }
      }
    });
  } else {
    at::parallel_for(0, B * C, grain(H * W), [&](int64_t p0, int64_t p1) {
      for (int64_t pl = p0; pl < p1; ++pl) {
        const int64_t b = pl / C, ch = pl % C;
        const T v = fill ? fill[ch] : T(0);
        for (int64_t Y = 0; Y < H; ++Y)
          for (int64_t X = 0; X < W; ++X) {
            const int64_t t = cm[(b * gh + Y / c) * gw + X / c];
            op[(pl * H + Y) * W + X] = t >= 0 ? ip[t * s0 + ch * s1 + (Y % c) * s2 + (X % c) * s3] : v;
          }
      }
    });
  }
}

void check_cell_map(const Tensor& cell_map, int64_t A) {
  check_cell_map_shape(cell_map);
  const int32_t* p = cell_map.data_ptr<int32_t>();
  for (int64_t n = 0; n < cell_map.numel(); ++n)
    TORCH_CHECK(p[n] >= kMasked && p[n] < A, "cell_map entry ", p[n], " is out of range for ", A, " tiles");
}

Tensor unpack_cpu(const Tensor& in_, const Tensor& cells, const Tensor& cell_map_,
                  const std::optional<Tensor>& fill_, std::optional<bool> channels_last) {
  TORCH_CHECK(in_.dim() == 4 && in_.size(2) == in_.size(3) && in_.size(2) > 0, "packed must be (A, C, c, c), got ",
              in_.sizes());
  check_float(in_, "packed");
  check_table(cells, 3, "cells");
  TORCH_CHECK(cells.size(0) == in_.size(0), "cells has ", cells.size(0), " rows for ", in_.size(0), " tiles");
  check_cell_map_shape(cell_map_);
  const Tensor cell_map = cell_map_.contiguous();
  check_cell_map(cell_map, in_.size(0));
  const int64_t C = in_.size(1), c = in_.size(2);
  const int64_t B = cell_map.size(0), H = cell_map.size(1) * c, W = cell_map.size(2) * c;
  Tensor fill;
  if (fill_.has_value()) {
    check_fill(in_, *fill_);
    fill = fill_->reshape({C}).contiguous();
  }
  const bool in_cl = is_channels_last(in_);
  const bool cl = channels_last.value_or(in_cl);
  Tensor out = at::empty({B, C, H, W}, in_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  const int32_t* cm = cell_map.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_.scalar_type(), "sparse_unpack", [&] {
    const scalar_t* f = fill.defined() ? fill.data_ptr<scalar_t>() : nullptr;
    if (simple_kernels()) {
      unpack_simple<scalar_t>(in_, cm, f, out, c);
    } else if (cl == in_cl) {
      const Tensor in = in_.contiguous(format_of(cl));
      unpack_fast<scalar_t>(in, cm, f, out, c, cl);
    } else {
      unpack_transpose<scalar_t>(in_, cm, f, out, c, cl);
    }
  });
  return out;
}

// Per-channel sum of grad over the masked cells (the gradient of unpack's fill).
template <typename T>
void masked_channel_sum(const Tensor& g, const int32_t* cm, Tensor& out, int64_t c) {
  using acc_t = at::opmath_type<T>;
  const T* gp = g.data_ptr<T>();
  const int64_t B = g.size(0), C = g.size(1), H = g.size(2), W = g.size(3), gh = H / c, gw = W / c;
  const auto s = g.strides();
  T* op = out.data_ptr<T>();
  // One channel per task: a fixed summation order, whatever the thread count.
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      acc_t acc = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < gh; ++i)
          for (int64_t j = 0; j < gw; ++j) {
            if (cm[(b * gh + i) * gw + j] >= 0) continue;
            for (int64_t y = 0; y < c; ++y)
              for (int64_t x = 0; x < c; ++x)
                acc += static_cast<acc_t>(gp[b * s[0] + ch * s[1] + (i * c + y) * s[2] + (j * c + x) * s[3]]);
          }
      op[ch] = static_cast<T>(acc);
    }
  });
}

std::tuple<Tensor, Tensor> unpack_backward_cpu(const Tensor& grad, const Tensor& cells, const Tensor& cell_map_,
                                               bool fill_grad, std::optional<bool> channels_last) {
  const int64_t c = cell_size(grad, cell_map_);
  const Tensor cell_map = cell_map_.contiguous();
  Tensor gpacked = pack_cpu(grad, cells, cell_map, channels_last);
  Tensor gfill = at::empty({fill_grad ? grad.size(1) : 0}, grad.options());
  if (fill_grad && gfill.numel() > 0) {
    check_cell_map(cell_map, cells.size(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sparse_unpack_backward", [&] {
      masked_channel_sum<scalar_t>(grad, cell_map.data_ptr<int32_t>(), gfill, c);
    });
  }
  return {gpacked, gfill};
}

// ---------------------------------------------------------------------------------------------
// halo

template <typename T>
void halo_simple(const Tensor& x, const int32_t* nbr, Tensor& out, int64_t p, T mfill, T bfill) {
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = x.size(0), C = x.size(1), c = x.size(2), P = c + 2 * p;
  const auto xs = x.strides();
  const auto os = out.strides();
  at::parallel_for(0, A, grain(C * P * P), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t py = 0; py < P; ++py)
          for (int64_t px = 0; px < P; ++px) {
            int64_t y, x;
            const int64_t u = halo_source(nbr + 8 * t, t, py, px, c, p, &y, &x);
            op[t * os[0] + ch * os[1] + py * os[2] + px * os[3]] =
                u >= 0 ? xp[u * xs[0] + ch * xs[1] + y * xs[2] + x * xs[3]] : (u == kMasked ? mfill : bfill);
          }
  });
}

template <typename T>
void halo_fast(const Tensor& x, const int32_t* nbr, Tensor& out, int64_t p, T mfill, T bfill, bool cl) {
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = x.size(0), C = x.size(1), c = x.size(2), P = c + 2 * p;
  if (cl) {  // per tile: 9 rectangles, each row of a rectangle is (x1-x0)*C contiguous values
    at::parallel_for(0, A, grain(P * P * C), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        T* o = op + t * P * P * C;
        for (int dy = -1; dy <= 1; ++dy)
          for (int dx = -1; dx <= 1; ++dx) {
            const int64_t u = offset_tile(nbr + 8 * t, t, dy, dx);
            const int64_t y0 = halo_lo(dy, c, p), y1 = halo_hi(dy, c, p), sy = halo_shift(dy, c, p);
            const int64_t x0 = halo_lo(dx, c, p), x1 = halo_hi(dx, c, p), sx = halo_shift(dx, c, p);
            const int64_t n = (x1 - x0) * C;
            for (int64_t py = y0; py < y1; ++py) {
              T* dst = o + (py * P + x0) * C;
              if (u >= 0)
                std::memcpy(dst, xp + ((u * c + py - sy) * c + x0 - sx) * C, sizeof(T) * n);
              else
                std::fill(dst, dst + n, u == kMasked ? mfill : bfill);
            }
          }
      }
    });
  } else {  // per plane (t, ch): 9 rectangles of rows
    at::parallel_for(0, A * C, grain(P * P), [&](int64_t p0, int64_t p1) {
      for (int64_t pl = p0; pl < p1; ++pl) {
        const int64_t t = pl / C, ch = pl % C;
        T* o = op + pl * P * P;
        for (int dy = -1; dy <= 1; ++dy)
          for (int dx = -1; dx <= 1; ++dx) {
            const int64_t u = offset_tile(nbr + 8 * t, t, dy, dx);
            const int64_t y0 = halo_lo(dy, c, p), y1 = halo_hi(dy, c, p), sy = halo_shift(dy, c, p);
            const int64_t x0 = halo_lo(dx, c, p), x1 = halo_hi(dx, c, p), sx = halo_shift(dx, c, p);
            const T* src = u >= 0 ? xp + (u * C + ch) * c * c : nullptr;
            const T v = u == kMasked ? mfill : bfill;
            for (int64_t py = y0; py < y1; ++py) {
              T* dst = o + py * P;
              if (src) {
                const T* s = src + (py - sy) * c - sx;
                for (int64_t px = x0; px < x1; ++px) dst[px] = s[px];
              } else {
                for (int64_t px = x0; px < x1; ++px) dst[px] = v;
              }
            }
          }
      }
    });
  }
}

Tensor halo_cpu(const Tensor& x_, const Tensor& nbr_, int64_t p, double masked_fill, double border_fill) {
  check_halo_args(x_, nbr_, p);
  const Tensor nbr = nbr_.contiguous();
  const int64_t A = x_.size(0), C = x_.size(1), c = x_.size(2), P = c + 2 * p;
  check_nbr_values(nbr, A);
  const bool cl = is_channels_last(x_);
  Tensor out = at::empty({A, C, P, P}, x_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "sparse_halo", [&] {
    const auto mf = static_cast<scalar_t>(masked_fill), bf = static_cast<scalar_t>(border_fill);
    if (simple_kernels()) {
      halo_simple<scalar_t>(x_, nb, out, p, mf, bf);
    } else {
      const Tensor x = x_.contiguous(format_of(cl));
      halo_fast<scalar_t>(x, nb, out, p, mf, bf, cl);
    }
  });
  return out;
}

template <typename T>
void halo_backward_simple(const Tensor& g, const int32_t* nbr, Tensor& out, int64_t p) {
  using acc_t = at::opmath_type<T>;
  const T* gp = g.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = out.size(0), C = out.size(1), c = out.size(2);
  const auto gs = g.strides();
  const auto os = out.strides();
  at::parallel_for(0, A, grain(C * c * c * 4), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t y = 0; y < c; ++y)
          for (int64_t x = 0; x < c; ++x) {
            acc_t acc = 0;
            // Every tile n (t itself or a neighbour) whose padded tile holds a copy of (t, y, x).
            for (int dy = -1; dy <= 1; ++dy)
              for (int dx = -1; dx <= 1; ++dx) {
                if (y < back_lo(dy, c, p) || y >= back_hi(dy, c, p) || x < back_lo(dx, c, p) ||
                    x >= back_hi(dx, c, p))
                  continue;
                const int64_t n = offset_tile(nbr + 8 * t, t, dy, dx);
                if (n < 0) continue;
                acc += static_cast<acc_t>(gp[n * gs[0] + ch * gs[1] + (y + back_shift(dy, c, p)) * gs[2] +
                                             (x + back_shift(dx, c, p)) * gs[3]]);
              }
            op[t * os[0] + ch * os[1] + y * os[2] + x * os[3]] = static_cast<T>(acc);
          }
  });
}

template <typename T>
void halo_backward_fast(const Tensor& g, const int32_t* nbr, Tensor& out, int64_t p, bool cl) {
  using acc_t = at::opmath_type<T>;
  const T* gp = g.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = out.size(0), C = out.size(1), c = out.size(2), P = c + 2 * p;
  // Accumulate one output row in acc_t, then round once (fp16/bf16 sum up to four copies).
  const int64_t row = cl ? c * C : c;
  const int64_t items = cl ? A * c : A * C * c;
  at::parallel_for(0, items, grain(row * 4), [&](int64_t r0, int64_t r1) {
    Tensor scratch = at::empty({row}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* acc = scratch.data_ptr<acc_t>();
    for (int64_t r = r0; r < r1; ++r) {
      int64_t t, ch = 0, y;
      if (cl) {
        t = r / c;
        y = r % c;
      } else {
        t = r / (C * c);
        ch = (r / c) % C;
        y = r % c;
      }
      std::fill(acc, acc + row, acc_t(0));
      for (int dy = -1; dy <= 1; ++dy) {
        if (y < back_lo(dy, c, p) || y >= back_hi(dy, c, p)) continue;
        const int64_t py = y + back_shift(dy, c, p);
        for (int dx = -1; dx <= 1; ++dx) {
          const int64_t n = offset_tile(nbr + 8 * t, t, dy, dx);
          if (n < 0) continue;
          const int64_t x0 = back_lo(dx, c, p), x1 = back_hi(dx, c, p), sx = back_shift(dx, c, p);
          if (cl) {
            const T* src = gp + ((n * P + py) * P + x0 + sx) * C;
            acc_t* a = acc + x0 * C;
            for (int64_t k = 0; k < (x1 - x0) * C; ++k) a[k] += static_cast<acc_t>(src[k]);
          } else {
            const T* src = gp + ((n * C + ch) * P + py) * P + sx;
            for (int64_t x = x0; x < x1; ++x) acc[x] += static_cast<acc_t>(src[x]);
          }
        }
      }
      T* dst = cl ? op + r * row : op + r * c;  // NCHW row r = ((t * C + ch) * c + y)
      for (int64_t k = 0; k < row; ++k) dst[k] = static_cast<T>(acc[k]);
    }
  });
}

Tensor halo_backward_cpu(const Tensor& g_, const Tensor& nbr_, int64_t p) {
  check_halo_grad_args(g_, nbr_, p);
  const int64_t A = g_.size(0), C = g_.size(1), c = g_.size(2) - 2 * p;
  const Tensor nbr = nbr_.contiguous();
  check_nbr_values(nbr, A);
  const bool cl = is_channels_last(g_);
  Tensor out = at::empty({A, C, c, c}, g_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_.scalar_type(), "sparse_halo_backward", [&] {
    if (simple_kernels()) {
      halo_backward_simple<scalar_t>(g_, nb, out, p);
    } else {
      const Tensor g = g_.contiguous(format_of(cl));
      halo_backward_fast<scalar_t>(g, nb, out, p, cl);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// im2col over visible positions (gather-GEMM path) and its adjoint

template <typename T>
void im2col_simple(const Tensor& x, const int32_t* nbr, Tensor& out, int64_t k, int64_t s, int64_t p) {
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t C = x.size(1), ci = x.size(2), co = ci / s, K = k * k, R = out.size(0);
  const auto xs = x.strides();
  at::parallel_for(0, R, grain(C * K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / (co * co), oy = (r / co) % co, ox = r % co;
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t ky = 0; ky < k; ++ky)
          for (int64_t kx = 0; kx < k; ++kx) {
            int64_t y, x;
            const int64_t u = halo_source(nbr + 8 * t, t, s * oy + ky, s * ox + kx, ci, p, &y, &x);
            op[r * C * K + ch * K + ky * k + kx] = u >= 0 ? xp[u * xs[0] + ch * xs[1] + y * xs[2] + x * xs[3]] : T(0);
          }
    }
  });
}

// Any strides: per row, the k*k source offsets are computed once, then every channel is gathered.
template <typename T>
void im2col_fast(const Tensor& x, const int32_t* nbr, Tensor& out, int64_t k, int64_t s, int64_t p) {
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t C = x.size(1), ci = x.size(2), co = ci / s, K = k * k, R = out.size(0);
  const int64_t sA = x.stride(0), sC = x.stride(1), sY = x.stride(2), sX = x.stride(3);
  at::parallel_for(0, R, grain(C * K), [&](int64_t r0, int64_t r1) {
    int64_t off[kMaxKernel * kMaxKernel];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / (co * co), oy = (r / co) % co, ox = r % co;
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) {
          int64_t y, x;
          const int64_t u = halo_source(nbr + 8 * t, t, s * oy + ky, s * ox + kx, ci, p, &y, &x);
          off[ky * k + kx] = u >= 0 ? u * sA + y * sY + x * sX : -1;
        }
      T* o = op + r * C * K;
      for (int64_t kk = 0; kk < K; ++kk) {
        if (off[kk] < 0) {
          for (int64_t ch = 0; ch < C; ++ch) o[ch * K + kk] = T(0);
        } else {
          const T* src = xp + off[kk];
          for (int64_t ch = 0; ch < C; ++ch) o[ch * K + kk] = src[ch * sC];
        }
      }
    }
  });
}

Tensor im2col_cpu(const Tensor& x_, const Tensor& nbr_, int64_t k, int64_t s, int64_t p) {
  check_halo_args(x_, nbr_, 0);
  const int64_t A = x_.size(0), C = x_.size(1), ci = x_.size(2);
  check_conv_geometry(ci, k, s, p);
  const Tensor nbr = nbr_.contiguous();
  check_nbr_values(nbr, A);
  const int64_t co = ci / s;
  Tensor out = at::empty({A * co * co, C * k * k}, x_.options());
  if (out.numel() == 0) return out;
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "sparse_im2col", [&] {
    if (simple_kernels())
      im2col_simple<scalar_t>(x_, nb, out, k, s, p);
    else
      im2col_fast<scalar_t>(x_, nb, out, k, s, p);
  });
  return out;
}

template <typename T>
void col2im_simple(const Tensor& g, const int32_t* nbr, Tensor& out, int64_t k, int64_t s, int64_t p) {
  using acc_t = at::opmath_type<T>;
  const T* gp = g.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = out.size(0), C = out.size(1), ci = out.size(2), co = ci / s, K = k * k;
  const auto os = out.strides();
  at::parallel_for(0, A, grain(C * ci * ci * K), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t y = 0; y < ci; ++y)
          for (int64_t x = 0; x < ci; ++x) {
            acc_t acc = 0;
            for (int64_t ky = 0; ky < k; ++ky)
              for (int64_t kx = 0; kx < k; ++kx) {
                int dy, dx;
                int64_t oy, ox;
                if (!col2im_target(y, ky, ci, s, p, &dy, &oy) || !col2im_target(x, kx, ci, s, p, &dx, &ox)) continue;
                const int64_t u = offset_tile(nbr + 8 * t, t, dy, dx);
                if (u < 0) continue;
                acc += static_cast<acc_t>(gp[((u * co + oy) * co + ox) * C * K + ch * K + ky * k + kx]);
              }
            op[t * os[0] + ch * os[1] + y * os[2] + x * os[3]] = static_cast<T>(acc);
          }
  });
}

template <typename T>
void col2im_fast(const Tensor& g, const int32_t* nbr, Tensor& out, int64_t k, int64_t s, int64_t p) {
  using acc_t = at::opmath_type<T>;
  const T* gp = g.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t A = out.size(0), C = out.size(1), ci = out.size(2), co = ci / s, K = k * k;
  const int64_t oA = out.stride(0), oC = out.stride(1), oY = out.stride(2), oX = out.stride(3);
  at::parallel_for(0, A * ci * ci, grain(C * K), [&](int64_t n0, int64_t n1) {
    int64_t src[kMaxKernel * kMaxKernel];
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = n / (ci * ci), y = (n / ci) % ci, x = n % ci;
      int64_t m = 0;  // the column entries that read (t, y, x), for channel 0
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) {
          int dy, dx;
          int64_t oy, ox;
          if (!col2im_target(y, ky, ci, s, p, &dy, &oy) || !col2im_target(x, kx, ci, s, p, &dx, &ox)) continue;
          const int64_t u = offset_tile(nbr + 8 * t, t, dy, dx);
          if (u >= 0) src[m++] = ((u * co + oy) * co + ox) * C * K + ky * k + kx;
        }
      T* o = op + t * oA + y * oY + x * oX;
      for (int64_t ch = 0; ch < C; ++ch) {
        acc_t acc = 0;
        for (int64_t q = 0; q < m; ++q) acc += static_cast<acc_t>(gp[src[q] + ch * K]);
        o[ch * oC] = static_cast<T>(acc);
      }
    }
  });
}

Tensor im2col_backward_cpu(const Tensor& g_, const Tensor& nbr_, int64_t C, int64_t ci, int64_t k, int64_t s,
                           int64_t p, bool cl) {
  check_im2col_grad_args(g_, nbr_, C, ci, k, s, p);
  const int64_t A = nbr_.size(0);
  const Tensor nbr = nbr_.contiguous();
  check_nbr_values(nbr, A);
  Tensor out = at::empty({A, C, ci, ci}, g_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  const Tensor g = g_.contiguous();
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparse_im2col_backward", [&] {
    if (simple_kernels())
      col2im_simple<scalar_t>(g, nb, out, k, s, p);
    else
      col2im_fast<scalar_t>(g, nb, out, k, s, p);
  });
  return out;
}

}  // namespace
}  // namespace sparse
}  // namespace sparkct

TORCH_LIBRARY_IMPL(sparkct, CPU, m) {
  using namespace sparkct::sparse;
  m.impl("sparse_cell_tables", &cell_tables_cpu);
  m.impl("sparse_pack", &pack_cpu);
  m.impl("sparse_unpack", &unpack_cpu);
  m.impl("sparse_unpack_backward", &unpack_backward_cpu);
  m.impl("sparse_halo", &halo_cpu);
  m.impl("sparse_halo_backward", &halo_backward_cpu);
  m.impl("sparse_im2col", &im2col_cpu);
  m.impl("sparse_im2col_backward", &im2col_backward_cpu);
}
