"""Supervised pretraining (``sparkct pretrain supervised --labels``): it learns a separable set, its head
follows the labels file, only labelled slices are trained on, it refuses to start without labels (on
--data) and resumes to what an uninterrupted run gives; ``sparkct experiment`` refuses it."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

from sparkct.cli import main
from sparkct.errors import UserError
from sparkct.eval.config import ExperimentConfig
from sparkct.models.backbone import build_backbone
from sparkct.models.supervised import Supervised
from sparkct.train import checkpoint as C
from sparkct.train.trainer import Trainer, build_method

from test_trainer import cfg_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _series(small_synth):
    with open(os.path.join(small_synth, "labels.csv"), newline="") as f:
        return [r["series_uid"] for r in csv.DictReader(f)]


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _fit(cache, out, labels, **kw):
    cfg = cfg_for(cache, out, labels=labels, knn_every=0, **{"max_steps": 2, "preview_every": 0, **kw})
    trainer = Trainer(build_method("supervised", cfg), cfg, method_name="supervised")
    return trainer, trainer.fit()


def test_loss_falls_on_a_separable_set():
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", in_chans=1)
    m = Supervised(backbone)
    m.set_classes(["dark", "bright"])
    y = torch.arange(16) % 2
    x = 0.2 + 0.6 * y.view(-1, 1, 1, 1).float() + 0.05 * torch.randn(16, 1, 32, 32)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(15):
        loss, logs = m.training_step((x, y), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert m.loss_reference(16) == pytest.approx(math.log(2))
    assert losses[-1] < 0.3 * losses[0] and losses[-1] < 0.2, losses
    assert float(logs["acc"]) == 1.0


def test_the_head_follows_the_labels_file_and_only_labelled_slices_train(small_synth, small_cache, tmp_path):
    series = _series(small_synth)
    labels = _write(tmp_path / "three.csv", ["series_uid", "label"], zip(series, ["b", "c", "a"]))
    trainer, summary = _fit(small_cache, tmp_path / "run", labels)
    m = trainer.method
    assert m.classes == ["a", "b", "c"] and m.head.out_features == 3
    assert m.loss_reference(8) == pytest.approx(math.log(3))
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 2 and all(0 <= float(r["acc"]) <= 1 for r in rows)
    assert (tmp_path / "run" / "backbone.pt").exists()
    assert C.load_checkpoint(str(tmp_path / "run"))["model"]["head.weight"].shape[0] == 3

    # slice rows over two series: the slices of the third (no row) are left out of training
    with open(os.path.join(small_synth, "slice_labels.csv"), newline="") as f:
        keep = [r for r in csv.DictReader(f) if r["series_uid"] in series[:2]]
    labels = _write(
        tmp_path / "slices.csv",
        ["series_uid", "instance_number", "label"],
        [(r["series_uid"], r["instance_number"], i % 2) for i, r in enumerate(keep)],
    )
    trainer, _ = _fit(small_cache, tmp_path / "slices", labels)
    assert len(trainer.dataset) == len(keep) and (trainer.dataset.targets >= 0).all()


def test_patient_rows_label_every_series_of_the_patient(small_cache, tmp_path):
    from sparkct.data.cache import SliceCache

    patients = [str(p) for p in SliceCache(small_cache).patients]
    labels = _write(tmp_path / "patients.csv", ["patient", "label"], zip(patients, ["no", "yes", "no"]))
    trainer, _ = _fit(small_cache, tmp_path / "run", labels, max_steps=1)
    assert trainer.method.classes == ["no", "yes"] and len(trainer.dataset) == len(SliceCache(small_cache))


def test_builtin_data_uses_its_slice_labels(tmp_path, capsys):
    out = tmp_path / "run"
    # 8 patients: the fewest whose 6-slice series hold a nodule slice (two classes)
    argv = ["--out", str(out), "--device", "cpu", "--synth-patients", "8", "--synth-size", "64", "--synth-slices", "6"]
    argv += ["--crop", "32", "--batch", "4", "--max-steps", "1", "--knn-every", "0", "--windows", "lung"]
    assert main(["pretrain", "supervised", *argv, "--tensorboard", "false", "--progress", "false"]) == 0
    assert "training on its slice labels" in capsys.readouterr().err
    assert (out / "backbone.pt").exists()


def test_without_labels_on_data_is_one_line_before_anything_is_written(small_cache, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "supervised", "--data", small_cache, "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "supervised pretraining needs --labels" in err, err
    assert not out.exists()


def test_help_lists_its_options_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "supervised", "-h"])
    out = capsys.readouterr().out
    assert "--augment" in out and "--labels" in out and "optimizer=sgd" in out and "base_lr=0.1" in out


def test_resume_equals_an_uninterrupted_run(small_synth, small_cache, tmp_path):
    labels = _write(tmp_path / "l.csv", ["series_uid", "label"], zip(_series(small_synth), [0, 1, 0]))
    kw = dict(max_steps=6, epochs=3, ckpt_every=3, keep=5)
    straight, _ = _fit(small_cache, tmp_path / "straight", labels, **kw)
    mid = str(tmp_path / "straight" / "checkpoints" / "step-0000003.ckpt")
    cfg = cfg_for(small_cache, tmp_path / "resumed", labels=labels, knn_every=0, preview_every=0, **kw)
    resumed = Trainer(build_method("supervised", cfg), cfg, method_name="supervised", resume=mid)
    resumed.fit()

    def losses(run):
        return [r["loss"] for r in csv.DictReader(open(run / "metrics.csv")) if int(r["step"]) > 3]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 3
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_experiment_refuses_supervised_on_the_tasks_own_patients():
    with pytest.raises(UserError, match="needs its own labelled set.*--init-weights"):
        ExperimentConfig(methods="random,supervised").lists()
