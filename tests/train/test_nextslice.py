"""Next-slice prediction: the loss falls on synthetic CT, the trainer runs and resumes it exactly, a
pair's two slices share one augmentation, data without neighbouring slices is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkct.data import CTSliceDataset, SliceLoader
from sparkct.errors import UserError
from sparkct.models import METHODS, get_method
from sparkct.models.backbone import build_backbone
from sparkct.models.pretext import NextSliceConfig
from sparkct.train.trainer import Trainer, build_method

from test_trainer import cfg_for


def test_registered_and_selectable_in_the_experiment():
    from sparkct.eval.config import ExperimentConfig

    assert get_method("nextslice").name == "nextslice" and "nextslice" in METHODS
    assert ExperimentConfig(methods="random,nextslice").lists()[0] == ["random", "nextslice"]
    with pytest.raises(UserError, match="--gap"):
        NextSliceConfig(gap=1).validate()
    with pytest.raises(UserError, match="--p-other"):
        NextSliceConfig(p_other=1.5).validate()


def test_pair_transform_gives_both_slices_one_crop():
    torch.manual_seed(0)
    bb, _ = build_backbone("resnet18", in_chans=1)
    m = get_method("nextslice")(bb, NextSliceConfig())
    hu = (torch.rand(4, 1, 64, 64) * 2000 - 1000).to(torch.int16)
    xa, xb = m.transform(32, "lung")(torch.cat([hu, hu], 1), generator=torch.Generator().manual_seed(0))
    assert xa.shape == (4, 1, 32, 32) and torch.equal(xa, xb)  # same slice twice -> the same crop
    assert not torch.equal(xa[0], xa[1])


@pytest.fixture(scope="module")
def long_series(tmp_path_factory) -> str:
    """3 patients, one whole-chest series each at 5 mm (~60 slices): series as long as real ones are in
    slices, so same-series non-neighbours exist (the trainer fixture's 8-slice series are too short to
    learn from in a few steps)."""
    from sparkct.data import prepare
    from sparkct.data.synthetic import synth

    src = str(tmp_path_factory.mktemp("ns-synth"))
    synth(src, patients=3, seed=1, size=48, thickness=5.0, series_per_patient=(1, 1), localizer=False)
    dst = str(tmp_path_factory.mktemp("ns-cache"))
    prepare(src, dst, progress=False)
    return dst


def test_loss_falls_on_synthetic_ct(long_series):
    torch.manual_seed(0)
    ds = CTSliceDataset(long_series)
    bb, _ = build_backbone("resnet18", in_chans=1)
    m = get_method("nextslice")(bb, NextSliceConfig(hidden=64))
    tf = m.transform(32, "lung")
    held = list(SliceLoader(ds, 16, transform=tf, seed=99, pairs=m.pairs(ds)))[:4]  # fixed pairs to score on

    def held_loss():
        with torch.no_grad():
            return float(np.mean([float(m.training_step(b, 0)[0]) for b in held]))

    before = held_loss()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loader = SliceLoader(ds, 16, transform=tf, seed=0, pairs=m.pairs(ds))
    step = 0
    while step < 16:
        loader.set_epoch(step)
        for batch in loader:
            loss, logs = m.training_step(batch, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 16:
                break
    after = held_loss()
    assert after < 0.6 * before, (before, after)


def test_trainer_runs_and_resumes_it_exactly(small_cache, tmp_path):
    def run(resume=False):
        cfg = cfg_for(small_cache, tmp_path, max_steps=4, lr=1e-3, ckpt_every=2, preview_every=2)
        m = build_method("nextslice", cfg, NextSliceConfig(hidden=32))
        return Trainer(m, cfg, method_name="nextslice", resume=resume).fit(), m

    s, straight = run()
    assert s["steps"] == 4 and (tmp_path / "previews" / "latest.png").is_file()
    assert (tmp_path / "backbone.pt").is_file()
    # continue from the step-2 checkpoint: steps 3 and 4 must see the same pairs and give the same model
    s, resumed = run(resume=str(tmp_path / "checkpoints" / "step-0000002.ckpt"))
    assert s["steps"] == 4
    for (k, u), v in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(u, v), k


def test_data_without_neighbouring_slices_is_refused_before_training(small_cache, tmp_path):
    ds = CTSliceDataset(small_cache)
    firsts = ds.cache.series["offset"].astype(np.int64)
    cfg = cfg_for(small_cache, tmp_path / "run", max_steps=2, batch=2, ckpt_every=2, preview_every=2)
    m = build_method("nextslice", cfg, NextSliceConfig())
    with pytest.raises(UserError, match="neighbouring slices"):
        Trainer(m, cfg, method_name="nextslice", dataset=CTSliceDataset(small_cache, indices=firsts)).fit()
    assert not (tmp_path / "run" / "last.ckpt").exists()
