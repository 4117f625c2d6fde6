"""The method contract's monitor: the collapse indicator (about 1 when spread, 0 when collapsed)."""

from __future__ import annotations

import pytest
import torch

from sparkct.models.base import collapse_indicator

pytestmark = pytest.mark.usefixtures("one_thread")


def test_collapse_indicator():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 64, generator=g)
    assert collapse_indicator(spread) == pytest.approx(1.0, abs=0.03)
    one_point = torch.randn(1, 64, generator=g).repeat(512, 1) * torch.rand(512, 1, generator=g)  # same direction
    assert collapse_indicator(one_point) < 1e-3
    partial = torch.randn(512, 64, generator=g) * 0.01 + 1.0  # nearly one direction
    assert 0 < collapse_indicator(partial) < 0.2
    with pytest.raises(ValueError):
        collapse_indicator(torch.randn(1, 8))
