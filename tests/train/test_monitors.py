"""Monitors: cosine kNN accuracy on separable and on shuffled labels (vs scikit-learn's neighbours
for k = 1), and the online linear probe (learns a separable problem, touches no other gradient,
ignores unlabelled rows)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparkct.train.monitors import OnlineLinearProbe, extract_features, knn_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n_per, centres, noise, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + noise * torch.randn(n_per, c.shape[0], generator=g) for c in centres])
    y = torch.arange(len(centres)).repeat_interleave(n_per)
    return x, y


def test_knn_accuracy():
    centres = torch.eye(8)[:4] * 3
    bank, bl = clusters(50, centres, 0.3, 0)
    query, ql = clusters(20, centres, 0.3, 1)
    assert knn_accuracy(bank, bl, query, ql, k=10) == 1.0
    perm = torch.randperm(len(bl), generator=torch.Generator().manual_seed(0))
    assert knn_accuracy(bank, bl[perm], query, ql, k=10) < 0.6  # shuffled labels: about chance
    # k = 1: the nearest neighbour by cosine, as scikit-learn finds it
    neighbors = pytest.importorskip("sklearn.neighbors")
    bank, bl = clusters(30, centres, 2.0, 2)
    query, ql = clusters(30, centres, 2.0, 3)
    sk = neighbors.KNeighborsClassifier(1, metric="cosine").fit(bank.numpy(), bl.numpy())
    expected = float((torch.from_numpy(sk.predict(query.numpy())) == ql).float().mean())
    assert knn_accuracy(bank, bl, query, ql, k=1, chunk=7) == pytest.approx(expected)
    with pytest.raises(ValueError):
        knn_accuracy(bank[:0], bl[:0], query, ql)


def test_extract_features_restores_mode():
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    net.train()
    batches = [(torch.randn(5, 4), torch.arange(5)), (torch.randn(2, 4), torch.arange(2))]
    f, y = extract_features(net, batches)
    assert f.shape == (7, 3) and y.tolist() == [0, 1, 2, 3, 4, 0, 1]
    torch.testing.assert_close(f[:5], net[0](batches[0][0]).detach())  # eval: no dropout
    assert net.training


def test_online_linear_probe():
    torch.manual_seed(0)
    centres = torch.eye(16)[:3] * 2
    x, y = clusters(40, centres, 0.3, 0)
    backbone = nn.Linear(16, 16)
    probe = OnlineLinearProbe(16, 3, lr=0.1)
    first = None
    for _ in range(60):
        feats = backbone(x)  # attached to the backbone's graph: the probe must detach
        logs = probe.step(feats, y)
        first = first if first is not None else logs
    assert backbone.weight.grad is None
    assert logs["probe_acc"] == 1.0 and logs["probe_loss"] < first["probe_loss"]
    assert probe.accuracy(backbone(x).detach(), y) == 1.0
    # unlabelled rows (-1) are ignored; a batch without labels is a no-op
    w = probe.linear.weight.detach().clone()
    assert probe.step(x, torch.full_like(y, -1)) == {}
    torch.testing.assert_close(probe.linear.weight, w)
    # checkpoint round trip, including the optimizer's momentum
    other = OnlineLinearProbe(16, 3)
    other.restore(copy.deepcopy(probe.checkpoint()))  # as through torch.save / torch.load
    probe.step(x[:10], y[:10])
    other.step(x[:10], y[:10])
    torch.testing.assert_close(other.linear.weight, probe.linear.weight)
    with pytest.raises(ValueError):
        OnlineLinearProbe(16, 1)
