"""Pretraining data against the labelled validation/test patients in `sparkct experiment`: --data alone
pretrains on its cache less those patients, the same cache as --pretrain-data is refused before any work
(unless --allow-overlap, which results.md then states at the top), and the built-in pools do not overlap."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from sparkct.cli import main
from sparkct.data import SliceCache
from sparkct.eval import experiment as exp_mod
from sparkct.eval.config import ExperimentConfig
from sparkct.eval.data import load_task
from sparkct.eval.experiment import run_experiment

#: a pretraining method, so that there is pretraining data to check; no probes needed
SETTINGS = dict(methods="rotation", set=["rotation.max_steps=1", "finetune.max_steps=1"], protocols="finetune")


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _val_test_slices(eval_cache) -> tuple[int, int]:
    """(slices of the cache, slices of its labelled val + test patients) under TINY_EXPERIMENT's split."""
    task = load_task(eval_cache["cache"], eval_cache["patient_labels"], split=(0.34, 0.33, 0.33))
    held = {int(p) for d in (task.val, task.test) for p in np.unique(d.patients)}
    c = SliceCache(eval_cache["cache"])
    return len(c), int(np.isin(c.slice_patient, sorted(held)).sum())


def test_data_alone_pretrains_without_its_validation_and_test_patients(eval_cache, tiny_experiment, tmp_path):
    out = tmp_path / "exp"
    tiny_experiment(out, SETTINGS)
    (cfg_path,) = glob.glob(str(out / "pretrain" / "rotation-*" / "config.json"))
    with open(cfg_path) as f:
        pretrained = json.load(f)["resolved"]["slices"]
    total, held = _val_test_slices(eval_cache)
    assert 0 < held < total and pretrained == total - held
    header = _results(out)["header"]
    assert "less its labelled validation and test patients" in header["pretraining data"]
    assert header["pretraining overlap"].startswith("none with the labelled validation/test patients")
    assert "Warning" not in (out / "results.md").read_text()


def test_same_data_as_pretrain_data_is_refused_before_any_work(eval_cache, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", "--data", eval_cache["cache"], "--labels", eval_cache["patient_labels"]]
    args += ["--pretrain-data", eval_cache["cache"], "--out", str(out), "--methods", "random,rotation"]
    args += ["--fractions", "1", "--seeds", "0", "--crop", "32", "--windows", "lung", "--device", "cpu"]
    args += ["--split", "0.34,0.33,0.33", "--pretrain-epochs", "1", "--finetune-steps", "2"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sparkct experiment: error: the pretraining data overlaps"), err
    task = load_task(eval_cache["cache"], eval_cache["patient_labels"], split=(0.34, 0.33, 0.33))
    c = SliceCache(eval_cache["cache"])
    counts = []
    for d in (task.val, task.test):
        n_ser, n_pat = len(np.unique(d.series)), len(np.unique(d.patients))
        counts.append(f"{n_ser} of {n_ser} series, {n_pat} of {n_pat} patients")
    assert f"val {counts[0]}; test {counts[1]}" in err[-1], err
    assert "by Study/Series Instance UID and patient pseudonym" in err[-1] and "--allow-overlap" in err[-1]
    assert c.n_series and not (out / "pretrain").exists() and not (out / "finetune").exists()


def test_allowed_overlap_is_stated_at_the_top_of_the_report(eval_cache, tiny_experiment, tmp_path):
    out = tmp_path / "exp"
    tiny_experiment(out, SETTINGS, pretrain_data=eval_cache["cache"], allow_overlap=True)
    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "# Fine-tuning results"
    assert md[2].startswith("> **Warning:** Pretraining data overlaps the labelled validation/test patients"), md[:4]
    assert "series" in md[2] and "patients" in md[2]
    assert _results(out)["header"]["pretraining overlap"].endswith("allowed by --allow-overlap")
    (cfg_path,) = glob.glob(str(out / "pretrain" / "rotation-*" / "config.json"))
    with open(cfg_path) as f:
        assert json.load(f)["resolved"]["slices"] == _val_test_slices(eval_cache)[0]  # the whole cache


class _Stop(Exception):
    pass


def test_builtin_pretraining_pool_has_no_labelled_patient(tmp_path, monkeypatch):
    """The built-in task and pretraining pools are synthesized apart (their own seeds) under one salt:
    compared by UID and by pseudonym, they share no series and no patient."""
    seen = {}

    def spy(task, pretrain):
        seen["overlap"] = real(task, pretrain)
        raise _Stop  # the data is all this test needs: no training

    real = exp_mod.find_overlap
    monkeypatch.setattr(exp_mod, "find_overlap", spy)
    monkeypatch.setattr(exp_mod, "check_test_set", lambda task: None)  # a tiny test split is fine here
    cfg = ExperimentConfig(
        out=str(tmp_path / "exp"),
        methods="random,rotation",
        synth_patients=12,
        pretrain_patients=2,
        synth_size=64,
        synth_slices=6,
        device="cpu",
    )
    with pytest.raises(_Stop):
        run_experiment(cfg, log=lambda s: None)
    ov = seen["overlap"]
    assert ov.by_patient and set(ov.counts) == {"val", "test"}
    for c in ov.counts.values():
        assert c["n_series"] > 0 and c["n_patients"] > 0 and c["series"] == 0 and c["patients"] == 0


def test_overlap_counts_one_test_patient_by_uid_and_by_pseudonym(eval_cache):
    """Pretraining slices of one test patient: counted once in test, not in val; under another salt the
    pseudonyms are not compared, and the Series Instance UIDs still find it."""
    from sparkct.data import CTSliceDataset
    from sparkct.eval.overlap import find_overlap

    task = load_task(eval_cache["cache"], eval_cache["patient_labels"], split=(0.34, 0.33, 0.33))
    p = int(np.unique(task.test.patients)[0])
    pre = CTSliceDataset(eval_cache["cache"])
    pre = pre.subset(np.flatnonzero(pre.patients == p))
    n_ser = len(np.unique(pre.series))
    ov = find_overlap(task, pre)
    assert ov.by_patient and ov.counts["val"]["series"] == 0 and ov.counts["val"]["patients"] == 0
    assert ov.counts["test"]["series"] == n_ser and ov.counts["test"]["patients"] == 1
    pre.cache = SliceCache(eval_cache["cache"])
    pre.cache.manifest = {**pre.cache.manifest, "salt": "another"}
    ov = find_overlap(task, pre)
    assert not ov.by_patient and ov.counts["test"]["patients"] == 1 and ov.checked_by == "Study/Series Instance UID"
