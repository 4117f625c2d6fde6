"""The hybrid objective (ssl + lambda * cross-entropy on labelled rows, -1 = unlabelled) for every
method, chunked = unchunked with the supervised term, labels mapped onto a prepared synthetic cache
(label_slices) and through SliceLoader into a step, the augmentation presets, and clear errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparkct.data import label_slices
from sparkct.errors import UserError
from sparkct.models import get_method
from sparkct.models.simclr import SimCLR, SimCLRConfig
from sparkct.models.ssl import augment_kwargs

from contrastive_helpers import FEATURES, grads_chunked_vs_unchunked, synthetic_hu, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "simclr": {},
    "moco": {"queue_size": 16},
    "swav": {"prototypes": 12, "n_local": 2, "freeze_prototypes": 0},
    "byol": {},
}


def make(name="simclr", chunk=0, weight=0.5, norm="group", **kw):
    torch.manual_seed(0)
    cls = get_method(name)
    cfg = cls.config_class(
        chunk=chunk, hybrid_weight=weight, num_classes=3, proj_hidden_dim=32, proj_dim=8, **{**SMALL[name], **kw}
    )
    return cls(tiny_backbone(norm=norm), cfg, feature_dim=FEATURES)


TARGETS = torch.tensor([0, 2, -1, 1, -1, 0, 2, -1])


def test_loss_is_ssl_plus_weighted_cross_entropy():
    m = make(weight=0.5)
    views = m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(0))
    loss, logs = m.training_step((views, TARGETS), 0)
    feats = m.backbone(torch.cat(views))
    keep = TARGETS >= 0
    ce = sum(F.cross_entropy(m.classifier(f)[keep], TARGETS[keep]) for f in feats.split(8)) / 2
    torch.testing.assert_close(logs["supervised"], ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, logs["ssl"] + 0.5 * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.last_features, feats[:8].detach(), rtol=1e-5, atol=1e-6)  # for the probe
    assert m.last_targets is TARGETS
    # no labelled row: the supervised term is 0 and the classifier gets no gradient
    loss, logs = m.training_step((views, torch.full((8,), -1)), 0)
    assert float(logs["supervised"]) == 0.0
    loss.backward()
    assert float(m.classifier.weight.grad.abs().sum()) == 0.0
    # bare views (an unlabelled loader): self-supervised only
    loss, logs = m.training_step(views, 0)
    assert "supervised" not in logs


@pytest.mark.parametrize("name", ["moco", "swav", "byol"])
def test_every_method_takes_the_hybrid_term(name):
    m = make(name)
    views = m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(0))
    loss, logs = m.training_step((views, TARGETS), 0)
    loss.backward()
    assert float(logs["supervised"]) > 0 and m.classifier.weight.grad.abs().sum() > 0
    torch.testing.assert_close(loss.detach(), logs["ssl"] + 0.5 * logs["supervised"])


def test_chunked_equals_unchunked_with_labels():
    views = make().transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(2))
    l0, l1, g0, g1 = grads_chunked_vs_unchunked(lambda chunk: make(chunk=chunk), (views, TARGETS), chunk=3)
    assert "classifier.weight" in g0 and set(g0) == set(g1)
    assert l0 == pytest.approx(l1, rel=1e-12)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from sparkct.data import prepare
    from sparkct.data.synthetic import synth

    src, dst = tmp_path_factory.mktemp("synth"), tmp_path_factory.mktemp("cache")
    synth(str(src), patients=2, seed=1, size=64, thickness=8.0, series_per_patient=(1, 1), slices=6)
    prepare(str(src), str(dst), progress=False)
    return str(dst)


def test_labels_file_to_batch(cache, tmp_path):
    from sparkct.data import CTSliceDataset, SliceLoader

    ds = CTSliceDataset(cache)
    uids = [str(u) for u in ds.cache.series["series_uid"]]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:  # one series labelled per slice (two slices), one not at all
        w = csv.writer(f)
        w.writerow(["series_uid", "slice_index", "label"])
        w.writerow([uids[0], 0, "nodule"])
        w.writerow([uids[0], 3, "normal"])
    labelled, classes = label_slices(ds, str(labels))
    assert classes == ["nodule", "normal"] and len(labelled) == len(ds)
    off = int(ds.cache.series["offset"][0])
    expected = np.full(len(ds), -1)
    expected[off], expected[off + 3] = 0, 1
    np.testing.assert_array_equal(labelled.targets, expected)
    m = SimCLR(
        tiny_backbone(),
        SimCLRConfig(hybrid_weight=0.5, num_classes=len(classes), proj_hidden_dim=32, proj_dim=8),
        feature_dim=FEATURES,
    )
    loader = SliceLoader(labelled, batch_size=len(ds), shuffle=False, transform=m.transform(32, "lung"))
    batch = next(iter(loader))
    views, targets = batch
    assert len(views) == 2 and targets.tolist() == expected.tolist()
    loss, logs = m.training_step(batch, 0)
    assert torch.isfinite(loss) and float(logs["supervised"]) > 0
    # a labels file that matches nothing is a clear error
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["series_uid", "label"], ["1.2.3.nope", "1"]])
    with pytest.raises(UserError, match="matches no slice"):
        label_slices(ds, str(labels))


def test_augment_presets_compose():
    assert augment_kwargs("strong")["scale"] == (0.08, 1.0)
    kw = augment_kwargs("strong+no-rotate+no-blur")
    assert kw["p_rotate"] == 0.0 and kw["p_blur"] == 0.0 and kw["scale"] == (0.08, 1.0)
    with pytest.raises(UserError, match="unknown augmentation preset 'nope'"):
        augment_kwargs("light+nope")


def test_bad_config():
    with pytest.raises(UserError, match="needs labels"):
        SimCLRConfig(hybrid_weight=0.5).validate()
    with pytest.raises(UserError, match="hybrid weight must be >= 0"):
        SimCLRConfig(hybrid_weight=-1.0, num_classes=2).validate()
    with pytest.raises(UserError, match="crop size"):
        make().transform(4, "lung")


@pytest.mark.parametrize(
    "name,kw",
    [
        ("simclr", {"chunk": 4}),
        ("moco", {"queue_size": 32, "chunk": 4}),
        ("swav", {"prototypes": 20, "n_local": 2, "queue_size": 16, "queue_start_epoch": 0}),
        ("byol", {}),
    ],
)
def test_through_the_trainer(cache, tmp_path, name, kw):
    """A few steps of each method (chunked where it applies) through the one trainer, resnet18 at 32 px."""
    from sparkct.train.config import TrainConfig
    from sparkct.train.trainer import Trainer, build_method

    cfg = TrainConfig(
        data=cache,
        out=str(tmp_path / name),
        arch="resnet18",
        windows="lung",
        crop=32,
        batch=6,
        max_steps=3,
        ckpt_every=3,
        log_every=1,
        preview_every=0,
        tensorboard=False,
        progress=False,
        device="cpu",
        channels_last=False,
    )
    m = build_method(name, cfg, get_method(name).config_class(**kw))
    res = Trainer(m, cfg, method_name=name, log=lambda *a: None).fit()
    assert res["steps"] == 3 and np.isfinite(res["final"]["loss"]) and res["final"]["collapse"] > 0.05
