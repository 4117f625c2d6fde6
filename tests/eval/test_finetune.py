"""sparkct.eval.finetune: the Classifier method's schedule, and fine-tuning through the trainer."""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkct.errors import UserError
from sparkct.eval.data import load_task
from sparkct.eval.finetune import Classifier, FinetuneConfig, evaluate, finetune, resolve_init
from sparkct.models.backbone import backbone_state, build_backbone
from sparkct.train import checkpoint as C
from sparkct.train.config import TrainConfig


class _Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)


class _TinyBackbone(torch.nn.Module):
    """A stand-in with a ResNet's shape where it matters (feature_dim reads layer4[-1].bn2): the
    method's schedule does not depend on the network, and a ResNet-18 in float64 is slow here."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.layer4 = torch.nn.Sequential(_Block(c))

    def forward(self, x):
        b = self.layer4[0]
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(b.bn2(b.conv2(h))).mean((2, 3))


def _model(cfg=None, spe=4, k=2):
    torch.manual_seed(0)
    bb = _TinyBackbone()
    return Classifier(
        bb,
        k,
        cfg or FinetuneConfig(freeze_epochs=2, ramp_epochs=1, backbone_lr_start=0.1),
        windows="lung",
        steps_per_epoch=spe,
        crop=32,
    )


def test_freeze_and_ramp_schedule():
    m = _model()
    scales = [m.backbone_lr_scale(s) for s in range(14)]
    assert scales[:8] == [0.0] * 8  # 2 epochs x 4 steps frozen
    assert scales[8:13] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0]) and scales[13] == 1.0
    m.config = FinetuneConfig(linear_probe=True)
    assert all(m.frozen(s) for s in (0, 100, 10_000))
    m.config = FinetuneConfig(freeze_epochs=0, ramp_epochs=0)
    assert m.backbone_lr_scale(0) == 1.0
    with pytest.raises(UserError, match="backbone-lr-start"):
        FinetuneConfig(backbone_lr_start=0).validate()


def test_training_step_frozen_then_unfrozen():
    m = _model()
    m.train()
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    loss, logs = m.training_step((x, y), 0)
    assert not m.backbone.training and m.head.training  # frozen: BatchNorm statistics stay
    loss.backward()
    m.on_before_optimizer_step(0)
    assert all(p.grad is None for p in m.backbone.parameters()) and m.head.weight.grad is not None
    assert logs["backbone_lr_scale"] == 0.0 and 0 <= float(logs["acc"]) <= 1
    m.zero_grad(set_to_none=True)
    loss, logs = m.training_step((x, y), 8)
    assert m.backbone.training
    loss.backward()
    m.on_before_optimizer_step(8)
    assert all(p.grad is not None for p in m.backbone.parameters())


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_ramp_equals_a_scaled_backbone_learning_rate(opt):
    # The step's change scaled by s after the step == that optimizer with lr x s for the backbone.
    from sparkct.train.optim import build_optimizer

    # float64: Adam divides by sqrt(v); with near-zero gradients float32 rounding alone would differ
    a = _model(FinetuneConfig(freeze_epochs=0, ramp_epochs=4, backbone_lr_start=0.1), spe=1).double()
    b = copy.deepcopy(a)
    lr = 1e-2
    oa = build_optimizer(a, opt, lr, 5e-4, betas=(0.9, 0.999))
    ob = torch.optim.Adam if opt == "adam" else torch.optim.AdamW if opt == "adamw" else torch.optim.SGD
    kw = {"momentum": 0.9} if opt == "sgd" else {"betas": (0.9, 0.999)}
    groups = []
    for mod, is_bb in ((b.backbone, True), (b.head, False)):
        for p_decay in (True, False):
            ps = [p for n, p in mod.named_parameters() if (p.ndim > 1 and not n.endswith(".bias")) == p_decay]
            if ps:
                groups.append({"params": ps, "weight_decay": 5e-4 if p_decay else 0.0, "bb": is_bb})
    ob = ob(groups, lr=lr, **kw)
    a.train(), b.train()
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.rand(4, 1, 16, 16, generator=g, dtype=torch.float64)
        y = torch.tensor([0, 1, 1, 0])
        for m, o in ((a, oa), (b, ob)):
            loss, _ = m.training_step((x, y), step)
            loss.backward()
            if m is a:
                m.on_before_optimizer_step(step)
            else:
                for grp in o.param_groups:
                    grp["lr"] = lr * (b.backbone_lr_scale(step) if grp["bb"] else 1.0)
            o.step()
            o.zero_grad(set_to_none=True)
            if m is a:
                m.after_step(step, 2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-10, msg=n)
    assert not torch.equal(a.backbone.conv1.weight, _model(spe=1).double().backbone.conv1.weight)


def _cfg(tmp_path, name, **kw):
    base = dict(
        out=str(tmp_path / name),
        arch="resnet18",
        crop=32,
        epochs=3,
        batch=8,
        device="cpu",
        progress=False,
        tensorboard=False,
        preview_every=0,
        ckpt_every=1000,
        log_every=1,
        amp="none",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_finetune_end_to_end_on_a_cache(eval_cache, tmp_path, monkeypatch):
    from sparkct.train import trainer as T
    from sparkct.train.visual import curves_figure, epoch_rows

    plotted: dict = {}
    real = T.plot_curves
    monkeypatch.setattr(T, "plot_curves", lambda *a, **kw: plotted.update(kw) or real(*a, **kw))
    task = load_task(eval_cache["cache"], eval_cache["patient_labels"], split=(0.5, 0.25, 0.25), fraction=1.0)
    cfg = _cfg(tmp_path, "ft", epochs=3, batch=16)
    res = finetune(task, train_cfg=cfg, config=FinetuneConfig(freeze_epochs=1, ramp_epochs=1), n_resamples=200)
    out = cfg.out
    for f in ("result.json", "predictions.npz", "tested.pt", "config.json", "metrics.csv", "loss.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    # only the tested weights are kept: no checkpoints, no last-step export
    for f in ("best.ckpt", "last.ckpt", "backbone.pt", "checkpoints"):
        assert not os.path.exists(os.path.join(out, f)), f
    spe = res["steps_per_epoch"]
    assert plotted["marks"] == [(spe, "backbone unfrozen"), (2 * spe, "backbone at full lr")]
    # loss.png's validation panel marks the checkpoint that was tested
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    fig = curves_figure(rows, epoch_rows(os.path.join(out, "metrics.jsonl")), ("loss",), marks=plotted["marks"])
    star = next(ln for ln in fig.axes[1].lines if ln.get_marker() == "*")
    assert list(star.get_xdata()) == [res["tested_checkpoint"]["step"]]
    # tested.pt is the model that was tested: it gives the saved test predictions
    model = Classifier(
        build_backbone("resnet18", in_chans=len(task.windows))[0], 2, windows=task.windows, steps_per_epoch=1, crop=32
    )
    model.load_state_dict(torch.load(os.path.join(out, "tested.pt"), weights_only=True))
    again = evaluate(model, task.test, level=task.level, n_resamples=10)
    z0 = np.load(os.path.join(out, "predictions.npz"))
    np.testing.assert_allclose(again["probabilities"], z0["probabilities"], rtol=1e-5, atol=1e-6)
    saved = json.load(open(os.path.join(out, "result.json")))
    assert saved["test"]["unit"] == "patient" and saved["test"]["n_units"] == 4  # patient labels: per patient
    auc = saved["test"]["metrics"]["auc"]
    assert 0 <= auc["low"] <= auc["value"] <= auc["high"] <= 1
    assert [h["epoch"] for h in saved["val_history"]] == [1, 2, 3]  # --eval-every 0: at epoch ends
    assert [h["step"] for h in saved["val_history"]] == [spe, 2 * spe, 3 * spe]
    assert all("val_auc" in h and "monitor" in h for h in saved["val_history"])
    best = max(h["monitor"] for h in saved["val_history"])
    assert saved["tested_checkpoint"]["best_val_auc"] == pytest.approx(best)
    z = np.load(os.path.join(out, "predictions.npz"))
    assert z["probabilities"].shape == (4, 2) and np.allclose(z["probabilities"].sum(1), 1)
    assert res["init"]["kind"] == "random" and saved["effective_batch"] == 16
    # a finished run folder is refused unless resumed
    with pytest.raises(UserError, match="holds a finished fine-tuning run"):
        finetune(task, train_cfg=_cfg(tmp_path, "ft", epochs=3, batch=16), config=FinetuneConfig(freeze_epochs=1))


def _every_3_steps(data, out, **kw):
    """A fine-tuning run validated every 3 steps over epochs of 8 steps (32 images, batch 4), 16 steps; the
    head alone learns (at lr 1e-2 its validation AUC peaks mid-run, not at the first validation)."""
    cfg = _cfg(Path(out).parent, Path(out).name, epochs=2, batch=4, lr=1e-2)
    fcfg = FinetuneConfig(freeze_epochs=2, eval_every=3, keep_checkpoints=True)
    return finetune(load_task(data), train_cfg=cfg, config=fcfg, n_resamples=20, **kw)


def _jsonl(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k != "images_per_s"} for ln in f]


def test_eval_every_validates_every_n_steps_mid_epoch_and_resumes_exactly(tmp_path, write_npz, monkeypatch):
    data = write_npz(tmp_path / "s.npz", n=(32, 12, 12), k=3, size=20)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    a = _every_3_steps(data, ref)
    assert a["steps_per_epoch"] == 8
    hist = a["val_history"]
    # every 3 steps, mid-epoch too, and the last; the end of epoch 1 (step 8) does not validate, the
    # last step (the end of epoch 2) once
    assert [h["step"] for h in hist] == [3, 6, 9, 12, 15, 16]
    assert [h["epoch"] for h in hist] == [1, 1, 2, 2, 2, 2]  # the epoch each step lies in
    best = max(hist, key=lambda h: h["monitor"])  # the first of equal maxima: a later one is no improvement
    assert a["tested_checkpoint"]["step"] == C.load_checkpoint(os.path.join(ref, "best.ckpt"))["step"] == best["step"]
    assert a["tested_checkpoint"]["best_val_auc"] == pytest.approx(best["monitor"])

    # killed between two validations (no checkpoint at the kill): resumed from the latest
    # validation's checkpoint, mid-epoch, it ends as the uninterrupted run did
    after_step = Classifier.after_step

    def dying(self, step, total):
        after_step(self, step, total)
        if step == 10:  # the 11th step, between the validations of steps 9 and 12
            raise KeyboardInterrupt

    monkeypatch.setattr(Classifier, "after_step", dying)
    with pytest.raises(KeyboardInterrupt):
        _every_3_steps(data, run)
    monkeypatch.setattr(Classifier, "after_step", after_step)
    assert C.load_checkpoint(run)["step"] in (3, 6, 9)  # a validation's new best, in the middle of an epoch
    b = _every_3_steps(data, run, resume=True)
    assert b["val_history"] == hist and b["test"]["metrics"] == a["test"]["metrics"]
    assert b["tested_checkpoint"]["step"] == a["tested_checkpoint"]["step"]
    assert _jsonl(run) == _jsonl(ref)
    za, zb = (np.load(os.path.join(d, "predictions.npz")) for d in (ref, run))
    assert np.array_equal(za["probabilities"], zb["probabilities"])


def test_linear_probe_from_a_file_keeps_the_backbone(tmp_path, write_npz):
    task = load_task(write_npz(tmp_path / "s.npz", n=(24, 12, 12), k=3, size=20), fraction=0.5, seed=1)
    torch.manual_seed(5)
    bb, _ = build_backbone("resnet18", in_chans=1)
    w = str(tmp_path / "init.pt")
    torch.save(backbone_state(bb), w)
    cfg = _cfg(tmp_path, "probe", epochs=2, batch=64)  # batch lowered to the 12 training images
    fcfg = FinetuneConfig(linear_probe=True, keep_checkpoints=True)
    res = finetune(task, init=w, train_cfg=cfg, config=fcfg, n_resamples=100)
    for f in ("best.ckpt", "last.ckpt", "backbone.pt"):  # --keep-checkpoints
        assert os.path.isfile(os.path.join(cfg.out, f)), f
    assert "tested_weights" not in res
    assert res["effective_batch"] == 12 and res["init"]["kind"] == "file" and res["test"]["unit"] == "item"
    assert res["task"]["train"]["per_class"] == [4, 4, 4]
    after = torch.load(os.path.join(cfg.out, "backbone.pt"), weights_only=True)
    for k, v in backbone_state(bb).items():
        assert torch.equal(after[k], v), k  # frozen throughout, BatchNorm statistics included


def test_resolve_init(tmp_path):
    assert resolve_init("random", "resnet50") == (None, "resnet50", "random")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match="without backbone.pt"):
        resolve_init(str(run), "resnet18")
    (run / "backbone.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"train": {"arch": "resnet34"}}))
    assert resolve_init(str(run), "resnet18") == (str(run / "backbone.pt"), "resnet34", "run")
    with pytest.raises(UserError, match="not 'random'"):
        resolve_init(str(tmp_path / "nope.pt"), "resnet18")


def test_finetune_tests_the_newest_checkpoint_that_loads(tmp_path, write_npz, monkeypatch):
    """Without best.ckpt the run's newest loadable checkpoint is tested: a zero-byte last.ckpt (a kill
    during a copy, a full disk) is skipped with a log line, as `--resume` does."""
    from sparkct.train.trainer import Trainer

    fit = Trainer.fit

    def fit_then_break(self):
        out = fit(self)
        os.unlink(os.path.join(self.run_dir, "best.ckpt"))
        last = os.path.join(self.run_dir, "last.ckpt")
        os.unlink(last)  # a hard link to the newest step checkpoint, which stays intact
        open(last, "wb").close()
        return out

    monkeypatch.setattr(Trainer, "fit", fit_then_break)
    task = load_task(write_npz(tmp_path / "s.npz", n=(24, 12, 12), k=3, size=20))
    lines: list[str] = []
    cfg = _cfg(tmp_path, "ft", epochs=1, batch=8)
    res = finetune(task, train_cfg=cfg, config=FinetuneConfig(freeze_epochs=0), n_resamples=20, log=lines.append)
    assert res["tested_checkpoint"]["path"] == os.path.join(cfg.out, "checkpoints", "step-0000003.ckpt")
    assert any("skipped" in ln and "last.ckpt" in ln for ln in lines), lines


def test_the_closing_line_names_only_what_the_run_keeps(tmp_path, write_npz):
    """backbone.pt only with --keep-checkpoints: otherwise it would be named, then removed after testing."""
    task = load_task(write_npz(tmp_path / "s.npz", n=(24, 12, 12), k=3, size=20))
    for keep, made in ((False, "(loss.png)"), (True, "(loss.png, backbone.pt)")):
        lines: list[str] = []
        cfg = _cfg(tmp_path, f"ft-{keep}", epochs=1, batch=8)
        finetune(task, train_cfg=cfg, config=FinetuneConfig(keep_checkpoints=keep), n_resamples=20, log=lines.append)
        done = next(ln for ln in lines if ln.startswith("done:"))
        assert done.endswith(made), done  # fine-tuning writes no previews/
        assert os.path.exists(os.path.join(cfg.out, "backbone.pt")) == keep
        assert not os.path.exists(os.path.join(cfg.out, "previews"))
        assert lines[-1].endswith(os.path.join(cfg.out, "result.json")) and os.path.isfile(lines[-1].split("; ")[-1])
        summary = json.load(open(os.path.join(cfg.out, "summary.json")))
        assert summary["backbone"] == (os.path.join(cfg.out, "backbone.pt") if keep else None)


def test_evaluation_uses_the_trainers_public_api():
    import ast

    import sparkct.eval

    for path in Path(sparkct.eval.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparkct.train"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_init_weights_that_do_not_fit_are_refused_before_training(tmp_path, write_npz):
    # a size-mismatch traceback (another arch, one wrong tensor) or an IndexError (a zero-byte file) before
    task = load_task(write_npz(tmp_path / "s.npz", n=(12, 6, 6), k=2, size=20), fraction=1.0, seed=1)
    sd = backbone_state(build_backbone("resnet18", in_chans=1)[0])
    files = {
        "arch.pt": backbone_state(build_backbone("resnet34", in_chans=1)[0]),
        "shape.pt": dict(sd, **{"bn1.weight": torch.ones(32)}),
    }
    for name, state in files.items():
        torch.save(state, tmp_path / name)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, msg in [
        ("arch.pt", r"arch\.pt: not weights of this resnet18 backbone: unexpected 96 \(layer1\.2\.conv1\.weight"),
        ("shape.pt", r"shape mismatch 1 \(bn1\.weight \(32,\) vs \(64,\)\)"),
        ("empty.pt", r"empty\.pt: not a loadable weights file"),
    ]:
        cfg = _cfg(tmp_path, "ft", epochs=1)
        with pytest.raises(UserError, match=msg):
            finetune(task, init=str(tmp_path / name), train_cfg=cfg, n_resamples=10)
        assert not os.path.exists(cfg.out)
