"""SparK's light decoder: widths, shapes at every scale, CT channels, init, state_dict names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparkct.models.spark.decoder import LightDecoder, decoder_channels


def inputs(dec, B, gh, gw, n=4, dtype=torch.float32):
    """Densified features deepest first: block i's width at stride 32 / 2**i."""
    return [torch.randn(B, w, gh * 2**i, gw * 2**i, dtype=dtype) for i, w in enumerate(dec.in_widths[:n])]


@pytest.mark.parametrize("in_chans,width,grid", [(1, 64, (2, 3)), (2, 64, (2, 3)), (3, 64, (2, 3)), (3, 768, (1, 1))])
@torch.no_grad()
def test_shapes_at_every_scale(in_chans, width, grid):
    dec = LightDecoder(in_chans, width)
    assert len(dec.dec) == 5
    assert dec.in_widths == [width // 2**i for i in range(5)]
    B, (gh, gw) = 2, grid
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))) for blk in dec.dec]
    out = dec(inputs(dec, B, gh, gw))
    for h in hooks:
        h.remove()
    # block i doubles the resolution and halves the width
    assert seen == [(B, width // 2 ** (i + 1), gh * 2 ** (i + 1), gw * 2 ** (i + 1)) for i in range(5)]
    assert out.shape == (B, in_chans, 32 * gh, 32 * gw)


def test_published_structure_and_names():
    dec = LightDecoder(3, 768)
    assert decoder_channels(768) == [768, 384, 192, 96, 48, 24]
    blk = dec.dec[0]
    up = blk.up_sample
    assert (
        isinstance(up, nn.ConvTranspose2d)
        and up.kernel_size == (4, 4)
        and up.stride == (2, 2)
        and up.padding == (1, 1)
        and up.bias is not None
    )
    kinds = [type(m) for m in blk.conv]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.Conv2d, nn.BatchNorm2d]
    assert all(m.kernel_size == (3, 3) and m.bias is None for m in blk.conv if isinstance(m, nn.Conv2d))
    assert dec.proj.kernel_size == (1, 1) and dec.proj.in_channels == 24 and dec.proj.out_channels == 3
    # SparK checkpoint names (dec.<i>.up_sample / dec.<i>.conv.<j>, proj)
    keys = set(dec.state_dict())
    assert {
        "dec.0.up_sample.weight",
        "dec.0.up_sample.bias",
        "dec.0.conv.0.weight",
        "dec.0.conv.1.running_mean",
        "dec.4.conv.3.weight",
        "dec.4.conv.4.bias",
        "proj.weight",
        "proj.bias",
    } <= keys
    # ~20 GFLOP per 224x224 image (multiply-adds x 2), as the design notes say
    flops = 0
    h = 7
    for b in dec.dec:
        c = b.up_sample.in_channels
        flops += 2 * c * c * 16 * h * h  # transposed conv: every input pixel scatters a 4x4 kernel
        h *= 2
        flops += 2 * 9 * h * h * (c * c + c * b.conv[3].out_channels)
    assert 18e9 < flops < 22e9


def test_init_as_published():
    torch.manual_seed(0)
    dec = LightDecoder(3, 256)
    for m in dec.modules():
        if isinstance(m, nn.Conv2d):
            assert abs(m.weight.std().item() - 0.02) < 0.004
        if isinstance(m, nn.ConvTranspose2d):  # Kaiming fan-out: std = sqrt(2 / (out * k * k))
            expect = (2 / (m.weight.shape[1] * 16)) ** 0.5
            assert abs(m.weight.std().item() / expect - 1) < 0.1
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_skips_are_added_before_each_block():
    torch.manual_seed(0)
    dec = LightDecoder(1, 64).double().eval()
    feats = inputs(dec, 1, 1, 2, dtype=torch.float64)
    x = feats[0]
    for i, blk in enumerate(dec.dec):
        x = blk(x if i == 0 else x + (feats[i] if i < len(feats) else 0))
    ref = dec.proj(x)
    assert torch.allclose(dec([f.clone() for f in feats]), ref, rtol=0, atol=1e-12)
    # fewer skips (a shallower encoder) and None are allowed; the deepest one is required
    assert dec(feats[:2]).shape == ref.shape
    assert dec([feats[0], None, feats[2]]).shape == ref.shape
    with pytest.raises(ValueError, match="deepest"):
        dec([None])


def test_channels_last_and_grads():
    torch.manual_seed(0)
    dec = LightDecoder(3, 32).double()
    feats = [f.requires_grad_() for f in inputs(dec, 2, 1, 1, dtype=torch.float64)]
    out = dec(feats)
    g = torch.autograd.grad(out.square().sum(), feats)
    dec_cl = LightDecoder(3, 32).double().to(memory_format=torch.channels_last)
    dec_cl.load_state_dict(dec.state_dict())
    feats_cl = [f.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for f in feats]
    out_cl = dec_cl(feats_cl)
    g_cl = torch.autograd.grad(out_cl.square().sum(), feats_cl)
    assert torch.allclose(out, out_cl, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, g_cl):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(width=100), dict(width=16), dict(out_chans=0), dict(up_sample_ratio=24)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        LightDecoder(**{"out_chans": 3, **kw})
