"""sparkct.eval.robustness: the perturbed test slices are fixed (the same for every call, model and batch
size), a perturbation at its identity level is the clean evaluation, each perturbation does what it
names; finetune tests the tested model under each and keeps the probabilities."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sparkct.eval.config import PERTURBED_KEY, FinetuneConfig
from sparkct.eval.data import load_task
from sparkct.eval.finetune import Classifier, eval_transform, evaluate, finetune, predict
from sparkct.eval.robustness import KINDS, PERTURBATIONS, Perturbation, evaluate_robustness
from sparkct.train.config import TrainConfig


@pytest.fixture(scope="module")
def task(eval_cache):
    return load_task(eval_cache["cache"], eval_cache["patient_labels"], split=(0.5, 0.25, 0.25), windows="lung")


class _Tiny(torch.nn.Module):
    """A stand-in backbone with a ResNet's shape where Classifier reads it (layer4[-1].bn2): a ResNet-18
    evaluated under every perturbation is slow here, and the network does not matter."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, c, 3, padding=1)
        self.layer4 = torch.nn.Sequential(torch.nn.Module())
        self.layer4[0].bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.layer4[0].bn2(self.conv1(x))).mean((2, 3))


def _model(task, seed=0):
    torch.manual_seed(seed)
    return Classifier(_Tiny(), 2, windows=task.windows, steps_per_epoch=1, crop=32)


def _slices(n=6, size=32):
    """HU slices (n, 1, size, size): air around a 40 HU body holding a -850 HU lung and a bright spot."""
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.45 * size)) ** 2 <= 1
    lung = ((yy - size / 2) / (0.25 * size)) ** 2 + ((xx - 0.4 * size) / (0.15 * size)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0)
    hu[lung] = -850.0
    rng = np.random.default_rng(0)
    out = np.stack([hu + rng.normal(0, 10, hu.shape) for _ in range(n)])
    return torch.from_numpy(out.astype(np.int16))[:, None]


def test_perturbed_slices_depend_only_on_the_slice_and_the_perturbation():
    hu, ids = _slices(), np.arange(100, 106)
    tf = eval_transform(32, "lung,mediastinum")
    clean = tf(hu)
    for p in PERTURBATIONS:
        whole = p(hu, ids, tf)
        assert whole.shape == clean.shape and not torch.equal(whole, clean), p.name  # it perturbs
        assert torch.equal(whole, p(hu, ids, tf)), p.name  # again: the same
        halves = torch.cat([p(hu[:2], ids[:2], tf), p(hu[2:], ids[2:], tf)])
        assert torch.equal(whole, halves), p.name  # whatever the batching
    # the noise follows the slice's index, not its place in the batch
    noise = Perturbation("noise", 40.0)
    a = noise(hu[:2], ids[:2], tf)
    b = noise(hu[:2].flip(0), ids[:2][::-1].copy(), tf).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(noise(hu[:1], ids[:1], tf), noise(hu[:1], ids[1:2], tf))


def test_a_perturbation_at_its_identity_level_is_the_clean_transform():
    hu, ids = _slices(3), np.arange(3)
    tf = eval_transform(32, "lung")
    for kind, k in KINDS.items():
        assert torch.equal(Perturbation(kind, k.identity)(hu, ids, tf), tf(hu)), kind


def test_each_perturbation_does_what_it_names():
    hu, ids = _slices(2, size=32), np.arange(2)
    wide = eval_transform(32, [(0.0, 4000.0)])  # HU -2000..2000 onto 0..1, unclipped for these slices
    clean = wide(hu)
    # HU shift and scale: the windowed value of HU + d, and of HU x s
    shifted = Perturbation("hu_shift", 100.0)(hu, ids, wide)
    torch.testing.assert_close(shifted, clean + 100 / 4000, atol=1e-5, rtol=0)
    scaled = Perturbation("hu_scale", 1.1)(hu, ids, wide)
    torch.testing.assert_close(scaled, (clean * 4000 - 2000) * 1.1 / 4000 + 0.5, atol=1e-5, rtol=0)
    # noise: sigma HU per pixel of the input, the same field at every sigma
    n20 = (Perturbation("noise", 20.0)(hu, ids, wide) - clean) * 4000
    n40 = (Perturbation("noise", 40.0)(hu, ids, wide) - clean) * 4000
    assert 16 < float(n20.std()) < 24
    torch.testing.assert_close(n40, 2 * n20, atol=0.05, rtol=0)
    # rotation by 90 degrees of a square slice: the clean slice turned a quarter
    turned = Perturbation("rotate", 90.0)(hu, ids, wide)
    assert min(float((turned - clean.rot90(k, (-2, -1))).abs().max()) for k in (1, -1)) < 1e-4
    # scaling by 0.5: the body covers a quarter of the pixels it covered
    body = (clean > (-500 + 2000) / 4000).float().mean()
    small = (Perturbation("zoom", 0.5)(hu, ids, wide) > (-500 + 2000) / 4000).float().mean()
    assert float(small / body) == pytest.approx(0.25, abs=0.04)
    with pytest.raises(ValueError, match="unknown perturbation"):
        Perturbation("blur", 1.0)


def test_evaluating_a_model_under_perturbations(task):
    m, other = _model(task), _model(task, seed=1)
    clean = evaluate(m, task.test, level=task.level, n_resamples=50)
    same = evaluate(m, task.test, level=task.level, n_resamples=50, perturbation=Perturbation("zoom", 1.0))
    np.testing.assert_array_equal(same["probabilities"], clean["probabilities"])
    assert same["metrics"] == clean["metrics"]
    res = evaluate_robustness(m, task.test, level=task.level, n_resamples=50, batch=3)
    assert list(res) == [p.name for p in PERTURBATIONS]
    for p in PERTURBATIONS:
        r = res[p.name]
        np.testing.assert_array_equal(r["labels"], clean["labels"])
        assert 0 <= r["metrics"]["auc"]["low"] <= r["metrics"]["auc"]["value"] <= r["metrics"]["auc"]["high"] <= 1
    for p in (Perturbation("noise", 20.0), Perturbation("rotate", 10.0)):
        # another batch size, the same perturbed slices: the same probabilities
        again, _ = predict(m, task.test, batch=5, perturbation=p)
        raw, _ = predict(m, task.test, batch=3, perturbation=p)
        np.testing.assert_allclose(again, raw, rtol=1e-5, atol=1e-6)
    # two models see the same perturbed slices: what reaches a model is fixed by the slice alone
    seen = []
    for model in (m, other):
        model.forward_logits = lambda x, model=model, seen=seen: (seen.append(x.clone()), torch.zeros(len(x), 2))[1]
        predict(model, task.test, batch=4, perturbation=Perturbation("noise", 20.0))
    half = len(seen) // 2
    assert all(torch.equal(a, b) for a, b in zip(seen[:half], seen[half:]))


def _cfg(out):
    return TrainConfig(
        out=out, crop=32, epochs=1, batch=8, device="cpu", progress=False, tensorboard=False, preview_every=0
    )


def test_finetune_keeps_the_robustness_results_and_probabilities(task, tmp_path):
    cfg = _cfg(str(tmp_path / "ft"))
    res = finetune(task, train_cfg=cfg, config=FinetuneConfig(freeze_epochs=0, ramp_epochs=0), n_resamples=50)
    saved = json.load(open(os.path.join(cfg.out, "result.json")))
    rob = saved["robustness"]["perturbations"]
    assert [r["name"] for r in rob] == [p.name for p in PERTURBATIONS] and saved["robustness"] == res["robustness"]
    z = np.load(os.path.join(cfg.out, "predictions.npz"))
    for r in rob:
        a = r["auc"]
        assert 0 <= a["low"] <= a["value"] <= a["high"] <= 1 and r["n_units"] == len(z["labels"])
        assert z[PERTURBED_KEY + r["name"]].shape == z["probabilities"].shape
    assert "robustness" in saved["seconds"]
    # off: neither tested nor stored
    cfg2 = _cfg(str(tmp_path / "off"))
    res = finetune(task, train_cfg=cfg2, config=FinetuneConfig(freeze_epochs=0, robustness=False), n_resamples=50)
    assert "robustness" not in res
    assert not any(k.startswith(PERTURBED_KEY) for k in np.load(os.path.join(cfg2.out, "predictions.npz")).files)
