"""BYOL: sizes, the asymmetric views, the loss equals the symmetric negative cosine of the online
predictions and the target projections, the target's cosine EMA 0.99 -> 1, chunked = unchunked
gradients, a plain loop lowers the loss while the collapse indicator stays away from 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkct.errors import UserError
from sparkct.models import get_method
from sparkct.models.byol import BYOL, BYOLConfig

from contrastive_helpers import FEATURES, grads_chunked_vs_unchunked, synthetic_hu, tiny_backbone, train

pytestmark = pytest.mark.usefixtures("one_thread")


def make(chunk=0, norm="group", **kw):
    torch.manual_seed(0)
    return BYOL(
        tiny_backbone(norm=norm), BYOLConfig(chunk=chunk, proj_hidden_dim=32, proj_dim=8, **kw), feature_dim=FEATURES
    )


def test_defaults_sizes_and_views():
    assert get_method("byol") is BYOL
    m = BYOL(tiny_backbone(), BYOLConfig(), feature_dim=512)  # sizes as for a resnet18
    lin = lambda mod: [(l.in_features, l.out_features) for l in mod.modules() if isinstance(l, torch.nn.Linear)]  # noqa: E731
    assert lin(m.projector) == [(512, 1024), (1024, 256)] and lin(m.predictor) == [(256, 1024), (1024, 256)]
    assert (m.config.momentum, m.config.momentum_end) == (0.99, 1.0)
    tf = m.transform(32, "lung")
    assert [a.p_blur for a in tf.augments] == [1.0, 0.1]  # BYOL's asymmetric blur


@pytest.mark.parametrize("joint_views", [False, True])
def test_loss_as_byols_code(joint_views):
    """BYOL's code runs each view through the online and the target network alone (BatchNorm statistics
    per view); --joint-views true runs both views in one batch. float64, the same weights."""
    m = make(norm="batch", joint_views=joint_views).double()
    views = [v.double() for v in m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))]
    with torch.no_grad():
        z0, z1 = m.target(views[0]), m.target(views[1])
    loss, _ = m.training_step(views, 0)

    def online(x):
        return m.predictor(m.projector(m.backbone(x)))

    p0, p1 = online(torch.cat(views)).split(8) if joint_views else (online(views[0]), online(views[1]))
    expected = -0.5 * (F.cosine_similarity(p0, z1).mean() + F.cosine_similarity(p1, z0).mean())
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_per_view_is_the_default_and_changes_the_loss():
    assert BYOLConfig().joint_views is False
    views = [v.double() for v in make().transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))]
    a, _ = make(norm="batch").double().training_step(views, 0)
    b, _ = make(norm="batch", joint_views=True).double().training_step(views, 0)
    assert abs(float(a.detach()) - float(b.detach())) > 1e-6


def test_loss_and_target_ema():
    m = make()
    views = m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))
    with torch.no_grad():
        z0, z1 = m.target(views[0]), m.target(views[1])
    loss, _ = m.training_step(views, 0)
    p0, p1 = (m.predictor(m.projector(m.backbone(v))) for v in views)  # each view alone, as BYOL's code
    expected = -0.5 * (F.cosine_similarity(p0, z1).mean() + F.cosine_similarity(p1, z0).mean())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in m.target.parameters())
    before = [p.detach().clone() for p in m.target.parameters()]
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    online = [p.detach() for p in list(m.backbone.parameters()) + list(m.projector.parameters())]
    m.after_step(0, 100)  # momentum 0.99 at the start
    for b, o, t in zip(before, online, m.target.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * o)
    snapshot = [p.detach().clone() for p in m.target.parameters()]
    m.after_step(99, 100)  # momentum 1.0 at the end: the target stays
    for s, t in zip(snapshot, m.target.parameters()):
        torch.testing.assert_close(t, s)


def test_chunked_equals_unchunked():
    views = make().transform(32, "lung")(synthetic_hu(10), torch.Generator().manual_seed(2))
    l0, l1, g0, g1 = grads_chunked_vs_unchunked(make, views, chunk=3)
    assert l0 == pytest.approx(l1, rel=1e-12) and len(g0) > 4 and set(g0) == set(g1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12)


def test_training_lowers_loss_without_collapse():
    losses, collapse = train(make(norm="batch", augment="light"), steps=30)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    assert min(collapse) > 0.2


def test_bad_config():
    with pytest.raises(UserError, match="momentum"):
        BYOLConfig(momentum_end=1.01).validate()
    with pytest.raises(UserError, match="hybrid"):
        BYOLConfig(hybrid_weight=0.5).validate()
    with pytest.raises(UserError, match="joint views"):
        BYOLConfig(joint_views="no").validate()
