// Fused InfoNCE: the per-element maths shared by the CPU (csrc/cpu/info_nce.cpp) and CUDA
// (csrc/cuda/info_nce.cu) kernels, so the CPU tests exercise the arithmetic the GPU runs.
//
// Geometry. The anchors ("rows") are R embeddings, the candidates ("columns") are M embeddings;
// both are L2-normalized inside (F.normalize semantics: x / max(||x||, eps), eps = 1e-12), which
// the kernels do on the fly: logit(r, c) = (x_r . y_c) * inv_r * inv_c / tau.
//
//   pair mode (NT-Xent, SimCLR): rows = [z0; z1] (R = 2n). The rows are a contiguous block of the
//     columns starting at column `offset`: single process -> columns are the rows (offset 0,
//     M = R); distributed -> columns are every rank's [z0_k; z1_k] in rank order (M = world * 2n,
//     offset = rank * 2n). Row r's own column offset + r is excluded; its positive is the other
//     view, column offset + partner(r). Every other column is a negative.
//   bank mode (MoCo): rows = z0 (R = n), columns = the bank (M = K), all negatives; row r's
//     positive is z1[r], an extra logit outside the column set.
//
// Loss = mean_r (lse_r - positive logit_r), lse_r = log sum over the row's logits (positive
// included, own column excluded). Only lse_r (fp32, one per row) is kept for the backward.
//
// Backward, before the common factor g / (R * tau) (g: upstream gradient), with
// P_rc = exp(logit_rc - lse_r) and everything w.r.t. the *normalized* embeddings:
//   d rows_r  = sum_c (P_rc - [c = pos(r)]) yhat_c   (+ (P_r,pos - 1) z1hat_r in bank mode)
//   d cols_c  = sum_r (P_rc - [c = pos(r)]) xhat_r
// Single-process pair mode (columns = rows, S symmetric, pos an involution) folds both into one
// pass: d zhat_r = sum_c W_rc zhat_c with W_rc = P_rc + P_cr - 2 [c = pos(r)] (0 on the diagonal).
// Then through the normalization: dz = inv * g_hat - inv^3 (z . g_hat) z (unless clamped), in the
// scale-safe form below ("scale safety").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace sparkct {
namespace nce {

constexpr double kNormEps = 1e-12;  // F.normalize's default eps

// ---- geometry ---------------------------------------------------------------------------------

// Pair mode: the other view of row r (rows [0, n) are z0, [n, 2n) are z1).
SPARKCT_HD int64_t partner(int64_t r, int64_t n) { return r < n ? r + n : r - n; }

// How rows relate to columns. pair == false: bank mode (no own/positive column).
struct Geometry {
  int64_t n = 0;       // pair mode: rows are [z0; z1], each n long
  int64_t offset = 0;  // pair mode: column index of row 0
  bool pair = false;
};

SPARKCT_HD bool is_self(const Geometry& g, int64_t r, int64_t c) { return g.pair && c == g.offset + r; }
SPARKCT_HD bool is_pos(const Geometry& g, int64_t r, int64_t c) {
  return g.pair && c == g.offset + partner(r, g.n);
}
// Column pass (own index = column c): the row whose own column is c, or -1.
SPARKCT_HD int64_t row_of_self_col(const Geometry& g, int64_t c) {
  if (!g.pair) return -1;
  const int64_t r = c - g.offset;
  return (r >= 0 && r < 2 * g.n) ? r : -1;
}
// Column pass: the row whose positive is column c, or -1 (partner is an involution).
SPARKCT_HD int64_t row_of_pos_col(const Geometry& g, int64_t c) {
  const int64_t r = row_of_self_col(g, c);
  return r < 0 ? -1 : partner(r, g.n);
}

// ---- normalization ----------------------------------------------------------------------------
// Scale safety. Squares and dot products of raw embeddings overflow (fp32: |x| ~ 1e19 with D = 16)
// or lose precision in denormals. So a row whose largest |x| lies outside [2^-S, 2^S] is multiplied
// by an exact power of two p (its largest |x| is then in [0.5, 1)), and the kernels work on
// x' = p x. Every quantity is exactly scale-equivariant (no rounding: p is a power of two):
//   ||x'|| = p ||x||,  x'_r . y'_c = p_r p_c (x_r . y_c),  inv' = 1 / max(||x'||, eps p) = inv / p,
// so logit = (x'_r . y'_c) inv'_r inv'_c / tau is the definition's, and F.normalize's clamp
// ||x|| < eps <=> ||x'|| < eps p. Rows inside the range get p = 1 and compute what they always did.
// S keeps every sum of squares and dot product of in-range rows finite for D < 2^30 (fp32) and
// never scales fp16 input (|x| in [2^-24, 2^16]).
template <class T>
struct ScaleLimits;
template <>
struct ScaleLimits<float> {
  static constexpr int kSafeExp = 48;  // rows with max |x| in [2^-49, 2^48) keep p = 1
  static constexpr int kMaxExp = 126;  // p stays a normal number (flush-to-zero safe)
};
template <>
struct ScaleLimits<double> {
  static constexpr int kSafeExp = 480;
  static constexpr int kMaxExp = 1022;
};

SPARKCT_HD float frexp_(float x, int* e) { return frexpf(x, e); }
SPARKCT_HD double frexp_(double x, int* e) { return frexp(x, e); }
SPARKCT_HD float ldexp_(float x, int e) { return ldexpf(x, e); }
SPARKCT_HD double ldexp_(double x, int e) { return ldexp(x, e); }

// The power of two p for a row whose largest |x| is maxabs: 1 inside the safe range, for zero rows
// and for inf / NaN rows (which must propagate as they are).
template <class T>
SPARKCT_HD T row_pow2_scale(T maxabs) {
  if (!(maxabs > T(0)) || !(maxabs <= std::numeric_limits<T>::max())) return T(1);
  int e = 0;
  frexp_(maxabs, &e);  // maxabs = m 2^e, m in [0.5, 1)
  if (e >= -ScaleLimits<T>::kSafeExp && e <= ScaleLimits<T>::kSafeExp) return T(1);
  e = e > ScaleLimits<T>::kMaxExp ? ScaleLimits<T>::kMaxExp : (e < -ScaleLimits<T>::kMaxExp ? -ScaleLimits<T>::kMaxExp : e);
  return ldexp_(T(1), -e);
}

// 1 / max(||x||, eps p) from the sum of squares of the scaled row x' = p x (inv' above).
template <class T>
SPARKCT_HD T inv_norm(T sumsq, T p = T(1)) {
  const T nrm = sqrt(sumsq);
  const T lim = T(kNormEps) * p;
  return T(1) / (nrm > lim ? nrm : lim);
}
// Is the norm clamped to eps (F.normalize then passes no gradient through the norm)?
// clamp_min's gradient flows where norm >= eps; NaN norms are not clamped (NaN must propagate).
template <class T>
SPARKCT_HD bool norm_clamped(T sumsq, T p = T(1)) {
  return sqrt(sumsq) < T(kNormEps) * p;
}
// Gradient through x -> x * inv in scaled terms: dz = c (inv_true g - beta x') with inv_true = p inv'
// (norm_grad_inv) and beta = p inv'^3 (x' . g), g the gradient w.r.t. the normalized row and
// xg = x' . g. With x' within [0.5, 1) of unit size neither factor over- or underflows; a clamped
// row (beta = 0) passes inv_true = 1 / eps. For p = 1 this is dz = c (inv g - inv^3 (x . g) x).
template <class T>
SPARKCT_HD T norm_grad_beta(T inv, T xg, bool clamped, T p = T(1)) {
  return clamped ? T(0) : p * (((xg * inv) * inv) * inv);
}
template <class T>
SPARKCT_HD T norm_grad_inv(T inv, T p = T(1)) {
  return p * inv;
}

// ---- logits and the online log-sum-exp ----------------------------------------------------------

// scale_r = inv_r / tau is hoisted per row; logit = dot * scale_r * inv_c.
template <class T>
SPARKCT_HD T row_scale(T inv_r, T inv_tau) { return inv_r * inv_tau; }
template <class T>
SPARKCT_HD T logit(T dot, T scale_r, T inv_c) { return (dot * scale_r) * inv_c; }
// The same logit, symmetric in (r, c): (x_r . y_c) (inv_r inv_c) / tau rounds identically for (r, c)
// and (c, r) (given the same dot product). The backward recomputes every logit and subtracts a
// forward LSE; where that LSE is another row's (the symmetric pass: P_cr = exp(l_cr - lse_c) read
// from row r's tile; the column pass), an asymmetric rounding of l is an absolute error of
// |l| * 2^-24 ~ 2^-24 / tau in the exponent: 6 % in P at tau = 1e-6 (relative gradient error 1e-2).
// With this form the recomputed logit equals the one the LSE was built from, bit for bit.
// On the device the products are rounded explicitly (__fmul_rn is never contracted into an FMA with
// a following subtraction; see coef_row_impl in csrc/cpu/info_nce.cpp for the host's way).
SPARKCT_HD float logit_sym(float dot, float inv_r, float inv_c, float inv_tau) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fmul_rn(dot, __fmul_rn(inv_r, inv_c)), inv_tau);
#else
  return (dot * (inv_r * inv_c)) * inv_tau;
#endif
}
SPARKCT_HD double logit_sym(double dot, double inv_r, double inv_c, double inv_tau) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(__dmul_rn(dot, __dmul_rn(inv_r, inv_c)), inv_tau);
#else
  return (dot * (inv_r * inv_c)) * inv_tau;
#endif
}

template <class T>
SPARKCT_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }
template <class T>
SPARKCT_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }

// Running (max, sum of exp(x - max)) of a row. Starts at (-inf, 0).
// Merge a partial (m2, s2) (a tile's max and its sum relative to m2) into (m, s). NaN anywhere
// makes the result NaN (fmax would silently drop it); a fully masked partial (-inf) is a no-op.
template <class T, class ExpFn>
SPARKCT_HD void lse_merge(T& m, T& s, T m2, T s2, ExpFn expf_) {
  if (m2 != m2 || s2 != s2 || m != m) {
    m = quiet_nan<T>();
    s = quiet_nan<T>();
    return;
  }
  if (m2 == neg_inf<T>()) return;
  if (m == neg_inf<T>()) {
    m = m2;
    s = s2;
    return;
  }
  if (m2 > m) {
    s = s * expf_(m - m2) + s2;
    m = m2;
  } else {
    s = s + s2 * expf_(m2 - m);
  }
}
// Add one logit x (the simple kernels, the bank positive).
template <class T, class ExpFn>
SPARKCT_HD void lse_add(T& m, T& s, T x, ExpFn expf_) {
  lse_merge(m, s, x, T(1), expf_);
}
// log sum exp; -inf for an empty row (N = 1 has one logit, so this happens only for R = 0).
template <class T>
SPARKCT_HD T lse_final(T m, T s) {
  if (m != m || s != s) return quiet_nan<T>();
  if (m == neg_inf<T>()) return neg_inf<T>();
  return m + log(s);
}

// ---- backward coefficients (before the factor g / (R * tau)) --------------------------------------

// Row pass and column pass: P_rc - [c = pos(r)]; the own column contributes nothing.
template <class T, class ExpFn>
SPARKCT_HD T coef_row(T x, T lse_r, bool self, bool pos, ExpFn expf_) {
  if (self) return T(0);
  return expf_(x - lse_r) - (pos ? T(1) : T(0));
}
// Single-process pair mode, one pass: W_rc = P_rc + P_cr - 2 [c = pos(r)], 0 on the diagonal.
template <class T, class ExpFn>
SPARKCT_HD T coef_sym(T x, T lse_r, T lse_c, bool self, bool pos, ExpFn expf_) {
  if (self) return T(0);
  return expf_(x - lse_r) + expf_(x - lse_c) - (pos ? T(2) : T(0));
}
// Bank mode, the positive: P_r,pos - 1 multiplies z1hat_r in d z0hat_r and z0hat_r in d z1hat_r.
template <class T, class ExpFn>
SPARKCT_HD T coef_bank_pos(T pos_logit, T lse_r, ExpFn expf_) {
  return expf_(pos_logit - lse_r) - T(1);
}

// ---- exp ----------------------------------------------------------------------------------------

// Accurate exp in the accumulation type (the simple kernels, float64).
struct ExpAccurate {
  template <class T>
  SPARKCT_HD T operator()(T x) const { return exp(x); }
};

#if !defined(__CUDA_ARCH__)
// Host float exp written so that GCC vectorizes loops calling it (glibc's expf is a scalar call):
// exp(x) = 2^k exp(r), k = round(x / ln2), r = x - k ln2 (two-part ln2), |r| <= ln2/2, and exp(r)
// by its Taylor series to r^7 (truncation < 6e-9 relative, below float's half ulp 6e-8).
// x < -87.3 -> 0 (no denormals), x > 88 -> inf (a little early: exp(88.7) would still be finite;
// the kernels only ever pass x - max <= 0), NaN -> NaN.
inline float exp_host_fast(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float t = xc * 1.4426950408889634f + 12582912.0f;  // 1.5 * 2^23: round to nearest
  const float k = t - 12582912.0f;
  const float r = (xc - k * 0.693145751953125f) - k * 1.4286068203094172e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.0f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
#endif

// The fast exp for float on either side; double always uses exp().
struct ExpFast {
  SPARKCT_HD double operator()(double x) const { return exp(x); }
  SPARKCT_HD float operator()(float x) const {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return exp_host_fast(x);
#endif
  }
};

}  // namespace nce
}  // namespace sparkct
