"""Projection heads: the published ResNet-50 sizes, the scaling rule for smaller backbones, the
block structure (bias only without BN), lightly's heads as peers, SwAV's prototypes on the sphere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparkct.nn import heads as H

pytestmark = pytest.mark.usefixtures("one_thread")


def linears(head):
    return [(m.in_features, m.out_features, m.bias is not None) for m in head.modules() if isinstance(m, nn.Linear)]


def norms(head):
    return [m.num_features for m in head.modules() if isinstance(m, nn.BatchNorm1d)]


@pytest.mark.parametrize(
    "cls,sizes,bn",
    [
        (H.SimCLRProjectionHead, (2048, 2048, 128), True),
        (H.MoCoProjectionHead, (2048, 2048, 128), False),
        (H.SwAVProjectionHead, (2048, 2048, 128), True),
        (H.BYOLProjectionHead, (2048, 4096, 256), True),
    ],
)
def test_published_resnet50_sizes(cls, sizes, bn):
    h = cls(2048)
    assert [(i, o) for i, o, _ in linears(h)] == [(sizes[0], sizes[1]), (sizes[1], sizes[2])]
    assert norms(h) == ([sizes[1]] if bn else [])
    assert [b for *_, b in linears(h)] == [not bn, True]  # a bias only where no BN follows
    assert h(torch.randn(4, 2048)).shape == (4, sizes[2])


def test_byol_predictor_published_and_scaled():
    assert [(i, o) for i, o, _ in linears(H.BYOLPredictionHead())] == [(256, 4096), (4096, 256)]
    # the predictor's hidden width follows the backbone's feature dim, not its 256-d input
    assert [(i, o) for i, o, _ in linears(H.BYOLPredictionHead(feature_dim=512))] == [(256, 1024), (1024, 256)]


def test_scaling_rule_resnet18():
    assert H.scaled_width(2048, 512) == 512 and H.scaled_width(4096, 512) == 1024
    assert H.scaled_width(2048, 64, output_dim=128) == 128  # never narrower than the output
    assert [(i, o) for i, o, _ in linears(H.SimCLRProjectionHead(512))] == [(512, 512), (512, 128)]
    assert [(i, o) for i, o, _ in linears(H.BYOLProjectionHead(512))] == [(512, 1024), (1024, 256)]
    assert [(i, o) for i, o, _ in linears(H.MoCoProjectionHead(512, hidden_dim=64, output_dim=16))] == [
        (512, 64),
        (64, 16),
    ]


def test_blocks_must_chain():
    with pytest.raises(ValueError, match="does not match"):
        H.ProjectionHead([(8, 16, False, True), (15, 4, False, False)])
    with pytest.raises(ValueError):
        H.ProjectionHead([])


def test_same_function_as_lightly_heads():
    heads = pytest.importorskip("lightly.models.modules.heads")
    # (lightly's SimCLRProjectionHead adds a BN after the output layer, SimCLR v2's way; ours is v1's)
    for ours, theirs in (
        (H.BYOLProjectionHead(32, 48, 16), heads.BYOLProjectionHead(32, 48, 16)),
        (H.SwAVProjectionHead(32, 48, 16), heads.SwaVProjectionHead(32, 48, 16)),
    ):
        theirs.load_state_dict(ours.state_dict())  # same names, same shapes
        x = torch.randn(6, 32)
        torch.testing.assert_close(ours(x), theirs(x))


def test_prototypes_unit_norm_and_cosine_scores():
    p = H.SwAVPrototypes(16, 10)
    torch.testing.assert_close(p.weight.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        p.weight.mul_(3.0)
    p.normalize()
    torch.testing.assert_close(p.weight.norm(dim=1), torch.ones(10))
    z = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    s = p(z)
    assert s.shape == (5, 10) and s.abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError):
        H.SwAVPrototypes(16, 0)
