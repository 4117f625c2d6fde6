// CUDA kernels of the packed cell-tile layout (sparse masked convolution for SparK).
//
// All of them are gathers (each thread owns the elements it writes; no atomics, deterministic) and
// memory-bound. Two forms per op, like csrc/cpu/sparse.cpp:
//  - simple: one thread per output element over arbitrary strides, built directly on the shared index
//    functions of csrc/sparse.h: the oracle (sparkct::sparse_simple_kernels(True) selects it);
//  - fast: for channels-last (the training layout: bf16 NHWC) one thread per pixel *vector* of
//    channels (16 bytes where the channel count and alignment allow, else 8/4/2), so reads and writes
//    are coalesced 16-byte accesses; NCHW tensors use the element kernels on contiguous data.
//    im2col / col2im: one block per row (position), its k*k source offsets computed once in shared
//    memory, threads over the channels.
// Table entries are range-checked on the device (an out-of-range tile reads as masked) because
// checking them on the host would need a device-to-host copy per call.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "sparse.h"
#include "sparse_host.h"

namespace sparkct {
namespace sparse {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

#define SPARKCT_GRID_STRIDE(i, n)                                                           \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

int64_t blocks_for(int64_t n, int64_t threads = kThreads) {
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min(ceil_div(n, threads), cap));
}

// Sizes and strides of a 4-D tensor, passed by value to the element kernels.
struct Geo4 {
  int64_t size[4];
  int64_t stride[4];
  SPARKCT_HD int64_t at(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3];
  }
};

Geo4 geo(const Tensor& t) {
  Geo4 g;
  for (int d = 0; d < 4; ++d) {
    g.size[d] = t.size(d);
    g.stride[d] = t.stride(d);
  }
  return g;
}

// Largest access width (bytes) that divides a pixel's channel vector and every pointer's alignment.
int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int u : {16, 8, 4, 2}) {
    bool ok = row_bytes % u == 0;
    for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % u == 0);
    if (ok) return u;
  }
  return 0;
}

template <typename F>
void with_vector_type(int u, F&& f) {
  switch (u) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: TORCH_CHECK(false, "sparkct: no vector width for this layout (internal error)");
  }
}

// A vector whose every element is v. (Vectors narrower than an element are instantiated by
// with_vector_type but never chosen: vector_bytes only returns widths that hold whole elements.)
template <typename V, typename T>
V splat(T v) {
  V out{};
  if constexpr (sizeof(V) >= sizeof(T)) {
    T* e = reinterpret_cast<T*>(&out);
    for (size_t k = 0; k < sizeof(V) / sizeof(T); ++k) e[k] = v;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// tables

__global__ void cell_map_kernel(const bool* m, const int32_t* csum, int32_t* cm, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) { cm[e] = m[e] ? csum[e] - 1 : kMasked; }
}

__global__ void cells_nbr_kernel(const bool* m, const int32_t* cm, int32_t* cells, int32_t* nbr, int64_t gh,
                                 int64_t gw, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    if (!m[e]) continue;
    const int64_t t = cm[e], b = e / (gh * gw), i = (e / gw) % gh, j = e % gw;
    cells[3 * t] = static_cast<int32_t>(b);
    cells[3 * t + 1] = static_cast<int32_t>(i);
    cells[3 * t + 2] = static_cast<int32_t>(j);
    for (int dy = -1; dy <= 1; ++dy)
      for (int dx = -1; dx <= 1; ++dx)
        if (dy != 0 || dx != 0) nbr[8 * t + nbr_slot(dy, dx)] = neighbour_code(cm, b, i, j, dy, dx, gh, gw);
  }
}

std::tuple<Tensor, Tensor, Tensor> cell_tables_cuda(const Tensor& mask_) {
  TORCH_CHECK(mask_.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask_.scalar_type());
  TORCH_CHECK(mask_.dim() == 3, "mask must be (B, GH, GW), got ", mask_.sizes());
  TORCH_CHECK(mask_.numel() < INT32_MAX, "too many cells: ", mask_.numel());
  c10::cuda::CUDAGuard guard(mask_.device());
  const Tensor mask = mask_.contiguous();
  const int64_t B = mask.size(0), gh = mask.size(1), gw = mask.size(2), n = mask.numel();
  const auto iopt = mask.options().dtype(at::kInt);
  Tensor cell_map = at::empty({B, gh, gw}, iopt);
  if (n == 0) return {at::empty({0, 3}, iopt), at::empty({0, 8}, iopt), cell_map};
  const Tensor csum = at::cumsum(mask.reshape({-1}), 0, at::kInt);
  const int64_t A = csum[n - 1].item<int32_t>();  // the one device->host sync: A sizes the outputs
  Tensor cells = at::empty({A, 3}, iopt), nbr = at::empty({A, 8}, iopt);
  auto stream = at::cuda::getCurrentCUDAStream();
  cell_map_kernel<<<blocks_for(n), kThreads, 0, stream>>>(mask.data_ptr<bool>(), csum.data_ptr<int32_t>(),
                                                          cell_map.data_ptr<int32_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (A > 0) {
    cells_nbr_kernel<<<blocks_for(n), kThreads, 0, stream>>>(mask.data_ptr<bool>(), cell_map.data_ptr<int32_t>(),
                                                             cells.data_ptr<int32_t>(), nbr.data_ptr<int32_t>(),
                                                             gh, gw, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {cells, nbr, cell_map};
}

// ---------------------------------------------------------------------------------------------
// pack / unpack

template <typename T>
__global__ void pack_simple_kernel(const T* x, Geo4 xg, const int32_t* cells, T* out, Geo4 og, int64_t c,
                                   int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t C = og.size[1];
    const int64_t xx = e % c, y = (e / c) % c, ch = (e / (c * c)) % C, t = e / (c * c * C);
    const int64_t b = cells[3 * t], Y = cells[3 * t + 1] * c + y, X = cells[3 * t + 2] * c + xx;
    const bool ok = b >= 0 && b < xg.size[0] && Y >= 0 && Y < xg.size[2] && X >= 0 && X < xg.size[3];
    out[og.at(t, ch, y, xx)] = ok ? x[xg.at(b, ch, Y, X)] : T(0);
  }
}

// Channels-last: element e = ((t * c + y) * c + x) * Cv + q of the packed tensor, in vectors V.
template <typename V>
__global__ void pack_cl_kernel(const V* x, const int32_t* cells, V* out, int64_t B, int64_t H, int64_t W,
                               int64_t c, int64_t Cv, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t q = e % Cv, xx = (e / Cv) % c, y = (e / (Cv * c)) % c, t = e / (Cv * c * c);
    const int64_t b = cells[3 * t], Y = cells[3 * t + 1] * c + y, X = cells[3 * t + 2] * c + xx;
    if (b >= 0 && b < B && Y >= 0 && Y < H && X >= 0 && X < W)
      out[e] = x[((b * H + Y) * W + X) * Cv + q];
    else
      out[e] = V{};
  }
}

Tensor pack_cuda(const Tensor& x_, const Tensor& cells_, const Tensor& cell_map, std::optional<bool> channels_last) {
  check_float(x_, "x");
  check_table(cells_, 3, "cells");
  check_same_device(x_, cells_, "cells");
  check_same_device(x_, cell_map, "cell_map");
  const int64_t c = cell_size(x_, cell_map);
  c10::cuda::CUDAGuard guard(x_.device());
  const bool in_cl = is_channels_last(x_);
  const bool cl = channels_last.value_or(in_cl);
  const Tensor cells = cells_.contiguous();
  const int64_t A = cells.size(0), B = x_.size(0), C = x_.size(1), H = x_.size(2), W = x_.size(3);
  Tensor out = at::empty({A, C, c, c}, x_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* ce = cells.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "sparse_pack_cuda", [&] {
    if (cl && in_cl && !simple_kernels()) {
      const Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
      const int u = vector_bytes(C * sizeof(scalar_t), {x.data_ptr(), out.data_ptr()});
      with_vector_type(u, [&](auto tag) {
        using V = decltype(tag);
        const int64_t Cv = C * static_cast<int64_t>(sizeof(scalar_t)) / static_cast<int64_t>(sizeof(V));
        const int64_t n = A * c * c * Cv;
        pack_cl_kernel<V><<<blocks_for(n), kThreads, 0, stream>>>(
            reinterpret_cast<const V*>(x.data_ptr()), ce, reinterpret_cast<V*>(out.data_ptr()), B, H, W, c, Cv, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      // NCHW, a change of layout, or the oracle: one thread per element over any strides.
      const Tensor x = (simple_kernels() || cl != in_cl) ? x_ : x_.contiguous(format_of(cl));
      const int64_t n = out.numel();
      pack_simple_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), geo(x), ce, out.data_ptr<scalar_t>(), geo(out), c, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

template <typename T>
__global__ void unpack_simple_kernel(const T* in, Geo4 ig, const int32_t* cm, const T* fill, T* out, Geo4 og,
                                     int64_t c, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t C = og.size[1], H = og.size[2], W = og.size[3], gh = H / c, gw = W / c;
    const int64_t X = e % W, Y = (e / W) % H, ch = (e / (W * H)) % C, b = e / (W * H * C);
    const int64_t t = cm[(b * gh + Y / c) * gw + X / c];
    T v = fill ? fill[ch] : T(0);
    if (t >= 0 && t < ig.size[0]) v = in[ig.at(t, ch, Y % c, X % c)];
    out[og.at(b, ch, Y, X)] = v;
  }
}

// Channels-last: element e = ((b * H + Y) * W + X) * Cv + q of the dense output, in vectors V.
template <typename V>
__global__ void unpack_cl_kernel(const V* in, const int32_t* cm, const V* fill, V* out, int64_t A, int64_t H,
                                 int64_t W, int64_t c, int64_t Cv, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t q = e % Cv, X = (e / Cv) % W, Y = (e / (Cv * W)) % H, b = e / (Cv * W * H);
    const int64_t t = cm[(b * (H / c) + Y / c) * (W / c) + X / c];
    if (t >= 0 && t < A)
      out[e] = in[((t * c + Y % c) * c + X % c) * Cv + q];
    else
      out[e] = fill ? fill[q] : V{};
  }
}

Tensor unpack_cuda(const Tensor& in_, const Tensor& cells, const Tensor& cell_map_,
                   const std::optional<Tensor>& fill_, std::optional<bool> channels_last) {
  TORCH_CHECK(in_.dim() == 4 && in_.size(2) == in_.size(3) && in_.size(2) > 0, "packed must be (A, C, c, c), got ",
              in_.sizes());
  check_float(in_, "packed");
  check_table(cells, 3, "cells");
  TORCH_CHECK(cells.size(0) == in_.size(0), "cells has ", cells.size(0), " rows for ", in_.size(0), " tiles");
  check_same_device(in_, cells, "cells");
  check_cell_map_shape(cell_map_);
  check_same_device(in_, cell_map_, "cell_map");
  c10::cuda::CUDAGuard guard(in_.device());
  const Tensor cell_map = cell_map_.contiguous();
  const int64_t A = in_.size(0), C = in_.size(1), c = in_.size(2);
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
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* cm = cell_map.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_.scalar_type(), "sparse_unpack_cuda", [&] {
    const scalar_t* f = fill.defined() ? fill.data_ptr<scalar_t>() : nullptr;
    if (cl && in_cl && !simple_kernels()) {
      const Tensor in = in_.contiguous(at::MemoryFormat::ChannelsLast);
      const int u = vector_bytes(C * sizeof(scalar_t), {in.data_ptr(), out.data_ptr(), static_cast<const void*>(f)});
      with_vector_type(u, [&](auto tag) {
        using V = decltype(tag);
        const int64_t Cv = C * static_cast<int64_t>(sizeof(scalar_t)) / static_cast<int64_t>(sizeof(V));
        const int64_t n = B * H * W * Cv;
        unpack_cl_kernel<V><<<blocks_for(n), kThreads, 0, stream>>>(
            reinterpret_cast<const V*>(in.data_ptr()), cm, reinterpret_cast<const V*>(f),
            reinterpret_cast<V*>(out.data_ptr()), A, H, W, c, Cv, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const Tensor in = (simple_kernels() || cl != in_cl) ? in_ : in_.contiguous(format_of(cl));
      const int64_t n = out.numel();
      unpack_simple_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          in.data_ptr<scalar_t>(), geo(in), cm, f, out.data_ptr<scalar_t>(), geo(out), c, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> unpack_backward_cuda(const Tensor& grad, const Tensor& cells, const Tensor& cell_map,
                                                bool fill_grad, std::optional<bool> channels_last) {
  const int64_t c = cell_size(grad, cell_map);
  check_same_device(grad, cell_map, "cell_map");
  c10::cuda::CUDAGuard guard(grad.device());
  Tensor gpacked = pack_cuda(grad, cells, cell_map, channels_last);
  Tensor gfill = at::empty({fill_grad ? grad.size(1) : 0}, grad.options());
  if (fill_grad && gfill.numel() > 0) {
    // A per-channel sum over the masked cells: ATen's deterministic reductions, accumulated in fp32.
    // A where, not grad * mask: a non-finite gradient at a visible position (an fp16 overflow under
    // AMP) must not reach the fill's gradient as inf * 0 = NaN; the CPU op skips visible cells.
    const int64_t B = grad.size(0), C = grad.size(1), gh = cell_map.size(1), gw = cell_map.size(2);
    const Tensor masked = cell_map.lt(0).view({B, 1, gh, 1, gw, 1});
    const Tensor g6 = grad.view({B, C, gh, c, gw, c});  // splits H and W: a view for any strides
    const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    gfill.copy_(at::sum(at::where(masked, g6, 0), {0, 2, 3, 4, 5}, false, acc));
  }
  return {gpacked, gfill};
}

// ---------------------------------------------------------------------------------------------
// halo

template <typename T>
__global__ void halo_simple_kernel(const T* x, Geo4 xg, const int32_t* nbr, T* out, Geo4 og, int64_t p, T mfill,
                                   T bfill, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t C = og.size[1], P = og.size[2], c = xg.size[2], A = xg.size[0];
    const int64_t px = e % P, py = (e / P) % P, ch = (e / (P * P)) % C, t = e / (P * P * C);
    int64_t y, xx;
    const int64_t u = halo_source(nbr + 8 * t, t, py, px, c, p, &y, &xx);
    T v = u == kOutside ? bfill : mfill;
    if (u >= 0 && u < A) v = x[xg.at(u, ch, y, xx)];
    out[og.at(t, ch, py, px)] = v;
  }
}

// Channels-last: element e = ((t * P + py) * P + px) * Cv + q of the padded output, in vectors V.
template <typename V>
__global__ void halo_cl_kernel(const V* x, const int32_t* nbr, V* out, int64_t A, int64_t c, int64_t p, int64_t Cv,
                               V mfill, V bfill, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t P = c + 2 * p;
    const int64_t q = e % Cv, px = (e / Cv) % P, py = (e / (Cv * P)) % P, t = e / (Cv * P * P);
    int64_t y, xx;
    const int64_t u = halo_source(nbr + 8 * t, t, py, px, c, p, &y, &xx);
    if (u >= 0 && u < A)
      out[e] = x[((u * c + y) * c + xx) * Cv + q];
    else
      out[e] = u == kOutside ? bfill : mfill;
  }
}

Tensor halo_cuda(const Tensor& x_, const Tensor& nbr_, int64_t p, double masked_fill, double border_fill) {
  check_halo_args(x_, nbr_, p);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor nbr = nbr_.contiguous();
  const int64_t A = x_.size(0), C = x_.size(1), c = x_.size(2), P = c + 2 * p;
  const bool cl = is_channels_last(x_);
  Tensor out = at::empty({A, C, P, P}, x_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "sparse_halo_cuda", [&] {
    const auto mf = static_cast<scalar_t>(masked_fill), bf = static_cast<scalar_t>(border_fill);
    if (cl && !simple_kernels()) {
      const Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
      const int u = vector_bytes(C * sizeof(scalar_t), {x.data_ptr(), out.data_ptr()});
      with_vector_type(u, [&](auto tag) {
        using V = decltype(tag);
        const int64_t Cv = C * static_cast<int64_t>(sizeof(scalar_t)) / static_cast<int64_t>(sizeof(V));
        const int64_t n = A * P * P * Cv;
        halo_cl_kernel<V><<<blocks_for(n), kThreads, 0, stream>>>(
            reinterpret_cast<const V*>(x.data_ptr()), nb, reinterpret_cast<V*>(out.data_ptr()), A, c, p, Cv,
            splat<V>(mf), splat<V>(bf), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const Tensor x = simple_kernels() ? x_ : x_.contiguous(format_of(cl));
      const int64_t n = out.numel();
      halo_simple_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), geo(x), nb, out.data_ptr<scalar_t>(), geo(out), p, mf, bf, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

template <typename T>
__global__ void halo_backward_simple_kernel(const T* g, Geo4 gg, const int32_t* nbr, T* out, Geo4 og, int64_t p,
                                            int64_t n) {
  using acc_t = at::opmath_type<T>;
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t A = og.size[0], C = og.size[1], c = og.size[2];
    const int64_t x = e % c, y = (e / c) % c, ch = (e / (c * c)) % C, t = e / (c * c * C);
    acc_t acc = 0;
    for (int dy = -1; dy <= 1; ++dy)
      for (int dx = -1; dx <= 1; ++dx) {
        if (y < back_lo(dy, c, p) || y >= back_hi(dy, c, p) || x < back_lo(dx, c, p) || x >= back_hi(dx, c, p))
          continue;
        const int64_t m = offset_tile(nbr + 8 * t, t, dy, dx);
        if (m < 0 || m >= A) continue;
        acc += static_cast<acc_t>(g[gg.at(m, ch, y + back_shift(dy, c, p), x + back_shift(dx, c, p))]);
      }
    out[og.at(t, ch, y, x)] = static_cast<T>(acc);
  }
}

// Channels-last: element e = ((t * c + y) * c + x) * Cv + q of the packed gradient, in vectors V of
// sizeof(V) / sizeof(T) channels, summed in acc_t.
template <typename T, typename V>
__global__ void halo_backward_cl_kernel(const V* g, const int32_t* nbr, V* out, int64_t A, int64_t c, int64_t p,
                                        int64_t Cv, int64_t n) {
  using acc_t = at::opmath_type<T>;
  constexpr int kE = sizeof(V) / sizeof(T);
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t P = c + 2 * p;
    const int64_t q = e % Cv, x = (e / Cv) % c, y = (e / (Cv * c)) % c, t = e / (Cv * c * c);
    acc_t acc[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) acc[k] = 0;
    for (int dy = -1; dy <= 1; ++dy)
      for (int dx = -1; dx <= 1; ++dx) {
        if (y < back_lo(dy, c, p) || y >= back_hi(dy, c, p) || x < back_lo(dx, c, p) || x >= back_hi(dx, c, p))
          continue;
        const int64_t m = offset_tile(nbr + 8 * t, t, dy, dx);
        if (m < 0 || m >= A) continue;
        const V v = g[((m * P + y + back_shift(dy, c, p)) * P + x + back_shift(dx, c, p)) * Cv + q];
        const T* ve = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int k = 0; k < kE; ++k) acc[k] += static_cast<acc_t>(ve[k]);
      }
    V r;
    T* re = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int k = 0; k < kE; ++k) re[k] = static_cast<T>(acc[k]);
    out[e] = r;
  }
}

Tensor halo_backward_cuda(const Tensor& g_, const Tensor& nbr_, int64_t p) {
  check_halo_grad_args(g_, nbr_, p);
  const int64_t A = g_.size(0), C = g_.size(1), c = g_.size(2) - 2 * p;
  c10::cuda::CUDAGuard guard(g_.device());
  const Tensor nbr = nbr_.contiguous();
  const bool cl = is_channels_last(g_);
  Tensor out = at::empty({A, C, c, c}, g_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_.scalar_type(), "sparse_halo_backward_cuda", [&] {
    if (cl && !simple_kernels()) {
      const Tensor g = g_.contiguous(at::MemoryFormat::ChannelsLast);
      const int u = vector_bytes(C * sizeof(scalar_t), {g.data_ptr(), out.data_ptr()});
      with_vector_type(u, [&](auto tag) {
        using V = decltype(tag);
        if constexpr (sizeof(V) < sizeof(scalar_t)) {
          TORCH_CHECK(false, "sparkct: vector narrower than an element (internal error)");
        } else {
          const int64_t Cv = C * static_cast<int64_t>(sizeof(scalar_t)) / static_cast<int64_t>(sizeof(V));
          const int64_t n = A * c * c * Cv;
          halo_backward_cl_kernel<scalar_t, V><<<blocks_for(n), kThreads, 0, stream>>>(
              reinterpret_cast<const V*>(g.data_ptr()), nb, reinterpret_cast<V*>(out.data_ptr()), A, c, p, Cv, n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    } else {
      const Tensor g = simple_kernels() ? g_ : g_.contiguous(format_of(cl));
      const int64_t n = out.numel();
      halo_backward_simple_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), geo(g), nb, out.data_ptr<scalar_t>(), geo(out), p, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// im2col over visible positions (gather-GEMM path) and its adjoint

template <typename T>
__global__ void im2col_simple_kernel(const T* x, Geo4 xg, const int32_t* nbr, T* out, int64_t k, int64_t s,
                                     int64_t p, int64_t n) {
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t A = xg.size[0], C = xg.size[1], ci = xg.size[2], co = ci / s, K = k * k;
    const int64_t kx = e % k, ky = (e / k) % k, ch = (e / K) % C, r = e / (K * C);
    const int64_t t = r / (co * co), oy = (r / co) % co, ox = r % co;
    int64_t y, xx;
    const int64_t u = halo_source(nbr + 8 * t, t, s * oy + ky, s * ox + kx, ci, p, &y, &xx);
    out[e] = (u >= 0 && u < A) ? x[xg.at(u, ch, y, xx)] : T(0);
  }
}

// One block per column row: its k*k source offsets go to shared memory once, then the threads write
// the C*k*k columns of the row (coalesced).
template <typename T>
__global__ void im2col_rows_kernel(const T* x, Geo4 xg, const int32_t* nbr, T* out, int64_t k, int64_t s,
                                   int64_t p, int64_t R) {
  __shared__ int64_t off[kMaxKernel * kMaxKernel];
  const int64_t A = xg.size[0], C = xg.size[1], ci = xg.size[2], co = ci / s, K = k * k;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t t = r / (co * co), oy = (r / co) % co, ox = r % co;
    for (int64_t kk = threadIdx.x; kk < K; kk += blockDim.x) {
      int64_t y, xx;
      const int64_t u = halo_source(nbr + 8 * t, t, s * oy + kk / k, s * ox + kk % k, ci, p, &y, &xx);
      off[kk] = (u >= 0 && u < A) ? xg.at(u, 0, y, xx) : -1;
    }
    __syncthreads();
    T* o = out + r * C * K;
    for (int64_t col = threadIdx.x; col < C * K; col += blockDim.x) {
      const int64_t kk = col % K, ch = col / K;
      o[col] = off[kk] >= 0 ? x[off[kk] + ch * xg.stride[1]] : T(0);
    }
    __syncthreads();  // off[] is rewritten for the next row
  }
}

Tensor im2col_cuda(const Tensor& x_, const Tensor& nbr_, int64_t k, int64_t s, int64_t p) {
  check_halo_args(x_, nbr_, 0);
  const int64_t A = x_.size(0), C = x_.size(1), ci = x_.size(2);
  check_conv_geometry(ci, k, s, p);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor nbr = nbr_.contiguous();
  const int64_t co = ci / s, R = A * co * co;
  Tensor out = at::empty({R, C * k * k}, x_.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "sparse_im2col_cuda", [&] {
    if (simple_kernels()) {
      const int64_t n = out.numel();
      im2col_simple_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          x_.data_ptr<scalar_t>(), geo(x_), nb, out.data_ptr<scalar_t>(), k, s, p, n);
    } else {
      const int64_t blocks = std::min<int64_t>(R, 65535);
      im2col_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x_.data_ptr<scalar_t>(), geo(x_), nb,
                                                                     out.data_ptr<scalar_t>(), k, s, p, R);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename T>
__global__ void col2im_simple_kernel(const T* g, const int32_t* nbr, T* out, Geo4 og, int64_t k, int64_t s,
                                     int64_t p, int64_t n) {
  using acc_t = at::opmath_type<T>;
  SPARKCT_GRID_STRIDE(e, n) {
    const int64_t A = og.size[0], C = og.size[1], ci = og.size[2], co = ci / s, K = k * k;
    const int64_t x = e % ci, y = (e / ci) % ci, ch = (e / (ci * ci)) % C, t = e / (ci * ci * C);
    acc_t acc = 0;
    for (int64_t ky = 0; ky < k; ++ky)
      for (int64_t kx = 0; kx < k; ++kx) {
        int dy, dx;
        int64_t oy, ox;
        if (!col2im_target(y, ky, ci, s, p, &dy, &oy) || !col2im_target(x, kx, ci, s, p, &dx, &ox)) continue;
        const int64_t u = offset_tile(nbr + 8 * t, t, dy, dx);
        if (u < 0 || u >= A) continue;
        acc += static_cast<acc_t>(g[((u * co + oy) * co + ox) * C * K + ch * K + ky * k + kx]);
      }
    out[og.at(t, ch, y, x)] = static_cast<T>(acc);
  }
}

// One block per input position (t, y, x): the k*k column entries that read it go to shared memory
// (-1 where none), then the threads sum them per channel in a fixed order.
template <typename T>
__global__ void col2im_positions_kernel(const T* g, const int32_t* nbr, T* out, Geo4 og, int64_t k, int64_t s,
                                        int64_t p, int64_t N) {
  using acc_t = at::opmath_type<T>;
  __shared__ int64_t src[kMaxKernel * kMaxKernel];
  const int64_t A = og.size[0], C = og.size[1], ci = og.size[2], co = ci / s, K = k * k;
  for (int64_t pos = blockIdx.x; pos < N; pos += gridDim.x) {
    const int64_t t = pos / (ci * ci), y = (pos / ci) % ci, x = pos % ci;
    for (int64_t kk = threadIdx.x; kk < K; kk += blockDim.x) {
      int dy, dx;
      int64_t oy, ox;
      int64_t v = -1;
      if (col2im_target(y, kk / k, ci, s, p, &dy, &oy) && col2im_target(x, kk % k, ci, s, p, &dx, &ox)) {
        const int64_t u = offset_tile(nbr + 8 * t, t, dy, dx);
        if (u >= 0 && u < A) v = ((u * co + oy) * co + ox) * C * K + kk;
      }
      src[kk] = v;
    }
    __syncthreads();
    for (int64_t ch = threadIdx.x; ch < C; ch += blockDim.x) {
      acc_t acc = 0;
      for (int64_t kk = 0; kk < K; ++kk)
        if (src[kk] >= 0) acc += static_cast<acc_t>(g[src[kk] + ch * K]);
      out[og.at(t, ch, y, x)] = static_cast<T>(acc);
    }
    __syncthreads();
  }
}

Tensor im2col_backward_cuda(const Tensor& g_, const Tensor& nbr_, int64_t C, int64_t ci, int64_t k, int64_t s,
                            int64_t p, bool cl) {
  check_im2col_grad_args(g_, nbr_, C, ci, k, s, p);
  const int64_t A = nbr_.size(0);
  c10::cuda::CUDAGuard guard(g_.device());
  const Tensor nbr = nbr_.contiguous();
  Tensor out = at::empty({A, C, ci, ci}, g_.options().memory_format(format_of(cl)));
  if (out.numel() == 0) return out;
  const Tensor g = g_.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* nb = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparse_im2col_backward_cuda", [&] {
    if (simple_kernels()) {
      const int64_t n = out.numel();
      col2im_simple_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), nb, out.data_ptr<scalar_t>(), geo(out), k, s, p, n);
    } else {
      const int64_t N = A * ci * ci;
      const int64_t blocks = std::min<int64_t>(N, 65535);
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(C, 32) * 32)));
      col2im_positions_kernel<scalar_t><<<blocks, threads, 0, stream>>>(g.data_ptr<scalar_t>(), nb,
                                                                          out.data_ptr<scalar_t>(), geo(out), k, s,
                                                                          p, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace sparse
}  // namespace sparkct

TORCH_LIBRARY_IMPL(sparkct, CUDA, m) {
  using namespace sparkct::sparse;
  m.impl("sparse_cell_tables", &cell_tables_cuda);
  m.impl("sparse_pack", &pack_cuda);
  m.impl("sparse_unpack", &unpack_cuda);
  m.impl("sparse_unpack_backward", &unpack_backward_cuda);
  m.impl("sparse_halo", &halo_cuda);
  m.impl("sparse_halo_backward", &halo_backward_cuda);
  m.impl("sparse_im2col", &im2col_cuda);
  m.impl("sparse_im2col_backward", &im2col_backward_cuda);
}
