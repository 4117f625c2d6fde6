"""Projection and prediction heads: one :class:`ProjectionHead` built from blocks, the per-method heads
as thin subclasses, and SwAV's prototypes.

Sizes. The defaults are the published ones for a ResNet-50 (2048-d features):

    =================  ======================  ====
    head               published (ResNet-50)   BN
    =================  ======================  ====
    SimCLR projector   2048-2048-128           yes
    MoCo v2 projector  2048-2048-128           no
    SwAV projector     2048-2048-128           yes
    BYOL projector     2048-4096-256           yes
    BYOL predictor     256-4096-256            yes
    =================  ======================  ====

Scaling rule for other backbones: hidden widths scale with the backbone's feature dimension,
``hidden = round(published_hidden * feature_dim / 2048)`` (at least the output width), while the
output widths (128, 256) are kept as published, since the loss works on them. A ResNet-18 (512-d)
thus gets SimCLR 512-512-128 and BYOL 512-1024-256 / 256-1024-256. :func:`scaled_width` is that
rule; pass an explicit ``hidden_dim`` to override it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ProjectionHead",
    "SimCLRProjectionHead",
    "MoCoProjectionHead",
    "SwAVProjectionHead",
    "BYOLProjectionHead",
    "BYOLPredictionHead",
    "SwAVPrototypes",
    "scaled_width",
    "REFERENCE_DIM",
]

#: the feature dimension the published head sizes are for (ResNet-50's pooled features)
REFERENCE_DIM = 2048


def scaled_width(published: int, feature_dim: int, output_dim: int = 1) -> int:
    """A published hidden width (for 2048-d ResNet-50 features) scaled to `feature_dim`, never below
    `output_dim`."""
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
    return max(int(output_dim), int(round(published * feature_dim / REFERENCE_DIM)))


class ProjectionHead(nn.Module):
    """An MLP from blocks ``(in_features, out_features, batch_norm, relu)``: each block is a Linear
    (without bias when a BatchNorm follows it: the BN's shift replaces it), then an optional
    BatchNorm1d, then an optional ReLU. Module names follow lightly's (``layers.0``, ...)."""

    def __init__(self, blocks: Sequence[tuple[int, int, bool, bool]]):
        super().__init__()
        if not blocks:
            raise ValueError("ProjectionHead needs at least one block")
        layers: list[nn.Module] = []
        prev = None
        for b in blocks:
            i, o, bn, relu = b
            if prev is not None and i != prev:
                raise ValueError(f"ProjectionHead: block input {i} does not match the previous output {prev}")
            layers.append(nn.Linear(i, o, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm1d(o))
            if relu:
                layers.append(nn.ReLU(inplace=True))
            prev = o
        self.layers = nn.Sequential(*layers)
        self.input_dim, self.output_dim = blocks[0][0], blocks[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SimCLRProjectionHead(ProjectionHead):
    """SimCLR (v1): Linear-BN-ReLU, Linear (2048-2048-128 for ResNet-50). lightly's head with
    ``batch_norm=True`` also puts a BN after the output layer (SimCLR v2's form); this one does not."""

    def __init__(
        self, input_dim: int = 2048, hidden_dim: int | None = None, output_dim: int = 128, batch_norm: bool = True
    ):
        h = hidden_dim or scaled_width(2048, input_dim, output_dim)
        super().__init__([(input_dim, h, batch_norm, True), (h, output_dim, False, False)])


class MoCoProjectionHead(ProjectionHead):
    """MoCo v2: Linear-ReLU, Linear (2048-2048-128 for ResNet-50; no BN, as published)."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int | None = None, output_dim: int = 128):
        h = hidden_dim or scaled_width(2048, input_dim, output_dim)
        super().__init__([(input_dim, h, False, True), (h, output_dim, False, False)])


class SwAVProjectionHead(ProjectionHead):
    """SwAV: Linear-BN-ReLU, Linear (2048-2048-128 for ResNet-50)."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int | None = None, output_dim: int = 128):
        h = hidden_dim or scaled_width(2048, input_dim, output_dim)
        super().__init__([(input_dim, h, True, True), (h, output_dim, False, False)])


class BYOLProjectionHead(ProjectionHead):
    """BYOL projector: Linear-BN-ReLU, Linear (2048-4096-256 for ResNet-50)."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int | None = None, output_dim: int = 256):
        h = hidden_dim or scaled_width(4096, input_dim, output_dim)
        super().__init__([(input_dim, h, True, True), (h, output_dim, False, False)])


class BYOLPredictionHead(ProjectionHead):
    """BYOL predictor: Linear-BN-ReLU, Linear (256-4096-256 for ResNet-50). Its input is the
    projection, so the hidden width scales with the *backbone's* `feature_dim`, not `input_dim`."""

    def __init__(
        self,
        input_dim: int = 256,
        hidden_dim: int | None = None,
        output_dim: int = 256,
        feature_dim: int = REFERENCE_DIM,
    ):
        h = hidden_dim or scaled_width(4096, feature_dim, output_dim)
        super().__init__([(input_dim, h, True, True), (h, output_dim, False, False)])


class SwAVPrototypes(nn.Module):
    """SwAV's prototypes: a bias-free Linear whose K rows are kept on the unit sphere
    (:meth:`normalize`, called by the method before each step), applied to L2-normalized features,
    so the scores are cosine similarities in [-1, 1]. Freezing for the first iterations is the
    method's job (it drops the prototypes' gradients in ``on_before_optimizer_step``)."""

    def __init__(self, input_dim: int = 128, n_prototypes: int = 3000):
        super().__init__()
        if n_prototypes < 1:
            raise ValueError(f"n_prototypes must be >= 1, got {n_prototypes}")
        self.layer = nn.Linear(input_dim, n_prototypes, bias=False)
        self.normalize()

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @torch.no_grad()
    def normalize(self) -> None:
        w = self.layer.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Scores (N, K) of already L2-normalized features z (N, D)."""
        return self.layer(z)
