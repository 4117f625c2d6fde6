"""Fused prototype cross-entropy: DINO's loss (and SwAV-style prototype scores), tile by tile over K.

``prototype_cross_entropy(student, teacher, w_student, w_teacher, teacher_bias, student_temp,
teacher_temp, skip_same)`` with student (S, B, D) and teacher (T, B, D) crop features and prototypes
w_student / w_teacher (K, D) is

    mean over pairs (i, j) of  mean over b of  -sum_k p_t[i,b,k] log_softmax(s[j,b] / student_temp)_k
    s[j,b] = student[j,b] @ w_student.T,  p_t[i,b] = softmax(teacher[i,b] @ w_teacher.T / teacher_temp
                                                              + teacher_bias)

over every teacher crop i and student crop j, the pair i == j (the same view: the teacher sees the
first T crops) left out when ``skip_same`` (DINO). Nothing is normalized inside (DINO's head
normalizes). DINO's centering is ``teacher_bias = -center / teacher_temp``; a Sinkhorn-Knopp
assignment (DINOv2) is ``teacher_bias = prototype_sinkhorn(...)``.

The kernels never form the (crops x B) x K logits: with CE(i,j,b) = logZ_s(j,b) - E_{p_t(i,b)}[s(j,b)/tau_s]
the forward streams over K tiles keeping, per row, the student's log-sum-exp and the teacher's
(max, sum, sum weighted by the paired students' logits, sum weighted by its own logits); the backward
recomputes each tile's probabilities from the saved log-sum-exps. Extra memory is O(rows) plus one
tile and one gradient-sized accumulator per thread. fp16/bf16/fp32 inputs accumulate in fp32, fp64 in fp64.

Gradients flow to ``student`` and ``w_student`` only: the teacher inputs (teacher, w_teacher,
teacher_bias) are constants of the loss (DINO's teacher sits behind a stop-gradient); they are
detached here. ``return_stats=True`` also returns DINO's collapse signals at no extra pass: the
teacher's mean entropy and the mean KL(p_t || p_s) over the pairs (KL = CE - H(p_t)).
Double backward is not supported (use ``sparkct.ops.reference.prototype_cross_entropy``).
"""

from __future__ import annotations

import torch

from sparkct._ext import check_device
from sparkct.ops.info_nce import check_temperature
from sparkct.profiling import ranged

__all__ = ["IMPLS", "prototype_cross_entropy", "prototype_sinkhorn"]

#: kernel choice: "auto"/"fast" = the tiled kernels, "simple" = the plain per-element kernels (a test oracle).
IMPLS = {"auto": 0, "fast": 0, "simple": 1}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WHO = "prototype_cross_entropy"


def _check(student, teacher, w_student, w_teacher, teacher_bias, student_temp, teacher_temp, skip_same):
    named = (("student", student, 3), ("teacher", teacher, 3), ("w_student", w_student, 2), ("w_teacher", w_teacher, 2))
    for name, t, nd in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_WHO}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != nd:
            shape = "(crops, B, D)" if nd == 3 else "(K, D)"
            raise ValueError(f"{_WHO}: {name} must be {nd}-D {shape}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{_WHO}: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
    S, B, D = student.shape
    K = w_student.shape[0]
    if 0 in (S, teacher.shape[0], B, D, K):
        raise ValueError(
            f"{_WHO}: empty input (S = {S}, T = {teacher.shape[0]}, B = {B}, D = {D}, K = {K}); all must be >= 1"
        )
    if teacher.shape[1:] != (B, D):
        raise ValueError(f"{_WHO}: teacher must be (T, {B}, {D}) like the student, got {tuple(teacher.shape)}")
    if w_student.shape[1] != D or w_teacher.shape != w_student.shape:
        raise ValueError(
            f"{_WHO}: w_student and w_teacher must both be (K, {D}), got {tuple(w_student.shape)} and "
            f"{tuple(w_teacher.shape)}"
        )
    if teacher_bias is not None:
        if not isinstance(teacher_bias, torch.Tensor) or teacher_bias.shape != (K,):
            got = tuple(teacher_bias.shape) if isinstance(teacher_bias, torch.Tensor) else type(teacher_bias).__name__
            raise ValueError(f"{_WHO}: teacher_bias must be a ({K},) tensor or None, got {got}")
    for name, t in (
        ("teacher", teacher),
        ("w_student", w_student),
        ("w_teacher", w_teacher),
        ("teacher_bias", teacher_bias),
    ):
        if t is not None and t.dtype != student.dtype:
            raise ValueError(f"{_WHO}: {name} dtype {t.dtype} differs from the student's {student.dtype}")
    T = teacher.shape[0]
    if S * T - (min(S, T) if skip_same else 0) < 1:
        raise ValueError(f"{_WHO}: no (teacher, student) pair left (S = {S}, T = {T}, skip_same = {skip_same})")
    ts = check_temperature(student_temp, who=f"{_WHO}: student", dtype=student.dtype)
    tt = check_temperature(teacher_temp, who=f"{_WHO}: teacher", dtype=student.dtype)
    check_device(_WHO, student, teacher, w_student, w_teacher, teacher_bias)
    return ts, tt


def _autocast(*ts):
    """Under autocast every input runs in the autocast dtype, as the matmuls of the plain loss would (an
    fp32 prototype weight with bf16 features, say); gradients return in each input's own dtype."""
    first = ts[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return ts
    if not all(t is None or (isinstance(t, torch.Tensor) and t.is_floating_point()) for t in ts):
        return ts  # _check names the problem
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(None if t is None else t.to(dt) for t in ts)


@ranged("sparkct.prototype_cross_entropy")
def prototype_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    w_student: torch.Tensor,
    w_teacher: torch.Tensor,
    teacher_bias: torch.Tensor | None = None,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    skip_same: bool = True,
    *,
    return_stats: bool = False,
    impl: str = "auto",
):
    """Fused prototype cross-entropy, a scalar in the inputs' dtype (see the module docstring).

    student (S, B, D), teacher (T, B, D): crop features (the teacher's are the first T crops);
    w_student, w_teacher (K, D): prototypes; teacher_bias (K,) or None, added to the teacher's logits
    after dividing by teacher_temp (DINO centering: -center / teacher_temp). skip_same: leave out the
    pairs (i, i). Under autocast all inputs run in the autocast dtype (outside it they must share one
    dtype). return_stats: also return {"teacher_entropy", "kl"} (detached 0-d fp32 tensors, fp64
    for fp64 input). impl: "auto" (tiled kernels) or "simple" (per-element kernels, a test oracle).
    """
    student, teacher, w_student, w_teacher, teacher_bias = _autocast(
        student, teacher, w_student, w_teacher, teacher_bias
    )
    ts, tt = _check(student, teacher, w_student, w_teacher, teacher_bias, student_temp, teacher_temp, skip_same)
    if impl not in IMPLS:
        raise ValueError(f"{_WHO}: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    bias = None if teacher_bias is None else teacher_bias.detach()
    loss, _, _, stats = torch.ops.sparkct.prototype_ce(
        student, teacher.detach(), w_student, w_teacher.detach(), bias, ts, tt, bool(skip_same), IMPLS[impl]
    )
    if return_stats:
        return loss, {"teacher_entropy": stats[0], "kl": stats[1]}
    return loss


# ---- fake (meta) kernels and autograd ------------------------------------------------------------------


@torch.library.register_fake("sparkct::prototype_ce")
def _prototype_ce_fake(
    student, teacher, w_student, w_teacher, teacher_bias, student_temp, teacher_temp, skip_same, impl
):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    S, B, _ = student.shape
    return (
        student.new_empty(()),
        student.new_empty((S, B), dtype=acc),
        student.new_empty((teacher.shape[0], B), dtype=acc),
        student.new_empty((2,), dtype=acc),
    )


@torch.library.register_fake("sparkct::prototype_ce_backward")
def _prototype_ce_backward_fake(
    grad, student, teacher, w_student, w_teacher, teacher_bias, lse_s, lse_t, ts, tt, skip_same, s_grad, w_grad, impl
):
    g_s = torch.empty_like(student, memory_format=torch.contiguous_format) if s_grad else student.new_empty((0,))
    g_w = torch.empty_like(w_student, memory_format=torch.contiguous_format) if w_grad else student.new_empty((0,))
    return g_s, g_w


def _setup_context(ctx, inputs, output):
    student, teacher, w_student, w_teacher, bias, ts, tt, skip_same, impl = inputs
    _, lse_s, lse_t, stats = output
    ctx.save_for_backward(student, teacher, w_student, w_teacher, bias, lse_s, lse_t)
    ctx.args = (ts, tt, skip_same, impl)
    ctx.mark_non_differentiable(lse_s, lse_t, stats)


@ranged("sparkct.prototype_cross_entropy.backward")
def _backward(ctx, grad_loss, _g_lse_s, _g_lse_t, _g_stats):
    student, teacher, w_student, w_teacher, bias, lse_s, lse_t = ctx.saved_tensors
    ts, tt, skip_same, impl = ctx.args
    need = ctx.needs_input_grad
    g_s, g_w = torch.ops.sparkct.prototype_ce_backward(
        grad_loss, student, teacher, w_student, w_teacher, bias, lse_s, lse_t, ts, tt, skip_same, need[0], need[2], impl
    )
    # the teacher inputs are constants of the loss: no gradient (the Python face detaches them)
    return (g_s if need[0] else None, None, g_w if need[2] else None) + (None,) * 6


torch.library.register_autograd("sparkct::prototype_ce", _backward, setup_context=_setup_context)


def _bw_backward(ctx, *grads):
    raise RuntimeError(
        "prototype_cross_entropy: double backward is not supported by the fused kernels; "
        "differentiate sparkct.ops.reference.prototype_cross_entropy instead"
    )


def _bw_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd("sparkct::prototype_ce_backward", _bw_backward, setup_context=_bw_setup_context)


# ---- Sinkhorn-Knopp in tiles --------------------------------------------------------------------------


def _reduce(all_reduce, x):
    if all_reduce is None:
        return x
    out = all_reduce(x)
    return x if out is None else out


@torch.no_grad()
@ranged("sparkct.prototype_sinkhorn")
def prototype_sinkhorn(
    teacher: torch.Tensor,
    w_teacher: torch.Tensor,
    teacher_temp: float,
    iters: int = 3,
    all_reduce=None,
    *,
    tile: int = 8192,
) -> torch.Tensor:
    """The teacher bias (K,) that turns the teacher's softmax into DINOv2's Sinkhorn-Knopp assignment:
    ``softmax(teacher @ w_teacher.T / teacher_temp + bias)`` row by row equals DINOv2's
    ``sinkhorn_knopp_teacher(teacher @ w_teacher.T, teacher_temp, iters)`` (sparkct.ops.reference
    has it), computed over K tiles of `tile` prototypes without forming the N x K matrix.

    teacher (N, D): every teacher row of this rank (e.g. (T, B, D) flattened); w_teacher (K, D).
    all_reduce: None (one process) or a callable that sums a K-vector (fp32; fp64 for fp64 input)
    over the ranks, in place like ``torch.distributed.all_reduce`` or by returning the sum. It is
    called 2 + iters times per call. How: DINOv2's scalings are a column scaling c (per sample) and a row
    scaling r (per prototype); the assignment is softmax(l + log r) whatever c is, so only log r is
    kept: each iteration divides r by the global per-prototype sum of the current assignment. The first
    iteration (before any per-sample normalization, as DINOv2) sums exp(l) relative to the ranks' mean
    per-prototype maximum (exact; stable while the ranks' maxima differ by less than ~80 / temp units
    of logit). Departure: where DINOv2 overflows (logits / temp > 88 in fp32) or divides by zero (a
    prototype no sample reaches), this stays finite (a zero sum is clamped to the smallest normal).
    The bias is shifted so its largest entry is 0 (softmax is shift-invariant)."""
    if not isinstance(teacher, torch.Tensor) or teacher.dim() != 2:
        raise ValueError(f"prototype_sinkhorn: teacher must be 2-D (N, D), got {getattr(teacher, 'shape', teacher)}")
    if not isinstance(w_teacher, torch.Tensor) or w_teacher.dim() != 2 or w_teacher.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"prototype_sinkhorn: w_teacher must be 2-D (K, {teacher.shape[1]}), "
            f"got {getattr(w_teacher, 'shape', w_teacher)}"
        )
    if teacher.dtype != w_teacher.dtype or teacher.dtype not in _DTYPES:
        raise ValueError(
            "prototype_sinkhorn: teacher and w_teacher must share a float dtype, "
            f"got {teacher.dtype} and {w_teacher.dtype}"
        )
    if w_teacher.shape[0] == 0:
        raise ValueError("prototype_sinkhorn: empty prototype set")
    if teacher.shape[0] == 0 and all_reduce is None:
        # no rows (e.g. no masked patch for iBOT): no assignment to balance, no scaling
        return teacher.new_zeros(w_teacher.shape[0])
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"prototype_sinkhorn: iters must be an int >= 1, got {iters!r}")
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"prototype_sinkhorn: tile must be an int >= 1, got {tile!r}")
    temp = check_temperature(teacher_temp, who="prototype_sinkhorn: teacher", dtype=teacher.dtype)
    check_device("prototype_sinkhorn", teacher, w_teacher)
    acc = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    t = teacher.detach()
    w = w_teacher.detach()
    K = w.shape[0]
    spans = [(k0, min(K, k0 + tile)) for k0 in range(0, K, tile)]

    def logits(k0, k1):
        return (t @ w[k0:k1].t()).to(acc) / temp

    tiny = torch.finfo(acc).tiny
    # iteration 1: row sums of exp(l) (DINOv2's Q after its global scaling, uniform in the samples)
    # a rank with no rows (iBOT: no masked patch there) takes part in every all-reduce with zeros
    have = t.shape[0] > 0
    mx = torch.cat([logits(k0, k1).amax(0) for k0, k1 in spans]) if have else w.new_zeros(K, dtype=acc)
    if all_reduce is not None:
        ranks = _reduce(all_reduce, torch.full_like(mx, float(have)))
        if float(ranks[0]) == 0:  # no rows on any rank (every rank sees the same sum: no later all-reduce)
            return teacher.new_zeros(K)
        mx = _reduce(all_reduce, mx) / ranks
    rows = torch.cat([torch.exp(logits(k0, k1) - mx[k0:k1]).sum(0) for k0, k1 in spans])
    rows = _reduce(all_reduce, rows)
    log_r = -(mx + torch.log(rows.clamp_min(tiny)))
    for _ in range(iters - 1):
        # column normalization: log c_b = -logsumexp_k (l + log r)
        lse = torch.full((t.shape[0],), float("-inf"), dtype=acc, device=t.device)
        for k0, k1 in spans:
            lse = torch.logaddexp(lse, torch.logsumexp(logits(k0, k1) + log_r[k0:k1], dim=1))
        rows = torch.cat([torch.exp(logits(k0, k1) + log_r[k0:k1] - lse[:, None]).sum(0) for k0, k1 in spans])
        rows = _reduce(all_reduce, rows)
        log_r = log_r - torch.log(rows.clamp_min(tiny))
    return (log_r - log_r.max()).to(teacher.dtype)
