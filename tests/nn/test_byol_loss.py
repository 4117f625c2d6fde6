"""BYOL's loss: symmetric negative cosine similarity vs a plain formula and lightly's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkct.nn import BYOLLoss, NegativeCosineSimilarity


def test_negative_cosine_similarity_values():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    assert float(NegativeCosineSimilarity()(x, y)) == pytest.approx(0.0, abs=1e-6)  # (-1 + 1) / 2
    assert float(NegativeCosineSimilarity()(x, x)) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        NegativeCosineSimilarity()(x, y[:1])


def test_byol_loss_symmetric_reference_and_lightly():
    g = torch.Generator().manual_seed(0)
    p0, p1, z0, z1 = (torch.randn(8, 16, generator=g, requires_grad=True) for _ in range(4))
    loss = BYOLLoss()(p0, p1, z0, z1)
    ref = -0.5 * (F.cosine_similarity(p0, z1.detach()).mean() + F.cosine_similarity(p1, z0.detach()).mean())
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert z0.grad is None and z1.grad is None  # targets take no gradient
    assert p0.grad is not None and p1.grad is not None
    ncs = pytest.importorskip("lightly.loss").NegativeCosineSimilarity()
    torch.testing.assert_close(loss, 0.5 * (ncs(p0, z1.detach()) + ncs(p1, z0.detach())))
    # swapping the views gives the same loss
    torch.testing.assert_close(BYOLLoss()(p1, p0, z1, z0), loss)


def test_byol_loss_half_inputs_in_fp32():
    x = torch.randn(4, 8).half()
    assert NegativeCosineSimilarity()(x, x).dtype == torch.float32
