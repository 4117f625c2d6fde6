"""sparkct.ops.info_nce: the fused kernels against the plain-PyTorch reference (values and
gradients), the simple kernels, gradcheck, opcheck, torch.compile, bad input and NaN handling.
CUDA cases carry the `cuda` mark (the `device` fixture) and run where a GPU is present."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from sparkct.ops import info_nce
from sparkct.ops import reference as ref

OP = torch.ops.sparkct.info_nce
OP_BWD = torch.ops.sparkct.info_nce_backward


def make(n, d, k=None, *, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(1000 * n + d + (k or 0))
    z0 = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    z1 = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    # correlated views, so the positives matter (as after training)
    z1 = (z1 + 2 * z0).to(dtype)
    bank = None if k is None else torch.randn(k, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return z0, z1, bank


def loss_and_grads(fn, z0, z1, bank, *, bank_grad=False):
    z0 = z0.detach().clone().requires_grad_(True)
    z1 = z1.detach().clone().requires_grad_(True)
    ins = [z0, z1]
    if bank is not None:
        bank = bank.detach().clone().requires_grad_(bank_grad)
        if bank_grad:
            ins.append(bank)
    loss = fn(z0, z1, bank)
    return (loss.detach(), *torch.autograd.grad(loss, ins))


def assert_close(got, want, rtol, atol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), rtol=rtol, atol=atol)


def fused(tau, impl="auto"):
    return lambda a, b, bank: info_nce(a, b, tau, bank, impl=impl)


def naive(tau):
    return lambda a, b, bank: ref.info_nce(a, b, tau, bank)


# ---- values and gradients vs the reference ------------------------------------------------------

SHAPES = [(1, 16), (2, 16), (7, 33), (64, 128), (130, 64), (5, 2048)]


@pytest.mark.parametrize("impl", ["auto", "simple"])
@pytest.mark.parametrize("k", [None, 0, 1, 300])
@pytest.mark.parametrize("n,d", SHAPES)
def test_matches_reference_fp32(device, n, d, k, impl):
    z0, z1, bank = make(n, d, k, device=device)
    tau = 0.2
    got = loss_and_grads(fused(tau, impl), z0, z1, bank, bank_grad=k is not None)
    want = loss_and_grads(
        naive(tau), z0.double(), z1.double(), None if bank is None else bank.double(), bank_grad=k is not None
    )
    assert got[0].dtype == torch.float32
    assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "simple"])
def test_n1_has_no_negatives(device, impl):
    """N = 1 without a bank: the only other embedding is the positive, so the loss is 0 (as in
    lightly) and so is the gradient (up to the rounding of recomputed logits: exp(eps) - 1)."""
    z0, z1, _ = make(1, 16, device=device)
    loss, g0, g1 = loss_and_grads(fused(0.5, impl), z0, z1, None)
    assert loss.item() == 0.0
    assert g0.abs().max().item() < 1e-6 and g1.abs().max().item() < 1e-6


def test_many_tiles_ragged_edges():
    """2N = 1302 rows against the 128 x 256 CPU tiles: full and ragged blocks, and blocks that
    straddle the z0 / z1 boundary's neighbourhood."""
    z0, z1, _ = make(651, 40)
    got = loss_and_grads(fused(0.1), z0, z1, None)
    want = loss_and_grads(naive(0.1), z0.double(), z1.double(), None)
    assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 200])
def test_half_precision(device, dtype, k):
    """fp16/bf16 in, fp32 accumulation: against the fp32 reference on the same (rounded) inputs.
    The loss comes back in the input dtype (one rounding); gradients to the input's precision."""
    z0, z1, bank = make(150, 64, k, dtype=dtype, device=device)
    got = loss_and_grads(fused(0.2), z0, z1, bank)
    want = loss_and_grads(naive(0.2), z0.float(), z1.float(), None if bank is None else bank.float())
    assert got[0].dtype == dtype and got[1].dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0].float().cpu(), want[0].cpu(), rtol=2 * eps, atol=0)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float().cpu(), w.cpu(), rtol=4 * eps, atol=4 * eps * w.abs().max().item())


def test_float64_is_computed_in_float64():
    z0, z1, bank = make(20, 16, dtype=torch.float64)
    for b in (None, bank):
        got = loss_and_grads(fused(0.05), z0, z1, b)
        want = loss_and_grads(naive(0.05), z0, z1, b)
        assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tau", [1e-3, 0.07, 10.0])
def test_temperatures(tau):
    """Small temperatures give logits near 1/tau = 1000: the online max keeps the LSE finite."""
    z0, z1, bank = make(40, 16, 60)
    for b in (None, bank):
        got = loss_and_grads(fused(tau), z0, z1, b)
        want = loss_and_grads(naive(tau), z0.double(), z1.double(), None if b is None else b.double())
        assert torch.isfinite(got[0])
        assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, 1 / tau))


@pytest.mark.parametrize("tau", [1e-20, 1e-38, 5.88e-39])
def test_tiny_temperatures_down_to_the_smallest_usable(tau):
    """Down to the smallest temperature whose logits (±1/tau) and row losses (up to 2/tau) fp32 holds."""
    z0, z1, bank = make(40, 16, 60)
    for b in (None, bank):
        got = loss_and_grads(fused(tau), z0, z1, b)
        want = loss_and_grads(naive(tau), z0.double(), z1.double(), None if b is None else b.double())
        assert all(torch.isfinite(t).all() for t in got)
        assert_close(got, want, rtol=1e-5, atol=1e-6 / tau)


@pytest.mark.parametrize(
    "dtype,tau,smallest",
    [
        (torch.float32, 1e-40, "5.88e-39"),
        (torch.float32, 1e-39, "5.88e-39"),
        (torch.float32, 5.8e-39, "5.88e-39"),
        (torch.float32, 5e-324, "5.88e-39"),
        (torch.bfloat16, 1e-39, "5.88e-39"),
        (torch.float16, 1e-40, "5.88e-39"),
        (torch.float64, 1e-305, "1e-300"),
        (torch.float64, 5e-324, "1e-300"),
    ],
)
def test_temperatures_too_small_for_the_dtype_are_refused(dtype, tau, smallest):
    """1/tau (and the loss, up to 2/tau) would overflow the dtype the logits are formed in (fp32, fp64
    for fp64): the loss came back NaN; now a ValueError naming the argument and the smallest usable value."""
    z0, z1, _ = make(4, 8, dtype=dtype)
    with pytest.raises(ValueError, match=rf"info_nce: temperature {tau:g} .*smallest usable .* {smallest}\b"):
        info_nce(z0, z1, tau)
    info_nce(z0, z1, float(smallest))  # the value named is usable


def test_noncontiguous_inputs(device):
    z0, z1, bank = make(50, 64, 70, device=device)
    # strided in D, transposed storage, and a row slice
    z0n = torch.stack([z0, z0], 2)[..., 0]  # stride 2 along D
    z1n = z1.t().contiguous().t()
    bankn = torch.repeat_interleave(bank, 2, dim=0)[::2]  # row stride 2D
    assert not z0n.is_contiguous() and not z1n.is_contiguous() and not bankn.is_contiguous()
    for b, bn in ((None, None), (bank, bankn)):
        got = loss_and_grads(fused(0.3), z0n, z1n, bn, bank_grad=b is not None)
        want = loss_and_grads(fused(0.3), z0, z1, b, bank_grad=b is not None)
        assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_zero_embedding_follows_f_normalize():
    """A zero row: F.normalize divides by eps, so the gradient is g / eps with no projection."""
    z0, z1, bank = make(6, 16, 9, dtype=torch.float64)
    z0[2] = 0
    for b in (None, bank):
        got = loss_and_grads(fused(0.5), z0, z1, b)
        want = loss_and_grads(naive(0.5), z0, z1, b)
        assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", [0, 1])
def test_gathered_columns(device, impl):
    """The distributed form on one process: rows are rank 1's [z0; z1] inside 3 ranks' columns;
    gradients w.r.t. the rows and the gathered columns."""
    n, d, world, rank = 9, 24, 3, 1
    gen = torch.Generator().manual_seed(7)
    cols = torch.randn(world * 2 * n, d, generator=gen, dtype=torch.float64)
    z0 = cols[rank * 2 * n : rank * 2 * n + n].clone()
    z1 = cols[rank * 2 * n + n : (rank + 1) * 2 * n].clone()

    def run(fn, dtype):
        a, b, c = (t.to(device=device, dtype=dtype).requires_grad_(True) for t in (z0, z1, cols))
        loss = fn(a, b, c)
        return (loss.detach(), *torch.autograd.grad(loss, [a, b, c]))

    got = run(lambda a, b, c: OP(a, b, c, None, 0.25, rank * 2 * n, False, impl)[0], torch.float32)
    want = run(lambda a, b, c: ref.info_nce(a, b, 0.25, cols=c, col_offset=rank * 2 * n), torch.float64)
    assert_close(got, want, rtol=1e-5, atol=1e-7)


# ---- scale safety and low temperatures -------------------------------------------------------------


def _scaled(kind, n, d, k, gen):
    """(z0, z1, bank) in float64 with rows of magnitude 1e19, 1e-19 or mixed 1e-30 .. 1e30 per row."""
    z0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z1 = z1 + 2 * z0
    bank = torch.randn(k, d, generator=gen, dtype=torch.float64)
    if kind == "mixed":
        f = 10.0 ** torch.randint(-30, 31, (3, max(n, k), 1), generator=gen).double()
        return z0 * f[0, :n], z1 * f[1, :n], bank * f[2, :k]
    return z0 * kind, z1 * kind, bank * kind


@pytest.mark.parametrize("impl", ["auto", "simple"])
@pytest.mark.parametrize(
    "kind,dtype",
    [
        (1e19, torch.float32),
        (1e-19, torch.float32),
        (1e30, torch.float32),
        ("mixed", torch.float32),
        (1e160, torch.float64),
    ],
)
def test_scale_safe_normalization(device, impl, kind, dtype):
    """Squares and dot products of embeddings of magnitude 1e19 overflow fp32 (NaN loss before); the
    kernels scale such rows by exact powers of two, so loss and gradients follow the normalized
    definition (float64 reference) at any magnitude, also with rows of 1e-30 .. 1e30 mixed in one
    batch (1e-19 rows are below F.normalize's eps: clamped, gradient g / eps). fp64 overflows at
    1e154: its reference runs on the rows times 2^-500 (the loss is scale-invariant for unclamped rows,
    so its gradient is 2^-500 times the one there)."""
    gen = torch.Generator().manual_seed(21)
    z0, z1, bank = _scaled(kind, 70, 24, 90, gen)  # 140 rows: two row blocks on CPU
    pre = 2.0**-500 if dtype == torch.float64 else 1.0
    for b in (None, bank):
        got = loss_and_grads(
            fused(0.2, impl),
            z0.to(device=device, dtype=dtype),
            z1.to(device=device, dtype=dtype),
            None if b is None else b.to(device=device, dtype=dtype),
            bank_grad=b is not None,
        )
        want = loss_and_grads(
            naive(0.2),
            z0.to(dtype).double() * pre,
            z1.to(dtype).double() * pre,
            None if b is None else b.to(dtype).double() * pre,
            bank_grad=b is not None,
        )
        want = (want[0], *(w * pre for w in want[1:]))
        assert all(torch.isfinite(t).all() for t in got), (kind, b is None)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * w.abs().max().item())


def test_scale_safe_gathered_columns_and_raw_op():
    """The distributed form (gradient w.r.t. the gathered columns) at 1e19, through the raw op."""
    n, d, rank = 6, 16, 1
    gen = torch.Generator().manual_seed(5)
    cols = torch.randn(4 * n, d, generator=gen, dtype=torch.float64) * 1e19
    cols[: 2 * n] *= 1e-38  # another rank's rows at 1e-19
    z0, z1 = cols[2 * n : 3 * n].clone(), cols[3 * n :].clone()
    for impl in (0, 1):
        a, b, c = (t.float().requires_grad_(True) for t in (z0, z1, cols))
        loss = OP(a, b, c, None, 0.3, rank * 2 * n, False, impl)[0]
        got = (loss, *torch.autograd.grad(loss, [a, b, c]))
        a, b, c = (t.clone().requires_grad_(True) for t in (a.double(), b.double(), c.double()))
        loss = ref.info_nce(a, b, 0.3, cols=c, col_offset=rank * 2 * n)
        want = (loss, *torch.autograd.grad(loss, [a, b, c]))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


TEMPERATURES = [0.5, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]


@pytest.mark.parametrize("mode", ["pair", "bank", "cols"])
@pytest.mark.parametrize("n,d", [(8, 16), (150, 24)])
def test_low_temperature_gradients(n, d, mode):
    """At low temperature a logit is ~1/tau and exp(logit - lse) amplifies any difference between the
    logit the forward summed and the one the backward recomputes (an FMA-contracted or asymmetric
    logit: relative gradient errors of 1e-4 at tau = 1e-4 and 1e-2 at 1e-6 before). The fast and simple
    kernels must stay as accurate as the naive fp32 computation, against float64, at every tau.
    (Where two logits of a row lie within a few units of each other at |logit| ~ 1e6, fp32 itself
    cannot resolve them: that is what the naive fp32 bound allows for.)"""
    gen = torch.Generator().manual_seed(n + d)
    z0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    other = torch.randn(3 * n, d, generator=gen, dtype=torch.float64)
    if mode == "cols":
        other[n : 3 * n] = torch.cat([z0, z1])

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_(True) for t in ((z0, z1) if mode == "pair" else (z0, z1, other))]
        loss = fn(*ins)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ins)]).double()

    for tau in TEMPERATURES:
        if mode == "pair":
            fns = {i: (lambda a, b, i=i, tau=tau: OP(a, b, None, None, tau, 0, False, i)[0]) for i in (0, 1)}
            fref = lambda a, b, tau=tau: ref.info_nce(a, b, tau)  # noqa: E731
        elif mode == "bank":
            fns = {i: (lambda a, b, c, i=i, tau=tau: OP(a, b, None, c, tau, 0, False, i)[0]) for i in (0, 1)}
            fref = lambda a, b, c, tau=tau: ref.info_nce(a, b, tau, c)  # noqa: E731
        else:
            fns = {i: (lambda a, b, c, i=i, tau=tau: OP(a, b, c, None, tau, n, False, i)[0]) for i in (0, 1)}
            fref = lambda a, b, c, tau=tau: ref.info_nce(a, b, tau, cols=c, col_offset=n)  # noqa: E731
        want = run(fref, torch.float64)
        naive32 = ((run(fref, torch.float32) - want).norm() / want.norm()).item()
        for impl, fn in fns.items():
            err = ((run(fn, torch.float32) - want).norm() / want.norm()).item()
            assert err <= max(1e-5, 4 * naive32), (tau, impl, err, naive32)


# ---- the autograd / compiler contract -----------------------------------------------------------


@pytest.mark.parametrize("impl", [0, 1])
def test_gradcheck_float64(impl):
    gen = torch.Generator().manual_seed(3)
    z0, z1 = (torch.randn(4, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bank = torch.randn(5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(16, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: OP(a, b, None, None, 0.3, 0, False, impl)[0], (z0, z1))
    assert torch.autograd.gradcheck(lambda a, b, c: OP(a, b, None, c, 0.3, 0, False, impl)[0], (z0, z1, bank))
    assert torch.autograd.gradcheck(lambda a, b, c: OP(a, b, c, None, 0.3, 8, False, impl)[0], (z0, z1, cols))


@pytest.mark.parametrize("impl", [0, 1])
def test_double_backward_gradgradcheck_float64(impl):
    """Double backward (info_nce_backward has autograd of its own: the reference differentiated twice)
    in every mode, w.r.t. the embeddings, the bank / gathered columns and the upstream gradient."""
    gen = torch.Generator().manual_seed(13)
    z0, z1 = (torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bank = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    gg = functools.partial(torch.autograd.gradgradcheck, fast_mode=True)
    assert gg(lambda a, b: OP(a, b, None, None, 0.3, 0, False, impl)[0], (z0, z1))
    assert gg(lambda a, b, c: OP(a, b, None, c, 0.3, 0, False, impl)[0], (z0, z1, bank))
    assert gg(lambda a, b, c: OP(a, b, c, None, 0.3, 2, False, impl)[0], (z0, z1, cols))
    assert gg(lambda a, b: info_nce(a, b, 0.3, bank.detach()), (z0, z1))  # a bank without gradient


def test_double_backward_float32_matches_reference_and_third_order():
    """The issue's case: grad with create_graph=True, then backward, fills z0.grad (it stayed None);
    fp32 values equal the float64 reference's second derivatives, and a third order works too."""
    z0, z1, _ = make(6, 8)
    z0.requires_grad_(True)
    z1.requires_grad_(True)
    (g0,) = torch.autograd.grad(info_nce(z0, z1, 0.2), z0, create_graph=True)
    (g0 * g0).sum().backward()
    assert z0.grad is not None and z1.grad is not None
    r0, r1 = z0.detach().double().requires_grad_(True), z1.detach().double().requires_grad_(True)
    (h0,) = torch.autograd.grad(ref.info_nce(r0, r1, 0.2), r0, create_graph=True)
    (h0 * h0).sum().backward()
    torch.testing.assert_close(z0.grad.double(), r0.grad, rtol=1e-4, atol=1e-5 * r0.grad.abs().max().item())
    torch.testing.assert_close(z1.grad.double(), r1.grad, rtol=1e-4, atol=1e-5 * r1.grad.abs().max().item())
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64)

    def third(f):
        g1 = torch.autograd.grad(f(a, b, 0.4), a, create_graph=True)[0]
        g2 = torch.autograd.grad(g1.sum(), a, create_graph=True)[0]
        return torch.autograd.grad(g2.pow(2).sum(), a)[0]

    torch.testing.assert_close(third(info_nce), third(ref.info_nce), rtol=1e-8, atol=1e-10)


def test_double_backward_refuses_lse_with_grad():
    """The saved LSE is the forward's intermediate: info_nce_backward is not differentiable in it."""
    z0, z1, _ = make(4, 8, dtype=torch.float64)
    z0.requires_grad_(True)
    _, lse = OP(z0, z1, None, None, 0.5, 0, False, 0)
    lse = lse.clone().requires_grad_(True)
    g0, _, _ = OP_BWD(torch.tensor(1.0, dtype=torch.float64), z0, z1, None, None, lse, 0.5, 0, False, False, 0)
    with pytest.raises(ValueError, match="not differentiable with respect to lse"):
        g0.sum().backward()


def test_tensor_temperature():
    z0, z1, _ = make(4, 8)
    want = info_nce(z0, z1, 0.25)
    assert info_nce(z0, z1, torch.tensor(0.25)) == want
    t = torch.tensor(0.25, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        info_nce(z0, z1, t)
    assert info_nce(z0, z1, t.detach()) == want
    with torch.no_grad():
        assert info_nce(z0, z1, t) == want  # nothing is recorded: no gradient to lose
    with pytest.raises(ValueError, match="temperature must be a number"):
        info_nce(z0, z1, torch.tensor([0.25, 0.5]))


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    z0, z1 = (torch.randn(5, 16, generator=gen) for _ in range(2))
    bank = torch.randn(7, 16, generator=gen)
    cols = torch.randn(20, 16, generator=gen)
    grad = lambda *t: [x.clone().requires_grad_(True) for x in t]  # noqa: E731
    cases = [
        (*grad(z0, z1), None, None, 0.5, 0, False, 0),
        (*grad(z0, z1), None, grad(bank)[0], 0.2, 0, False, 0),
        (*grad(z0, z1), None, bank, 0.2, 0, False, 1),
        (*grad(z0, z1), grad(cols)[0], None, 0.3, 10, False, 0),
        (z0.double(), z1.double(), None, None, 0.5, 0, False, 0),
        (z0.bfloat16(), z1.bfloat16(), None, bank.bfloat16(), 0.5, 0, False, 0),
    ]
    for args in cases:
        torch.library.opcheck(OP.default, args)
    _, lse = OP(z0, z1, cols, None, 0.3, 10, False, 0)
    torch.library.opcheck(OP_BWD.default, (torch.tensor(1.0), z0, z1, cols, None, lse, 0.3, 10, True, False, 0))
    torch.library.opcheck(OP_BWD.default, (torch.tensor(1.0), z0, z1, cols, None, lse, 0.3, 10, False, False, 0))


def test_torch_compile_fullgraph(device):
    z0, z1, bank = make(33, 32, 40, device=device)
    for b in (None, bank):
        compiled = torch.compile(lambda x, y, bb: info_nce(x, y, 0.3, bb), fullgraph=True)
        got = loss_and_grads(compiled, z0, z1, b)
        want = loss_and_grads(fused(0.3), z0, z1, b)
        assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_lse_is_returned_and_not_differentiable():
    z0, z1, _ = make(8, 16)
    z0.requires_grad_(True)
    loss, lse = OP(z0, z1, None, None, 0.5, 0, False, 0)
    assert lse.shape == (16,) and lse.dtype == torch.float32 and not lse.requires_grad
    assert loss.requires_grad


# ---- bad input and non-finite values ------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8), torch.randn(4, 9), 0.5, None), "same shape"),
        ((torch.randn(4, 8), torch.randn(5, 8), 0.5, None), "same shape"),
        ((torch.randn(4, 8, 1), torch.randn(4, 8, 1), 0.5, None), "2-D"),
        ((torch.randn(8), torch.randn(8), 0.5, None), "2-D"),
        ((torch.randn(0, 8), torch.randn(0, 8), 0.5, None), "empty batch"),
        ((torch.randn(4, 0), torch.randn(4, 0), 0.5, None), "empty embedding"),
        ((torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long), 0.5, None), "dtype"),
        ((torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), 0.5, None), "same dtype"),
        ((torch.randn(4, 8), torch.randn(4, 8), 0.0, None), "temperature"),
        ((torch.randn(4, 8), torch.randn(4, 8), -0.5, None), "temperature"),
        ((torch.randn(4, 8), torch.randn(4, 8), math.nan, None), "temperature"),
        ((torch.randn(4, 8), torch.randn(4, 8), math.inf, None), "temperature"),
        ((torch.randn(4, 8), torch.randn(4, 8), "0.5", None), "temperature"),
        ((torch.randn(4, 8), torch.randn(4, 8), 0.5, torch.randn(10, 7)), "bank"),
        ((torch.randn(4, 8), torch.randn(4, 8), 0.5, torch.randn(10)), "bank"),
        ((torch.randn(4, 8), torch.randn(4, 8), 0.5, torch.randn(10, 8, dtype=torch.float64)), "bank dtype"),
        ((torch.randn(4, 8), torch.randn(4, 8, device="meta"), 0.5, None), "different devices"),
        ((torch.randn(4, 8), torch.randn(4, 8), 0.5, torch.randn(10, 8, device="meta")), "different devices"),
        (([[1.0]], torch.randn(1, 1), 0.5, None), "torch.Tensor"),
    ],
)
def test_bad_input_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        info_nce(*args)
    with pytest.raises(ValueError, match="impl"):
        info_nce(torch.randn(2, 4), torch.randn(2, 4), 0.5, impl="fastest")


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8), torch.randn(4, 9), None, None, 0.5, 0, False, 0), "same shape"),
        ((torch.randn(0, 8), torch.randn(0, 8), None, None, 0.5, 0, False, 0), "empty batch"),
        ((torch.randn(4, 8), torch.randn(4, 8), None, None, -1.0, 0, False, 0), "temperature"),
        ((torch.randn(4, 8), torch.randn(4, 8), None, torch.randn(3, 5), 0.5, 0, False, 0), "bank"),
        ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8), None, 0.5, 4, False, 0), "gathered columns"),
        ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8), torch.randn(3, 8), 0.5, 0, False, 0), "not both"),
        ((torch.randn(4, 8), torch.randn(4, 8), None, None, 0.5, 0, False, 7), "impl"),
        (
            (torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32), None, None, 0.5, 0, False, 0),
            "floating point",
        ),
    ],
)
def test_bad_input_to_the_raw_op(args, match):
    with pytest.raises(RuntimeError, match=match):
        OP(*args)


@pytest.mark.parametrize("where", ["z0", "z1", "bank"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_gives_non_finite_loss(device, where, bad):
    z0, z1, bank = make(20, 16, 30, device=device)
    {"z0": z0, "z1": z1, "bank": bank}[where][3, 5] = bad
    for b in (bank,) if where == "bank" else (None, bank):
        for impl in ("auto", "simple"):
            z0g = z0.clone().requires_grad_(True)
            loss = info_nce(z0g, z1, 0.5, b, impl=impl)
            assert not torch.isfinite(loss), (where, bad, b is None, impl)
            (g,) = torch.autograd.grad(loss, [z0g])
            assert not torch.isfinite(g).all()


def test_nan_in_one_tile_of_many():
    """The NaN sits in a column block other than the first: the online LSE must carry it."""
    z0, z1, _ = make(400, 16)
    z1[390, 0] = math.nan
    assert torch.isnan(info_nce(z0, z1, 0.5))


# ---- CUDA: the fast kernels against the reference and the simple CUDA kernel ---------------------

cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 1000])
@pytest.mark.parametrize("n,d", [(1, 16), (3, 24), (517, 128), (2050, 64), (64, 2048), (100, 1000)])
def test_cuda_fast_vs_simple_and_reference(n, d, k, dtype):
    """Large N spans many tiles; n, d and k are chosen to leave ragged tile edges (517, 1000, d =
    24 is not a multiple of the 16-wide MMA k-step)."""
    z0, z1, bank = make(n, d, k, dtype=dtype, device="cuda")
    fast = loss_and_grads(fused(0.1, "auto"), z0, z1, bank, bank_grad=k is not None)
    simple = loss_and_grads(fused(0.1, "simple"), z0, z1, bank, bank_grad=k is not None)
    want = loss_and_grads(
        naive(0.1), z0.double(), z1.double(), None if bank is None else bank.double(), bank_grad=k is not None
    )
    if dtype == torch.float32:
        assert_close(simple, want, rtol=1e-5, atol=1e-6)
        assert_close(fast, want, rtol=1e-5, atol=1e-6)
    else:
        eps = torch.finfo(dtype).eps
        # plus one rounding step at the bottom of the dtype's range: at d = 1000, 2048 some fp16
        # gradients are ~1e-6, subnormal in fp16 (spacing 2^-24 = 6e-8 > 8 eps max|grad|), so even the
        # exact gradient rounded once to fp16 would miss a purely relative tolerance
        step = torch.finfo(dtype).smallest_normal * eps
        for got in (fast, simple):
            torch.testing.assert_close(got[0].double().cpu(), want[0].cpu(), rtol=4 * eps, atol=0)
            for g, w in zip(got[1:], want[1:]):
                torch.testing.assert_close(
                    g.double().cpu(), w.cpu(), rtol=0.05, atol=8 * eps * w.abs().max().item() + step
                )
        # fast (tensor cores) and simple (fp32 FMA) see the same rounded inputs
        for g, s in zip(fast[1:], simple[1:]):
            torch.testing.assert_close(
                g.double().cpu(), s.double().cpu(), rtol=0.05, atol=8 * eps * s.double().abs().max().item() + step
            )


@cuda
def test_cuda_tf32_follows_torch_flag():
    z0, z1, _ = make(1000, 256, device="cuda")
    want = loss_and_grads(naive(0.1), z0.double(), z1.double(), None)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = loss_and_grads(fused(0.1), z0, z1, None)
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = loss_and_grads(fused(0.1), z0, z1, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_close(exact, want, rtol=1e-5, atol=1e-6)
    assert_close(tf32, want, rtol=2e-3, atol=1e-4)


@cuda
@pytest.mark.parametrize("impl", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gathered_columns(impl, dtype):
    n, d, world, rank = 300, 64, 4, 2
    gen = torch.Generator().manual_seed(9)
    cols = torch.randn(world * 2 * n, d, generator=gen, dtype=torch.float64).to(dtype).double()
    z0 = cols[rank * 2 * n : rank * 2 * n + n].clone()
    z1 = cols[rank * 2 * n + n : (rank + 1) * 2 * n].clone()

    def run(fn, dt, dev):
        a, b, c = (t.to(device=dev, dtype=dt).requires_grad_(True) for t in (z0, z1, cols))
        loss = fn(a, b, c)
        return (loss.detach(), *torch.autograd.grad(loss, [a, b, c]))

    got = run(lambda a, b, c: OP(a, b, c, None, 0.2, rank * 2 * n, False, impl)[0], dtype, "cuda")
    want = run(lambda a, b, c: ref.info_nce(a, b, 0.2, cols=c, col_offset=rank * 2 * n), torch.float64, "cpu")
    tol = 1e-5 if dtype == torch.float32 else 0.03
    assert_close(got, want, rtol=tol, atol=tol * 1e-2)


@cuda
def test_cuda_noncontiguous_and_nan():
    z0, z1, bank = make(300, 96, 500, device="cuda")
    z0n = torch.stack([z0, z0], 2)[..., 0]  # stride 2 along D
    got = loss_and_grads(fused(0.3), z0n, z1, bank)
    want = loss_and_grads(fused(0.3), z0, z1, bank)
    assert_close(got, want, rtol=1e-5, atol=1e-7)
    z1[200, 3] = math.nan
    assert torch.isnan(info_nce(z0, z1, 0.3))
    assert torch.isnan(info_nce(z0, z1, 0.3, bank))


@cuda
def test_cuda_compile_and_opcheck():
    z0, z1, bank = make(70, 64, 90, device="cuda")
    compiled = torch.compile(lambda x, y, bb: info_nce(x, y, 0.3, bb), fullgraph=True)
    for b in (None, bank):
        assert_close(loss_and_grads(compiled, z0, z1, b), loss_and_grads(fused(0.3), z0, z1, b), 1e-6, 1e-7)
    torch.library.opcheck(OP.default, (z0.requires_grad_(True), z1, None, bank, 0.3, 0, False, 0))
