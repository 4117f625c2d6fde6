"""The packed-tile kernels (tables, pack, unpack, halo, im2col and their backwards) against
sparkct.ops.reference, in both kernel forms (fast and the simple per-element oracle), both layouts,
every dtype; gradcheck, opcheck, torch.compile and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from sparkct.models.masking import cell_mask
from sparkct.ops import reference as R
from sparkct.ops import sparse as S

ops = torch.ops.sparkct


def make_mask(B, gh, gw, ratio, seed=0, device="cpu"):
    if ratio >= 1.0:  # every cell masked: an edge case of the kernels, not a SparK mask
        return torch.zeros(B, gh, gw, dtype=torch.bool, device=device)
    mask = cell_mask(B, (gh, gw), ratio, generator=torch.Generator().manual_seed(seed))
    if B >= 3:
        mask[0] = False  # a fully masked sample
        mask[1] = True  # a fully visible one
    return mask.to(device)


@pytest.fixture(params=[False, True], ids=["fast", "simple"])
def kernels(request):
    old = S.simple_kernels(request.param)
    yield request.param
    S.simple_kernels(old)


def to_layout(x, cl):
    return x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()


def assert_layout(x, cl):
    if x.shape[1] == 1 or x.shape[2] * x.shape[3] == 1:
        return  # contiguous both ways: the layout is only a matter of (irrelevant) strides
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt), (x.shape, x.stride())


def tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


# ---- tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,ratio",
    [((3, 4, 5), 0.5), ((2, 7, 7), 0.6), ((1, 1, 1), 0.0), ((4, 1, 6), 0.3), ((2, 3, 3), 1.0), ((5, 6, 2), 0.9)],
)
def test_cell_tables_match_reference(device, shape, ratio):
    mask = make_mask(*shape, ratio, device=device)
    layout = S.cell_layout(mask)
    cells, nbr, cell_map = R.sparse_cell_tables(mask.cpu())
    assert layout.cells.dtype == layout.nbr.dtype == layout.cell_map.dtype == torch.int32
    assert torch.equal(layout.cells.cpu(), cells)
    assert torch.equal(layout.nbr.cpu(), nbr)
    assert torch.equal(layout.cell_map.cpu(), cell_map)
    assert layout.num_tiles == int(mask.sum())


def test_cell_tables_neighbour_codes():
    mask = torch.tensor([[[True, False], [True, True]]])
    L = S.cell_layout(mask)
    # tile 0 = (0,0): E neighbour masked, S visible (tile 1), SE visible (tile 2), the rest outside
    assert L.nbr[0].tolist() == [S.OUTSIDE, S.OUTSIDE, S.OUTSIDE, S.OUTSIDE, S.MASKED, S.OUTSIDE, 1, 2]
    assert L.cells.tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 1]]


# ---- pack / unpack ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [1, 2, 8])
@pytest.mark.parametrize("cl_in,cl_out", [(False, None), (True, None), (False, True), (True, False)])
def test_pack_unpack_match_reference(device, kernels, dtype, c, cl_in, cl_out):
    mask = make_mask(3, 3, 4, 0.5, device=device)
    L = S.cell_layout(mask)
    x = to_layout(torch.randn(3, 5, 3 * c, 4 * c, device=device, dtype=dtype), cl_in).requires_grad_(True)
    p = S.pack(x, L, channels_last=cl_out)
    assert torch.equal(p, R.sparse_pack(x.detach(), mask))
    assert_layout(p, cl_in if cl_out is None else cl_out)
    g = torch.randn_like(p)
    (gx,) = torch.autograd.grad(p, x, g)
    assert torch.equal(gx, R.sparse_unpack(g, mask))  # pack's backward: zeros at masked cells
    assert_layout(gx, cl_in)

    fill = torch.randn(5, device=device, dtype=dtype, requires_grad=True)
    pd = p.detach().requires_grad_(True)
    u = S.unpack(pd, L, fill, channels_last=cl_in)
    assert torch.equal(u, R.sparse_unpack(pd.detach(), mask, fill.detach()))
    assert_layout(u, cl_in)
    gu = torch.randn_like(u)
    gp, gf = torch.autograd.grad(u, (pd, fill), gu)
    pr, fr = pd.detach().double().requires_grad_(True), fill.detach().double().requires_grad_(True)
    gpr, gfr = torch.autograd.grad(R.sparse_unpack(pr, mask, fr), (pr, fr), gu.double())
    assert torch.equal(gp, gpr.to(dtype))
    torch.testing.assert_close(gf.double(), gfr, rtol=tol(dtype) * 10, atol=tol(dtype) * 10 * gfr.abs().max().item())
    assert_layout(gp, cl_in if cl_out is None else cl_out)


def test_unpack_without_fill_is_zero_at_masked(device):
    mask = make_mask(3, 2, 3, 0.5, device=device)
    L = S.cell_layout(mask)
    p = torch.randn(L.num_tiles, 4, 4, 4, device=device)
    u = S.unpack(p, L)
    masked = ~mask.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert (u.permute(0, 2, 3, 1)[masked] == 0).all()


# ---- halo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,pad", [(1, 1), (2, 1), (2, 2), (4, 1), (8, 1), (8, 3), (32, 3), (4, 0)])
@pytest.mark.parametrize("cl", [False, True])
def test_halo_matches_reference(device, kernels, dtype, c, pad, cl):
    mask = make_mask(3, 3, 4, 0.4, seed=c + pad, device=device)
    L = S.cell_layout(mask)
    x = to_layout(torch.randn(L.num_tiles, 6, c, c, device=device, dtype=dtype), cl).requires_grad_(True)
    h = S.halo(x, L, pad, masked_fill=0.5, border_fill=-math.inf)
    assert torch.equal(h, R.sparse_halo(x.detach(), mask, pad, 0.5, -math.inf))
    assert_layout(h, S._is_channels_last(x))  # 1x1 tiles: the strides decide
    g = torch.randn_like(h)
    (gx,) = torch.autograd.grad(h, x, g)
    xr = x.detach().double().requires_grad_(True)
    (gr,) = torch.autograd.grad(R.sparse_halo(xr, mask, pad), xr, g.double())
    torch.testing.assert_close(gx.double(), gr, rtol=tol(dtype), atol=tol(dtype) * gr.abs().max().item())
    assert_layout(gx, S._is_channels_last(x))


# ---- im2col ----------------------------------------------------------------------------------

GEOMETRIES = [
    (1, 3, 1, 1),
    (2, 3, 1, 1),
    (4, 3, 1, 1),
    (2, 3, 2, 1),
    (4, 3, 2, 1),
    (8, 3, 2, 1),
    (8, 7, 2, 3),
    (2, 1, 2, 0),
    (4, 5, 1, 2),
]  # (cell, kernel, stride, pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,k,s,p", GEOMETRIES)
@pytest.mark.parametrize("cl", [False, True])
def test_im2col_matches_reference(device, kernels, dtype, c, k, s, p, cl):
    mask = make_mask(3, 3, 4, 0.4, seed=c * k, device=device)
    L = S.cell_layout(mask)
    x = to_layout(torch.randn(L.num_tiles, 5, c, c, device=device, dtype=dtype), cl).requires_grad_(True)
    cols = S.im2col(x, L, k, s, p)
    assert torch.equal(cols, R.sparse_im2col(x.detach(), mask, k, s, p))
    g = torch.randn_like(cols)
    (gx,) = torch.autograd.grad(cols, x, g)
    xr = x.detach().double().requires_grad_(True)
    (gr,) = torch.autograd.grad(R.sparse_im2col(xr, mask, k, s, p), xr, g.double())
    torch.testing.assert_close(gx.double(), gr, rtol=tol(dtype), atol=tol(dtype) * gr.abs().max().item())
    assert_layout(gx, cl)


# ---- strides, empty input, CUDA oracle -------------------------------------------------------


def test_non_contiguous_inputs(device, kernels):
    mask = make_mask(3, 2, 3, 0.4, device=device)
    L = S.cell_layout(mask)
    big = torch.randn(3, 10, 16, 24, device=device)
    x = big[:, ::2].transpose(2, 3).transpose(2, 3)  # every other channel: non-contiguous
    assert not x.is_contiguous()
    assert torch.equal(S.pack(x, L), R.sparse_pack(x, mask))
    t = torch.randn(L.num_tiles, 8, 8, 12, device=device)[..., 2:10].transpose(2, 3)  # strided tiles
    assert torch.equal(S.halo(t, L, 1), R.sparse_halo(t, mask, 1))
    assert torch.equal(S.im2col(t, L, 3, 2, 1), R.sparse_im2col(t, mask, 3, 2, 1))
    assert torch.equal(S.unpack(t, L), R.sparse_unpack(t, mask))
    g = torch.randn(L.num_tiles, 5, 12, 20, device=device)[:, :, 1:11, 2:12]
    assert torch.equal(ops.sparse_halo_backward(g, L.nbr, 1), ops.sparse_halo_backward(g.contiguous(), L.nbr, 1))


def test_empty_layout(device, kernels):
    mask = torch.zeros(2, 2, 3, dtype=torch.bool, device=device)
    L = S.cell_layout(mask)
    assert L.num_tiles == 0 and L.cells.shape == (0, 3) and L.nbr.shape == (0, 8)
    x = torch.randn(2, 4, 16, 24, device=device, requires_grad=True)
    p = S.pack(x, L)
    assert p.shape == (0, 4, 8, 8)
    assert S.halo(p, L, 1).shape == (0, 4, 10, 10)
    assert S.im2col(p, L, 3, 2, 1).shape == (0, 36)
    u = S.unpack(p, L, torch.ones(4, device=device))
    assert torch.equal(u, torch.ones_like(u))
    u.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert S.pack(torch.randn(2, 0, 16, 24, device=device), L).shape == (0, 0, 8, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [3, 8, 64, 100])  # 16-byte, narrower and odd vector widths
def test_cuda_fast_kernels_equal_simple(dtype, C):
    """On the GPU the simple per-element kernels are the oracle of the vectorized ones."""
    mask = make_mask(5, 4, 5, 0.5, device="cuda")
    L = S.cell_layout(mask)
    for c, pad in [(1, 1), (2, 1), (8, 1), (32, 3)]:
        x = torch.randn(5, C, 4 * c, 5 * c, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        fill = torch.randn(C, device="cuda", dtype=dtype)
        outs = []
        for simple in (False, True):
            old = S.simple_kernels(simple)
            try:
                p = S.pack(x, L)
                h = S.halo(p, L, pad, 0.0, -math.inf)
                outs.append(
                    [
                        p,
                        S.unpack(p, L, fill),
                        h,
                        ops.sparse_halo_backward(h.nan_to_num(0.0), L.nbr, pad),
                        S.im2col(p, L, 3, 1, 1),
                        ops.sparse_unpack_backward(x, L.cells, L.cell_map, True)[1],
                    ]
                )
                cols = outs[-1][4]
                outs[-1].append(ops.sparse_im2col_backward(cols, L.nbr, C, c, 3, 1, 1, True))
            finally:
                S.simple_kernels(old)
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-2)


# ---- autograd checks, opcheck, compile -------------------------------------------------------


def test_gradcheck_float64(kernels):
    mask = make_mask(3, 2, 3, 0.4, seed=3)
    L = S.cell_layout(mask)
    x = torch.randn(3, 2, 8, 12, dtype=torch.float64, requires_grad=True)
    p = torch.randn(L.num_tiles, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(2, dtype=torch.float64, requires_grad=True)
    p1 = torch.randn(L.num_tiles, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: S.pack(t, L), (x,))
    assert torch.autograd.gradcheck(lambda t, f: S.unpack(t, L, f), (p, fill))
    assert torch.autograd.gradcheck(lambda t: S.halo(t, L, 1, 0.0, 0.0), (p,))
    assert torch.autograd.gradcheck(lambda t: S.halo(t, L, 3, 0.0, 0.0), (p,))
    assert torch.autograd.gradcheck(lambda t: S.im2col(t, L, 3, 2, 1), (p,))
    assert torch.autograd.gradcheck(lambda t: S.im2col(t, L, 3, 1, 1), (p1,))
    # the backward ops are differentiable too (each is the other's adjoint)
    assert torch.autograd.gradgradcheck(lambda t: S.halo(t, L, 1), (p,))
    assert torch.autograd.gradgradcheck(lambda t: S.im2col(t, L, 3, 1, 1), (p,))
    assert torch.autograd.gradgradcheck(lambda t, f: S.unpack(t, L, f), (p, fill))
    assert torch.autograd.gradgradcheck(lambda t: S.pack(t, L), (x,))
    assert torch.autograd.gradgradcheck(lambda t: S.halo(t, L, 2, 0.5, -0.25), (p,))


def test_opcheck(device):
    mask = make_mask(3, 2, 3, 0.4, seed=5, device=device)
    L = S.cell_layout(mask)
    x = torch.randn(3, 4, 16, 24, device=device, requires_grad=True)
    p = torch.randn(L.num_tiles, 4, 8, 8, device=device, requires_grad=True)
    pcl = p.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    fill = torch.randn(4, device=device, requires_grad=True)
    cases = [
        (ops.sparse_cell_tables, (mask,)),
        (ops.sparse_pack, (x, L.cells, L.cell_map)),
        (ops.sparse_pack, (x, L.cells, L.cell_map, True)),
        (ops.sparse_unpack, (p, L.cells, L.cell_map, fill)),
        (ops.sparse_unpack, (pcl, L.cells, L.cell_map, None, False)),
        (ops.sparse_unpack_backward, (x.detach(), L.cells, L.cell_map, True)),
        (ops.sparse_halo, (p, L.nbr, 1, 0.0, -math.inf)),
        (ops.sparse_halo, (pcl, L.nbr, 3, 0.5, 0.0)),
        (ops.sparse_halo_backward, (torch.randn(L.num_tiles, 4, 10, 10, device=device), L.nbr, 1)),
        (ops.sparse_im2col, (p, L.nbr, 3, 2, 1)),
        (ops.sparse_im2col_backward, (torch.randn(L.num_tiles * 16, 36, device=device), L.nbr, 4, 4, 3, 1, 1, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    mask = make_mask(3, 3, 4, 0.5, seed=7)
    L = S.cell_layout(mask)
    w = torch.randn(6, 5, 3, 3)

    def f(x, cells, nbr, cell_map):
        p = ops.sparse_pack(x, cells, cell_map, True)
        h = ops.sparse_halo(p, nbr, 1, 0.0, 0.0)
        y = torch.nn.functional.conv2d(h, w)
        cols = ops.sparse_im2col(y, nbr, 3, 2, 1)
        return ops.sparse_unpack(y.relu(), cells, cell_map, None, None), cols.sum(1)

    x = torch.randn(3, 5, 24, 32, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = f(x, L.cells, L.nbr, L.cell_map)
    b = compiled(x, L.cells, L.nbr, L.cell_map)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    (ga,) = torch.autograd.grad(sum(t.sum() for t in a), x)
    (gb,) = torch.autograd.grad(sum(t.sum() for t in b), x)
    torch.testing.assert_close(ga, gb)


def test_torch_compile_tables_inside_graph():
    """The table op has a data-dependent size (A); with dynamic output shapes captured it compiles too."""
    import torch._dynamo

    def f(mask, x):
        cells, nbr, cell_map = ops.sparse_cell_tables(mask)
        halo = ops.sparse_halo(ops.sparse_pack(x, cells, cell_map), nbr, 1, 0.0, 0.0)
        return ops.sparse_unpack(halo[:, :, 1:-1, 1:-1], cells, cell_map, None)

    mask = make_mask(3, 3, 4, 0.5, seed=8)
    x = torch.randn(3, 2, 12, 16)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(mask, x)
    torch.testing.assert_close(out, R.sparse_unpack(R.sparse_pack(x, mask), mask))


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_errors():
    mask = make_mask(2, 2, 3, 0.3)
    L = S.cell_layout(mask)
    x = torch.randn(2, 3, 16, 24)
    with pytest.raises(ValueError, match="boolean"):
        S.cell_layout(mask.float())
    with pytest.raises(ValueError, match="shape"):
        S.cell_layout(mask[0])
    with pytest.raises(ValueError, match="float"):
        S.pack(x.long(), L)
    with pytest.raises(ValueError, match="square cells"):
        S.pack(torch.randn(2, 3, 16, 30), L)
    with pytest.raises(ValueError, match="batch size"):
        S.pack(torch.randn(3, 3, 16, 24), L)
    p = S.pack(x, L)
    with pytest.raises(ValueError, match="halo width"):
        S.halo(p, L, 9)
    with pytest.raises(ValueError, match="tiles"):
        S.halo(p[1:], L, 1)
    with pytest.raises(ValueError, match="stride"):
        S.im2col(p, L, 3, 3, 1)
    with pytest.raises(ValueError, match="reaches beyond"):
        S.im2col(S.pack(torch.randn(2, 3, 4, 6), L), L, 7, 1, 3)
    with pytest.raises(ValueError, match="one value per channel"):
        S.unpack(p, L, torch.zeros(4))
    # the raw ops check their arguments too
    with pytest.raises(RuntimeError, match="int32"):
        ops.sparse_halo(p, L.nbr.long(), 1, 0.0, 0.0)
    bad = L.nbr.clone()
    bad[0, 0] = 10**6
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sparse_halo(p, bad, 1, 0.0, 0.0)
    badc = L.cells.clone()
    badc[0, 1] = 99
    with pytest.raises(RuntimeError, match="outside the grid"):
        ops.sparse_pack(x, badc, L.cell_map)
    with pytest.raises(RuntimeError, match="bool"):
        ops.sparse_cell_tables(mask.int())


@pytest.mark.cuda
def test_cuda_device_mismatch_errors():
    mask = make_mask(2, 2, 3, 0.3)
    L = S.cell_layout(mask)
    with pytest.raises(ValueError, match="different devices"):
        S.pack(torch.randn(2, 3, 16, 24, device="cuda"), L)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_fill_grad_ignores_nonfinite_grad_at_visible(device, kernels, dtype, cl, bad):
    """unpack's fill gradient reads only masked cells: a non-finite gradient at a visible position (an
    fp16 overflow under AMP) stays out of it, as in the reference (a where), instead of becoming
    inf * 0 = NaN. The case of issue 13: 1x2x2 mask, C = 3, c = 2, grad[0, 1, 0, 0] = inf."""
    mask = torch.tensor([[[True, False], [False, True]]], device=device)
    L = S.cell_layout(mask)
    gen = torch.Generator().manual_seed(13)
    p = to_layout(torch.randn(L.num_tiles, 3, 2, 2, generator=gen), cl).to(device, dtype).requires_grad_(True)
    fill = torch.randn(3, generator=gen).to(device, dtype).requires_grad_(True)
    g = to_layout(torch.randn(1, 3, 4, 4, generator=gen), cl).to(device, dtype)
    g[0, 1, 0, 0] = bad  # cell (0, 0): visible
    g[0, 2, 3, 3] = bad  # cell (1, 1): visible
    gp, gf = torch.autograd.grad(S.unpack(p, L, fill), (p, fill), g)
    pr, fr = p.detach().double().requires_grad_(True), fill.detach().double().requires_grad_(True)
    gpr, gfr = torch.autograd.grad(R.sparse_unpack(pr, mask, fr), (pr, fr), g.double())
    assert torch.isfinite(gf).all(), gf
    visible = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)[0]
    want = torch.where(~visible, g.double(), 0).sum((0, 2, 3))
    torch.testing.assert_close(gfr, want)  # the reference skips visible cells too
    torch.testing.assert_close(gf.double(), gfr, rtol=tol(dtype), atol=tol(dtype) * 4)
    torch.testing.assert_close(gp.double(), gpr, rtol=0, atol=0, equal_nan=True)  # the tiles keep it
