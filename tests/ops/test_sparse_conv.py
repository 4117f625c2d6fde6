"""Sparse layers on packed tiles (sparse_conv2d through halo or gather-GEMM, sparse_max_pool2d)
against SparK's semantics (sparkct.ops.reference: dense layer on the masked canvas), and one 3x3
layer against spconv's SubMConv2d on the same visible pixels."""

from __future__ import annotations

import pytest
import torch

from sparkct.models.masking import cell_mask
from sparkct.ops import reference as R
from sparkct.ops import sparse as S


def make_mask(B, gh, gw, ratio, seed=0, device="cpu"):
    mask = cell_mask(B, (gh, gw), ratio, generator=torch.Generator().manual_seed(seed))
    if B >= 3:
        mask[0] = False
        mask[1] = True
    return mask.to(device)


CONVS = [  # (cell, kernel, stride, pad): every conv geometry of a ResNet, and a few more
    (8, 3, 1, 1),
    (4, 3, 1, 1),
    (2, 3, 1, 1),
    (1, 3, 1, 1),  # 3x3 at every scale
    (8, 3, 2, 1),
    (4, 3, 2, 1),
    (2, 3, 2, 1),  # strided 3x3
    (32, 7, 2, 3),  # the stem
    (8, 1, 2, 0),
    (2, 1, 1, 0),  # 1x1 downsample / pointwise
    (4, 5, 1, 2),
]


@pytest.mark.parametrize("c,k,s,p", CONVS)
@pytest.mark.parametrize("method", ["halo", "gemm"])
@pytest.mark.parametrize("cl", [False, True])
def test_sparse_conv2d_matches_dense_masked(device, c, k, s, p, method, cl):
    mask = make_mask(3, 2, 3, 0.4, seed=c + k, device=device)
    L = S.cell_layout(mask)
    dt = torch.float64 if device == "cpu" else torch.float32
    x = torch.randn(L.num_tiles, 4, c, c, device=device, dtype=dt)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(5, 4, k, k, device=device, dtype=dt, requires_grad=True)
    b = torch.randn(5, device=device, dtype=dt, requires_grad=True)
    y = S.sparse_conv2d(x, L, w, b, s, p, method=method)
    yr = R.sparse_conv2d(x, mask, w, b, s, p)
    rtol = 1e-10 if dt == torch.float64 else 1e-4
    torch.testing.assert_close(y, yr, rtol=rtol, atol=rtol * yr.abs().max().item())
    g = torch.randn_like(yr)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(yr, (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


def test_sparse_conv2d_groups_and_auto_method():
    mask = make_mask(3, 3, 3, 0.5, seed=1)
    L = S.cell_layout(mask)
    x = torch.randn(L.num_tiles, 6, 4, 4, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        S.sparse_conv2d(x, L, w, None, 1, 1, groups=3), R.sparse_conv2d(x, mask, w, None, 1, 1, 3)
    )
    with pytest.raises(ValueError, match="groups"):
        S.sparse_conv2d(x, L, w, None, 1, 1, groups=3, method="gemm")
    assert S.conv_method(2) == "gemm" and S.conv_method(4) == "halo" and S.conv_method(1, groups=2) == "halo"


def test_sparse_conv2d_gradcheck():
    mask = make_mask(3, 2, 2, 0.4, seed=2)
    L = S.cell_layout(mask)
    for c, s, method in [(4, 1, "halo"), (2, 2, "gemm"), (1, 1, "gemm"), (4, 2, "halo")]:
        x = torch.randn(L.num_tiles, 2, c, c, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b, s=s, method=method: S.sparse_conv2d(x, L, w, b, s, 1, method=method), (x, w, b)
        )


LAYERS = {  # name: (cell, layer(x, layout, w, b)); w / b unused by the pool
    "halo": (4, lambda x, L, w, b: S.sparse_conv2d(x, L, w, b, 1, 1, method="halo")),
    "halo-s2": (4, lambda x, L, w, b: S.sparse_conv2d(x, L, w, b, 2, 1, method="halo")),
    "gemm": (2, lambda x, L, w, b: S.sparse_conv2d(x, L, w, b, 1, 1, method="gemm")),
    "gemm-s2": (2, lambda x, L, w, b: S.sparse_conv2d(x, L, w, b, 2, 1, method="gemm")),
    "maxpool": (4, lambda x, L, w, b: S.sparse_max_pool2d(x, L, 3, 2, 1)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_double_backward(name):
    """Double backward of every layer: gradgradcheck in float64, and in fp32 (where the GEMM path's
    forward uses oneDNN's inner product, which has no autograd: it must not be used under
    create_graph=True) the second derivatives equal float64's."""
    c, layer = LAYERS[name]
    L = S.cell_layout(make_mask(3, 2, 2, 0.4, seed=4))
    gen = torch.Generator().manual_seed(7)
    x, w, b = (
        torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in ((L.num_tiles, 2, c, c), (3, 2, 3, 3), (3,))
    )
    ins = [t.clone().requires_grad_(True) for t in ((x,) if name == "maxpool" else (x, w, b))]
    f = (lambda x: layer(x, L, None, None)) if name == "maxpool" else (lambda x, w, b: layer(x, L, w, b))
    assert torch.autograd.gradgradcheck(f, ins)

    def second(dtype):
        xs = [t.detach().to(dtype).requires_grad_(True) for t in ins]
        y = f(*xs)
        (gx,) = torch.autograd.grad((y * y).sum(), xs[0], create_graph=True)
        v = torch.randn(gx.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        return torch.autograd.grad((gx * v).sum(), xs)

    for got, want in zip(second(torch.float32), second(torch.float64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("c,k,s,p", [(16, 3, 2, 1), (8, 3, 1, 1), (4, 2, 2, 0), (2, 3, 2, 1)])
@pytest.mark.parametrize("cl", [False, True])
def test_sparse_max_pool2d_matches_dense_masked(device, c, k, s, p, cl):
    mask = make_mask(3, 2, 3, 0.4, seed=c, device=device)
    L = S.cell_layout(mask)
    # ReLU'd features, as in the network: ties between zeros of visible and masked cells are common
    x = torch.randn(L.num_tiles, 4, c, c, device=device, dtype=torch.float64 if device == "cpu" else torch.float32)
    x = x.relu()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = S.sparse_max_pool2d(x, L, k, s, p)
    yr = R.sparse_max_pool2d(x, mask, k, s, p)
    assert torch.equal(y, yr)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(yr, x, g)[0])


def test_max_pool_border_is_minus_inf_and_masked_is_zero():
    # all-negative features: at the border the max must ignore the padding (-inf), next to a masked
    # cell it must see the masked cell's zeros
    mask = torch.tensor([[[True, False]]])
    L = S.cell_layout(mask)
    x = -torch.rand(1, 1, 4, 4) - 1.0
    y = S.sparse_max_pool2d(x, L, 3, 1, 1)
    assert (y[0, 0, :, 0] < 0).all()  # left column: border padding and own values only
    assert (y[0, 0, :, 3] == 0).all()  # right column's window reaches into the masked cell


@pytest.mark.parametrize("layout_cl", [False, True])
def test_bad_layer_arguments(layout_cl):
    mask = make_mask(2, 2, 2, 0.2)
    L = S.cell_layout(mask)
    x = torch.randn(L.num_tiles, 3, 4, 4)
    with pytest.raises(ValueError, match="square"):
        S.sparse_conv2d(x, L, torch.randn(3, 3, 3, 3), None, (1, 2), 1)
    with pytest.raises(ValueError, match="does not map"):
        S.sparse_conv2d(x, L, torch.randn(3, 3, 3, 3), None, 1, 0)  # valid conv shrinks the cell
    with pytest.raises(ValueError, match="method"):
        S.sparse_conv2d(x, L, torch.randn(3, 3, 3, 3), None, 1, 1, method="fft")
    with pytest.raises(ValueError, match="does not map"):
        S.sparse_max_pool2d(x, L, 3, 2, 0)


# ---- spconv as a peer oracle -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_single_conv_matches_spconv_submconv():
    """Our sparse 3x3 conv equals spconv's submanifold conv on the same visible pixels and weights.
    spconv 2.3.8's CPU SubMConv2d is wrong (only its centre tap acts); sparkct._peers then runs
    spconv's SubMConv3d on a depth-1 grid, the same operator, and this test checks that detection."""
    pytest.importorskip("spconv.pytorch")
    from sparkct._peers import SpconvSubMConv, spconv_2d_is_correct

    torch.manual_seed(0)
    B, C, Co, c = 3, 4, 5, 8
    mask = make_mask(B, 3, 4, 0.4, seed=11)
    L = S.cell_layout(mask)
    x = torch.randn(B, C, 3 * c, 4 * c)
    w = torch.randn(Co, C, 3, 3)
    ours = S.unpack(S.sparse_conv2d(S.pack(x, L), L, w, None, 1, 1), L)
    pix = mask.repeat_interleave(c, 1).repeat_interleave(c, 2)  # visible pixels (B, H, W)
    definition = torch.nn.functional.conv2d(x * pix[:, None], w, padding=1) * pix[:, None]
    torch.testing.assert_close(ours, definition, rtol=1e-4, atol=1e-4)

    idx = pix.nonzero().int()  # (N, 3): b, y, x
    feats = x.permute(0, 2, 3, 1)[pix].contiguous()  # (N, C)
    peer = SpconvSubMConv(w, idx, (3 * c, 4 * c), B)
    assert peer.use_3d == (not spconv_2d_is_correct("cpu"))
    with torch.no_grad():
        theirs = peer(feats)
    ours_at_pixels = ours.permute(0, 2, 3, 1)[pix]
    torch.testing.assert_close(ours_at_pixels, theirs, rtol=1e-4, atol=1e-4)
