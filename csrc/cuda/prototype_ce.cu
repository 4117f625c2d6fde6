// CUDA kernels of the fused prototype cross-entropy (DINO's loss). Schemas: csrc/ops.cpp; maths:
// csrc/prototype_ce.h (shared with the CPU kernels); Python face: sparkct/ops/prototype_ce.py.
//
// Fast path (impl 0): the K prototypes in tiles of kt columns (kt chosen so one fp32 tile of all rows
// is at most kTileElems), processed in order on the current stream. Per tile, cuBLAS GEMMs through
// ATen (fp32 out: at::mm with out_dtype for fp16/bf16 inputs, so the logits are never rounded to
// half) give student . w_student^T (S*B x kt) and teacher . w_teacher^T (T*B x kt); then
//   forward: one warp per row updates that row's streaming state (student rows first, which also
//     turns their tile into logits; the teacher warps then read the paired students' logits);
//   backward: one warp per teacher row turns its tile into P_t, one thread per (student row, k)
//     writes W * scale (in the input dtype for fp16/bf16, for the tensor-core GEMMs), and two GEMMs
//     add W w_tile into the fp32 student gradient and write W^T student into the tile of d w_student.
// Rows stay in the inputs' crop-major order (row j*B + b); nothing larger than a tile is formed.
//
// Simple path (impl 1): one thread per row (forward, d student) or per prototype (d w_student),
// plain loops over K and D with probabilities from finished LSEs: the GPU test oracle.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "info_nce.h"  // nce::ExpFast, nce::ExpAccurate, nce::lse_add, nce::lse_final
#include "prototype_ce.h"
#include "prototype_ce_host.h"

namespace sparkct {
namespace {

using pce::RowState;

constexpr int64_t kTileElems = int64_t(1) << 24;  // fp32 elements of one tile of all rows (64 MiB)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

int64_t tile_cols(int64_t rows, int64_t K) {
  int64_t kt = kTileElems / std::max<int64_t>(rows, 1);
  kt = std::max<int64_t>(128, std::min<int64_t>(8192, kt / 128 * 128));
  return std::min(kt, K);
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = (w > v || w != w) ? w : v;  // NaN wins
  }
  return v;
}
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- fast forward epilogues ---------------------------------------------------------------------

// One warp per student row: logits in place, tile (max, sum exp) merged into the row's state.
template <class A>
__global__ void fwd_student_rows(A* __restrict__ L, int64_t rows, int64_t kl, A inv_ts, RowState<A>* __restrict__ st) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  A* x = L + r * kl;
  A m = pce::neg_inf<A>();
  for (int64_t k = lane; k < kl; k += 32) {
    const A l = pce::student_logit(x[k], inv_ts);
    x[k] = l;
    m = (l > m || l != l) ? l : m;
  }
  m = warp_max(m);
  const nce::ExpFast ex;
  A s = 0;
  if (m == m && m != pce::neg_inf<A>())
    for (int64_t k = lane; k < kl; k += 32) s += ex(x[k] - m);
  s = warp_sum(s);
  if (lane == 0) {
    RowState<A> part{m, m == m ? s : m, A(0), A(0)};
    pce::state_merge(st[r], part, ex);
  }
}

// One warp per teacher row (i, b): logits, tile max, then sums of e, e * C, e * lt, merged.
template <class A>
__global__ void fwd_teacher_rows(const A* __restrict__ Lt, const A* __restrict__ Ls, const A* __restrict__ bias,
                                 int64_t S, int64_t T, int64_t B, int64_t kl, A inv_tt, bool skip,
                                 RowState<A>* __restrict__ st) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= T * B) return;
  const int64_t i = r / B, b = r % B;
  const A* y = Lt + r * kl;
  A m = pce::neg_inf<A>();
  for (int64_t k = lane; k < kl; k += 32) {
    const A l = pce::teacher_logit(y[k], inv_tt, bias ? bias[k] : A(0));
    m = (l > m || l != l) ? l : m;
  }
  m = warp_max(m);
  const nce::ExpFast ex;
  RowState<A> part{m, A(0), A(0), A(0)};
  if (m != m) {
    part = RowState<A>{m, m, m, m};
  } else if (m != pce::neg_inf<A>()) {
    A s = 0, a = 0, h = 0;
    for (int64_t k = lane; k < kl; k += 32) {
      const A l = pce::teacher_logit(y[k], inv_tt, bias ? bias[k] : A(0));
      const A e = ex(l - m);
      A c = 0;
      for (int64_t j = 0; j < S; ++j)
        if (pce::paired(i, j, skip)) c += Ls[(j * B + b) * kl + k];
      s += e;
      a += e * c;
      h += e > A(0) ? e * l : A(0);
    }
    part = RowState<A>{m, warp_sum(s), warp_sum(a), warp_sum(h)};
  }
  if (lane == 0) pce::state_merge(st[r], part, ex);
}

// ---- fast backward epilogues ----------------------------------------------------------------------

// One warp per teacher row: P_t = exp(lt - lse) in place.
template <class A>
__global__ void bwd_teacher_probs(A* __restrict__ Lt, const A* __restrict__ bias, const A* __restrict__ lse_t,
                                  int64_t rows, int64_t kl, A inv_tt) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const nce::ExpFast ex;
  A* y = Lt + r * kl;
  const A z = lse_t[r];
  for (int64_t k = lane; k < kl; k += 32) y[k] = ex(pce::teacher_logit(y[k], inv_tt, bias ? bias[k] : A(0)) - z);
}

// One thread per (student row, k): W * scale into Wout (A or the input dtype).
template <class A, class O>
__global__ void bwd_student_coef(const A* __restrict__ Ls, const A* __restrict__ Pt, const A* __restrict__ lse_s,
                                 int64_t S, int64_t T, int64_t B, int64_t kl, A inv_ts, bool skip, A scale,
                                 O* __restrict__ W) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= S * B * kl) return;
  const int64_t r = e / kl, k = e % kl, j = r / B, b = r % B;
  const nce::ExpFast ex;
  const A ps = ex(pce::student_logit(Ls[e], inv_ts) - lse_s[r]);
  A sum = 0, same = 0;
  for (int64_t i = 0; i < T; ++i) {
    const A p = Pt[(i * B + b) * kl + k];
    sum += p;
    if (i == j) same = p;
  }
  W[e] = static_cast<O>(scale * pce::coef(pce::teachers_of(j, T, skip), ps, sum, same, skip && j < T));
}

// ---- simple kernels ----------------------------------------------------------------------------

template <class X, class A>
__device__ A dot_d(const X* a, const X* b, int64_t d) {
  A acc = 0;
  for (int64_t k = 0; k < d; ++k) acc += static_cast<A>(a[k]) * static_cast<A>(b[k]);
  return acc;
}

template <class X, class A>
struct SimpleArgs {
  const X *st, *te, *ws, *wt;
  const A* bias;
  int64_t S, T, B, D, K;
  A inv_ts, inv_tt;
  bool skip;
  __device__ A ls(int64_t j, int64_t b, int64_t k) const {
    return pce::student_logit(dot_d<X, A>(st + (j * B + b) * D, ws + k * D, D), inv_ts);
  }
  __device__ A lt(int64_t i, int64_t b, int64_t k) const {
    return pce::teacher_logit(dot_d<X, A>(te + (i * B + b) * D, wt + k * D, D), inv_tt, bias ? bias[k] : A(0));
  }
  __device__ A w(int64_t j, int64_t b, int64_t k, const A* lse_s, const A* lse_t) const {
    A sum = 0, same = 0;
    for (int64_t i = 0; i < T; ++i) {
      const A p = exp(lt(i, b, k) - lse_t[i * B + b]);
      sum += p;
      if (i == j) same = p;
    }
    const A ps = exp(ls(j, b, k) - lse_s[j * B + b]);
    return pce::coef(pce::teachers_of(j, T, skip), ps, sum, same, skip && j < T);
  }
};

// Thread per row: student rows [0, S*B) get their LSE; teacher rows their LSE, A and E.
template <class X, class A>
__global__ void fwd_simple(SimpleArgs<X, A> p, A* lse_s, A* lse_t, A* Aout, A* Eout) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const nce::ExpAccurate ex;
  if (r < p.S * p.B) {
    const int64_t j = r / p.B, b = r % p.B;
    A m = pce::neg_inf<A>(), s = 0;
    for (int64_t k = 0; k < p.K; ++k) nce::lse_add(m, s, p.ls(j, b, k), ex);
    lse_s[r] = nce::lse_final(m, s);
  } else if (r < (p.S + p.T) * p.B) {
    const int64_t q = r - p.S * p.B, i = q / p.B, b = q % p.B;
    A m = pce::neg_inf<A>(), s = 0;
    for (int64_t k = 0; k < p.K; ++k) nce::lse_add(m, s, p.lt(i, b, k), ex);
    const A z = nce::lse_final(m, s);
    A a = 0, e = 0;
    for (int64_t k = 0; k < p.K; ++k) {
      const A l = p.lt(i, b, k);
      const A pt = exp(l - z);
      if (pt > A(0)) e += pt * l;
      for (int64_t j = 0; j < p.S; ++j)
        if (pce::paired(i, j, p.skip)) a += pt * p.ls(j, b, k);
    }
    lse_t[q] = z;
    Aout[q] = a;
    Eout[q] = e;
  }
}

template <class X, class A>
__global__ void bwd_simple_student(SimpleArgs<X, A> p, const A* lse_s, const A* lse_t, A scale, A* G) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.S * p.B) return;
  for (int64_t k = 0; k < p.K; ++k) {
    const A w = scale * p.w(r / p.B, r % p.B, k, lse_s, lse_t);
    for (int64_t d = 0; d < p.D; ++d) G[r * p.D + d] += w * static_cast<A>(p.ws[k * p.D + d]);
  }
}

template <class X, class A>
__global__ void bwd_simple_w(SimpleArgs<X, A> p, const A* lse_s, const A* lse_t, A scale, A* G) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= p.K) return;
  for (int64_t r = 0; r < p.S * p.B; ++r) {
    const A w = scale * p.w(r / p.B, r % p.B, k, lse_s, lse_t);
    for (int64_t d = 0; d < p.D; ++d) G[k * p.D + d] += w * static_cast<A>(p.st[r * p.D + d]);
  }
}

// ---- host side ----------------------------------------------------------------------------------

struct Inputs {
  at::Tensor st, te, ws, wt, bias;  // contiguous, input dtype (bias: accumulation dtype, or undefined)
  int64_t S, T, B, D, K;
  bool skip;
};

Inputs prep(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student,
            const at::Tensor& w_teacher, const c10::optional<at::Tensor>& bias, bool skip) {
  Inputs in;
  in.st = student.detach().contiguous();
  in.te = teacher.detach().contiguous();
  in.ws = w_student.detach().contiguous();
  in.wt = w_teacher.detach().contiguous();
  if (bias.has_value()) in.bias = bias->detach().to(pce::acc_type(student.scalar_type())).contiguous();
  in.S = student.size(0);
  in.T = teacher.size(0);
  in.B = student.size(1);
  in.D = student.size(2);
  in.K = w_student.size(0);
  in.skip = skip;
  return in;
}

// C (contiguous, accumulation dtype) = a @ b^T, fp32 out for fp16/bf16 inputs.
void mm_acc(at::Tensor& C, const at::Tensor& a, const at::Tensor& bt) {
  if (a.scalar_type() == C.scalar_type()) at::mm_out(C, a, bt);
  else at::mm_out(C, a, bt, C.scalar_type());
}

unsigned blocks_for(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

// Per-row statistics on the device, crop-major: lse_s (S*B), lse_t, A, E (T*B).
struct DevStats {
  at::Tensor lse_s, lse_t, A, E;
};

template <class A>
DevStats forward_fast(const Inputs& in, double its, double itt) {
  const auto acc = pce::acc_type(in.st.scalar_type());
  const auto opt = in.st.options().dtype(acc);
  const int64_t rs = in.S * in.B, rt = in.T * in.B;
  const int64_t kt = tile_cols(rs + rt, in.K);
  at::Tensor bufs = at::empty({rs * kt}, opt), buft = at::empty({rt * kt}, opt);
  // states as (rows, 4) tensors: m, s, a, h
  at::Tensor ss = at::empty({rs, 4}, opt), ts = at::empty({rt, 4}, opt);
  ss.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
  ss.narrow(1, 1, 3).zero_();
  ts.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
  ts.narrow(1, 1, 3).zero_();
  static_assert(sizeof(RowState<A>) == 4 * sizeof(A), "RowState layout");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const A* bias = in.bias.defined() ? in.bias.data_ptr<A>() : nullptr;
  for (int64_t k0 = 0; k0 < in.K; k0 += kt) {
    const int64_t kl = std::min(kt, in.K - k0);
    at::Tensor Ls = bufs.narrow(0, 0, rs * kl).view({rs, kl}), Lt = buft.narrow(0, 0, rt * kl).view({rt, kl});
    mm_acc(Ls, in.st.view({rs, in.D}), in.ws.narrow(0, k0, kl).t());
    mm_acc(Lt, in.te.view({rt, in.D}), in.wt.narrow(0, k0, kl).t());
    fwd_student_rows<A><<<blocks_for(rs, kWarps), kThreads, 0, stream>>>(
        Ls.data_ptr<A>(), rs, kl, static_cast<A>(its), reinterpret_cast<RowState<A>*>(ss.data_ptr<A>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fwd_teacher_rows<A><<<blocks_for(rt, kWarps), kThreads, 0, stream>>>(
        Lt.data_ptr<A>(), Ls.data_ptr<A>(), bias ? bias + k0 : nullptr, in.S, in.T, in.B, kl, static_cast<A>(itt),
        in.skip, reinterpret_cast<RowState<A>*>(ts.data_ptr<A>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  DevStats out;
  out.lse_s = ss.select(1, 0) + ss.select(1, 1).log();
  out.lse_t = ts.select(1, 0) + ts.select(1, 1).log();
  out.A = ts.select(1, 2) / ts.select(1, 1);
  out.E = ts.select(1, 3) / ts.select(1, 1);
  return out;
}

template <class X, class A>
SimpleArgs<X, A> simple_args(const Inputs& in, double its, double itt) {
  return SimpleArgs<X, A>{in.st.data_ptr<X>(), in.te.data_ptr<X>(), in.ws.data_ptr<X>(), in.wt.data_ptr<X>(),
                          in.bias.defined() ? in.bias.data_ptr<A>() : nullptr,
                          in.S, in.T, in.B, in.D, in.K, static_cast<A>(its), static_cast<A>(itt), in.skip};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prototype_ce_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student, const at::Tensor& w_teacher,
    const c10::optional<at::Tensor>& teacher_bias, double student_temp, double teacher_temp, bool skip_same,
    int64_t impl) {
  pce::check_inputs(student, teacher, w_student, w_teacher, teacher_bias, student_temp, teacher_temp, impl);
  pce::check_pairs(student.size(0), teacher.size(0), skip_same);
  const c10::cuda::CUDAGuard guard(student.device());
  const Inputs in = prep(student, teacher, w_student, w_teacher, teacher_bias, skip_same);
  const auto acc = pce::acc_type(student.scalar_type());
  const auto opt = student.options().dtype(acc);
  const double its = 1.0 / student_temp, itt = 1.0 / teacher_temp;
  DevStats s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "prototype_ce_cuda", [&] {
    using X = scalar_t;
    using A = at::acc_type<X, true>;
    if (impl == 1) {
      s.lse_s = at::empty({in.S * in.B}, opt);
      s.lse_t = at::empty({in.T * in.B}, opt);
      s.A = at::empty({in.T * in.B}, opt);
      s.E = at::empty({in.T * in.B}, opt);
      const int64_t rows = (in.S + in.T) * in.B;
      fwd_simple<X, A><<<blocks_for(rows, 128), 128, 0, at::cuda::getCurrentCUDAStream()>>>(
          simple_args<X, A>(in, its, itt), s.lse_s.data_ptr<A>(), s.lse_t.data_ptr<A>(), s.A.data_ptr<A>(),
          s.E.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      s = forward_fast<A>(in, its, itt);
    }
  });
  // loss and statistics from the per-row values, on the device (fp64 sums)
  const double np = static_cast<double>(pce::num_pairs(in.S, in.T, in.skip)) * static_cast<double>(in.B);
  std::vector<double> cj(in.S), di(in.T);
  for (int64_t j = 0; j < in.S; ++j) cj[j] = static_cast<double>(pce::teachers_of(j, in.T, in.skip));
  for (int64_t i = 0; i < in.T; ++i) di[i] = static_cast<double>(pce::students_of(i, in.S, in.skip));
  const at::Tensor wc = at::tensor(cj, at::TensorOptions().dtype(at::kDouble)).to(student.device()).view({in.S, 1});
  const at::Tensor wd = at::tensor(di, at::TensorOptions().dtype(at::kDouble)).to(student.device()).view({in.T, 1});
  const at::Tensor ls = s.lse_s.to(at::kDouble).view({in.S, in.B});
  const at::Tensor H = (s.lse_t.to(at::kDouble) - s.E.to(at::kDouble)).view({in.T, in.B});
  const at::Tensor loss = ((ls * wc).sum() - s.A.to(at::kDouble).sum()) / np;
  at::Tensor stats = at::stack({H.mean(), loss - (H * wd).sum() / np}).to(acc);
  return {loss.to(student.scalar_type()), s.lse_s.view({in.S, in.B}).to(acc), s.lse_t.view({in.T, in.B}).to(acc),
          stats};
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student,
    const at::Tensor& w_teacher, const c10::optional<at::Tensor>& teacher_bias, const at::Tensor& lse_student,
    const at::Tensor& lse_teacher, double student_temp, double teacher_temp, bool skip_same, bool student_grad,
    bool w_grad, int64_t impl) {
  pce::check_inputs(student, teacher, w_student, w_teacher, teacher_bias, student_temp, teacher_temp, impl);
  pce::check_pairs(student.size(0), teacher.size(0), skip_same);
  pce::check_backward(grad, lse_student, lse_teacher, student, teacher);
  const c10::cuda::CUDAGuard guard(student.device());
  const Inputs in = prep(student, teacher, w_student, w_teacher, teacher_bias, skip_same);
  const auto acc = pce::acc_type(student.scalar_type());
  const auto opt = student.options().dtype(acc);
  const double its = 1.0 / student_temp, itt = 1.0 / teacher_temp;
  const double np = static_cast<double>(pce::num_pairs(in.S, in.T, in.skip)) * static_cast<double>(in.B);
  const double scale = grad.item<double>() / (np * student_temp);
  const at::Tensor lse_s = lse_student.detach().contiguous(), lse_t = lse_teacher.detach().contiguous();
  const int64_t rs = in.S * in.B, rt = in.T * in.B;
  at::Tensor Gst = student_grad ? at::zeros({rs, in.D}, opt) : at::Tensor();
  at::Tensor Gw = w_grad ? at::zeros({in.K, in.D}, opt) : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "prototype_ce_backward_cuda", [&] {
    using X = scalar_t;
    using A = at::acc_type<X, true>;
    if (impl == 1) {
      const auto args = simple_args<X, A>(in, its, itt);
      if (student_grad) {
        bwd_simple_student<X, A><<<blocks_for(rs, 128), 128, 0, stream>>>(args, lse_s.data_ptr<A>(),
                                                                           lse_t.data_ptr<A>(), A(scale),
                                                                           Gst.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (w_grad) {
        bwd_simple_w<X, A><<<blocks_for(in.K, 128), 128, 0, stream>>>(args, lse_s.data_ptr<A>(), lse_t.data_ptr<A>(),
                                                                       A(scale), Gw.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    constexpr bool same_type = std::is_same<X, A>::value;
    const int64_t kt = tile_cols(rs + rt, in.K);
    at::Tensor bufs = at::empty({rs * kt}, opt), buft = at::empty({rt * kt}, opt);
    at::Tensor bufw = same_type ? bufs : at::empty({rs * kt}, in.st.options());  // W in the input dtype
    at::Tensor tmp = (!same_type && student_grad) ? at::empty({rs, in.D}, opt) : at::Tensor();
    const A* bias = in.bias.defined() ? in.bias.data_ptr<A>() : nullptr;
    const at::Tensor st2 = in.st.view({rs, in.D});
    for (int64_t k0 = 0; k0 < in.K; k0 += kt) {
      const int64_t kl = std::min(kt, in.K - k0);
      at::Tensor Ls = bufs.narrow(0, 0, rs * kl).view({rs, kl}), Lt = buft.narrow(0, 0, rt * kl).view({rt, kl});
      at::Tensor W = bufw.narrow(0, 0, rs * kl).view({rs, kl});
      const at::Tensor ws_t = in.ws.narrow(0, k0, kl);
      mm_acc(Ls, st2, ws_t.t());
      mm_acc(Lt, in.te.view({rt, in.D}), in.wt.narrow(0, k0, kl).t());
      bwd_teacher_probs<A><<<blocks_for(rt, kWarps), kThreads, 0, stream>>>(
          Lt.data_ptr<A>(), bias ? bias + k0 : nullptr, lse_t.data_ptr<A>(), rt, kl, A(itt));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bwd_student_coef<A, X><<<blocks_for(rs * kl, kThreads), kThreads, 0, stream>>>(
          Ls.data_ptr<A>(), Lt.data_ptr<A>(), lse_s.data_ptr<A>(), in.S, in.T, in.B, kl, A(its), in.skip, A(scale),
          W.data_ptr<X>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (student_grad) {
        if (same_type) {
          Gst.addmm_(W, ws_t);
        } else {
          at::mm_out(tmp, W, ws_t, acc);
          Gst.add_(tmp);
        }
      }
      if (w_grad) {
        at::Tensor gw = Gw.narrow(0, k0, kl);
        if (same_type) at::mm_out(gw, W.t(), st2);
        else at::mm_out(gw, W.t(), st2, acc);
      }
    }
  });
  at::Tensor g_st = student_grad ? Gst.view({in.S, in.B, in.D}).to(student.scalar_type()) : at::empty({0}, student.options());
  at::Tensor g_w = w_grad ? Gw.to(w_student.scalar_type()) : at::empty({0}, student.options());
  return {g_st, g_w};
}

}  // namespace
}  // namespace sparkct

TORCH_LIBRARY_IMPL(sparkct, CUDA, m) {
  m.impl("prototype_ce", &sparkct::prototype_ce_cuda);
  m.impl("prototype_ce_backward", &sparkct::prototype_ce_backward_cuda);
}
