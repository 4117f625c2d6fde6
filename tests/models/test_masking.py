"""The one SparK cell-mask generator: exact visible count, per-sample independence, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from sparkct.errors import UserError
from sparkct.models.masking import cell_mask, check_mask_ratio, visible_cells


def spark_mask(batch, gh, gw, keep, generator):
    """SparK's own draw (its SparK.mask): the `keep` cells with the smallest uniform noise are visible."""
    idx = torch.rand(batch, gh * gw, generator=generator).argsort(dim=1)[:, :keep]
    return torch.zeros(batch, gh * gw, dtype=torch.bool).scatter_(1, idx, True).view(batch, gh, gw)


@pytest.mark.parametrize("grid", [(7, 7), (2, 3), (1, 1), (6, 4)])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.6, 0.75, 0.9, 0.999])
def test_exact_visible_count_per_sample(grid, ratio):
    m = cell_mask(9, grid, ratio, generator=torch.Generator().manual_seed(1))
    n = grid[0] * grid[1]
    keep = max(1, round(n * (1 - ratio)))
    assert m.dtype == torch.bool and m.shape == (9, *grid)
    assert m.sum((1, 2)).tolist() == [keep] * 9
    assert visible_cells(n, ratio) == keep


def test_equals_spark_draw_for_the_same_generator():
    for seed in range(3):
        ours = cell_mask(5, (7, 7), 0.6, generator=torch.Generator().manual_seed(seed))
        theirs = spark_mask(5, 7, 7, round(49 * 0.4), torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs)


def test_samples_are_independent_and_uniform():
    B, n = 4000, 16
    m = cell_mask(B, (4, 4), 0.625, generator=torch.Generator().manual_seed(0)).view(B, n).double()
    p = 6 / 16
    assert (m.mean(0) - p).abs().max() < 0.04  # every cell equally likely visible
    both = (m[0::2] * m[1::2]).mean()  # neighbouring samples: independent -> p^2, identical -> p
    assert abs(both - p * p) < 0.02
    same = (m[0::2] == m[1::2]).all(1).double().mean()  # identical pairs: 1 / C(16, 6) if independent
    assert same < 10 / math.comb(16, 6)


def test_seeded():
    a = cell_mask(4, 7, 0.6, generator=torch.Generator().manual_seed(3))
    b = cell_mask(4, 7, 0.6, generator=torch.Generator().manual_seed(3))
    c = cell_mask(4, 7, 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_device_does_not_change_the_draw(device):
    a = cell_mask(4, 7, 0.6, generator=torch.Generator().manual_seed(3))
    b = cell_mask(4, 7, 0.6, generator=torch.Generator().manual_seed(3), device=device)
    assert b.device.type == device and torch.equal(a, b.cpu())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_ratio(bad):
    with pytest.raises(UserError, match="mask ratio"):
        check_mask_ratio(bad)
    with pytest.raises(UserError, match="mask ratio"):
        cell_mask(2, 7, bad)


def test_bad_shape():
    with pytest.raises(ValueError):
        cell_mask(2, (0, 3), 0.5)
    with pytest.raises(ValueError):
        cell_mask(-1, 3, 0.5)
    assert cell_mask(0, 3, 0.5).shape == (0, 3, 3)
