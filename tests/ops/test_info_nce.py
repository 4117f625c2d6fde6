"""sparkct.ops.info_nce: the fused kernels against the plain-PyTorch reference (values and
gradients), the simple kernels, gradcheck, opcheck, torch.compile, bad input and NaN handling.
CUDA cases carry the `cuda` mark (the `device` fixture) and run where a GPU is present."""
from __future__ import annotations

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
    want = loss_and_grads(naive(tau), z0.double(), z1.double(), None if bank is None else bank.double(),
                          bank_grad=k is not None)
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
    z0 = cols[rank * 2 * n: rank * 2 * n + n].clone()
    z1 = cols[rank * 2 * n + n: (rank + 1) * 2 * n].clone()

    def run(fn, dtype):
        a, b, c = (t.to(device=device, dtype=dtype).requires_grad_(True) for t in (z0, z1, cols))
        loss = fn(a, b, c)
        return (loss.detach(), *torch.autograd.grad(loss, [a, b, c]))

    got = run(lambda a, b, c: OP(a, b, c, None, 0.25, rank * 2 * n, False, impl)[0], torch.float32)
    want = run(lambda a, b, c: ref.info_nce(a, b, 0.25, cols=c, col_offset=rank * 2 * n), torch.float64)
    assert_close(got, want, rtol=1e-5, atol=1e-7)


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

@pytest.mark.parametrize("args,match", [
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
])
def test_bad_input_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        info_nce(*args)
    with pytest.raises(ValueError, match="impl"):
        info_nce(torch.randn(2, 4), torch.randn(2, 4), 0.5, impl="fastest")


@pytest.mark.parametrize("args,match", [
    ((torch.randn(4, 8), torch.randn(4, 9), None, None, 0.5, 0, False, 0), "same shape"),
    ((torch.randn(0, 8), torch.randn(0, 8), None, None, 0.5, 0, False, 0), "empty batch"),
    ((torch.randn(4, 8), torch.randn(4, 8), None, None, -1.0, 0, False, 0), "temperature"),
    ((torch.randn(4, 8), torch.randn(4, 8), None, torch.randn(3, 5), 0.5, 0, False, 0), "bank"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8), None, 0.5, 4, False, 0), "gathered columns"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8), torch.randn(3, 8), 0.5, 0, False, 0), "not both"),
    ((torch.randn(4, 8), torch.randn(4, 8), None, None, 0.5, 0, False, 7), "impl"),
    ((torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32), None, None, 0.5, 0, False, 0),
     "floating point"),
])
def test_bad_input_to_the_raw_op(args, match):
    with pytest.raises(RuntimeError, match=match):
        OP(*args)


@pytest.mark.parametrize("where", ["z0", "z1", "bank"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_gives_non_finite_loss(device, where, bad):
    z0, z1, bank = make(20, 16, 30, device=device)
    {"z0": z0, "z1": z1, "bank": bank}[where][3, 5] = bad
    for b in ((bank,) if where == "bank" else (None, bank)):
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
    want = loss_and_grads(naive(0.1), z0.double(), z1.double(), None if bank is None else bank.double(),
                          bank_grad=k is not None)
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
                torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=0.05,
                                           atol=8 * eps * w.abs().max().item() + step)
        # fast (tensor cores) and simple (fp32 FMA) see the same rounded inputs
        for g, s in zip(fast[1:], simple[1:]):
            torch.testing.assert_close(g.double().cpu(), s.double().cpu(), rtol=0.05,
                                       atol=8 * eps * s.double().abs().max().item() + step)


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
    z0 = cols[rank * 2 * n: rank * 2 * n + n].clone()
    z1 = cols[rank * 2 * n + n: (rank + 1) * 2 * n].clone()

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
