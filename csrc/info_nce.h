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
// Then through the normalization: dz = inv * g_hat - inv^3 (z . g_hat) z (unless clamped).
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

// 1 / max(||x||, eps) from the sum of squares.
template <class T>
SPARKCT_HD T inv_norm(T sumsq) {
  const T nrm = sqrt(sumsq);
  return T(1) / (nrm > T(kNormEps) ? nrm : T(kNormEps));
}
// Is the norm clamped to eps (F.normalize then passes no gradient through the norm)?
// clamp_min's gradient flows where norm >= eps; NaN norms are not clamped (NaN must propagate).
template <class T>
SPARKCT_HD bool norm_clamped(T sumsq) {
  return sqrt(sumsq) < T(kNormEps);
}
// Gradient through x -> x * inv: dx = inv * g - beta * x with beta = inv^3 (x . g), where g is
// the gradient w.r.t. the normalized vector and xg = x . g.
template <class T>
SPARKCT_HD T norm_grad_beta(T inv, T xg, bool clamped) {
  return clamped ? T(0) : ((xg * inv) * inv) * inv;
}

// ---- logits and the online log-sum-exp ----------------------------------------------------------

// scale_r = inv_r / tau is hoisted per row; logit = dot * scale_r * inv_c.
template <class T>
SPARKCT_HD T row_scale(T inv_r, T inv_tau) { return inv_r * inv_tau; }
template <class T>
SPARKCT_HD T logit(T dot, T scale_r, T inv_c) { return (dot * scale_r) * inv_c; }

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
