"""loss.png: the curve from the first step, the reference loss of uninformative predictions, the
validation AUC with the tested checkpoint, and schedule marks (checked on the matplotlib objects)."""

from __future__ import annotations

import csv
import math

import matplotlib
import pytest
import torch
from torch import nn

from sparkct.train import trainer as T
from sparkct.train.trainer import Trainer, build_method
from sparkct.train.visual import curves_figure

matplotlib.use("Agg")


def _backbone():
    from sparkct.models.backbone import build_backbone

    return build_backbone("resnet18", in_chans=1)[0]


def test_loss_references_of_the_methods():
    from sparkct.models.base import Method
    from sparkct.models.moco import MoCo, MoCoConfig
    from sparkct.models.pretext import Flip, NextSlice, Rotation
    from sparkct.models.simclr import SimCLR
    from sparkct.models.swav import SwAV, SwAVConfig

    bb = _backbone()
    assert SimCLR(bb).loss_reference(32) == pytest.approx(math.log(63))  # 2N - 1 candidates per embedding
    assert MoCo(bb, MoCoConfig(queue_size=1024)).loss_reference(32) == pytest.approx(math.log(1025))
    assert SwAV(bb, SwAVConfig(prototypes=500)).loss_reference(32) == pytest.approx(math.log(500))
    assert Rotation(bb).loss_reference(8) == pytest.approx(math.log(4))
    assert Flip(bb).loss_reference(8) == pytest.approx(math.log(2))
    assert NextSlice(bb).loss_reference(8) == pytest.approx(math.log(2))
    assert Method(nn.Identity()).loss_reference(8) is None  # no such value (e.g. reconstruction)
    assert SimCLR(bb, SimCLR.config_class(hybrid_weight=0.5, num_classes=2)).loss_reference(32) is None


def test_simclr_loss_at_uniform_similarities_is_the_reference():
    """The reference is the loss the method computes when every similarity is equal."""
    from sparkct.models.simclr import SimCLR

    m = SimCLR(_backbone())
    z = torch.ones(16, 8)  # all embeddings alike: every similarity equal
    assert float(m.criterion(z, z.clone())) == pytest.approx(m.loss_reference(16), rel=1e-5)


def test_metrics_start_at_step_1_and_loss_png_gets_the_reference(small_cache, tmp_path, monkeypatch):
    from test_trainer import cfg_for
    from tiny_method import TinyConfig

    seen = {}
    real = T.plot_curves

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(T, "plot_curves", spy)
    cfg = cfg_for(small_cache, tmp_path / "run", epochs=1, log_every=2, ckpt_every=100, preview_every=0)
    m = build_method("tiny", cfg, TinyConfig())
    m.loss_reference = lambda batch: 0.25 * batch  # type: ignore[method-assign]
    m.plot_marks = lambda: [(2, "event")]  # type: ignore[method-assign]
    s = Trainer(m, cfg, method_name="tiny").fit()
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    assert steps == [1, 2, 3] == [1, 2, s["steps"]]  # the first step, every --log-every, the last
    assert seen["reference"] == 2.0 and seen["marks"] == [(2, "event")]
    assert (tmp_path / "run" / "loss.png").is_file()


def _rows(n=6):
    return [{"step": str(s), "epoch": "1", "loss": str(2.0 - 0.1 * s)} for s in range(1, n + 1)]


def test_curves_figure_reference_line_and_marks():
    import matplotlib.pyplot as plt

    fig = curves_figure(_rows(), [], ("loss",), reference=math.log(63), marks=[(3, "backbone unfrozen")])
    (ax,) = fig.axes
    xs = list(ax.lines[0].get_xdata())
    assert xs[0] == 1  # from the first step
    assert any(list(ln.get_ydata()) == [math.log(63)] * 2 for ln in ax.lines)
    assert any(list(ln.get_xdata()) == [3, 3] for ln in ax.lines)
    assert any("backbone unfrozen" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)


def test_curves_figure_validation_auc_and_tested_checkpoint():
    import matplotlib.pyplot as plt

    ep = [
        {"step": 2, "epoch": 1, "epoch/val_auc": 0.6, "epoch/monitor": 0.6},
        {"step": 4, "epoch": 2, "epoch/val_auc": 0.8, "epoch/monitor": 0.8},
        {"step": 6, "epoch": 3, "epoch/val_auc": 0.8, "epoch/monitor": 0.8},  # a tie keeps the earlier best
    ]
    fig = curves_figure(_rows(), ep, ("loss",))
    assert len(fig.axes) == 2
    ax = fig.axes[1]
    assert list(ax.lines[0].get_xdata()) == [2, 4, 6] and list(ax.lines[0].get_ydata()) == [0.6, 0.8, 0.8]
    star = next(ln for ln in ax.lines if ln.get_marker() == "*")
    assert list(star.get_xdata()) == [4] and list(star.get_ydata()) == [0.8]
    assert any("tested checkpoint" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)
