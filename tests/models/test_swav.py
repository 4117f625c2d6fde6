"""SwAV: multi-crop shapes (2 global at the crop size + 6 local at 96/224 of it), the loss equals
lightly's SwaVLoss on the method's own scores, prototypes stay normalized and frozen for the first
steps, the feature queue, chunked = unchunked gradients, a plain loop lowers the loss without
collapse, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkct.errors import UserError
from sparkct.models import get_method
from sparkct.models.swav import SwAV, SwAVConfig

from contrastive_helpers import FEATURES, grads_chunked_vs_unchunked, synthetic_hu, tiny_backbone, train

pytestmark = pytest.mark.usefixtures("one_thread")


def make(chunk=0, norm="group", **kw):
    torch.manual_seed(0)
    kw = {"prototypes": 12, "n_local": 2, "freeze_prototypes": 0, **kw}
    return SwAV(
        tiny_backbone(norm=norm), SwAVConfig(chunk=chunk, proj_hidden_dim=32, proj_dim=8, **kw), feature_dim=FEATURES
    )


def test_defaults_and_multicrop_shapes():
    assert get_method("swav") is SwAV
    c = SwAVConfig()
    assert (c.prototypes, c.temperature, c.epsilon, c.sinkhorn_iterations, c.n_global, c.n_local) == (
        3000,
        0.1,
        0.05,
        3,
        2,
        6,
    )
    m = SwAV(tiny_backbone(), SwAVConfig(), feature_dim=FEATURES)
    assert m.prototypes.weight.shape == (3000, 128)
    views = m.transform(224, "lung")(synthetic_hu(2, size=64), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(2, 1, 224, 224)] * 2 + [(2, 1, 96, 96)] * 6
    views = m.transform(64, ["lung", "bone"])(synthetic_hu(3, size=64), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 2, 64, 64)] * 2 + [(3, 2, 27, 27)] * 6  # 64 * 96 / 224


@pytest.mark.parametrize("joint_head", [True, False])
def test_loss_matches_lightly_on_the_scores(joint_head):
    swav_loss = pytest.importorskip("lightly.loss.swav_loss")
    m = make(norm="batch", joint_head=joint_head).double()
    views = [v.double() for v in m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))]
    loss, logs = m.training_step(views, 0)
    with torch.no_grad():
        # SwAV's code: the crops of one resolution go through the backbone together, and the projection
        # head once over the features of all crops (BatchNorm over them all); --joint-head false: per resolution
        feats = [m.backbone(torch.cat(group)) for group in (views[:2], views[2:])]
        heads = [m.projector(torch.cat(feats))] if joint_head else [m.projector(f) for f in feats]
        scores = list(m.prototypes(F.normalize(torch.cat(heads), dim=1)).split(8))
    expected = swav_loss.SwaVLoss()(scores[:2], scores[2:])
    # the method's loss is fp32 by design (Sinkhorn-Knopp in fp32); the features above are float64
    torch.testing.assert_close(loss.detach(), expected.reshape(()).float(), rtol=1e-5, atol=1e-6)
    assert 0 < logs["collapse"] <= 1.5


def test_joint_head_is_the_default_and_changes_the_loss():
    assert SwAVConfig().joint_head is True
    views = make().transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))
    a, _ = make(norm="batch").double().training_step([v.double() for v in views], 0)
    b, _ = make(norm="batch", joint_head=False).double().training_step([v.double() for v in views], 0)
    assert abs(float(a.detach()) - float(b.detach())) > 1e-6  # the head's BatchNorm sees other batches
    with pytest.raises(UserError, match="joint head"):
        SwAVConfig(joint_head="yes").validate()


def test_prototypes_normalized_and_frozen():
    m = make(freeze_prototypes=2)
    with torch.no_grad():
        m.prototypes.weight.mul_(2.0)
    views = m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))
    for step in range(3):
        loss, _ = m.training_step(views, step)
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(12))  # renormalized first
        loss.backward()
        assert m.prototypes.weight.grad is not None
        m.on_before_optimizer_step(step)
        assert (m.prototypes.weight.grad is None) == (step < 2)
        m.zero_grad()


def test_queue_from_its_epoch():
    m = make(queue_size=16, queue_start_epoch=1)
    views = m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))
    _, logs = m.training_step(views, 0)
    assert logs["queue_used"] == 0.0 and len(m.queue[0]) == 0  # epoch 0: not yet
    m.on_epoch_end(0)
    for step in range(3):  # two batches of 8 fill the 16 rows, the third uses them
        _, logs = m.training_step(views, step)
        assert logs["queue_used"] == float(step == 2)
    assert m.queue[0].full
    assert m.state_dict()["epoch"] == 1 and "queue.0.queue" in m.state_dict()  # resumable


def test_chunked_equals_unchunked():
    views = make().transform(32, "lung")(synthetic_hu(10), torch.Generator().manual_seed(2))
    l0, l1, g0, g1 = grads_chunked_vs_unchunked(make, views, chunk=4)
    assert l0 == pytest.approx(l1, rel=1e-12) and len(g0) > 4 and set(g0) == set(g1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12)


def test_training_lowers_loss_without_collapse():
    losses, collapse = train(make(norm="batch", augment="light"), steps=30)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    assert min(collapse) > 0.2


def test_bad_input():
    with pytest.raises(UserError, match="smaller than the global batch"):
        m = make(queue_size=4)
        m.training_step(m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(0)), 0)
    with pytest.raises(UserError, match="epsilon must be > 0"):
        SwAVConfig(epsilon=0).validate()
    with pytest.raises(UserError, match="prototypes must be a positive integer"):
        SwAVConfig(prototypes=0).validate()
    with pytest.raises(UserError, match="at least 2 crops"):
        SwAVConfig(n_global=1, n_local=0).validate()
    with pytest.raises(UserError, match="local scale"):
        SwAVConfig(local_scale=(0.5, 0.1)).validate()
