"""BYOL's loss: negative cosine similarity of the online predictions and the target projections,
symmetrized over the two views (Grill et al. 2020).

``BYOLLoss()(p0, p1, z0, z1) = (ncs(p0, z1) + ncs(p1, z0)) / 2`` with ``ncs(p, z) = -mean_n cos(p_n,
z_n)`` (lightly's ``NegativeCosineSimilarity``); the targets z are detached. BYOL's paper writes the
loss as ``2 - 2 cos`` summed over both directions, i.e. ``4 + 4 * this``: the same minimizer, a 4x
larger gradient (absorbed by the learning rate). Values lie in [-1, 1]; -1 is perfect agreement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparkct.profiling import ranged

__all__ = ["NegativeCosineSimilarity", "BYOLLoss"]


class NegativeCosineSimilarity(nn.Module):
    """``-mean(cosine_similarity(x0, x1, dim, eps))`` (lightly's, computed in float32)."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape:
            raise ValueError(f"NegativeCosineSimilarity: shapes differ, {tuple(x0.shape)} vs {tuple(x1.shape)}")
        dt = torch.promote_types(torch.promote_types(x0.dtype, x1.dtype), torch.float32)
        return -F.cosine_similarity(x0.to(dt), x1.to(dt), self.dim, self.eps).mean()


class BYOLLoss(nn.Module):
    """Symmetric BYOL loss of online predictions (p0, p1) and target projections (z0, z1)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.ncs = NegativeCosineSimilarity(eps=eps)

    @ranged("loss/BYOLLoss")
    def forward(self, p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.ncs(p0, z1.detach()) + self.ncs(p1, z0.detach()))
