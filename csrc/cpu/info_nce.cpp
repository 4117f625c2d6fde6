// CPU kernels of the fused InfoNCE loss. Schemas: csrc/ops.cpp; maths and geometry:
// csrc/info_nce.h; Python face: sparkct/ops/info_nce.py.
//
// Fast path (impl 0): at::parallel_for over blocks of "own" rows; for each block of "other" rows
// one BLAS GEMM into a per-thread fp32 tile (S = own_blk * other_blk^T), a vectorized epilogue
// (scale to logits, online log-sum-exp, or backward coefficients), and in the backward a second
// GEMM G_own += W * other_blk. Nothing larger than a tile is ever formed; scratch is O(tile)
// per thread plus O(rows) for norms/LSE and, in the backward, the fp32 gradient accumulator
// (rows x D, the size of the gradient itself). fp16/bf16 inputs get an fp32 copy (rows x D).
//
// Simple path (impl 1): one anchor at a time, one column at a time, plain loops over D, the row
// and column passes written out separately (no symmetric fusion): a second oracle for the fast
// path and the CPU twin of the simple CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "info_nce.h"
#include "info_nce_host.h"

namespace sparkct {
namespace {

using nce::Geometry;

constexpr int64_t kOwnBlock = 128;    // rows of a tile (the block a thread owns)
constexpr int64_t kOtherBlock = 256;  // columns of a tile

// Hot epilogue loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time,
// so the wheel runs anywhere and still vectorizes exp (ATen does the same via its DispatchStub).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARKCT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#define SPARKCT_INLINE __attribute__((always_inline)) inline
#else
#define SPARKCT_CLONES
#define SPARKCT_INLINE inline
#endif

// ---- matrices given as up to two row segments (pair mode: z0 then z1) -------------------------

struct Mat {
  at::Tensor seg[2];  // contiguous, compute dtype (float or double)
  int64_t start[2] = {0, 0};
  int nseg = 0;
  int64_t rows = 0;
  int64_t dim = 0;

  void add(const at::Tensor& t) {
    seg[nseg] = t;
    start[nseg] = rows;
    rows += t.size(0);
    dim = t.size(1);
    ++nseg;
  }
  // Row r's data (global index).
  template <class T>
  const T* row(int64_t r) const {
    const int s = (nseg > 1 && r >= start[1]) ? 1 : 0;
    return seg[s].data_ptr<T>() + (r - start[s]) * dim;
  }
};

struct Block {
  int seg;
  int64_t local;   // first row inside the segment
  int64_t global;  // first row in the matrix
  int64_t len;
};

std::vector<Block> blocks_of(const Mat& m, int64_t bs) {
  std::vector<Block> out;
  for (int s = 0; s < m.nseg; ++s) {
    const int64_t n = m.seg[s].size(0);
    for (int64_t i = 0; i < n; i += bs) out.push_back({s, i, m.start[s] + i, std::min(bs, n - i)});
  }
  return out;
}

at::Tensor block_view(const Mat& m, const Block& b) { return m.seg[b.seg].narrow(0, b.local, b.len); }

// Per-row normalization data (compute dtype): sum of squares of the scaled row x' = p x, inv' =
// 1 / max(||x'||, eps p) and the power of two p (csrc/info_nce.h, "scale safety").
struct RowNorms {
  at::Tensor sumsq, inv, p;
};

// Largest |x| and sum of squares per row in one pass.
template <class T>
void row_stats(const Mat& m, T* maxabs, T* sumsq) {
  const int64_t d = m.dim;
  at::parallel_for(0, m.rows, 256, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* x = m.row<T>(r);
      T acc = 0, mx = 0;
#pragma omp simd reduction(+ : acc) reduction(max : mx)
      for (int64_t k = 0; k < d; ++k) {
        const T a = x[k] < 0 ? -x[k] : x[k];
        acc += x[k] * x[k];
        mx = a > mx ? a : mx;
      }
      // a NaN anywhere: keep it visible to row_pow2_scale (which then leaves the row alone)
      sumsq[r] = acc;
      maxabs[r] = acc != acc ? acc : mx;
    }
  });
}

// Norms of m's rows; segments holding rows outside the safe range are replaced by scaled copies
// (x' = p x, exact), so nothing is copied for ordinary inputs.
template <class T>
RowNorms normalize_rows(Mat& m) {
  RowNorms out;
  const auto opt = m.seg[0].options();
  out.sumsq = at::empty({m.rows}, opt);
  out.p = at::empty({m.rows}, opt);
  at::Tensor maxabs = at::empty({m.rows}, opt);
  T* ss = out.sumsq.data_ptr<T>();
  T* p = out.p.data_ptr<T>();
  const T* mx = maxabs.data_ptr<T>();
  row_stats<T>(m, maxabs.data_ptr<T>(), ss);
  for (int s = 0; s < m.nseg; ++s) {
    const int64_t n = m.seg[s].size(0), r0 = m.start[s];
    bool scaled = false;
    for (int64_t r = r0; r < r0 + n; ++r) {
      p[r] = nce::row_pow2_scale<T>(mx[r]);
      scaled = scaled || p[r] != T(1);
    }
    if (!scaled) continue;
    m.seg[s] = (m.seg[s] * out.p.narrow(0, r0, n).unsqueeze(1)).contiguous();
    Mat one;
    one.add(m.seg[s]);
    at::Tensor tmp = at::empty({n}, opt);
    row_stats<T>(one, tmp.data_ptr<T>(), ss + r0);
  }
  out.inv = at::empty_like(out.sumsq);
  T* iv = out.inv.data_ptr<T>();
  for (int64_t r = 0; r < m.rows; ++r) iv[r] = nce::inv_norm<T>(ss[r], p[r]);
  return out;
}

// ---- vectorized epilogues -----------------------------------------------------------------------

// One tile row: logits in place, then its (max, sum exp(x - max)). The caller masks the own
// column between the two steps.
template <class T>
SPARKCT_INLINE void scale_row_impl(T* x, int64_t n, T inv_r, const T* inv_c, T inv_tau) {
#pragma omp simd
  for (int64_t b = 0; b < n; ++b) x[b] = nce::logit_sym(x[b], inv_r, inv_c[b], inv_tau);
}

template <class T>
SPARKCT_INLINE void max_sumexp_impl(const T* x, int64_t n, T* m_out, T* s_out) {
  T m = nce::neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t b = 0; b < n; ++b) m = x[b] > m ? x[b] : m;
  if (m == nce::neg_inf<T>()) {  // all masked, or NaN (which `>` never selects)
    T s = 0;
    for (int64_t b = 0; b < n; ++b)
      if (x[b] != x[b]) s = x[b];
    *m_out = s != s ? s : m;
    *s_out = s;
    return;
  }
  const nce::ExpFast ex;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t b = 0; b < n; ++b) s += ex(x[b] - m);  // NaN in x makes s NaN
  *m_out = m;
  *s_out = s;
}

// kRowPass: d rows from the rows' tiles; kColPass: d columns from the same tiles (the forward's
// orientation, see col_pass_fast); kSymPass: single-process NT-Xent in one pass.
enum Kind : int { kRowPass = 0, kColPass = 1, kSymPass = 2 };

// One tile row of backward coefficients, in place: x holds the logits on entry (written by
// scale_row, the forward's own function, so they are the forward's logits bit for bit) and
// W * inv_other on exit. lse_own is this row's LSE (row and symmetric passes), lse_other the
// other rows' LSEs (symmetric pass). The column pass (the tile of anchor row `own` against
// columns) writes W * s_own instead, s_own the row's inverse norm.
// Why the logits go through memory: at low temperature a logit is ~1/tau and the coefficient
// exp(l - lse) amplifies any difference between the logit the forward summed and the one
// recomputed here (2^-24 / tau: 6 % at tau = 1e-6). Computed inline, the compiler may contract
// (dot * s) * inv_tau - lse into one FMA (GCC's default -ffp-contract=fast in the AVX2 / AVX-512
// clones), which skips the rounding of l that the forward did: relative gradient errors of 1e-4 at
// tau = 1e-4 and 1e-2 at 1e-6. Rounded by the store and reread, l is the forward's.
template <class T, int K>
SPARKCT_INLINE void coef_row_impl(T* x, int64_t n, const T* inv_x, T lse_own, const T* lse_other, T s_own) {
  const nce::ExpFast ex;
#pragma omp simd
  for (int64_t b = 0; b < n; ++b) {
    const T l = x[b];
    T w;
    if constexpr (K == kRowPass) {
      w = nce::coef_row(l, lse_own, false, false, ex);
    } else if constexpr (K == kColPass) {
      w = nce::coef_row(l, lse_own, false, false, ex);
    } else {
      w = nce::coef_sym(l, lse_own, lse_other[b], false, false, ex);
    }
    if constexpr (K == kColPass) x[b] = w * s_own;
    else x[b] = w * inv_x[b];
  }
}

SPARKCT_CLONES void scale_row_f(float* x, int64_t n, float ir, const float* c, float it) {
  scale_row_impl(x, n, ir, c, it);
}
SPARKCT_CLONES void max_sumexp_f(const float* x, int64_t n, float* m, float* s) { max_sumexp_impl(x, n, m, s); }
SPARKCT_CLONES void coef_row_f0(float* x, int64_t n, const float* ix, float lo, const float* lx, float so) {
  coef_row_impl<float, kRowPass>(x, n, ix, lo, lx, so);
}
SPARKCT_CLONES void coef_row_f1(float* x, int64_t n, const float* ix, float lo, const float* lx, float so) {
  coef_row_impl<float, kColPass>(x, n, ix, lo, lx, so);
}
SPARKCT_CLONES void coef_row_f2(float* x, int64_t n, const float* ix, float lo, const float* lx, float so) {
  coef_row_impl<float, kSymPass>(x, n, ix, lo, lx, so);
}

inline void scale_row(float* x, int64_t n, float ir, const float* c, float it) { scale_row_f(x, n, ir, c, it); }
inline void scale_row(double* x, int64_t n, double ir, const double* c, double it) { scale_row_impl(x, n, ir, c, it); }
inline void max_sumexp(const float* x, int64_t n, float* m, float* s) { max_sumexp_f(x, n, m, s); }
inline void max_sumexp(const double* x, int64_t n, double* m, double* s) { max_sumexp_impl(x, n, m, s); }
template <int K>
inline void coef_row_vec(float* x, int64_t n, const float* ix, float lo, const float* lx, float so = 0) {
  if constexpr (K == kRowPass) coef_row_f0(x, n, ix, lo, lx, so);
  else if constexpr (K == kColPass) coef_row_f1(x, n, ix, lo, lx, so);
  else coef_row_f2(x, n, ix, lo, lx, so);
}
template <int K>
inline void coef_row_vec(double* x, int64_t n, const double* ix, double lo, const double* lx, double so = 0) {
  coef_row_impl<double, K>(x, n, ix, lo, lx, so);
}

// ---- the fast path ------------------------------------------------------------------------------

// In tile coordinates, the own column (self) and the positive of anchor row `a` among columns
// [b0, b0 + bc), or -1.
inline void specials(const Geometry& g, int64_t a, int64_t b0, int64_t bc, int64_t* b_self, int64_t* b_pos) {
  *b_self = *b_pos = -1;
  if (!g.pair) return;
  const int64_t s = g.offset + a, p = g.offset + nce::partner(a, g.n);
  if (s >= b0 && s < b0 + bc) *b_self = s - b0;
  if (p >= b0 && p < b0 + bc) *b_pos = p - b0;
}

// Forward: per anchor row, the LSE over its logits (own column excluded) and its positive logit.
// Bank mode: `pos_init` holds each row's positive logit, which seeds the running LSE.
template <class T>
void forward_fast(const Mat& rows, const Mat& cols, const T* inv_r, const T* inv_c, const Geometry& g,
                  T inv_tau, const T* pos_init, T* lse, T* pos) {
  const std::vector<Block> rb = blocks_of(rows, kOwnBlock), cb = blocks_of(cols, kOtherBlock);
  at::parallel_for(0, static_cast<int64_t>(rb.size()), 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({kOwnBlock, kOtherBlock}, rows.seg[0].options());
    T* t = tile.data_ptr<T>();
    T m[kOwnBlock], s[kOwnBlock];
    for (int64_t bi = begin; bi < end; ++bi) {
      const Block& R = rb[bi];
      const at::Tensor A = block_view(rows, R);
      for (int64_t a = 0; a < R.len; ++a) {
        m[a] = nce::neg_inf<T>();
        s[a] = 0;
        if (pos_init) {
          nce::lse_add(m[a], s[a], pos_init[R.global + a], nce::ExpFast{});
          pos[R.global + a] = pos_init[R.global + a];
        }
      }
      for (const Block& C : cb) {
        at::Tensor S = tile.narrow(0, 0, R.len).narrow(1, 0, C.len);
        at::mm_out(S, A, block_view(cols, C).t());
        for (int64_t a = 0; a < R.len; ++a) {
          T* x = t + a * kOtherBlock;
          scale_row(x, C.len, inv_r[R.global + a], inv_c + C.global, inv_tau);
          int64_t bs, bp;
          specials(g, R.global + a, C.global, C.len, &bs, &bp);
          if (bp >= 0) pos[R.global + a] = x[bp];
          if (bs >= 0) x[bs] = nce::neg_inf<T>();
          T tm, ts;
          max_sumexp(x, C.len, &tm, &ts);
          nce::lse_merge(m[a], s[a], tm, ts, nce::ExpFast{});
        }
      }
      for (int64_t a = 0; a < R.len; ++a) lse[R.global + a] = nce::lse_final(m[a], s[a]);
    }
  });
}

// One backward pass: G_own += sum over other rows of W(own, other) * other_hat, G w.r.t. the
// normalized own rows (before the factor g / (R tau)).
template <class T, int K>
void grad_pass_fast(const Mat& own, const Mat& other, const T* inv_o, const T* inv_x, const T* lse_o,
                    const T* lse_x, const Geometry& g, T inv_tau, at::Tensor G) {
  const std::vector<Block> ob = blocks_of(own, kOwnBlock), xb = blocks_of(other, kOtherBlock);
  at::parallel_for(0, static_cast<int64_t>(ob.size()), 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({kOwnBlock, kOtherBlock}, own.seg[0].options());
    T* t = tile.data_ptr<T>();
    for (int64_t bi = begin; bi < end; ++bi) {
      const Block& O = ob[bi];
      const at::Tensor A = block_view(own, O);
      at::Tensor Gb = G.narrow(0, O.global, O.len);
      for (const Block& X : xb) {
        const at::Tensor B = block_view(other, X);
        at::Tensor S = tile.narrow(0, 0, O.len).narrow(1, 0, X.len);
        at::mm_out(S, A, B.t());
        for (int64_t a = 0; a < O.len; ++a) {
          const int64_t ag = O.global + a;
          T* x = t + a * kOtherBlock;
          int64_t bs, bp;
          specials(g, ag, X.global, X.len, &bs, &bp);
          // The forward's logits (see coef_row_impl), then the own column and the positive before the
          // vector loop.
          scale_row(x, X.len, inv_o[ag], inv_x + X.global, inv_tau);
          T ws = 0, wp = 0;
          const nce::ExpFast ex;
          auto special = [&](int64_t b) {
            const int64_t bg = X.global + b;
            const T l = x[b];
            const bool self = b == bs, posf = b == bp;
            T w;
            if constexpr (K == kRowPass) w = nce::coef_row(l, lse_o[ag], self, posf, ex);
            else w = nce::coef_sym(l, lse_o[ag], lse_x[bg], self, posf, ex);
            return w * inv_x[bg];
          };
          if (bs >= 0) ws = special(bs);
          if (bp >= 0) wp = special(bp);
          coef_row_vec<K>(x, X.len, inv_x + X.global, lse_o ? lse_o[ag] : T(0),
                          lse_x ? lse_x + X.global : nullptr);
          if (bs >= 0) x[bs] = ws;
          if (bp >= 0) x[bp] = wp;
        }
        Gb.addmm_(S, B);
      }
    }
  });
}

// The column pass: G_cols += sum over anchor rows r of W_rc * rows_hat_r (d columns before the
// factor g / (R tau)). Threads own blocks of columns and walk every row block; each tile is the
// forward's GEMM call itself (rows block x columns block, same operands and shape), so its logits
// are the forward's bit for bit. A transposed call (columns x rows) would not do: MKL's sgemm rounds
// x.y and y.x differently for some shapes (e.g. 8 x 24 vs 24 x 8), and at low temperature that last
// bit, divided by tau, is a visible error in exp(l - lse_r).
template <class T>
void col_pass_fast(const Mat& rows, const Mat& cols, const T* inv_r, const T* inv_c, const T* lse, const Geometry& g,
                   T inv_tau, at::Tensor G) {
  const std::vector<Block> rb = blocks_of(rows, kOwnBlock), cb = blocks_of(cols, kOtherBlock);
  at::parallel_for(0, static_cast<int64_t>(cb.size()), 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({kOwnBlock, kOtherBlock}, rows.seg[0].options());
    T* t = tile.data_ptr<T>();
    for (int64_t bi = begin; bi < end; ++bi) {
      const Block& C = cb[bi];
      const at::Tensor B = block_view(cols, C);
      at::Tensor Gb = G.narrow(0, C.global, C.len);
      for (const Block& R : rb) {
        const at::Tensor A = block_view(rows, R);
        at::Tensor S = tile.narrow(0, 0, R.len).narrow(1, 0, C.len);
        at::mm_out(S, A, B.t());
        for (int64_t a = 0; a < R.len; ++a) {
          const int64_t ag = R.global + a;
          T* x = t + a * kOtherBlock;
          int64_t bs, bp;
          specials(g, ag, C.global, C.len, &bs, &bp);
          scale_row(x, C.len, inv_r[ag], inv_c + C.global, inv_tau);
          const T wp = bp >= 0 ? nce::coef_row(x[bp], lse[ag], false, true, nce::ExpFast{}) * inv_r[ag] : T(0);
          coef_row_vec<kColPass>(x, C.len, nullptr, lse[ag], nullptr, inv_r[ag]);
          if (bs >= 0) x[bs] = 0;
          if (bp >= 0) x[bp] = wp;
        }
        Gb.addmm_(S.t(), A);
      }
    }
  });
}

// Single-process NT-Xent fuses the row and column passes into one symmetric pass: W_rc = P_rc + P_cr
// - 2 [pos], P_cr read from row r's tile (the logit is symmetric, csrc/info_nce.h logit_sym) against
// the LSE of row c, which the forward summed from row c's tile. That needs x_r.y_c and x_c.y_r to
// round alike, which MKL does not promise (see col_pass_fast): a last-bit difference is an error of
// 2^-24 / tau in the exponent. Above this temperature that stays below fp32's own error (measured:
// no worse than the naive fp32 loss at tau >= 0.05); below it the backward runs the row pass and the
// column pass, both on the forward's own tiles (twice the GEMMs, the same exps).
constexpr double kSymPassMinTemperature = 0.05;

// dz = c * (inv_true * G - beta * z') for the rows of one segment (z' the scaled rows, csrc/info_nce.h),
// written in the output's dtype.
template <class T>
void finalize(const Mat& m, int segi, const RowNorms& nm, const at::Tensor& G, T c, at::Tensor out) {
  const int64_t n = m.seg[segi].size(0), d = m.dim, g0 = m.start[segi];
  const T* z = m.seg[segi].data_ptr<T>();
  const T* gp = G.data_ptr<T>() + g0 * d;
  const T* sumsq = nm.sumsq.data_ptr<T>();
  const T* inv = nm.inv.data_ptr<T>();
  const T* ps = nm.p.data_ptr<T>();
  const bool direct = out.scalar_type() == G.scalar_type();  // else via a per-chunk buffer
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    at::Tensor buf = direct ? out.narrow(0, b, e - b) : at::empty({e - b, d}, G.options());
    T* o = buf.data_ptr<T>();
    for (int64_t r = b; r < e; ++r) {
      const T* zr = z + r * d;
      const T* gr = gp + r * d;
      T xg = 0;
#pragma omp simd reduction(+ : xg)
      for (int64_t k = 0; k < d; ++k) xg += zr[k] * gr[k];
      const T iv = inv[g0 + r], p = ps[g0 + r];
      const T beta = nce::norm_grad_beta(iv, xg, nce::norm_clamped(sumsq[g0 + r], p), p);
      const T ivt = nce::norm_grad_inv(iv, p);
      T* orow = o + (r - b) * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) orow[k] = c * (ivt * gr[k] - beta * zr[k]);
    }
    if (!direct) out.narrow(0, b, e - b).copy_(buf);
  });
}

// ---- the simple path ----------------------------------------------------------------------------

template <class T>
void forward_simple(const Mat& rows, const Mat& cols, const T* inv_r, const T* inv_c, const Geometry& g,
                    T inv_tau, const T* pos_init, T* lse, T* pos) {
  const nce::ExpAccurate ex;
  at::parallel_for(0, rows.rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T m = nce::neg_inf<T>(), s = 0;
      if (pos_init) {
        nce::lse_add(m, s, pos_init[r], ex);
        pos[r] = pos_init[r];
      }
      for (int64_t c = 0; c < cols.rows; ++c) {
        if (nce::is_self(g, r, c)) continue;
        const T l = nce::logit_sym(simple_dot(rows.row<T>(r), cols.row<T>(c), rows.dim), inv_r[r], inv_c[c], inv_tau);
        if (nce::is_pos(g, r, c)) pos[r] = l;
        nce::lse_add(m, s, l, ex);
      }
      lse[r] = nce::lse_final(m, s);
    }
  });
}

// Row pass (col_pass false: G over rows) or column pass (G over columns), one output row at a time.
template <class T>
void grad_pass_simple(const Mat& rows, const Mat& cols, const T* inv_r, const T* inv_c, const T* lse,
                      const Geometry& g, T inv_tau, bool col_pass, at::Tensor G) {
  const nce::ExpAccurate ex;
  const Mat& own = col_pass ? cols : rows;
  const Mat& other = col_pass ? rows : cols;
  const int64_t d = rows.dim;
  T* gp = G.data_ptr<T>();
  at::parallel_for(0, own.rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t a = b; a < e; ++a) {
      T* ga = gp + a * d;
      for (int64_t o = 0; o < other.rows; ++o) {
        const int64_t r = col_pass ? o : a, c = col_pass ? a : o;
        const T l = nce::logit_sym(simple_dot(rows.row<T>(r), cols.row<T>(c), d), inv_r[r], inv_c[c], inv_tau);
        const T w = nce::coef_row(l, lse[r], nce::is_self(g, r, c), nce::is_pos(g, r, c), ex);
        const T wo = w * (col_pass ? inv_r[r] : inv_c[c]);
        const T* y = other.row<T>(o);
        for (int64_t k = 0; k < d; ++k) ga[k] += wo * y[k];
      }
    }
  });
}

// ---- op entry points ----------------------------------------------------------------------------

at::ScalarType compute_type(at::ScalarType t) { return nce::acc_type(t); }

template <class T>
struct ProblemNorms {
  RowNorms r, c;
};

// A compute-dtype contiguous copy only where needed; detached so that ATen calls made from worker
// threads (where the caller's autograd guards do not reach) never see requires_grad tensors.
at::Tensor prep(const at::Tensor& t) { return t.detach().to(compute_type(t.scalar_type())).contiguous(); }

struct Problem {
  Mat rows, cols;
  Geometry g;
  bool bank = false, single = false;
};

// Norms of rows and columns; may swap segments for scaled copies (single: the columns are the rows).
template <class T>
ProblemNorms<T> normalize_problem(Problem& p) {
  ProblemNorms<T> n;
  n.r = normalize_rows<T>(p.rows);
  if (p.single) {
    p.cols = p.rows;
    n.c = n.r;
  } else {
    n.c = normalize_rows<T>(p.cols);
  }
  return n;
}

Problem make_problem(const at::Tensor& z0, const at::Tensor& z1, const c10::optional<at::Tensor>& cols,
                     const c10::optional<at::Tensor>& bank, int64_t col_offset) {
  Problem p;
  p.rows.add(prep(z0));
  if (bank.has_value()) {
    p.bank = true;
    p.cols.add(prep(*bank));
  } else {
    p.rows.add(prep(z1));
    p.g.pair = true;
    p.g.n = z0.size(0);
    if (cols.has_value()) {
      p.cols.add(prep(*cols));
      p.g.offset = col_offset;
    } else {
      p.single = true;
      p.cols = p.rows;
    }
  }
  return p;
}

template <class T>
at::Tensor bank_pos_logits(const at::Tensor& z0c, const at::Tensor& z1c, const T* inv0, const T* inv1, T inv_tau) {
  const int64_t n = z0c.size(0), d = z0c.size(1);
  at::Tensor out = at::empty({n}, z0c.options());
  T* o = out.data_ptr<T>();
  const T* a = z0c.data_ptr<T>();
  const T* b = z1c.data_ptr<T>();
  at::parallel_for(0, n, 256, [&](int64_t s, int64_t e) {
    for (int64_t r = s; r < e; ++r)
      o[r] = nce::logit_sym(simple_dot(a + r * d, b + r * d, d), inv0[r], inv1[r], inv_tau);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> info_nce_cpu(const at::Tensor& z0, const at::Tensor& z1,
                                                const c10::optional<at::Tensor>& cols,
                                                const c10::optional<at::Tensor>& bank, double temperature,
                                                int64_t col_offset, bool allow_tf32, int64_t impl) {
  (void)allow_tf32;  // CPU fp32 is always exact
  nce::check_inputs(z0, z1, cols, bank, temperature, col_offset, impl);
  Problem p = make_problem(z0, z1, cols, bank, col_offset);
  const auto ct = compute_type(z0.scalar_type());
  at::Tensor lse = at::empty({p.rows.rows}, z0.options().dtype(ct));
  at::Tensor pos = at::empty({p.rows.rows}, z0.options().dtype(ct));
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(ct, "info_nce_cpu", [&] {
    using T = scalar_t;
    const T inv_tau = static_cast<T>(1.0 / temperature);
    const ProblemNorms<T> nm = normalize_problem<T>(p);
    const at::Tensor& inv_r = nm.r.inv;
    const at::Tensor& inv_c = nm.c.inv;
    at::Tensor pos_init;
    if (p.bank) {
      // rows = z0 only; z1 is the positive
      Mat m1;
      m1.add(prep(z1));
      const RowNorms n1 = normalize_rows<T>(m1);
      pos_init = bank_pos_logits<T>(p.rows.seg[0], m1.seg[0], inv_r.data_ptr<T>(), n1.inv.data_ptr<T>(), inv_tau);
    }
    const T* pi = pos_init.defined() ? pos_init.data_ptr<T>() : nullptr;
    if (impl == 1) {
      forward_simple<T>(p.rows, p.cols, inv_r.data_ptr<T>(), inv_c.data_ptr<T>(), p.g, inv_tau, pi,
                        lse.data_ptr<T>(), pos.data_ptr<T>());
    } else {
      forward_fast<T>(p.rows, p.cols, inv_r.data_ptr<T>(), inv_c.data_ptr<T>(), p.g, inv_tau, pi,
                      lse.data_ptr<T>(), pos.data_ptr<T>());
    }
    const T* l = lse.data_ptr<T>();
    const T* q = pos.data_ptr<T>();
    for (int64_t r = 0; r < p.rows.rows; ++r) total += static_cast<double>(l[r]) - static_cast<double>(q[r]);
  });
  at::Tensor loss = at::scalar_tensor(total / static_cast<double>(p.rows.rows), z0.options());
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cpu(
    const at::Tensor& grad, const at::Tensor& z0, const at::Tensor& z1, const c10::optional<at::Tensor>& cols,
    const c10::optional<at::Tensor>& bank, const at::Tensor& lse, double temperature, int64_t col_offset,
    bool other_grad, bool allow_tf32, int64_t impl) {
  (void)allow_tf32;
  nce::check_inputs(z0, z1, cols, bank, temperature, col_offset, impl);
  Problem p = make_problem(z0, z1, cols, bank, col_offset);
  const auto ct = compute_type(z0.scalar_type());
  nce::check_backward(grad, lse, z0, p.rows.rows);
  const bool want_other = other_grad && !p.single;
  at::Tensor dz0 = at::empty_like(z0, at::MemoryFormat::Contiguous);
  at::Tensor dz1 = at::empty_like(z1, at::MemoryFormat::Contiguous);
  at::Tensor dother = want_other ? at::empty_like(p.bank ? *bank : *cols, at::MemoryFormat::Contiguous)
                                 : at::empty({0}, z0.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "info_nce_backward_cpu", [&] {
    using T = scalar_t;
    const T inv_tau = static_cast<T>(1.0 / temperature);
    const T c = static_cast<T>(grad.item<double>() / (static_cast<double>(p.rows.rows) * temperature));
    const at::Tensor lse_c = lse.contiguous();
    const T* l = lse_c.data_ptr<T>();
    const ProblemNorms<T> nm = normalize_problem<T>(p);
    const T* ir = nm.r.inv.data_ptr<T>();
    const T* ic = nm.c.inv.data_ptr<T>();
    const int64_t d = p.rows.dim;
    // Gradient accumulators w.r.t. the normalized rows; the output itself when it is fp32/fp64.
    at::Tensor Gr = at::zeros({p.rows.rows, d}, z0.options().dtype(ct));
    at::Tensor Gc = want_other ? at::zeros({p.cols.rows, d}, z0.options().dtype(ct)) : at::Tensor();
    const bool fast = impl == 0;
    if (p.single) {
      if (fast && temperature >= kSymPassMinTemperature) {
        grad_pass_fast<T, kSymPass>(p.rows, p.rows, ir, ir, l, l, p.g, inv_tau, Gr);
      } else if (fast) {
        grad_pass_fast<T, kRowPass>(p.rows, p.rows, ir, ir, l, nullptr, p.g, inv_tau, Gr);
        col_pass_fast<T>(p.rows, p.rows, ir, ir, l, p.g, inv_tau, Gr);
      } else {  // row pass + column pass into the same accumulator
        grad_pass_simple<T>(p.rows, p.cols, ir, ic, l, p.g, inv_tau, false, Gr);
        grad_pass_simple<T>(p.rows, p.cols, ir, ic, l, p.g, inv_tau, true, Gr);
      }
    } else {
      if (fast) grad_pass_fast<T, kRowPass>(p.rows, p.cols, ir, ic, l, nullptr, p.g, inv_tau, Gr);
      else grad_pass_simple<T>(p.rows, p.cols, ir, ic, l, p.g, inv_tau, false, Gr);
      if (want_other) {
        if (fast) col_pass_fast<T>(p.rows, p.cols, ir, ic, l, p.g, inv_tau, Gc);
        else grad_pass_simple<T>(p.rows, p.cols, ir, ic, l, p.g, inv_tau, true, Gc);
      }
    }
    Mat m1;  // bank mode: z1 (the positives) is not among the rows
    RowNorms n1;
    at::Tensor G1;
    if (p.bank) {
      m1.add(prep(z1));
      n1 = normalize_rows<T>(m1);
      G1 = at::empty({p.rows.rows, d}, z0.options().dtype(ct));
      const at::Tensor pl = bank_pos_logits<T>(p.rows.seg[0], m1.seg[0], ir, n1.inv.data_ptr<T>(), inv_tau);
      const T* plp = pl.data_ptr<T>();
      const T* i1 = n1.inv.data_ptr<T>();
      T* g0p = Gr.data_ptr<T>();
      T* g1p = G1.data_ptr<T>();
      const T* a = p.rows.seg[0].data_ptr<T>();
      const T* b = m1.seg[0].data_ptr<T>();
      const nce::ExpAccurate ex;
      at::parallel_for(0, p.rows.rows, 256, [&](int64_t s, int64_t e) {
        for (int64_t r = s; r < e; ++r) {
          const T w = nce::coef_bank_pos(plp[r], l[r], ex);
          for (int64_t k = 0; k < d; ++k) {
            g0p[r * d + k] += w * i1[r] * b[r * d + k];
            g1p[r * d + k] = w * ir[r] * a[r * d + k];
          }
        }
      });
    }
    finalize<T>(p.rows, 0, nm.r, Gr, c, dz0);
    if (p.bank) finalize<T>(m1, 0, n1, G1, c, dz1);
    else finalize<T>(p.rows, 1, nm.r, Gr, c, dz1);
    if (want_other) finalize<T>(p.cols, 0, nm.c, Gc, c, dother);
  });
  return {dz0, dz1, dother};
}

}  // namespace
}  // namespace sparkct

TORCH_LIBRARY_IMPL(sparkct, CPU, m) {
  m.impl("info_nce", &sparkct::info_nce_cpu);
  m.impl("info_nce_backward", &sparkct::info_nce_backward_cpu);
}
