"""SimCLR: construction from the registry, views, the loss equals lightly's NT-Xent on the projections,
chunked = unchunked gradients, a plain loop lowers the loss without collapse, and clear errors."""

from __future__ import annotations

import pytest
import torch

from sparkct.errors import UserError
from sparkct.models import get_method
from sparkct.models.simclr import SimCLR, SimCLRConfig

from contrastive_helpers import FEATURES, grads_chunked_vs_unchunked, synthetic_hu, tiny_backbone, train

pytestmark = pytest.mark.usefixtures("one_thread")


def make(chunk=0, norm="group", **kw):
    torch.manual_seed(0)
    return SimCLR(
        tiny_backbone(norm=norm), SimCLRConfig(chunk=chunk, proj_hidden_dim=32, proj_dim=8, **kw), feature_dim=FEATURES
    )


def test_registry_resnet18_and_views():
    from sparkct.models.backbone import build_backbone

    cls = get_method("simclr")
    assert cls is SimCLR and cls.name == "simclr"
    backbone, dim = build_backbone("resnet18", in_chans=2)
    m = cls(backbone, SimCLRConfig())
    assert [l.out_features for l in m.projector.modules() if isinstance(l, torch.nn.Linear)] == [512, 128]
    views = m.transform(32, ["lung", "bone"])(synthetic_hu(4), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 2, 32, 32)] * 2
    assert not torch.equal(views[0], views[1])  # independently augmented
    loss, logs = m.training_step(views, 0)
    assert loss.requires_grad and set(logs) >= {"ssl", "collapse"}


def test_loss_is_ntxent_of_projections():
    lightly_loss = pytest.importorskip("lightly.loss")
    m = make(temperature=0.3)
    views = m.transform(32, "lung")(synthetic_hu(6), torch.Generator().manual_seed(1))
    loss, _ = m.training_step(views, 0)
    z = m.projector(m.backbone(torch.cat(views)))
    torch.testing.assert_close(loss, lightly_loss.NTXentLoss(0.3)(z[:6], z[6:]), rtol=1e-5, atol=1e-6)


def test_chunked_equals_unchunked():
    views = make().transform(32, "lung")(synthetic_hu(10), torch.Generator().manual_seed(2))
    l0, l1, g0, g1 = grads_chunked_vs_unchunked(make, views, chunk=3)
    assert l0 == pytest.approx(l1, rel=1e-12) and set(g0) == set(g1) and len(g0) > 4
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12)


def test_training_lowers_loss_without_collapse():
    losses, collapse = train(make(norm="batch", temperature=0.2, augment="light"), steps=30)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert min(collapse) > 0.2


def test_bad_input():
    m = make()
    views = m.transform(32, "lung")(synthetic_hu(1), torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="at least 2 images"):
        m.training_step(views, 0)
    with pytest.raises(UserError, match="temperature must be > 0"):
        SimCLRConfig(temperature=0).validate()
    with pytest.raises(UserError, match="unknown method .simclrr."):
        get_method("simclrr")
    with pytest.raises(UserError, match="unknown augmentation preset"):
        SimCLR(tiny_backbone(), SimCLRConfig(augment="strong+wild"), feature_dim=FEATURES).transform(32, "lung")
    with pytest.raises(UserError, match="chunk"):
        SimCLRConfig(chunk=-1).validate()
