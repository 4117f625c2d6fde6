"""sparkct.ops.prototype_cross_entropy (DINO's loss): the fused kernels against the plain-PyTorch
reference (values, gradients, collapse statistics), the simple kernels, gradcheck, opcheck,
torch.compile, bad input; prototype_sinkhorn against DINOv2's Sinkhorn-Knopp (sparkct.ops.reference),
including its all-reduce over simulated ranks. CUDA cases run where a GPU is present."""

from __future__ import annotations

import threading

import pytest
import torch

from sparkct.ops import prototype_cross_entropy, prototype_sinkhorn
from sparkct.ops import reference as ref

OP = torch.ops.sparkct.prototype_ce
OP_BWD = torch.ops.sparkct.prototype_ce_backward


def make(S, T, B, D, K, *, dtype=torch.float32, device="cpu", bias=True, seed=0):
    """Normalized features and prototypes as DINO's head makes them; correlated crops."""
    g = torch.Generator().manual_seed(seed + 7 * S + 13 * K)
    base = torch.randn(1, B, D, generator=g, dtype=torch.float64)
    st = torch.nn.functional.normalize(base + 0.7 * torch.randn(S, B, D, generator=g, dtype=torch.float64), dim=-1)
    te = torch.nn.functional.normalize(base + 0.7 * torch.randn(T, B, D, generator=g, dtype=torch.float64), dim=-1)
    ws = torch.nn.functional.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)
    wt = torch.nn.functional.normalize(ws + 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)
    b = 0.5 * torch.randn(K, generator=g, dtype=torch.float64) if bias else None
    return [None if x is None else x.to(device=device, dtype=dtype) for x in (st, te, ws, wt, b)]


def run(fn, st, te, ws, wt, b, **kw):
    st = st.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(True)
    loss, stats = fn(st, te, ws, wt, b, return_stats=True, **kw)
    gs, gw = torch.autograd.grad(loss, [st, ws])
    return loss.detach(), gs, gw, stats["teacher_entropy"], stats["kl"]


def fused(impl="auto"):
    return lambda *a, **kw: prototype_cross_entropy(*a, impl=impl, **kw)


def reference(*a, **kw):
    return ref.prototype_cross_entropy(*a, **kw)


def as64(xs):
    return [None if x is None else x.double() for x in xs]


def assert_close(got, want, rtol, atol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), rtol=rtol, atol=atol)


# S, T, B, D, K: K below, at and across the 256-prototype tile, ragged; T > S; a single pair.
SHAPES = [(8, 2, 4, 32, 300), (3, 2, 5, 16, 256), (4, 2, 3, 8, 1), (2, 3, 2, 16, 513), (1, 1, 3, 16, 40)]


@pytest.mark.parametrize("impl", ["auto", "simple"])
@pytest.mark.parametrize("skip_same", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp64(device, shape, skip_same, impl):
    S, T = shape[:2]
    if skip_same and S == 1 and T == 1:
        pytest.skip("no pair left (tested in test_bad_input_is_named)")
    xs = make(*shape, dtype=torch.float64, device=device)
    got = run(fused(impl), *xs, skip_same=skip_same)
    want = run(reference, *xs, skip_same=skip_same)
    assert got[0].dtype == torch.float64
    assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["auto", "simple"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_matches_reference_fp32(device, shape, bias, impl):
    xs = make(*shape, device=device, bias=bias)
    got = run(fused(impl), *xs)
    want = run(reference, *as64(xs))
    assert got[0].dtype == torch.float32
    assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_many_tiles_and_threads_fp32():
    """K = 65,536 / 7 + ragged over many tiles and chunks; the DINO temperatures."""
    xs = make(10, 2, 3, 64, 9363)
    got = run(fused(), *xs)
    want = run(reference, *as64(xs))
    assert_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_fp32_reference(device, dtype):
    xs = make(6, 2, 4, 32, 700, device=device, dtype=dtype)
    got = run(fused(), *xs)
    want = run(reference, *[None if x is None else x.float() for x in xs])
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 3e-2  # the loss and grads rounded to the dtype
    assert_close(got, want, rtol=tol, atol=tol * 1e-2)


def test_stats_are_entropy_and_kl():
    """teacher_entropy and kl by their definitions, computed here independently."""
    st, te, ws, wt, b = make(4, 2, 3, 16, 50, dtype=torch.float64)
    loss, stats = prototype_cross_entropy(st, te, ws, wt, b, 0.1, 0.04, True, return_stats=True)
    lp_t = torch.log_softmax(te @ wt.t() / 0.04 + b, -1)
    lp_s = torch.log_softmax(st @ ws.t() / 0.1, -1)
    h = -(lp_t.exp() * lp_t).sum(-1).mean()
    kls = [(lp_t[i].exp() * (lp_t[i] - lp_s[j])).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
    torch.testing.assert_close(stats["teacher_entropy"], h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["kl"], torch.stack(kls).mean(), rtol=1e-12, atol=1e-12)
    assert not stats["kl"].requires_grad


def test_teacher_gets_no_gradient_and_bias_is_centering():
    st, te, ws, wt, _ = make(4, 2, 3, 16, 50, dtype=torch.float64)
    te = te.clone().requires_grad_(True)
    wt = wt.clone().requires_grad_(True)
    center = torch.randn(50, dtype=torch.float64)
    loss = prototype_cross_entropy(st.requires_grad_(True), te, ws, wt, -center / 0.04)
    loss.backward()
    assert te.grad is None and wt.grad is None and st.grad is not None
    # DINO's form: softmax((t - center) / temp)
    lsm = torch.log_softmax(st @ ws.t() / 0.1, -1)
    pt = torch.softmax((te.detach() @ wt.detach().t() - center) / 0.04, -1)
    want = torch.stack([-(pt[i] * lsm[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_only_w_student_needs_grad():
    st, te, ws, wt, b = make(3, 2, 2, 8, 30, dtype=torch.float64)
    ws.requires_grad_(True)
    (gw,) = torch.autograd.grad(prototype_cross_entropy(st, te, ws, wt, b), [ws])
    (want,) = torch.autograd.grad(ref.prototype_cross_entropy(st, te, ws, wt, b), [ws])
    torch.testing.assert_close(gw, want, rtol=1e-12, atol=1e-12)


def test_noncontiguous_inputs(device):
    st, te, ws, wt, b = make(4, 2, 3, 16, 70, dtype=torch.float64, device=device)
    nc = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (st, te, ws, wt)]
    assert not nc[0].is_contiguous()
    assert_close(run(fused(), *nc, b), run(reference, st, te, ws, wt, b), 1e-12, 1e-12)


def test_non_finite_input_gives_non_finite_loss():
    st, te, ws, wt, b = make(3, 2, 2, 8, 600)
    for t in (st, te):
        bad = t.clone()
        bad[0, 0, 0] = float("nan")
        args = [bad if x is t else x for x in (st, te, ws, wt, b)]
        assert torch.isnan(prototype_cross_entropy(*args))


def test_large_logits_stay_stable():
    """Logits / temperature in the hundreds (fp32 exp would overflow without the streaming max)."""
    st, te, ws, wt, b = make(4, 2, 3, 16, 700)
    xs = [st * 5, te * 5, ws, wt, b * 50]
    got = run(lambda *a, **kw: prototype_cross_entropy(*a, student_temp=0.05, teacher_temp=0.01, **kw), *xs)
    want = run(lambda *a, **kw: ref.prototype_cross_entropy(*a, student_temp=0.05, teacher_temp=0.01, **kw), *as64(xs))
    assert all(torch.isfinite(t).all() for t in got)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_thread_count_does_not_change_the_result():
    """The K chunks follow the thread count; results agree to fp32 rounding."""
    xs = make(6, 2, 3, 32, 3000)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(fused(), *xs)
        torch.set_num_threads(max(2, old))
        many = run(fused(), *xs)
    finally:
        torch.set_num_threads(old)
    assert_close(one, many, rtol=1e-5, atol=1e-7)


def test_autocast_runs_in_the_autocast_dtype():
    """fp32 prototypes with fp32 features under CPU bf16 autocast: computed as the bf16 op (as the plain
    loss's matmuls would be), gradients in the inputs' fp32."""
    st, te, ws, wt, b = make(4, 2, 3, 16, 300)
    st.requires_grad_(True)
    ws.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = prototype_cross_entropy(st, te, ws, wt, b)
    gs, gw = torch.autograd.grad(loss, [st, ws])
    assert loss.dtype == torch.bfloat16 and gs.dtype == torch.float32 and gw.dtype == torch.float32
    bf = [x.detach().bfloat16() for x in (st, te, ws, wt, b)]
    want = run(fused(), *bf)
    assert_close((loss.detach(), gs, gw), want[:3], rtol=1e-2, atol=1e-4)
    with pytest.raises(ValueError, match="differs from the student"):  # outside autocast: one dtype
        prototype_cross_entropy(st, te, ws.double(), wt, b)


# ---- the autograd / compiler contract --------------------------------------------------------------


@pytest.mark.parametrize("impl", [0, 1])
def test_gradcheck_float64(impl):
    st, te, ws, wt, b = make(3, 2, 2, 5, 7, dtype=torch.float64)
    st.requires_grad_(True)
    ws.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, w: OP(s, te, w, wt, b, 0.3, 0.2, True, impl)[0], (st, ws))
    assert torch.autograd.gradcheck(lambda s, w: OP(s, te, w, wt, None, 0.3, 0.2, False, impl)[0], (st, ws))


def test_double_backward_is_refused_clearly():
    st, te, ws, wt, b = make(3, 2, 2, 5, 7, dtype=torch.float64)
    st.requires_grad_(True)
    (g,) = torch.autograd.grad(prototype_cross_entropy(st, te, ws, wt, b), [st], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_opcheck():
    st, te, ws, wt, b = make(3, 2, 2, 8, 300)
    st.requires_grad_(True)
    ws.requires_grad_(True)
    torch.library.opcheck(OP.default, (st, te, ws, wt, b, 0.1, 0.04, True, 0))
    torch.library.opcheck(OP.default, (st, te, ws, wt, None, 0.1, 0.04, False, 1))
    _, ls, lt, _ = OP(st.detach(), te, ws.detach(), wt, b, 0.1, 0.04, True, 0)
    for flags in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(
            OP_BWD.default, (torch.tensor(1.0), st.detach(), te, ws.detach(), wt, b, ls, lt, 0.1, 0.04, True, *flags, 0)
        )


def test_torch_compile_fullgraph(device):
    xs = make(4, 2, 3, 16, 300, device=device)
    compiled = torch.compile(lambda s, t, w, v, b, **kw: prototype_cross_entropy(s, t, w, v, b, **kw), fullgraph=True)
    assert_close(run(compiled, *xs), run(fused(), *xs), 1e-6, 1e-7)


_GOOD = dict(
    student=torch.zeros(3, 2, 4), teacher=torch.zeros(2, 2, 4), w_student=torch.zeros(5, 4), w_teacher=torch.zeros(5, 4)
)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(student=torch.zeros(6, 4)), r"student must be 3-D \(crops, B, D\)"),
        (dict(teacher=torch.zeros(2, 3, 4)), r"teacher must be \(T, 2, 4\)"),
        (dict(w_student=torch.zeros(5, 3)), r"w_student and w_teacher must both be \(K, 4\)"),
        (dict(w_teacher=torch.zeros(6, 4)), r"must both be \(K, 4\)"),
        (dict(teacher_bias=torch.zeros(4)), r"teacher_bias must be a \(5,\) tensor"),
        (dict(w_teacher=torch.zeros(5, 4, dtype=torch.float64)), "w_teacher dtype torch.float64 differs"),
        (dict(student=torch.zeros(3, 2, 4, dtype=torch.int64)), "student has dtype torch.int64"),
        (dict(student=torch.zeros(0, 2, 4)), "empty input"),
        (dict(student=torch.zeros(1, 2, 4), teacher=torch.zeros(1, 2, 4)), "no \\(teacher, student\\) pair left"),
        (dict(student_temp=0.0), "student: temperature must be finite and > 0"),
        (dict(teacher_temp=float("nan")), "teacher: temperature must be finite"),
        (dict(student="x"), "student must be a torch.Tensor"),
    ],
)
def test_bad_input_is_named(change, match):
    kw = {**_GOOD, **change}
    with pytest.raises(ValueError, match=match):
        prototype_cross_entropy(**kw)


def test_bad_input_to_the_raw_op():
    st, te, ws, wt = (_GOOD[k] for k in ("student", "teacher", "w_student", "w_teacher"))
    with pytest.raises(RuntimeError, match="must be 3-D"):
        OP(st[0], te, ws, wt, None, 0.1, 0.04, True, 0)
    with pytest.raises(RuntimeError, match="teacher_bias must be"):
        OP(st, te, ws, wt, torch.zeros(3), 0.1, 0.04, True, 0)
    with pytest.raises(RuntimeError, match="impl must be"):
        OP(st, te, ws, wt, None, 0.1, 0.04, True, 2)
    with pytest.raises(RuntimeError, match="no \\(teacher, student\\) pair"):
        OP(st[:1], te[:1], ws, wt, None, 0.1, 0.04, True, 0)
    with pytest.raises(RuntimeError, match="lse_student must be"):
        OP_BWD(
            torch.tensor(1.0),
            st,
            te,
            ws,
            wt,
            None,
            torch.zeros(2, 2),
            torch.zeros(2, 2),
            0.1,
            0.04,
            True,
            True,
            True,
            0,
        )


def test_impl_name_is_checked():
    with pytest.raises(ValueError, match="impl must be one of"):
        prototype_cross_entropy(**_GOOD, impl="fastest")


# ---- Sinkhorn-Knopp in tiles --------------------------------------------------------------------


@pytest.mark.parametrize("iters", [1, 3, 5])
@pytest.mark.parametrize("tile", [7, 64, 8192])
def test_sinkhorn_matches_dinov2(device, iters, tile):
    st, te, ws, wt, _ = make(1, 2, 24, 16, 200, dtype=torch.float64, device=device)
    t = te.reshape(-1, 16)
    bias = prototype_sinkhorn(t, wt, 0.05, iters, tile=tile)
    got = torch.softmax(t @ wt.t() / 0.05 + bias, -1)
    want = ref.sinkhorn_knopp_teacher(t @ wt.t(), 0.05, iters).double()  # DINOv2 works in fp32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert bias.shape == (200,) and bias.max() == 0


@pytest.mark.parametrize("split", [25, 60, 0])
def test_sinkhorn_all_reduce_over_ranks_equals_one_process(split):
    """Two simulated ranks (threads with an all-reduce through a barrier) on parts of the batch give
    the single-process bias on the whole batch, as DINOv2's distributed Sinkhorn does; a rank with no
    rows (iBOT: no masked patch there) takes part in every all-reduce and changes nothing."""
    _, te, _, wt, _ = make(1, 2, 30, 16, 100, dtype=torch.float64)
    t = te.reshape(-1, 16)
    halves = [t[:split], t[split:]]
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    calls = [0, 0]
    out: list = [None, None]

    def worker(rank):
        def all_reduce(x):
            calls[rank] += 1
            slots[rank] = x.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            x.copy_(total)

        out[rank] = prototype_sinkhorn(halves[rank], wt, 0.05, 3, all_reduce)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    whole = prototype_sinkhorn(t, wt, 0.05, 3)
    torch.testing.assert_close(out[0], whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], whole, rtol=1e-10, atol=1e-10)
    assert calls == [5, 5]
    # and DINOv2's distributed form: each rank's assignment of its own samples
    want = ref.sinkhorn_knopp_teacher(t @ wt.t(), 0.05, 3).double()
    got = torch.softmax(halves[1] @ wt.t() / 0.05 + out[1], -1)
    torch.testing.assert_close(got, want[split:], rtol=1e-5, atol=1e-7)


def test_sinkhorn_with_no_rows_anywhere_is_no_scaling():
    _, _, _, wt, _ = make(1, 2, 4, 16, 10, dtype=torch.float64)
    empty = torch.zeros(0, 16, dtype=torch.float64)
    assert torch.equal(prototype_sinkhorn(empty, wt, 0.05, 3), torch.zeros(10, dtype=torch.float64))
    calls = []
    assert torch.equal(prototype_sinkhorn(empty, wt, 0.05, 3, lambda x: calls.append(1)), torch.zeros(10))
    assert calls == [1]  # every rank saw no rows: one all-reduce, the same on every rank, then none


def test_sinkhorn_stays_finite_where_dinov2_overflows():
    _, te, _, wt, _ = make(1, 2, 8, 16, 50, dtype=torch.float32)
    t = te.reshape(-1, 16) * 10  # logits / temp up to 10 / 0.04 = 250 > 88: exp overflows fp32
    assert not torch.isfinite(ref.sinkhorn_knopp_teacher(t @ wt.t(), 0.04, 3)).all()
    bias = prototype_sinkhorn(t, wt, 0.04, 3)
    q = torch.softmax(t @ wt.t() / 0.04 + bias, -1)
    assert torch.isfinite(bias).all() and torch.allclose(q.sum(-1), torch.ones(16))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(2, 3, 4), torch.zeros(5, 4), 0.1), "teacher must be 2-D"),
        ((torch.zeros(3, 4), torch.zeros(5, 3), 0.1), r"w_teacher must be 2-D \(K, 4\)"),
        ((torch.zeros(3, 4), torch.zeros(5, 4), -1.0), "temperature must be finite and > 0"),
        ((torch.zeros(3, 4), torch.zeros(5, 4), 0.1, 0), "iters must be an int >= 1"),
    ],
)
def test_sinkhorn_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        prototype_sinkhorn(*args)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(10, 2, 16, 64, 5000), (3, 2, 5, 16, 300)])
def test_cuda_fast_vs_simple_and_reference(shape, dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    xs = make(*shape, device="cuda", dtype=dtype)
    got = run(fused(), *xs)
    simple = run(fused("simple"), *xs)
    want = run(reference, *[None if x is None else x.double() for x in xs])
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert_close(got, want, rtol=tol, atol=tol * 1e-2)
    assert_close(simple, want, rtol=tol, atol=tol * 1e-2)
    xs64 = make(*shape, device="cuda", dtype=torch.float64)
    assert_close(run(fused(), *xs64), run(reference, *xs64), 1e-12, 1e-12)


@pytest.mark.cuda
def test_cuda_opcheck():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    st, te, ws, wt, b = make(3, 2, 2, 8, 300, device="cuda")
    torch.library.opcheck(OP.default, (st.requires_grad_(True), te, ws.requires_grad_(True), wt, b, 0.1, 0.04, True, 0))
