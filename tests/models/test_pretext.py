"""Pretext tasks: corruptions are what they say, labels are drawn per global batch, losses fall."""

from __future__ import annotations

import pytest
import torch

from sparkct.errors import UserError
from sparkct.models import get_method
from sparkct.models.backbone import build_backbone
from sparkct.models.pretext import PretextConfig


def make(name, **kw):
    torch.manual_seed(0)
    bb, _ = build_backbone("resnet18", in_chans=1)
    return get_method(name)(bb, PretextConfig(decoder_width=64, **kw))


def test_rotation_and_flip_corruptions():
    x = torch.rand(4, 1, 32, 32)
    rot = make("rotation")
    y = torch.tensor([0, 1, 2, 3])
    out = rot.corrupt(x, y)
    for i in range(4):
        assert torch.equal(out[i], torch.rot90(x[i], i, dims=(1, 2)))
    flip = make("flip")
    out = flip.corrupt(x, torch.tensor([0, 1, 0, 1]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))


def test_inpaint_box_and_loss_only_on_the_box():
    m = make("inpaint", box=(0.25, 0.5))
    x = torch.rand(3, 1, 64, 64)
    xin, box = m.corrupt(x, step=7)
    frac = box.mean((1, 2, 3))
    assert ((frac >= 0.25**2 - 0.02) & (frac <= 0.5**2 + 0.02)).all()
    inside = box.bool().expand_as(x)
    assert (xin[inside] == 0).all() and torch.equal(xin[~inside], x[~inside])
    assert torch.equal(m.corrupt(x, 7)[1], box) and not torch.equal(m.corrupt(x, 8)[1], box)  # keyed by step
    m.eval()
    l1, _ = m.training_step(x, 7)
    # the same corrupted input, a target that differs only outside the box: the loss must not move
    x2 = torch.where(inside, x, torch.rand_like(x))
    m.corrupt = lambda x_, s_: (xin, box)
    l2, _ = m.training_step(x2, 7)
    assert torch.allclose(l1, l2)
    x3 = torch.where(inside, torch.rand_like(x), x)  # ... and inside it, it must
    assert not torch.allclose(l1, m.training_step(x3, 7)[0])


@pytest.mark.parametrize("name", ["rotation", "flip", "denoise", "inpaint"])
def test_loss_falls(name):
    m = make(name)
    g = torch.Generator().manual_seed(1)
    # smooth asymmetric images: blobs in the left half
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    c = torch.rand(16, 2, generator=g) * 0.6 - torch.tensor([0.8, 0.3])
    x = torch.exp(-((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2) / 0.1)[:, None]
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for step in range(25):
        loss, _ = m.training_step(x, step % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


def test_bad_config():
    with pytest.raises(UserError, match="decoder-width"):
        PretextConfig(decoder_width=100).validate()
    with pytest.raises(UserError, match="--box"):
        PretextConfig(box=(0.5, 0.2)).validate()
