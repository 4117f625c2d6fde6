import math

import pytest
import torch

from sparkct.errors import UserError
from sparkct.train.optim import apply_schedule, build_optimizer, lr_at, param_groups, scaled_lr, wd_at


def test_lr_warmup_then_cosine_to_floor():
    peak, total, warm = 1.0, 100, 10
    assert lr_at(0, total, warm, peak) == pytest.approx(0.005)
    assert lr_at(5, total, warm, peak) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lr_at(10, total, warm, peak) == pytest.approx(1.0)
    assert lr_at(99, total, warm, peak) == pytest.approx(0.001)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), total, warm, peak) == pytest.approx(
        0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89))
    )
    lrs = [lr_at(s, total, warm, peak) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warm-up


def test_wd_cosine_and_lr_scaling():
    assert wd_at(0, 50, 0.04, 0.2) == pytest.approx(0.04)
    assert wd_at(49, 50, 0.04, 0.2) == pytest.approx(0.2)
    assert scaled_lr(2e-4, 512) == pytest.approx(4e-4)


def test_no_decay_on_biases_norms_and_named():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    m.register_parameter("token", torch.nn.Parameter(torch.zeros(1, 4, 1, 1)))
    groups = param_groups(m, 0.1, {"token"})
    decay = {id(p) for g in groups if g["decay"] for p in g["params"]}
    assert decay == {id(m[0].weight), id(m[2].weight)}
    opt = build_optimizer(m, "lamb", 1e-3, 0.1, no_decay={"token"})
    apply_schedule(opt, 0.5, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.3]


@pytest.mark.parametrize("name", ["lamb", "lars", "adamw", "adam", "sgd"])
def test_every_optimizer_steps(name):
    m = torch.nn.Linear(4, 1)
    opt = build_optimizer(m, name, 0.1, 0.01)
    w0 = m.weight.detach().clone()
    m(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    assert not torch.equal(w0, m.weight)


def test_bad_optimizer_settings():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="unknown optimizer"):
        build_optimizer(m, "adagrad", 0.1, 0.0)
    with pytest.raises(UserError, match="learning rate"):
        build_optimizer(m, "sgd", float("nan"), 0.0)
