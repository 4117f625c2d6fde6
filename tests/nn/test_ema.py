"""update_momentum and cosine_schedule: values by hand and against lightly's; MomentumEncoder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparkct.nn import MomentumEncoder, cosine_schedule, momentum_copy, update_momentum


def test_update_momentum_values():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    update_momentum(a, b, 0.9)
    torch.testing.assert_close(b.weight, 0.9 * wb + 0.1 * wa)
    update_momentum(a, b, 0.0)  # m = 0 copies
    torch.testing.assert_close(b.weight, wa)
    before = b.bias.detach().clone()
    update_momentum(nn.Linear(3, 2), b, 1.0)  # m = 1 keeps
    torch.testing.assert_close(b.bias, before)
    with pytest.raises(ValueError):
        update_momentum(a, b, 1.5)
    with pytest.raises(ValueError, match="different parameters"):
        update_momentum(a, nn.Linear(3, 3), 0.5)


def test_update_momentum_matches_lightly():
    utils = pytest.importorskip("lightly.models.utils")
    a = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    b1, b2 = momentum_copy(a), momentum_copy(a)
    for p in b1.parameters():
        p.data.normal_()
    b2.load_state_dict(b1.state_dict())
    update_momentum(a, b1, 0.99)
    utils.update_momentum(a, b2, 0.99)
    for p, q in zip(b1.parameters(), b2.parameters()):
        torch.testing.assert_close(p, q)


def test_cosine_schedule_values():
    assert cosine_schedule(0, 11, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_schedule(5, 11, 0.99, 1.0) == pytest.approx(0.995)  # half way
    assert cosine_schedule(10, 11, 0.99, 1.0) == 1.0
    assert cosine_schedule(50, 11, 0.99, 1.0) == 1.0
    assert cosine_schedule(3, 11, 0.999, 0.999) == pytest.approx(0.999)  # MoCo's constant
    assert cosine_schedule(2, 11, 0.99, 1.0) == pytest.approx(1.0 - 0.01 * (math.cos(math.pi * 0.2) + 1) / 2)
    with pytest.raises(ValueError):
        cosine_schedule(-1, 10, 0, 1)


def test_cosine_schedule_matches_lightly():
    sched = pytest.importorskip("lightly.utils.scheduler")
    for total in (1, 2, 7, 100):
        for step in range(total):
            assert cosine_schedule(step, total, 0.99, 1.0) == pytest.approx(
                sched.cosine_schedule(step, total, 0.99, 1.0)
            )


def test_momentum_encoder():
    online = nn.Linear(3, 3)
    enc = MomentumEncoder(online, 0.5, 1.0)
    assert not any(p.requires_grad for p in enc.parameters())
    assert [k for k in enc.state_dict()] == ["ema.weight", "ema.bias"]  # the online model is not registered
    with torch.no_grad():
        online.weight.add_(1.0)
    w_ema = enc.ema.weight.detach().clone()
    m = enc.update(0, 3)
    assert m == 0.5
    torch.testing.assert_close(enc.ema.weight, 0.5 * w_ema + 0.5 * online.weight.detach())
    assert enc.update(2, 3) == 1.0
    x = torch.randn(2, 3)
    torch.testing.assert_close(enc(x), enc.ema(x))
