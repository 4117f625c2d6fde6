// CPU kernels of the fused prototype cross-entropy (DINO's loss). Schemas: csrc/ops.cpp; maths:
// csrc/prototype_ce.h; Python face: sparkct/ops/prototype_ce.py.
//
// Fast path (impl 0): the K prototypes are cut into tiles of kTileK columns, the tiles into one
// contiguous chunk per thread (at::parallel_for over chunks). Rows are taken in blocks of whole
// images (all S student and T teacher crops of nb images, so a tile holds every crop of its images:
// the pair sums need them together). Per (tile, block): two BLAS GEMMs into per-thread fp32 tiles
// (student . w_student^T, teacher . w_teacher^T), then a vectorized epilogue:
//   forward: per row the streaming state (csrc/prototype_ce.h); chunks merged in order at the end;
//   backward: the coefficients W in place of the student tile, then G_student += W w_tile (a per-chunk
//   accumulator, summed at the end) and G_w[tile] += W^T student (tiles are disjoint across chunks).
// Nothing larger than a tile is formed: extra memory is O(rows x D) per thread (the gradient's own
// size) plus O(rows) statistics. fp16/bf16 inputs get fp32 copies (inputs' size).
//
// Simple path (impl 1): per-element loops, no GEMMs, probabilities formed from a finished LSE (not
// streamed), the pair sums written out: a second oracle for the fast path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "info_nce.h"  // nce::ExpFast, nce::ExpAccurate
#include "prototype_ce.h"
#include "prototype_ce_host.h"

namespace sparkct {
namespace {

using pce::RowState;

constexpr int64_t kTileK = 256;         // prototypes per tile
constexpr int64_t kRowsPerBlock = 256;  // student + teacher rows per block (whole images)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARKCT_PCE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define SPARKCT_PCE_CLONES
#endif

// Inputs in the compute dtype; student and teacher image-major ((B*S, D), row b*S + j), so a block
// of images is one contiguous row range.
struct Prep {
  at::Tensor st, te, ws, wt, bias;
  int64_t S = 0, T = 0, B = 0, D = 0, K = 0;
  bool skip = false;
};

Prep make_prep(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student,
               const at::Tensor& w_teacher, const c10::optional<at::Tensor>& bias, bool skip_same) {
  Prep p;
  const auto ct = pce::acc_type(student.scalar_type());
  p.S = student.size(0);
  p.T = teacher.size(0);
  p.B = student.size(1);
  p.D = student.size(2);
  p.K = w_student.size(0);
  p.skip = skip_same;
  // detached: ATen calls from worker threads must never see requires_grad tensors
  p.st = student.detach().to(ct).transpose(0, 1).contiguous().view({p.B * p.S, p.D});
  p.te = teacher.detach().to(ct).transpose(0, 1).contiguous().view({p.B * p.T, p.D});
  p.ws = w_student.detach().to(ct).contiguous();
  p.wt = w_teacher.detach().to(ct).contiguous();
  if (bias.has_value()) p.bias = bias->detach().to(ct).contiguous();
  return p;
}

int64_t images_per_block(const Prep& p) { return std::max<int64_t>(1, std::min(p.B, kRowsPerBlock / (p.S + p.T))); }

// ---- vectorized epilogues ------------------------------------------------------------------------

// Student row of a tile: logits in place, and the tile's (max, sum exp).
template <class T>
SPARKCT_PCE_CLONES void student_tile_row(T* x, int64_t n, T inv_ts, RowState<T>* part) {
  const nce::ExpFast ex;
  T m = pce::neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) {
    x[k] = pce::student_logit(x[k], inv_ts);
    m = x[k] > m ? x[k] : m;
  }
  T s = 0;
  if (m == pce::neg_inf<T>()) {  // all -inf, or NaN (which `>` never selects)
    for (int64_t k = 0; k < n; ++k)
      if (x[k] != x[k]) m = s = x[k];
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += ex(x[k] - m);
  }
  *part = RowState<T>{m, s, T(0), T(0)};
}

// Teacher row of a tile: logits in place (bias may be null), then relative to the tile max the sums
// of e, e * C (C = lsum - same, same = the skipped student row or null) and e * lt.
template <class T>
SPARKCT_PCE_CLONES void teacher_tile_row(T* y, int64_t n, T inv_tt, const T* bias, const T* lsum, const T* same,
                                         RowState<T>* part) {
  const nce::ExpFast ex;
  T m = pce::neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) {
    y[k] = pce::teacher_logit(y[k], inv_tt, bias ? bias[k] : T(0));
    m = y[k] > m ? y[k] : m;
  }
  if (m == pce::neg_inf<T>()) {
    T bad = 0;
    for (int64_t k = 0; k < n; ++k)
      if (y[k] != y[k]) bad = y[k];
    *part = bad != bad ? RowState<T>{bad, bad, bad, bad} : pce::state_init<T>();
    return;
  }
  T s = 0, a = 0, h = 0;
  if (same) {
#pragma omp simd reduction(+ : s, a, h)
    for (int64_t k = 0; k < n; ++k) {
      const T e = ex(y[k] - m);
      s += e;
      a += e * (lsum[k] - same[k]);
      h += e > T(0) ? e * y[k] : T(0);  // a -inf logit (bias) has e = 0: no 0 * inf
    }
  } else {
#pragma omp simd reduction(+ : s, a, h)
    for (int64_t k = 0; k < n; ++k) {
      const T e = ex(y[k] - m);
      s += e;
      a += e * lsum[k];
      h += e > T(0) ? e * y[k] : T(0);
    }
  }
  *part = RowState<T>{m, s, a, h};
}

// Backward, teacher row: logits, then P_t = exp(lt - lse) in place, added into pt_sum.
template <class T>
SPARKCT_PCE_CLONES void teacher_prob_row(T* y, int64_t n, T inv_tt, const T* bias, T lse, T* pt_sum, bool first) {
  const nce::ExpFast ex;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const T l = pce::teacher_logit(y[k], inv_tt, bias ? bias[k] : T(0));
    y[k] = l;
  }
  // separate loop: the logit is rounded by the store before lse is subtracted (no FMA contraction)
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const T pk = ex(y[k] - lse);
    y[k] = pk;
    pt_sum[k] = first ? pk : pt_sum[k] + pk;
  }
}

// Backward, student row: logits, then W * scale in place (same = P_t of the same view, or null).
template <class T>
SPARKCT_PCE_CLONES void student_coef_row(T* x, int64_t n, T inv_ts, T lse, T cj, const T* pt_sum, const T* same,
                                         T scale) {
  const nce::ExpFast ex;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) x[k] = pce::student_logit(x[k], inv_ts);
  if (same) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) x[k] = scale * (cj * ex(x[k] - lse) - (pt_sum[k] - same[k]));
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) x[k] = scale * (cj * ex(x[k] - lse) - pt_sum[k]);
  }
}

// The K tiles of chunk c of nchunk.
struct Chunks {
  int64_t ntiles, nchunk;
  explicit Chunks(int64_t K) {
    ntiles = ceil_div(K, kTileK);
    nchunk = std::max<int64_t>(1, std::min<int64_t>(ntiles, at::get_num_threads()));
  }
  int64_t first(int64_t c) const { return c * ntiles / nchunk; }
  int64_t last(int64_t c) const { return (c + 1) * ntiles / nchunk; }
};

// ---- fast forward --------------------------------------------------------------------------------

// Per-row statistics, image-major: lse_s (B*S), and per teacher row lse_t, A = E_p[C], E = E_p[lt].
template <class T>
struct Stats {
  std::vector<T> lse_s, lse_t, A, E;
};

template <class T>
Stats<T> finish_states(const Prep& p, const std::vector<RowState<T>>& ss, const std::vector<RowState<T>>& ts) {
  Stats<T> out;
  out.lse_s.resize(p.B * p.S);
  out.lse_t.resize(p.B * p.T);
  out.A.resize(p.B * p.T);
  out.E.resize(p.B * p.T);
  for (int64_t r = 0; r < p.B * p.S; ++r) out.lse_s[r] = pce::state_lse(ss[r]);
  for (int64_t r = 0; r < p.B * p.T; ++r) {
    out.lse_t[r] = pce::state_lse(ts[r]);
    out.A[r] = ts[r].a / ts[r].s;
    out.E[r] = ts[r].h / ts[r].s;
  }
  return out;
}

template <class T>
Stats<T> forward_fast(const Prep& p, T inv_ts, T inv_tt) {
  const Chunks ch(p.K);
  const int64_t S = p.S, Tn = p.T, nb = images_per_block(p), rs = p.B * S, rt = p.B * Tn;
  std::vector<RowState<T>> ss(ch.nchunk * rs, pce::state_init<T>()), ts(ch.nchunk * rt, pce::state_init<T>());
  const T* bias = p.bias.defined() ? p.bias.data_ptr<T>() : nullptr;
  at::parallel_for(0, ch.nchunk, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor Ls = at::empty({nb * S, kTileK}, p.st.options());
    at::Tensor Lt = at::empty({nb * Tn, kTileK}, p.st.options());
    std::vector<T> lsum(kTileK);
    const nce::ExpFast ex;
    for (int64_t c = c0; c < c1; ++c) {
      RowState<T>* sc = ss.data() + c * rs;
      RowState<T>* tc = ts.data() + c * rt;
      for (int64_t tile = ch.first(c); tile < ch.last(c); ++tile) {
        const int64_t k0 = tile * kTileK, kl = std::min(kTileK, p.K - k0);
        const at::Tensor ws_t = p.ws.narrow(0, k0, kl), wt_t = p.wt.narrow(0, k0, kl);
        for (int64_t b0 = 0; b0 < p.B; b0 += nb) {
          const int64_t n = std::min(nb, p.B - b0);
          at::Tensor Lsv = Ls.narrow(0, 0, n * S).narrow(1, 0, kl), Ltv = Lt.narrow(0, 0, n * Tn).narrow(1, 0, kl);
          at::mm_out(Lsv, p.st.narrow(0, b0 * S, n * S), ws_t.t());
          at::mm_out(Ltv, p.te.narrow(0, b0 * Tn, n * Tn), wt_t.t());
          T* xs = Ls.data_ptr<T>();
          T* xt = Lt.data_ptr<T>();
          for (int64_t bl = 0; bl < n; ++bl) {
            const int64_t b = b0 + bl;
            for (int64_t j = 0; j < S; ++j) {
              RowState<T> part;
              student_tile_row(xs + (bl * S + j) * kTileK, kl, inv_ts, &part);
              pce::state_merge(sc[b * S + j], part, ex);
            }
            for (int64_t k = 0; k < kl; ++k) lsum[k] = 0;
            for (int64_t j = 0; j < S; ++j) {
              const T* x = xs + (bl * S + j) * kTileK;
              for (int64_t k = 0; k < kl; ++k) lsum[k] += x[k];
            }
            for (int64_t i = 0; i < Tn; ++i) {
              const T* same = (p.skip && i < S) ? xs + (bl * S + i) * kTileK : nullptr;
              RowState<T> part;
              teacher_tile_row(xt + (bl * Tn + i) * kTileK, kl, inv_tt, bias ? bias + k0 : nullptr, lsum.data(), same,
                               &part);
              pce::state_merge(tc[b * Tn + i], part, ex);
            }
          }
        }
      }
    }
  });
  const nce::ExpAccurate exa;
  for (int64_t c = 1; c < ch.nchunk; ++c) {
    for (int64_t r = 0; r < rs; ++r) pce::state_merge(ss[r], ss[c * rs + r], exa);
    for (int64_t r = 0; r < rt; ++r) pce::state_merge(ts[r], ts[c * rt + r], exa);
  }
  ss.resize(rs);
  ts.resize(rt);
  return finish_states<T>(p, ss, ts);
}

// ---- fast backward -------------------------------------------------------------------------------

// Gst (B*S, D) and Gw (K, D): zero-initialised compute-dtype accumulators (undefined: not wanted).
template <class T>
void backward_fast(const Prep& p, T inv_ts, T inv_tt, const T* lse_s, const T* lse_t, T scale, at::Tensor Gst,
                   at::Tensor Gw) {
  const Chunks ch(p.K);
  const int64_t S = p.S, Tn = p.T, nb = images_per_block(p);
  const T* bias = p.bias.defined() ? p.bias.data_ptr<T>() : nullptr;
  std::vector<at::Tensor> acc(ch.nchunk);
  if (Gst.defined()) {
    acc[0] = Gst;
    for (int64_t c = 1; c < ch.nchunk; ++c) acc[c] = at::zeros_like(Gst);
  }
  at::parallel_for(0, ch.nchunk, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor Ls = at::empty({nb * S, kTileK}, p.st.options());
    at::Tensor Lt = at::empty({nb * Tn, kTileK}, p.st.options());
    std::vector<T> pt_sum(kTileK);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t tile = ch.first(c); tile < ch.last(c); ++tile) {
        const int64_t k0 = tile * kTileK, kl = std::min(kTileK, p.K - k0);
        const at::Tensor ws_t = p.ws.narrow(0, k0, kl), wt_t = p.wt.narrow(0, k0, kl);
        for (int64_t b0 = 0; b0 < p.B; b0 += nb) {
          const int64_t n = std::min(nb, p.B - b0);
          at::Tensor Lsv = Ls.narrow(0, 0, n * S).narrow(1, 0, kl);
          const at::Tensor st_b = p.st.narrow(0, b0 * S, n * S);
          at::mm_out(Lsv, st_b, ws_t.t());
          at::Tensor Ltv = Lt.narrow(0, 0, n * Tn).narrow(1, 0, kl);
          at::mm_out(Ltv, p.te.narrow(0, b0 * Tn, n * Tn), wt_t.t());
          T* xs = Ls.data_ptr<T>();
          T* xt = Lt.data_ptr<T>();
          for (int64_t bl = 0; bl < n; ++bl) {
            const int64_t b = b0 + bl;
            for (int64_t i = 0; i < Tn; ++i)
              teacher_prob_row(xt + (bl * Tn + i) * kTileK, kl, inv_tt, bias ? bias + k0 : nullptr, lse_t[b * Tn + i],
                               pt_sum.data(), i == 0);
            for (int64_t j = 0; j < S; ++j) {
              const T* same = (p.skip && j < Tn) ? xt + (bl * Tn + j) * kTileK : nullptr;
              student_coef_row(xs + (bl * S + j) * kTileK, kl, inv_ts, lse_s[b * S + j],
                               T(pce::teachers_of(j, Tn, p.skip)), pt_sum.data(), same, scale);
            }
          }
          if (Gst.defined()) acc[c].narrow(0, b0 * S, n * S).addmm_(Lsv, ws_t);
          if (Gw.defined()) Gw.narrow(0, k0, kl).addmm_(Lsv.t(), st_b);
        }
      }
    }
  });
  if (Gst.defined())
    for (int64_t c = 1; c < ch.nchunk; ++c) Gst.add_(acc[c]);
}

// ---- the simple path -----------------------------------------------------------------------------

template <class T>
struct Simple {
  const Prep& p;
  T inv_ts, inv_tt;
  const T *st, *te, *ws, *wt, *bias;
  Simple(const Prep& p_, T its, T itt)
      : p(p_), inv_ts(its), inv_tt(itt), st(p_.st.data_ptr<T>()), te(p_.te.data_ptr<T>()), ws(p_.ws.data_ptr<T>()),
        wt(p_.wt.data_ptr<T>()), bias(p_.bias.defined() ? p_.bias.data_ptr<T>() : nullptr) {}
  T ls(int64_t b, int64_t j, int64_t k) const {
    return pce::student_logit(simple_dot(st + (b * p.S + j) * p.D, ws + k * p.D, p.D), inv_ts);
  }
  T lt(int64_t b, int64_t i, int64_t k) const {
    return pce::teacher_logit(simple_dot(te + (b * p.T + i) * p.D, wt + k * p.D, p.D), inv_tt, bias ? bias[k] : T(0));
  }
  template <class F>
  T lse(F f) const {
    T m = pce::neg_inf<T>(), s = 0;
    for (int64_t k = 0; k < p.K; ++k) nce::lse_add(m, s, f(k), nce::ExpAccurate{});
    return nce::lse_final(m, s);
  }
  // W[j,b,k] from finished LSEs.
  T w(int64_t b, int64_t j, int64_t k, const T* lse_s, const T* lse_t) const {
    T pt_sum = 0, pt_same = 0;
    for (int64_t i = 0; i < p.T; ++i) {
      const T pt = std::exp(lt(b, i, k) - lse_t[b * p.T + i]);
      pt_sum += pt;
      if (i == j) pt_same = pt;
    }
    const T ps = std::exp(ls(b, j, k) - lse_s[b * p.S + j]);
    return pce::coef(pce::teachers_of(j, p.T, p.skip), ps, pt_sum, pt_same, p.skip && j < p.T);
  }
};

template <class T>
Stats<T> forward_simple(const Prep& p, T inv_ts, T inv_tt) {
  const Simple<T> sm(p, inv_ts, inv_tt);
  Stats<T> out;
  out.lse_s.resize(p.B * p.S);
  out.lse_t.resize(p.B * p.T);
  out.A.assign(p.B * p.T, T(0));
  out.E.assign(p.B * p.T, T(0));
  at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < p.S; ++j) out.lse_s[b * p.S + j] = sm.lse([&](int64_t k) { return sm.ls(b, j, k); });
      for (int64_t i = 0; i < p.T; ++i) {
        const T z = sm.lse([&](int64_t k) { return sm.lt(b, i, k); });
        out.lse_t[b * p.T + i] = z;
        T a = 0, e = 0;
        for (int64_t k = 0; k < p.K; ++k) {
          const T l = sm.lt(b, i, k);
          const T pt = std::exp(l - z);
          if (pt > T(0)) e += pt * l;
          for (int64_t j = 0; j < p.S; ++j)
            if (pce::paired(i, j, p.skip)) a += pt * sm.ls(b, j, k);
        }
        out.A[b * p.T + i] = a;
        out.E[b * p.T + i] = e;
      }
    }
  });
  return out;
}

template <class T>
void backward_simple(const Prep& p, T inv_ts, T inv_tt, const T* lse_s, const T* lse_t, T scale, at::Tensor Gst,
                     at::Tensor Gw) {
  const Simple<T> sm(p, inv_ts, inv_tt);
  const int64_t D = p.D;
  if (Gst.defined()) {
    T* g = Gst.data_ptr<T>();
    at::parallel_for(0, p.B * p.S, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < p.K; ++k) {
          const T w = scale * sm.w(r / p.S, r % p.S, k, lse_s, lse_t);
          for (int64_t d = 0; d < D; ++d) g[r * D + d] += w * sm.ws[k * D + d];
        }
    });
  }
  if (Gw.defined()) {
    T* g = Gw.data_ptr<T>();
    at::parallel_for(0, p.K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t r = 0; r < p.B * p.S; ++r) {
          const T w = scale * sm.w(r / p.S, r % p.S, k, lse_s, lse_t);
          for (int64_t d = 0; d < D; ++d) g[k * D + d] += w * sm.st[r * D + d];
        }
    });
  }
}

// ---- op entry points -----------------------------------------------------------------------------

// (B*S) image-major values -> (S, B) tensor.
template <class T>
at::Tensor crops_major(const std::vector<T>& v, int64_t B, int64_t C, const at::TensorOptions& opt) {
  at::Tensor t = at::empty({B, C}, opt);
  std::copy(v.begin(), v.end(), t.data_ptr<T>());
  return t.t().contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prototype_ce_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student, const at::Tensor& w_teacher,
    const c10::optional<at::Tensor>& teacher_bias, double student_temp, double teacher_temp, bool skip_same,
    int64_t impl) {
  pce::check_inputs(student, teacher, w_student, w_teacher, teacher_bias, student_temp, teacher_temp, impl);
  pce::check_pairs(student.size(0), teacher.size(0), skip_same);
  const Prep p = make_prep(student, teacher, w_student, w_teacher, teacher_bias, skip_same);
  const auto ct = pce::acc_type(student.scalar_type());
  const auto opt = student.options().dtype(ct);
  at::Tensor lse_s, lse_t, stats = at::empty({2}, opt);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(ct, "prototype_ce_cpu", [&] {
    using T = scalar_t;
    const T its = static_cast<T>(1.0 / student_temp), itt = static_cast<T>(1.0 / teacher_temp);
    const Stats<T> s = impl == 1 ? forward_simple<T>(p, its, itt) : forward_fast<T>(p, its, itt);
    const double np = static_cast<double>(pce::num_pairs(p.S, p.T, p.skip)) * static_cast<double>(p.B);
    double tot = 0, ent = 0, ent_w = 0;
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t j = 0; j < p.S; ++j)
        tot += static_cast<double>(pce::teachers_of(j, p.T, p.skip)) * static_cast<double>(s.lse_s[b * p.S + j]);
      for (int64_t i = 0; i < p.T; ++i) {
        const int64_t r = b * p.T + i;
        const double h = static_cast<double>(s.lse_t[r]) - static_cast<double>(s.E[r]);
        tot -= static_cast<double>(s.A[r]);
        ent += h;
        ent_w += static_cast<double>(pce::students_of(i, p.S, p.skip)) * h;
      }
    }
    loss = tot / np;
    T* st = stats.data_ptr<T>();
    st[0] = static_cast<T>(ent / static_cast<double>(p.B * p.T));
    st[1] = static_cast<T>(loss - ent_w / np);
    lse_s = crops_major<T>(s.lse_s, p.B, p.S, opt);
    lse_t = crops_major<T>(s.lse_t, p.B, p.T, opt);
  });
  return {at::scalar_tensor(loss, student.options()), lse_s, lse_t, stats};
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student,
    const at::Tensor& w_teacher, const c10::optional<at::Tensor>& teacher_bias, const at::Tensor& lse_student,
    const at::Tensor& lse_teacher, double student_temp, double teacher_temp, bool skip_same, bool student_grad,
    bool w_grad, int64_t impl) {
  pce::check_inputs(student, teacher, w_student, w_teacher, teacher_bias, student_temp, teacher_temp, impl);
  pce::check_pairs(student.size(0), teacher.size(0), skip_same);
  pce::check_backward(grad, lse_student, lse_teacher, student, teacher);
  const Prep p = make_prep(student, teacher, w_student, w_teacher, teacher_bias, skip_same);
  const auto ct = pce::acc_type(student.scalar_type());
  const auto opt = student.options().dtype(ct);
  at::Tensor g_st = at::empty({0}, student.options()), g_w = at::empty({0}, student.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "prototype_ce_backward_cpu", [&] {
    using T = scalar_t;
    const T its = static_cast<T>(1.0 / student_temp), itt = static_cast<T>(1.0 / teacher_temp);
    const double np = static_cast<double>(pce::num_pairs(p.S, p.T, p.skip)) * static_cast<double>(p.B);
    const T scale = static_cast<T>(grad.item<double>() / (np * student_temp));
    const at::Tensor ls = lse_student.detach().t().contiguous(), lt = lse_teacher.detach().t().contiguous();
    at::Tensor Gst = student_grad ? at::zeros({p.B * p.S, p.D}, opt) : at::Tensor();
    at::Tensor Gw = w_grad ? at::zeros({p.K, p.D}, opt) : at::Tensor();
    if (impl == 1) backward_simple<T>(p, its, itt, ls.data_ptr<T>(), lt.data_ptr<T>(), scale, Gst, Gw);
    else backward_fast<T>(p, its, itt, ls.data_ptr<T>(), lt.data_ptr<T>(), scale, Gst, Gw);
    if (student_grad) g_st = Gst.view({p.B, p.S, p.D}).transpose(0, 1).to(student.scalar_type()).contiguous();
    if (w_grad) g_w = Gw.to(w_student.scalar_type());
  });
  return {g_st, g_w};
}

}  // namespace
}  // namespace sparkct

TORCH_LIBRARY_IMPL(sparkct, CPU, m) {
  m.impl("prototype_ce", &sparkct::prototype_ce_cpu);
  m.impl("prototype_ce_backward", &sparkct::prototype_ce_backward_cpu);
}
