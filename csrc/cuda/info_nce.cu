// CUDA kernels of the fused InfoNCE loss. Schemas: csrc/ops.cpp; maths and geometry (shared with
// the CPU kernels): csrc/info_nce.h; Python face: sparkct/ops/info_nce.py.
//
// Two implementations, both kept:
//  * simple (impl 1, and every fp64 call): one warp per anchor row, one column at a time, a warp
//    dot product, the online LSE of csrc/info_nce.h, fp32 (fp64) accumulation; the backward as a
//    separate row pass and column pass. Obviously correct, slow: the GPU test oracle.
//  * fast (impl 0): 64 x 64 tiles of the similarity matrix, operands in shared memory, the tile
//    GEMM on tensor cores (WMMA: fp16/bf16 operands, or TF32 for fp32 when torch allows TF32) or
//    with exact fp32 FMAs; D is consumed in BK-wide chunks, so any D works. Forward: one fp32 LSE
//    per row, per column split, merged by a small kernel. Backward: recompute each tile from the
//    LSE, turn it into coefficients W, and accumulate W * other_tile (second GEMM) into an fp32
//    gradient for a 128-wide chunk of D; a final kernel applies the normalization's Jacobian.
//    Single-process NT-Xent uses the symmetric form (one pass); the distributed form and a bank
//    that needs a gradient add a column pass (the same kernel with the roles swapped).
// Launches are checked, run on the current stream under a device guard; inputs are made
// contiguous (a copy only for non-contiguous input).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "info_nce.h"
#include "info_nce_host.h"

namespace sparkct {
namespace {

using nce::Geometry;
namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps per block, every kernel below
constexpr int kBM = 64;        // own rows per block (fast kernels)
constexpr int kBN = 64;        // other rows per tile (fast kernels)
constexpr int kDC = 128;       // output D chunk per block (fast backward)
constexpr int kLDS = kBN + 4;  // fp32 similarity tile leading dimension (WMMA: multiple of 4)

enum Kind : int { kRowPass = 0, kColPass = 1, kSymPass = 2 };

// ---- element conversions --------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ double to_f(double x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class S>
__device__ __forceinline__ S from_f(float x) {
  if constexpr (std::is_same_v<S, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<S, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return static_cast<S>(x);
}
template <class S>
__device__ __forceinline__ S from_acc(double x) {
  if constexpr (std::is_same_v<S, double>) return x;
  else return from_f<S>(static_cast<float>(x));
}

// An operand copied to shared memory: as is when the smem type is the element type (tensor-core
// paths), converted to fp32 otherwise (FMA path).
template <class S, class T>
__device__ __forceinline__ S to_smem(T x) {
  if constexpr (std::is_same_v<S, T>) return x;
  else return to_f(x);
}
template <class S>
__device__ __forceinline__ S smem_zero() {
  if constexpr (std::is_same_v<S, float>) return 0.0f;
  else return from_f<S>(0.0f);
}

// ---- views: a matrix made of up to two row segments (z0 then z1), unit stride along D ------------

template <class T>
struct Rows {
  T* p0 = nullptr;
  T* p1 = nullptr;
  int64_t n0 = 0;    // rows in the first segment
  int64_t rows = 0;  // total rows
  int64_t ld = 0;    // row stride of both segments (elements)
  __device__ __forceinline__ T* row(int64_t r) const { return r < n0 ? p0 + r * ld : p1 + (r - n0) * ld; }
};

template <class To, class From>
Rows<To> rows_of(const at::Tensor& a, const at::Tensor& b = at::Tensor()) {
  Rows<To> v;
  v.p0 = reinterpret_cast<To*>(a.data_ptr<From>());
  v.n0 = a.size(0);
  v.rows = a.size(0);
  v.ld = a.size(1);
  if (b.defined()) {
    v.p1 = reinterpret_cast<To*>(b.data_ptr<From>());
    v.rows += b.size(0);
  }
  return v;
}

// fp32/fp64 gradient accumulator of `rows` x D, `splits` partial slices `split_stride` apart.
template <class A>
struct Acc {
  Rows<A> v;
  int64_t split_stride = 0;
  __device__ __forceinline__ A* row(int64_t r, int sp) const { return v.row(r) + sp * split_stride; }
};

// ---- warp helpers ---------------------------------------------------------------------------------

template <class A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Butterfly merge of every lane's (m, s); lse_merge is symmetric, so all lanes agree.
template <class A, class ExpFn>
__device__ __forceinline__ void warp_lse(A& m, A& s, ExpFn ex) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A om = __shfl_xor_sync(0xffffffffu, m, o);
    const A os = __shfl_xor_sync(0xffffffffu, s, o);
    nce::lse_merge(m, s, om, os, ex);
  }
}

template <class T, class A>
__device__ __forceinline__ A warp_dot(const T* x, const T* y, int64_t d, int lane) {
  A acc = 0;
  for (int64_t k = lane; k < d; k += 32) acc += static_cast<A>(to_f(x[k])) * static_cast<A>(to_f(y[k]));
  return warp_sum(acc);
}

// ---- per-row helpers (both implementations) --------------------------------------------------------

// Per row (warp per row): the power of two pw that brings the row into the safe range, the sum of
// squares of the scaled row and its inverse norm (csrc/info_nce.h, "scale safety"). The caller then
// swaps the inputs for their scaled copies (scale_problem).
template <class T, class A>
__global__ void __launch_bounds__(kThreads) norms_kernel(Rows<const T> x, A* sumsq, A* inv, A* pw) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (r >= x.rows) return;
  const T* p = x.row(r);
  A mx = 0;
  for (int64_t k = lane; k < x.ld; k += 32) mx = fmax(mx, fabs(static_cast<A>(to_f(p[k]))));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const A sc = nce::row_pow2_scale(mx);
  A ss = 0;
  for (int64_t k = lane; k < x.ld; k += 32) {
    const A v = static_cast<A>(to_f(p[k])) * sc;
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) {
    sumsq[r] = ss;
    inv[r] = nce::inv_norm(ss, sc);
    pw[r] = sc;
  }
}

// Bank mode: each row's positive logit z0hat_r . z1hat_r / tau.
template <class T, class A>
__global__ void __launch_bounds__(kThreads) bank_pos_logit_kernel(Rows<const T> z0, Rows<const T> z1, const A* inv0,
                                                                  const A* inv1, A inv_tau, A* out) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (r >= z0.rows) return;
  const A d = warp_dot<T, A>(z0.row(r), z1.row(r), z0.ld, lane);
  if (lane == 0) out[r] = nce::logit(d, nce::row_scale(inv0[r], inv_tau), inv1[r]);
}

// Bank mode backward, the positive: G0_r += w inv1 z1_r (into split 0), G1_r = w inv0 z0_r.
template <class T, class A>
__global__ void __launch_bounds__(kThreads) bank_pos_grad_kernel(Rows<const T> z0, Rows<const T> z1, const A* inv0,
                                                                 const A* inv1, const A* pos_logit, const A* lse,
                                                                 Acc<A> g0, Acc<A> g1) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (r >= z0.rows) return;
  const A w = nce::coef_bank_pos(pos_logit[r], lse[r], nce::ExpAccurate{});
  const T* a = z0.row(r);
  const T* b = z1.row(r);
  A* o0 = g0.row(r, 0);
  A* o1 = g1.row(r, 0);
  for (int64_t k = lane; k < z0.ld; k += 32) {
    o0[k] += w * inv1[r] * static_cast<A>(to_f(b[k]));
    o1[k] = w * inv0[r] * static_cast<A>(to_f(a[k]));
  }
}

// dz_r = c (inv_true G_r - beta z'_r) on the scaled rows z' (csrc/info_nce.h), G_r summed over the
// splits, c = grad * scale; warp per row.
// `out` may alias G (fp32, one split): each element is read before the same lane writes it.
template <class T, class A>
__global__ void __launch_bounds__(kThreads) finalize_kernel(Rows<const T> z, const A* sumsq, const A* inv,
                                                            const A* pw, Acc<A> g, int splits, Rows<T> out,
                                                            const A* grad, A scale) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (r >= z.rows) return;
  const T* zr = z.row(r);
  const int64_t d = z.ld;
  A xg = 0;
  for (int64_t k = lane; k < d; k += 32) {
    A gk = 0;
    for (int sp = 0; sp < splits; ++sp) gk += g.row(r, sp)[k];
    xg += static_cast<A>(to_f(zr[k])) * gk;
  }
  xg = warp_sum(xg);
  const A iv = inv[r], sc = pw[r];
  const A beta = nce::norm_grad_beta(iv, xg, nce::norm_clamped(sumsq[r], sc), sc);
  const A ivt = nce::norm_grad_inv(iv, sc);
  const A c = grad[0] * scale;
  T* o = out.row(r);
  for (int64_t k = lane; k < d; k += 32) {
    A gk = 0;
    for (int sp = 0; sp < splits; ++sp) gk += g.row(r, sp)[k];
    o[k] = from_acc<T>(c * (ivt * gk - beta * static_cast<A>(to_f(zr[k]))));
  }
}

// ---- the simple kernels --------------------------------------------------------------------------

template <class T, class A>
__global__ void __launch_bounds__(kThreads) simple_forward_kernel(Rows<const T> rows, Rows<const T> cols,
                                                                  const A* inv_r, const A* inv_c, Geometry g,
                                                                  A inv_tau, const A* pos_init, A* lse, A* pos) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (r >= rows.rows) return;
  const nce::ExpAccurate ex;
  A m = nce::neg_inf<A>(), s = 0;
  A p = 0;
  if (pos_init) {
    p = pos_init[r];
    nce::lse_add(m, s, p, ex);
  }
  const A sc = nce::row_scale(inv_r[r], inv_tau);
  for (int64_t c = 0; c < cols.rows; ++c) {
    if (nce::is_self(g, r, c)) continue;
    const A l = nce::logit(warp_dot<T, A>(rows.row(r), cols.row(c), rows.ld, lane), sc, inv_c[c]);
    if (nce::is_pos(g, r, c)) p = l;
    nce::lse_add(m, s, l, ex);
  }
  if (lane == 0) {
    lse[r] = nce::lse_final(m, s);
    pos[r] = p;
  }
}

// Row pass (G over rows, sum over columns) or column pass (G over columns, sum over rows), one
// warp per output row, G += w * other_row straight in global memory (lane k owns element k).
template <class T, class A>
__global__ void __launch_bounds__(kThreads) simple_grad_kernel(Rows<const T> rows, Rows<const T> cols,
                                                               const A* inv_r, const A* inv_c, const A* lse,
                                                               Geometry g, A inv_tau, bool col_pass, Acc<A> G) {
  const int lane = threadIdx.x & 31;
  const int64_t a = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const Rows<const T>& own = col_pass ? cols : rows;
  const Rows<const T>& other = col_pass ? rows : cols;
  if (a >= own.rows) return;
  const nce::ExpAccurate ex;
  A* ga = G.row(a, 0);
  for (int64_t o = 0; o < other.rows; ++o) {
    const int64_t r = col_pass ? o : a, c = col_pass ? a : o;
    const A l = nce::logit(warp_dot<T, A>(rows.row(r), cols.row(c), rows.ld, lane),
                           nce::row_scale(inv_r[r], inv_tau), inv_c[c]);
    const A w = nce::coef_row(l, lse[r], nce::is_self(g, r, c), nce::is_pos(g, r, c), ex) *
                (col_pass ? inv_r[r] : inv_c[c]);
    const T* y = other.row(o);
    for (int64_t k = lane; k < rows.ld; k += 32) ga[k] += w * static_cast<A>(to_f(y[k]));
  }
}

// ---- tile GEMM policies for the fast kernels --------------------------------------------------------
// S (64 x 64, fp32 in smem) = A (64 x D) * B (64 x D)^T, D consumed BK at a time; and
// O (64 x 128, registers) += W (64 x 64) * X (64 x 128). Warps tile the outputs 2 x 2.

// Shared-memory geometry of the tensor-core policies (the host sizes shared memory from it).
template <class T>
struct TC16Layout {
  using S = T;  // smem operand type
  static constexpr int BK = 32, LDK = BK + 8, LDW = kBN + 8, LDX = kDC + 8;
  static constexpr bool kSeparateW = true;  // W is converted to T in its own buffer
  // W (in [-2, 2]) is stored times 2^13 and the product unscaled in o_store (both exact: powers of
  // two). Unscaled, fp16 keeps only an absolute step of 6e-8 below 6e-5 and flushes values below
  // 3e-8 to zero, while a negative's coefficient is ~1 / M (at M = 65,536 up to ~0.4 % off).
  // Scaled, W stays a normal fp16 number down to 7e-9, and |W| up to 8 still fits (4x its range).
  // For bf16 (fp32's exponent range) the scaling changes nothing.
  static constexpr float kWScale = 8192.0f;
};
struct TF32Layout {
  using S = float;
  static constexpr int BK = 16, LDK = BK + 4, LDW = kLDS, LDX = kDC + 4;
  static constexpr bool kSeparateW = false;  // W overwrites the fp32 similarity tile in place
  static constexpr float kWScale = 1.0f;     // W stays fp32 (TF32 keeps fp32's exponent range)
};

// WMMA with bf16 / TF32 operands needs sm_80. Device passes for older archs get layout-only stubs;
// the host never launches tensor-core kernels there and their bodies compile to a trap.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SPARKCT_WMMA_OK 1
#else
#define SPARKCT_WMMA_OK 0
#endif

#if SPARKCT_WMMA_OK
// Fragment types of the two tensor-core flavours; fix() turns loaded fp32 values into TF32.
template <class T>
struct TC16Frags {
  using Layout = TC16Layout<T>;
  static constexpr int kStep = 16;  // MMA k per step
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <class F>
  static __device__ __forceinline__ void fix(F&) {}
};
struct TF32Frags {
  using Layout = TF32Layout;
  static constexpr int kStep = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <class F>
  static __device__ __forceinline__ void fix(F& f) {
#pragma unroll
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
};

// Tensor cores (sm_80+): fp16 / bf16 operands, or TF32 from fp32 operands (only when torch
// allows TF32). Warp w computes S rows 32 (w / 2).., columns 32 (w % 2)..; O rows 32 (w / 2)..,
// columns 64 (w % 2)...
template <class F>
struct MmaWmma : F::Layout {
  using L = typename F::Layout;
  using S = typename L::S;
  static constexpr int BK = L::BK, LDK = L::LDK, LDW = L::LDW, LDX = L::LDX, KS = F::kStep;
  using FragA = typename F::FragA;
  using FragBc = typename F::FragBc;
  using FragBr = typename F::FragBr;
  using FragC = typename F::FragC;
  struct SAcc { FragC c[2][2]; };
  struct OAcc { FragC c[2][4]; };

  template <int NI, int NJ>
  static __device__ __forceinline__ void zero(FragC (&c)[NI][NJ]) {
#pragma unroll
    for (int i = 0; i < NI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) wmma::fill_fragment(c[i][j], 0.0f);
  }
  // c[i][j] += A[16 i.., 0:kend] * B[0:kend, 16 j..]; A row-major at a (leading dim lda), the
  // (j, kk) block of B at b_at(j, kk) (leading dim ldb, layout of FB).
  template <class FB, int NI, int NJ, class BAt>
  static __device__ __forceinline__ void mma(FragC (&c)[NI][NJ], const S* a, int lda, int kend, BAt b_at,
                                             int ldb) {
#pragma unroll
    for (int kk = 0; kk < kend; kk += KS) {
      FragA fa[NI];
      FB fb[NJ];
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        wmma::load_matrix_sync(fa[i], a + i * 16 * lda + kk, lda);
        F::fix(fa[i]);
      }
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        wmma::load_matrix_sync(fb[j], b_at(j, kk), ldb);
        F::fix(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
    }
  }

  static __device__ void s_zero(SAcc& acc) { zero(acc.c); }
  // S[64][64] += A[64][BK] * B[64][BK]^T; B as a column-major K x N operand: (k, n) at Bs[n][k].
  static __device__ void s_step(SAcc& acc, const S* As, const S* Bs, int warp) {
    const int wm = warp >> 1, wn = warp & 1;
    mma<FragBc>(acc.c, As + wm * 32 * LDK, LDK, BK,
                [&](int j, int kk) { return Bs + (wn * 32 + j * 16) * LDK + kk; }, LDK);
  }
  static __device__ void s_store(SAcc& acc, float* Ss, int warp) {
    const int wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Ss + (wm * 32 + i * 16) * kLDS + wn * 32 + j * 16, acc.c[i][j], kLDS,
                                wmma::mem_row_major);
  }
  static __device__ void o_zero(OAcc& acc) { zero(acc.c); }
  // O[64][128] += W[64][64] * X[64][128], both row-major in smem.
  static __device__ void o_step(OAcc& acc, const S* Ws, const S* Xs, int warp) {
    const int wm = warp >> 1, wn = warp & 1;
    mma<FragBr>(acc.c, Ws + wm * 32 * LDW, LDW, kBN,
                [&](int j, int kk) { return Xs + kk * LDX + wn * 64 + j * 16; }, LDX);
  }
  // Through a per-warp 16 x 16 staging tile, bounded by own_rows x d.
  static __device__ void o_store(OAcc& acc, float* stage, int warp, int lane, Acc<float> G, int sp, int64_t a0,
                                 int64_t own_rows, int64_t c0, int64_t d) {
    const int wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(stage, acc.c[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t ag = a0 + wm * 32 + i * 16 + e / 16;
          const int64_t k = c0 + wn * 64 + j * 16 + e % 16;
          if (ag < own_rows && k < d) G.row(ag, sp)[k] = stage[e] * (1.0f / L::kWScale);
        }
        __syncwarp();
      }
  }
};
#else
template <class T>
struct TC16Frags {
  using Layout = TC16Layout<T>;
};
struct TF32Frags {
  using Layout = TF32Layout;
};
template <class F>
struct MmaWmma : F::Layout {};
#endif
template <class T>
using MmaTC16 = MmaWmma<TC16Frags<T>>;
using MmaTF32 = MmaWmma<TF32Frags>;

// Exact fp32 FMAs (fp32 without TF32, and any dtype on GPUs older than sm_80). Thread t owns
// S rows 4 (t/8) + i (i < 4), columns t%8 + 8 j (j < 8); O rows t/16 + 8 i (i < 8), columns
// o_col(t%16, j) (j < 8: two float4 runs, 4 (t%16).. and 64 + 4 (t%16)..). Interleaved so that the
// inner loops' shared-memory reads are free of bank conflicts: per instruction a warp reads B rows
// tx + 8 j (word 17 tx + const: 8 distinct banks), W rows ty and ty + 1 (68 words apart: different
// banks) and X as float4 runs that are contiguous per 8 lanes. (Blocked ownership -- rows 8 ty..,
// columns 8 tx.. -- put every W and X read of the backward's second GEMM and every B read of the
// first on 2-way conflicts: W rows 8 apart are 544 = 0 mod 32 words apart. Checked by
// tests/ops/test_info_nce_cuda_emulation.py.)
struct MmaFMA {
  using S = float;
  static constexpr int BK = 16, LDK = BK + 1, LDW = kLDS, LDX = kDC + 4;
  static constexpr bool kSeparateW = false;
  struct SAcc { float c[4][8]; };
  struct OAcc { float c[8][8]; };

  template <int NI, int NJ>
  static __device__ __forceinline__ void zero(float (&c)[NI][NJ]) {
#pragma unroll
    for (int i = 0; i < NI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) c[i][j] = 0.0f;
  }
  // c[i][j] += sum_k a_at(i, k) * b_at(j, k), k < kend.
  template <int NI, int NJ, class AAt, class BAt>
  static __device__ __forceinline__ void fma_tile(float (&c)[NI][NJ], int kend, AAt a_at, BAt b_at) {
#pragma unroll 4
    for (int k = 0; k < kend; ++k) {
      float a[NI], b[NJ];
#pragma unroll
      for (int i = 0; i < NI; ++i) a[i] = a_at(i, k);
#pragma unroll
      for (int j = 0; j < NJ; ++j) b[j] = b_at(j, k);
#pragma unroll
      for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  }

  static __device__ void s_zero(SAcc& acc) { zero(acc.c); }
  static __device__ void s_step(SAcc& acc, const S* As, const S* Bs, int /*warp*/) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    fma_tile(acc.c, BK, [&](int i, int k) { return As[(ty * 4 + i) * LDK + k]; },
             [&](int j, int k) { return Bs[(tx + 8 * j) * LDK + k]; });
  }
  static __device__ void s_store(SAcc& acc, float* Ss, int /*warp*/) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Ss[(ty * 4 + i) * kLDS + tx + 8 * j] = acc.c[i][j];
  }
  static __device__ __forceinline__ int o_col(int tx, int j) { return 4 * tx + 64 * (j / 4) + j % 4; }
  static __device__ void o_zero(OAcc& acc) { zero(acc.c); }
  static __device__ void o_step(OAcc& acc, const S* Ws, const S* Xs, int /*warp*/) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    fma_tile(acc.c, kBN, [&](int i, int k) { return Ws[(ty + 8 * i) * LDW + k]; },
             [&](int j, int k) { return Xs[k * LDX + o_col(tx, j)]; });
  }
  static __device__ void o_store(OAcc& acc, float* /*stage*/, int /*warp*/, int /*lane*/, Acc<float> G, int sp,
                                 int64_t a0, int64_t own_rows, int64_t c0, int64_t d) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t ag = a0 + ty + 8 * i;
      if (ag >= own_rows) continue;
      float* g = G.row(ag, sp);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t k = c0 + o_col(tx, j);
        if (k < d) g[k] = acc.c[i][j];
      }
    }
  }
};

// Shared-memory layout of the fast kernels (byte offsets, each region 128-byte aligned; WMMA
// needs 32-byte aligned fragment pointers).
constexpr int64_t align128(int64_t x) { return (x + 127) / 128 * 128; }

template <class P>
struct Smem {
  using S = typename P::S;
  static constexpr int64_t As = 0;
  static constexpr int64_t Bs = As + align128(int64_t(kBM) * P::LDK * sizeof(S));
  static constexpr int64_t Ss = Bs + align128(int64_t(kBN) * P::LDK * sizeof(S));
  static constexpr int64_t Ws = Ss + align128(int64_t(kBM) * kLDS * sizeof(float));
  static constexpr int64_t Xs = Ws + (P::kSeparateW ? align128(int64_t(kBM) * P::LDW * sizeof(S)) : 0);
  static constexpr int64_t Stage = Xs + align128(int64_t(kBN) * P::LDX * sizeof(S));
  static constexpr int64_t OwnArr = Stage + align128(int64_t(kThreads / 32) * 256 * sizeof(float));
  static constexpr int64_t OtherArr = OwnArr + align128(2 * kBM * sizeof(float));
  static constexpr int64_t GradBytes = OtherArr + align128(2 * kBN * sizeof(float));
  // the forward needs As, Bs, Ss and two small arrays
  static constexpr int64_t FwdOwn = Ws;  // scale_r, running max, running sum: 3 x kBM floats
  static constexpr int64_t FwdOther = FwdOwn + align128(3 * kBM * sizeof(float));
  static constexpr int64_t FwdBytes = FwdOther + align128(kBN * sizeof(float));
};

// Copy a rows x cols tile (cols a compile-time width) of x starting at (row0, k0) into smem with
// leading dimension ld, zero outside x's rows and D.
template <int COLS, class S, class T>
__device__ __forceinline__ void load_tile(S* dst, int ld, const Rows<const T>& x, int64_t row0, int rows, int64_t k0) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < rows * COLS; idx += kThreads) {
    const int r = idx / COLS, k = idx % COLS;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r * ld + k] = (gr < x.rows && gk < x.ld) ? to_smem<S>(x.row(gr)[gk]) : smem_zero<S>();
  }
}
// The same with each row multiplied by scale[r] (the backward's normalized X tile: values in
// [-1, 1], so an fp16 copy neither overflows nor underflows whatever the embeddings' norms).
template <int COLS, class S, class T>
__device__ __forceinline__ void load_tile_scaled(S* dst, int ld, const Rows<const T>& x, int64_t row0, int rows,
                                                 int64_t k0, const float* scale) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < rows * COLS; idx += kThreads) {
    const int r = idx / COLS, k = idx % COLS;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r * ld + k] = (gr < x.rows && gk < x.ld) ? from_f<S>(to_f(x.row(gr)[gk]) * scale[r]) : smem_zero<S>();
  }
}

// WMMA with bf16 / TF32 operands needs sm_80: below it the host only launches the FMA policy, and
// the device pass compiles the tensor-core instantiations down to a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define SPARKCT_TC_DISPATCH(P, CALL) \
  if constexpr (std::is_same_v<P, MmaFMA>) { CALL; } else { __trap(); }
#else
#define SPARKCT_TC_DISPATCH(P, CALL) CALL;
#endif

// Tiles [t_begin, t_end) of the other matrix for split `sp` of `splits`.
__device__ __forceinline__ void split_range(int64_t ntiles, int splits, int sp, int64_t* b, int64_t* e) {
  const int64_t per = (ntiles + splits - 1) / splits;
  *b = std::min<int64_t>(ntiles, sp * per);
  *e = std::min<int64_t>(ntiles, *b + per);
}

// ---- fast forward ---------------------------------------------------------------------------------
// grid (ceil(R / 64), splits). Block: rows [a0, a0 + 64), column tiles of its split; warp w keeps
// the running LSE of rows 16 w .. 16 w + 15; lane l handles tile columns l and l + 32.
template <class T, class P>
__device__ __forceinline__ void fwd_fast_body(Rows<const T> rows, Rows<const T> cols, const float* inv_r,
                                              const float* inv_c, Geometry g, float inv_tau, const float* pos_init,
                                              float* part_m, float* part_s, float* pos) {
  using S = typename P::S;
  using L = Smem<P>;
  extern __shared__ __align__(128) unsigned char smem[];
  S* As = reinterpret_cast<S*>(smem + L::As);
  S* Bs = reinterpret_cast<S*>(smem + L::Bs);
  float* Ss = reinterpret_cast<float*>(smem + L::Ss);
  float* scale_r = reinterpret_cast<float*>(smem + L::FwdOwn);
  float* inv_ct = reinterpret_cast<float*>(smem + L::FwdOther);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int sp = blockIdx.y, splits = gridDim.y;
  const int64_t R = rows.rows, M = cols.rows, D = rows.ld;
  const nce::ExpFast ex;

  for (int a = threadIdx.x; a < kBM; a += kThreads)
    scale_r[a] = (a0 + a < R) ? nce::row_scale(inv_r[a0 + a], inv_tau) : 0.0f;

  // Running (max, sum) of row a lives in smem and is only touched by warp a / 16: every lane
  // computes the same merge (lse_merge is symmetric), lane 0 stores it.
  float* run_m = scale_r + kBM;
  float* run_s = run_m + kBM;
  for (int i = 0; i < 16; ++i) {
    const int a = warp * 16 + i;
    const int64_t ag = a0 + a;
    float m = nce::neg_inf<float>(), s = 0.0f;
    if (pos_init && sp == 0 && ag < R) {
      nce::lse_add(m, s, pos_init[ag], ex);
      if (lane == 0) pos[ag] = pos_init[ag];
    }
    if (lane == 0) {
      run_m[a] = m;
      run_s[a] = s;
    }
  }

  int64_t tb, te;
  split_range((M + kBN - 1) / kBN, splits, sp, &tb, &te);
  typename P::SAcc acc;
  for (int64_t t = tb; t < te; ++t) {
    const int64_t b0 = t * kBN;
    __syncthreads();  // the previous tile's epilogue is done with Ss, inv_ct and the running state
    for (int b = threadIdx.x; b < kBN; b += kThreads) inv_ct[b] = (b0 + b < M) ? inv_c[b0 + b] : 0.0f;
    P::s_zero(acc);
    for (int64_t k0 = 0; k0 < D; k0 += P::BK) {
      __syncthreads();
      load_tile<P::BK>(As, P::LDK, rows, a0, kBM, k0);
      load_tile<P::BK>(Bs, P::LDK, cols, b0, kBN, k0);
      __syncthreads();
      P::s_step(acc, As, Bs, warp);
    }
    P::s_store(acc, Ss, warp);
    __syncthreads();
#pragma unroll 1
    for (int i = 0; i < 16; ++i) {
      const int a = warp * 16 + i;
      const int64_t ag = a0 + a;
      if (ag >= R) break;  // warp-uniform; later rows of this warp are out of range too
      float pm = nce::neg_inf<float>(), ps = 0.0f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int b = lane + 32 * h;
        const int64_t bg = b0 + b;
        if (bg >= M || nce::is_self(g, ag, bg)) continue;
        const float x = nce::logit(Ss[a * kLDS + b], scale_r[a], inv_ct[b]);
        if (nce::is_pos(g, ag, bg)) pos[ag] = x;
        nce::lse_add(pm, ps, x, ex);
      }
      warp_lse(pm, ps, ex);
      float m = run_m[a], s = run_s[a];
      nce::lse_merge(m, s, pm, ps, ex);
      __syncwarp();  // every lane has read the old state before lane 0 replaces it
      if (lane == 0) {
        run_m[a] = m;
        run_s[a] = s;
      }
    }
  }
  __syncthreads();
  for (int a = threadIdx.x; a < kBM; a += kThreads) {
    const int64_t ag = a0 + a;
    if (ag < R) {
      part_m[sp * R + ag] = run_m[a];
      part_s[sp * R + ag] = run_s[a];
    }
  }
}

template <class T, class P>
__global__ void __launch_bounds__(kThreads) fwd_fast_kernel(Rows<const T> rows, Rows<const T> cols,
                                                            const float* inv_r, const float* inv_c, Geometry g,
                                                            float inv_tau, const float* pos_init, float* part_m,
                                                            float* part_s, float* pos) {
  SPARKCT_TC_DISPATCH(P, (fwd_fast_body<T, P>(rows, cols, inv_r, inv_c, g, inv_tau, pos_init, part_m, part_s, pos)))
}

// lse_r = merge of the splits' partials, in split order (deterministic).
__global__ void __launch_bounds__(kThreads) lse_combine_kernel(const float* part_m, const float* part_s, int splits,
                                                               int64_t R, float* lse) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= R) return;
  float m = nce::neg_inf<float>(), s = 0.0f;
  for (int sp = 0; sp < splits; ++sp) nce::lse_merge(m, s, part_m[sp * R + r], part_s[sp * R + r], nce::ExpFast{});
  lse[r] = nce::lse_final(m, s);
}

// ---- fast backward --------------------------------------------------------------------------------
// grid (ceil(own / 64), ceil(D / 128), splits). Block: own rows [a0, a0 + 64), output columns
// [c0, c0 + 128) of D, the other tiles of its split. Per tile: S = own * other^T (all of D),
// W = coefficients (csrc/info_nce.h, in [-2, 2]), O += W * other_hat[:, c0:c0+128] with the
// normalized other rows. O -> G slice sp.
template <class T, class P, int KIND>
__device__ __forceinline__ void grad_fast_body(Rows<const T> own, Rows<const T> other, const float* inv_o,
                                               const float* inv_x, const float* lse_o, const float* lse_x,
                                               Geometry g, float inv_tau, Acc<float> G) {
  using S = typename P::S;
  using L = Smem<P>;
  extern __shared__ __align__(128) unsigned char smem[];
  S* As = reinterpret_cast<S*>(smem + L::As);
  S* Bs = reinterpret_cast<S*>(smem + L::Bs);
  float* Ss = reinterpret_cast<float*>(smem + L::Ss);
  S* Ws = P::kSeparateW ? reinterpret_cast<S*>(smem + L::Ws) : reinterpret_cast<S*>(Ss);
  S* Xs = reinterpret_cast<S*>(smem + L::Xs);
  float* stage = reinterpret_cast<float*>(smem + L::Stage);
  float* scale_o = reinterpret_cast<float*>(smem + L::OwnArr);
  float* lse_ot = scale_o + kBM;
  float* inv_xt = reinterpret_cast<float*>(smem + L::OtherArr);
  float* lse_xt = inv_xt + kBN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kDC;
  const int sp = blockIdx.z, splits = gridDim.z;
  const int64_t RO = own.rows, RX = other.rows, D = own.ld;
  const nce::ExpFast ex;

  for (int a = threadIdx.x; a < kBM; a += kThreads) {
    const bool ok = a0 + a < RO;
    scale_o[a] = ok ? nce::row_scale(inv_o[a0 + a], inv_tau) : 0.0f;
    lse_ot[a] = (ok && lse_o) ? lse_o[a0 + a] : 0.0f;
  }

  typename P::OAcc oacc;
  P::o_zero(oacc);
  typename P::SAcc sacc;
  int64_t tb, te;
  split_range((RX + kBN - 1) / kBN, splits, sp, &tb, &te);
  for (int64_t t = tb; t < te; ++t) {
    const int64_t b0 = t * kBN;
    // Every reader of inv_xt / lse_xt (the previous epilogue) has passed the barrier before o_step.
    for (int b = threadIdx.x; b < kBN; b += kThreads) {
      const bool ok = b0 + b < RX;
      inv_xt[b] = ok ? inv_x[b0 + b] : 0.0f;
      lse_xt[b] = (ok && lse_x) ? lse_x[b0 + b] : 0.0f;
    }
    P::s_zero(sacc);
    for (int64_t k0 = 0; k0 < D; k0 += P::BK) {
      __syncthreads();  // also: the previous tile's o_step is done with Ws / Xs / Ss
      load_tile<P::BK>(As, P::LDK, own, a0, kBM, k0);
      load_tile<P::BK>(Bs, P::LDK, other, b0, kBN, k0);
      __syncthreads();
      P::s_step(sacc, As, Bs, warp);
    }
    P::s_store(sacc, Ss, warp);
    __syncthreads();
    // W, element by element; each element is read and written by the same thread (in place when
    // Ws aliases Ss). Rows / columns outside the problem get 0 (their S is 0, their exp is not).
#pragma unroll 2
    for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
      const int a = idx / kBN, b = idx % kBN;
      const int64_t ag = a0 + a, bg = b0 + b;
      float w = 0.0f;
      if (ag < RO && bg < RX) {
        const float l = nce::logit(Ss[a * kLDS + b], scale_o[a], inv_xt[b]);
        if constexpr (KIND == kRowPass) {
          w = nce::coef_row(l, lse_ot[a], nce::is_self(g, ag, bg), nce::is_pos(g, ag, bg), ex);
        } else if constexpr (KIND == kColPass) {
          w = nce::coef_row(l, lse_xt[b], nce::is_self(g, bg, ag), nce::is_pos(g, bg, ag), ex);
        } else {
          w = nce::coef_sym(l, lse_ot[a], lse_xt[b], nce::is_self(g, ag, bg), nce::is_pos(g, ag, bg), ex);
        }
      }
      if constexpr (P::kSeparateW) Ws[a * P::LDW + b] = from_f<S>(w * P::kWScale);
      else Ss[a * kLDS + b] = w;
    }
    load_tile_scaled<kDC>(Xs, P::LDX, other, b0, kBN, c0, inv_xt);  // other_hat = other * inv
    __syncthreads();
    P::o_step(oacc, Ws, Xs, warp);
  }
  P::o_store(oacc, stage + warp * 256, warp, lane, G, sp, a0, RO, c0, D);
}

template <class T, class P, int KIND>
__global__ void __launch_bounds__(kThreads) grad_fast_kernel(Rows<const T> own, Rows<const T> other,
                                                             const float* inv_o, const float* inv_x,
                                                             const float* lse_o, const float* lse_x, Geometry g,
                                                             float inv_tau, Acc<float> G) {
  SPARKCT_TC_DISPATCH(P, (grad_fast_body<T, P, KIND>(own, other, inv_o, inv_x, lse_o, lse_x, g, inv_tau, G)))
}

// ---- host side --------------------------------------------------------------------------------------

inline int blocks_for_rows(int64_t rows) {
  return static_cast<int>((rows + kThreads / 32 - 1) / (kThreads / 32));  // warp per row
}

enum class Path { kTC16, kTF32, kFMA };

Path pick_path(at::ScalarType t, bool allow_tf32) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const bool sm80 = prop->major >= 8;
  if (t == at::kFloat) return (allow_tf32 && sm80) ? Path::kTF32 : Path::kFMA;
  return sm80 ? Path::kTC16 : Path::kFMA;
}

template <class K>
void prepare_smem(K kernel, int64_t bytes) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= static_cast<int64_t>(prop->sharedMemPerBlockOptin), "info_nce: kernel needs ", bytes,
              " bytes of shared memory, the device offers ", prop->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Column splits so that small batches still fill the GPU: about 4 blocks per SM in total.
int pick_splits(int64_t blocks, int64_t ntiles, int64_t cap) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t s = (4 * sms + blocks - 1) / std::max<int64_t>(blocks, 1);
  s = std::max<int64_t>(1, std::min({s, ntiles, cap, int64_t(64)}));
  return static_cast<int>(s);
}

struct Problem {
  at::Tensor z0, z1, cols, bank;  // contiguous
  bool is_bank = false, single = false;
  Geometry g;
  int64_t R = 0, M = 0, D = 0;
};

Problem make_problem(const at::Tensor& z0, const at::Tensor& z1, const c10::optional<at::Tensor>& cols,
                     const c10::optional<at::Tensor>& bank, int64_t col_offset) {
  Problem p;
  p.z0 = z0.detach().contiguous();
  p.z1 = z1.detach().contiguous();
  p.D = z0.size(1);
  if (bank.has_value()) {
    p.is_bank = true;
    p.bank = bank->detach().contiguous();
    p.R = z0.size(0);
    p.M = p.bank.size(0);
  } else {
    p.g.pair = true;
    p.g.n = z0.size(0);
    p.R = 2 * z0.size(0);
    if (cols.has_value()) {
      p.cols = cols->detach().contiguous();
      p.g.offset = col_offset;
      p.M = p.cols.size(0);
    } else {
      p.single = true;
      p.M = p.R;
    }
  }
  return p;
}

template <class T, class From>
Rows<const T> rows_view(const Problem& p) {
  return p.is_bank ? rows_of<const T, From>(p.z0) : rows_of<const T, From>(p.z0, p.z1);
}
template <class T, class From>
Rows<const T> cols_view(const Problem& p) {
  if (p.is_bank) return rows_of<const T, From>(p.bank);
  if (p.single) return rows_of<const T, From>(p.z0, p.z1);
  return rows_of<const T, From>(p.cols);
}

template <class T, class A>
void launch_norms(Rows<const T> x, at::Tensor& sumsq, at::Tensor& inv, at::Tensor& pw, cudaStream_t st) {
  if (x.rows == 0) return;
  norms_kernel<T, A><<<blocks_for_rows(x.rows), kThreads, 0, st>>>(x, sumsq.data_ptr<A>(), inv.data_ptr<A>(),
                                                                   pw.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Scale safety (csrc/info_nce.h): row x becomes x' = pw x, the power of two the norms kernel chose.
// fp16 rows always get pw = 1 (|x| in [2^-24, 2^16]) and are used as they are; other dtypes get a
// copy (a multiply by 1 for ordinary rows): choosing on the host would cost a device sync.
at::Tensor scaled_rows(const at::Tensor& t, const at::Tensor& pw) {
  if (t.scalar_type() == at::kHalf || t.numel() == 0) return t;
  return at::mul(t, pw.unsqueeze(1)).to(t.scalar_type()).contiguous();
}
// pw_r over the rows ([z0; z1], or z0 with a bank), pw_c over gathered columns or the bank. In bank
// mode z1 has norms of its own and is scaled by the caller.
void scale_problem(Problem& p, const at::Tensor& pw_r, const at::Tensor& pw_c) {
  const int64_t n = p.z0.size(0);
  p.z0 = scaled_rows(p.z0, pw_r.narrow(0, 0, n));
  if (p.is_bank) {
    p.bank = scaled_rows(p.bank, pw_c);
    return;
  }
  p.z1 = scaled_rows(p.z1, pw_r.narrow(0, n, n));
  if (!p.single) p.cols = scaled_rows(p.cols, pw_c);
}

// Forward for element type T (CUDA type) whose ATen type is From; A the accumulation type.
template <class T, class From, class A>
void forward_impl(Problem p, double temperature, bool allow_tf32, int64_t impl, at::Tensor& lse,
                  at::Tensor& pos) {
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  const auto opt = p.z0.options().dtype(c10::CppTypeToScalarType<A>::value);
  const A inv_tau = static_cast<A>(1.0 / temperature);
  Rows<const T> rv = rows_view<T, From>(p), cv = cols_view<T, From>(p);
  at::Tensor ss_r = at::empty({p.R}, opt), inv_r = at::empty({p.R}, opt), pw_r = at::empty({p.R}, opt);
  launch_norms<T, A>(rv, ss_r, inv_r, pw_r, st);
  at::Tensor ss_c = ss_r, inv_c = inv_r, pw_c = pw_r;
  if (!p.single) {
    ss_c = at::empty({p.M}, opt);
    inv_c = at::empty({p.M}, opt);
    pw_c = at::empty({p.M}, opt);
    launch_norms<T, A>(cv, ss_c, inv_c, pw_c, st);
  }
  scale_problem(p, pw_r, pw_c);
  rv = rows_view<T, From>(p);
  cv = cols_view<T, From>(p);
  at::Tensor pos_init;
  if (p.is_bank) {
    at::Tensor ss1 = at::empty({p.R}, opt), inv1 = at::empty({p.R}, opt), pw1 = at::empty({p.R}, opt);
    launch_norms<T, A>(rows_of<const T, From>(p.z1), ss1, inv1, pw1, st);
    p.z1 = scaled_rows(p.z1, pw1);
    const Rows<const T> z1v = rows_of<const T, From>(p.z1);
    pos_init = at::empty({p.R}, opt);
    bank_pos_logit_kernel<T, A><<<blocks_for_rows(p.R), kThreads, 0, st>>>(
        rv, z1v, inv_r.data_ptr<A>(), inv1.data_ptr<A>(), inv_tau, pos_init.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const A* pi = pos_init.defined() ? pos_init.data_ptr<A>() : nullptr;
  if (impl == 1 || std::is_same_v<A, double>) {
    simple_forward_kernel<T, A><<<blocks_for_rows(p.R), kThreads, 0, st>>>(
        rv, cv, inv_r.data_ptr<A>(), inv_c.data_ptr<A>(), p.g, inv_tau, pi, lse.data_ptr<A>(), pos.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if constexpr (std::is_same_v<A, float>) {
    const int64_t nblk = (p.R + kBM - 1) / kBM, ntiles = (p.M + kBN - 1) / kBN;
    const int splits = pick_splits(nblk, ntiles, 64);
    at::Tensor part = at::empty({2, splits, p.R}, opt);
    float* pm = part.data_ptr<float>();
    float* ps = pm + splits * p.R;
    const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(splits));
    auto launch = [&](auto kernel, int64_t bytes) {
      prepare_smem(kernel, bytes);
      kernel<<<grid, kThreads, bytes, st>>>(rv, cv, inv_r.data_ptr<float>(), inv_c.data_ptr<float>(), p.g,
                                            static_cast<float>(inv_tau), pi, pm, ps, pos.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const Path path = pick_path(p.z0.scalar_type(), allow_tf32);
    if constexpr (std::is_same_v<T, float>) {
      if (path == Path::kTF32) launch(fwd_fast_kernel<T, MmaTF32>, Smem<MmaTF32>::FwdBytes);
      else launch(fwd_fast_kernel<T, MmaFMA>, Smem<MmaFMA>::FwdBytes);
    } else {
      if (path == Path::kTC16) launch(fwd_fast_kernel<T, MmaTC16<T>>, Smem<MmaTC16<T>>::FwdBytes);
      else launch(fwd_fast_kernel<T, MmaFMA>, Smem<MmaFMA>::FwdBytes);
    }
    lse_combine_kernel<<<static_cast<unsigned>((p.R + kThreads - 1) / kThreads), kThreads, 0, st>>>(
        pm, ps, splits, p.R, lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> info_nce_cuda(const at::Tensor& z0, const at::Tensor& z1,
                                                 const c10::optional<at::Tensor>& cols,
                                                 const c10::optional<at::Tensor>& bank, double temperature,
                                                 int64_t col_offset, bool allow_tf32, int64_t impl) {
  nce::check_inputs(z0, z1, cols, bank, temperature, col_offset, impl);
  const c10::cuda::CUDAGuard guard(z0.device());
  const Problem p = make_problem(z0, z1, cols, bank, col_offset);
  const auto ct = nce::acc_type(z0.scalar_type());
  at::Tensor lse = at::empty({p.R}, z0.options().dtype(ct));
  at::Tensor pos = at::empty({p.R}, z0.options().dtype(ct));
  switch (z0.scalar_type()) {
    case at::kFloat: forward_impl<float, float, float>(p, temperature, allow_tf32, impl, lse, pos); break;
    case at::kDouble: forward_impl<double, double, double>(p, temperature, allow_tf32, impl, lse, pos); break;
    case at::kHalf: forward_impl<__half, at::Half, float>(p, temperature, allow_tf32, impl, lse, pos); break;
    case at::kBFloat16:
      forward_impl<__nv_bfloat16, at::BFloat16, float>(p, temperature, allow_tf32, impl, lse, pos);
      break;
    default: TORCH_CHECK(false, "info_nce: unsupported dtype ", z0.scalar_type());
  }
  // mean over rows of (lse - positive logit), in fp64, then the input dtype
  at::Tensor loss = (lse.to(at::kDouble) - pos.to(at::kDouble)).sum().div(static_cast<double>(p.R)).to(z0.scalar_type());
  return {loss, lse};
}

// Backward for one dtype. G accumulators: fp32 slices (fast) or fp32/fp64 (simple); written
// straight into the fp32 outputs when there is one slice.
template <class T, class From, class A>
void backward_impl(Problem p, const at::Tensor& grad, const at::Tensor& lse, double temperature,
                   bool want_other, bool allow_tf32, int64_t impl, at::Tensor& dz0, at::Tensor& dz1,
                   at::Tensor& dother) {
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  const auto opt = p.z0.options().dtype(c10::CppTypeToScalarType<A>::value);
  const A inv_tau = static_cast<A>(1.0 / temperature);
  const A scale = static_cast<A>(1.0 / (static_cast<double>(p.R) * temperature));
  const at::Tensor g = grad.detach().reshape({1}).to(opt.dtype());
  const at::Tensor lse_c = lse.contiguous();
  const A* l = lse_c.data_ptr<A>();
  Rows<const T> rv = rows_view<T, From>(p), cv = cols_view<T, From>(p);
  at::Tensor ss_r = at::empty({p.R}, opt), inv_r = at::empty({p.R}, opt), pw_r = at::empty({p.R}, opt);
  launch_norms<T, A>(rv, ss_r, inv_r, pw_r, st);
  at::Tensor ss_c = ss_r, inv_c = inv_r, pw_c = pw_r;
  if (!p.single) {
    ss_c = at::empty({p.M}, opt);
    inv_c = at::empty({p.M}, opt);
    pw_c = at::empty({p.M}, opt);
    launch_norms<T, A>(cv, ss_c, inv_c, pw_c, st);
  }
  scale_problem(p, pw_r, pw_c);
  rv = rows_view<T, From>(p);
  cv = cols_view<T, From>(p);
  const bool simple = impl == 1 || std::is_same_v<A, double>;
  if (simple) {  // the simple kernels accumulate (+=), also when the output is the accumulator
    dz0.zero_();
    dz1.zero_();
    dother.zero_();
  }
  const int64_t D = p.D;
  const int64_t dchunks = (D + kDC - 1) / kDC;
  // gridDim.y of the fast backward (D chunks) is limited to 65535
  TORCH_CHECK(simple || dchunks <= 65535, "info_nce_backward: D = ", D, " exceeds the CUDA kernels' limit of ",
              int64_t(65535) * kDC);

  // Own rows: [z0; z1] (pair) or z0 (bank). Outputs as row views.
  Rows<T> out_rows = p.is_bank ? rows_of<T, From>(dz0) : rows_of<T, From>(dz0, dz1);
  // An accumulator over `rows` rows with `splits` slices: the fp32 output itself when possible.
  auto make_acc = [&](int64_t rows, int splits, Rows<T> out, at::Tensor& keep) {
    Acc<A> acc;
    if constexpr (std::is_same_v<T, A>) {
      if (splits == 1) {
        acc.v = out;
        keep = at::Tensor();
        return acc;
      }
    }
    keep = (simple ? at::zeros({splits, rows, D}, opt) : at::empty({splits, rows, D}, opt));
    acc.v = rows_of<A, A>(keep.view({splits * rows, D}));
    acc.v.rows = rows;
    acc.split_stride = rows * D;
    return acc;
  };
  auto fast_splits = [&](int64_t own_rows, int64_t other_rows) {
    const int64_t blocks = ((own_rows + kBM - 1) / kBM) * dchunks;
    const int64_t cap = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, own_rows * D * 4));
    return pick_splits(blocks, (other_rows + kBN - 1) / kBN, cap);
  };

  auto grad_pass = [&](int kind, const Rows<const T>& own, const Rows<const T>& other, const A* inv_o,
                       const A* inv_x, const A* lse_o, const A* lse_x, Acc<A> G, int splits) {
    if (own.rows == 0) return;  // an empty bank's column pass
    if (simple) {
      // the simple kernel indexes by (rows, cols) and a flag
      const bool col_pass = kind == kColPass;
      simple_grad_kernel<T, A><<<blocks_for_rows(own.rows), kThreads, 0, st>>>(
          rv, cv, inv_r.data_ptr<A>(), inv_c.data_ptr<A>(), l, p.g, inv_tau, col_pass, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if constexpr (std::is_same_v<A, float>) {
      const dim3 grid(static_cast<unsigned>((own.rows + kBM - 1) / kBM), static_cast<unsigned>(dchunks),
                      static_cast<unsigned>(splits));
      auto launch = [&](auto kernel, int64_t bytes) {
        prepare_smem(kernel, bytes);
        kernel<<<grid, kThreads, bytes, st>>>(own, other, inv_o, inv_x, lse_o, lse_x, p.g, inv_tau, G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      auto by_kind = [&](auto policy) {
        using P = decltype(policy);
        if (kind == kRowPass) launch(grad_fast_kernel<T, P, kRowPass>, Smem<P>::GradBytes);
        else if (kind == kColPass) launch(grad_fast_kernel<T, P, kColPass>, Smem<P>::GradBytes);
        else launch(grad_fast_kernel<T, P, kSymPass>, Smem<P>::GradBytes);
      };
      const Path path = pick_path(p.z0.scalar_type(), allow_tf32);
      if constexpr (std::is_same_v<T, float>) {
        if (path == Path::kTF32) by_kind(MmaTF32{});
        else by_kind(MmaFMA{});
      } else {
        if (path == Path::kTC16) by_kind(MmaTC16<T>{});
        else by_kind(MmaFMA{});
      }
    }
  };

  const A* ir = inv_r.data_ptr<A>();
  const A* ic = inv_c.data_ptr<A>();
  at::Tensor keep_r, keep_c, keep_1;
  const int splits_r = simple ? 1 : fast_splits(p.R, p.M);
  Acc<A> Gr = make_acc(p.R, splits_r, out_rows, keep_r);
  if (p.single) {
    if (simple) {  // row pass + column pass into the same accumulator
      grad_pass(kRowPass, rv, cv, ir, ic, l, nullptr, Gr, 1);
      grad_pass(kColPass, cv, rv, ic, ir, nullptr, l, Gr, 1);
    } else {
      grad_pass(kSymPass, rv, rv, ir, ir, l, l, Gr, splits_r);
    }
  } else {
    grad_pass(kRowPass, rv, cv, ir, ic, l, nullptr, Gr, splits_r);
  }
  // bank mode: z1 gets only the positive's term; z0 gets it added to split 0
  Rows<const T> z1v;
  at::Tensor ss1, inv1, pw1;
  Acc<A> G1;
  if (p.is_bank) {
    ss1 = at::empty({p.R}, opt);
    inv1 = at::empty({p.R}, opt);
    pw1 = at::empty({p.R}, opt);
    launch_norms<T, A>(rows_of<const T, From>(p.z1), ss1, inv1, pw1, st);
    p.z1 = scaled_rows(p.z1, pw1);
    z1v = rows_of<const T, From>(p.z1);
    at::Tensor pl = at::empty({p.R}, opt);
    bank_pos_logit_kernel<T, A><<<blocks_for_rows(p.R), kThreads, 0, st>>>(rv, z1v, ir, inv1.data_ptr<A>(), inv_tau,
                                                                         pl.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    G1 = make_acc(p.R, 1, rows_of<T, From>(dz1), keep_1);
    bank_pos_grad_kernel<T, A><<<blocks_for_rows(p.R), kThreads, 0, st>>>(rv, z1v, ir, inv1.data_ptr<A>(),
                                                                        pl.data_ptr<A>(), l, Gr, G1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_kernel<T, A><<<blocks_for_rows(p.R), kThreads, 0, st>>>(rv, ss_r.data_ptr<A>(), ir, pw_r.data_ptr<A>(), Gr,
                                                                  splits_r, out_rows, g.data_ptr<A>(), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.is_bank) {
    finalize_kernel<T, A><<<blocks_for_rows(p.R), kThreads, 0, st>>>(z1v, ss1.data_ptr<A>(), inv1.data_ptr<A>(),
                                                                    pw1.data_ptr<A>(), G1, 1, rows_of<T, From>(dz1),
                                                                    g.data_ptr<A>(), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (want_other && p.M > 0) {
    const int splits_c = simple ? 1 : fast_splits(p.M, p.R);
    Rows<T> out_c = rows_of<T, From>(dother);
    Acc<A> Gc = make_acc(p.M, splits_c, out_c, keep_c);
    grad_pass(kColPass, cv, rv, ic, ir, nullptr, l, Gc, splits_c);
    finalize_kernel<T, A><<<blocks_for_rows(p.M), kThreads, 0, st>>>(cv, ss_c.data_ptr<A>(), ic, pw_c.data_ptr<A>(),
                                                                    Gc, splits_c, out_c, g.data_ptr<A>(), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cuda(
    const at::Tensor& grad, const at::Tensor& z0, const at::Tensor& z1, const c10::optional<at::Tensor>& cols,
    const c10::optional<at::Tensor>& bank, const at::Tensor& lse, double temperature, int64_t col_offset,
    bool other_grad, bool allow_tf32, int64_t impl) {
  nce::check_inputs(z0, z1, cols, bank, temperature, col_offset, impl);
  nce::check_backward(grad, lse, z0, nce::num_rows(z0, bank));
  const c10::cuda::CUDAGuard guard(z0.device());
  const Problem p = make_problem(z0, z1, cols, bank, col_offset);
  const bool want_other = other_grad && !p.single;
  at::Tensor dz0 = at::empty_like(z0, at::MemoryFormat::Contiguous);
  at::Tensor dz1 = at::empty_like(z1, at::MemoryFormat::Contiguous);
  at::Tensor dother = want_other ? at::empty_like(p.is_bank ? p.bank : p.cols, at::MemoryFormat::Contiguous)
                                 : at::empty({0}, z0.options());
  switch (z0.scalar_type()) {
    case at::kFloat:
      backward_impl<float, float, float>(p, grad, lse, temperature, want_other, allow_tf32, impl, dz0, dz1, dother);
      break;
    case at::kDouble:
      backward_impl<double, double, double>(p, grad, lse, temperature, want_other, allow_tf32, impl, dz0, dz1,
                                            dother);
      break;
    case at::kHalf:
      backward_impl<__half, at::Half, float>(p, grad, lse, temperature, want_other, allow_tf32, impl, dz0, dz1,
                                             dother);
      break;
    case at::kBFloat16:
      backward_impl<__nv_bfloat16, at::BFloat16, float>(p, grad, lse, temperature, want_other, allow_tf32, impl, dz0,
                                                        dz1, dother);
      break;
    default: TORCH_CHECK(false, "info_nce_backward: unsupported dtype ", z0.scalar_type());
  }
  return {dz0, dz1, dother};
}

}  // namespace
}  // namespace sparkct

TORCH_LIBRARY_IMPL(sparkct, CUDA, m) {
  m.impl("info_nce", &sparkct::info_nce_cuda);
  m.impl("info_nce_backward", &sparkct::info_nce_backward_cuda);
}
