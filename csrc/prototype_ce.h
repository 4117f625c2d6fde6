// Fused prototype cross-entropy (DINO's loss, SwAV-style prototype scores): the per-element maths
// shared by the CPU (csrc/cpu/prototype_ce.cpp) and CUDA (csrc/cuda/prototype_ce.cu) kernels, so
// the CPU tests exercise the arithmetic the GPU runs.
//
// Inputs: student (S, B, D), teacher (T, B, D), prototypes w_student / w_teacher (K, D), an optional
// teacher bias (K,), temperatures tau_s, tau_t. Logits (no normalization inside: the caller
// normalizes, as DINO's head does):
//   ls[j,b,k] = (student[j,b] . w_student[k]) / tau_s
//   lt[i,b,k] = (teacher[i,b] . w_teacher[k]) / tau_t + bias[k],   p_t = softmax_k(lt)
// Pairs (i, j): every teacher crop with every student crop, minus i == j when skip_same (the same
// view). c_j = number of teachers paired with student j, d_i = number of students paired with teacher i.
//   CE(i,j,b) = logZs[j,b] - sum_k p_t[i,b,k] ls[j,b,k]
//   loss = sum over valid pairs and b of CE / (npairs B)
//        = (sum_{j,b} c_j logZs[j,b] - sum_{i,b} A[i,b]) / (npairs B),
//   A[i,b] = sum_k p_t[i,b,k] C[i,b,k],  C[i,b,k] = sum_{j paired with i} ls[j,b,k]
// The forward streams over K tiles keeping per row: the student's (max, sum exp); the teacher's
// (max, sum exp, sum exp * C, sum exp * lt) -- flash-attention style, rescaled when the max grows.
// The last one gives the teacher entropy H = logZt - E_p[lt] (and KL(p_t || p_s) = CE - H) for free.
//
// Backward (before the factor g / (npairs B tau_s)), with P_s = exp(ls - logZs), P_t = exp(lt - logZt):
//   dL/d ls[j,b,k] ~ W[j,b,k] = c_j P_s[j,b,k] - sum_{i paired with j} P_t[i,b,k]
//   d student[j,b] = sum_k W[j,b,k] w_student[k],   d w_student[k] = sum_{j,b} W[j,b,k] student[j,b]
// Teacher inputs get no gradient (DINO's teacher is an EMA copy behind stop-gradient).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace sparkct {
namespace pce {

// Is (teacher i, student j) a pair?
SPARKCT_HD bool paired(int64_t i, int64_t j, bool skip_same) { return !(skip_same && i == j); }
// c_j: teachers paired with student j.
SPARKCT_HD int64_t teachers_of(int64_t j, int64_t T, bool skip_same) { return T - ((skip_same && j < T) ? 1 : 0); }
// d_i: students paired with teacher i.
SPARKCT_HD int64_t students_of(int64_t i, int64_t S, bool skip_same) { return S - ((skip_same && i < S) ? 1 : 0); }
SPARKCT_HD int64_t num_pairs(int64_t S, int64_t T, bool skip_same) {
  return S * T - (skip_same ? (S < T ? S : T) : 0);
}

// The logits, written once and used by forward and backward alike (so the backward's recomputed
// logits are the forward's bit for bit; on the device the products are rounded explicitly).
SPARKCT_HD float student_logit(float dot, float inv_ts) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(dot, inv_ts);
#else
  return dot * inv_ts;
#endif
}
SPARKCT_HD double student_logit(double dot, double inv_ts) { return dot * inv_ts; }
SPARKCT_HD float teacher_logit(float dot, float inv_tt, float bias) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(dot, inv_tt), bias);
#else
  return dot * inv_tt + bias;
#endif
}
SPARKCT_HD double teacher_logit(double dot, double inv_tt, double bias) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dmul_rn(dot, inv_tt), bias);
#else
  return dot * inv_tt + bias;
#endif
}

template <class T>
SPARKCT_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }
template <class T>
SPARKCT_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }

// Streaming state of a teacher row: max m, and relative to it s = sum e, a = sum e C, h = sum e lt
// (e = exp(lt - m)). The student rows use (m, s) only (a, h stay 0). Starts at (-inf, 0, 0, 0).
template <class T>
struct RowState {
  T m, s, a, h;
};
template <class T>
SPARKCT_HD RowState<T> state_init() { return RowState<T>{neg_inf<T>(), T(0), T(0), T(0)}; }

// Merge a partial state (a tile's, relative to its own max) into st. NaN anywhere propagates; a
// partial with max -inf (all logits -inf) is a no-op.
template <class T, class ExpFn>
SPARKCT_HD void state_merge(RowState<T>& st, const RowState<T>& p, ExpFn exp_) {
  if (p.m != p.m || p.s != p.s || p.a != p.a || p.h != p.h || st.m != st.m) {
    st.m = st.s = st.a = st.h = quiet_nan<T>();
    return;
  }
  if (p.m == neg_inf<T>()) return;
  if (st.m == neg_inf<T>()) {
    st = p;
    return;
  }
  if (p.m > st.m) {
    const T f = exp_(st.m - p.m);
    st.s = st.s * f + p.s;
    st.a = st.a * f + p.a;
    st.h = st.h * f + p.h;
    st.m = p.m;
  } else {
    const T f = exp_(p.m - st.m);
    st.s += p.s * f;
    st.a += p.a * f;
    st.h += p.h * f;
  }
}

// log sum exp of a finished state (-inf for an all -inf row, NaN for NaN).
template <class T>
SPARKCT_HD T state_lse(const RowState<T>& st) {
  if (st.m != st.m || st.s != st.s) return quiet_nan<T>();
  if (st.m == neg_inf<T>()) return neg_inf<T>();
  return st.m + log(st.s);
}

// The backward coefficient W[j,b,k] for student crop j, given P_s[j,b,k], the sum over all teacher
// crops of P_t[i,b,k] and P_t[j,b,k] (used only when j is also a teacher crop and skip_same).
template <class T>
SPARKCT_HD T coef(int64_t c_j, T ps, T pt_sum, T pt_same, bool drop_same) {
  return T(c_j) * ps - (drop_same ? pt_sum - pt_same : pt_sum);
}

}  // namespace pce
}  // namespace sparkct
