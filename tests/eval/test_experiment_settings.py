"""`sparkct experiment`'s bookkeeping: runs are selected by the hash of their full settings (runs made
with other settings are listed as stale, never averaged with current ones; a re-run still skips finished
runs), and results.md states the pretraining data, the built-in overrides, the fine-tuning lr of every arm,
the protocol actually run and the labelled patients and slices each fraction got."""

from __future__ import annotations

import json
import os

from sparkct.eval.config import ExperimentConfig
from sparkct.eval.experiment import _lr_line, _overrides_line, _finetune_configs, run_experiment

TINY = dict(
    methods="random",
    fractions="1,0.5",
    seeds="0",
    crop=32,
    windows="lung",
    pretrain_epochs=1,
    pretrain_batch=8,
    finetune_epochs=1,
    finetune_batch=8,
    freeze_epochs=0.5,
    ramp_epochs=0.5,
    split="0.34,0.33,0.33",
    resamples=20,
    device="cpu",
    amp="none",
)


def _run(cache, out, **kw):
    lines: list[str] = []
    kw = {"labels": cache["patient_labels"], **TINY, **kw}
    cfg = ExperimentConfig(out=str(out), data=cache["cache"], **kw)
    run_experiment(cfg, log=lines.append)
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    return lines, res, md


def test_runs_with_other_settings_are_stale_not_extra_seeds(eval_cache, tmp_path):
    out = tmp_path / "exp"
    _run(eval_cache, out)
    log, res, md = _run(eval_cache, out, finetune_epochs=2)
    # the first invocation's runs are neither counted as seeds nor averaged in
    assert [c["seeds"] for c in res["cells"]] == [[0], [0]]
    assert all(r["train"]["epochs"] == 2 for r in res["runs"])
    assert "(n=1)" in md and "(n=2)" not in md
    stale = res["stale_runs"]
    assert len(stale) == 2 and all("train.epochs 1 (now 2)" in s["stale"] for s in stale)
    assert "## Stale runs" in md and "train.epochs 1 (now 2)" in md
    assert all(os.path.isdir(s["run_dir"]) for s in stale)  # kept on disk
    # the same settings again: finished runs are skipped, the stale ones still listed
    log, res2, _ = _run(eval_cache, out, finetune_epochs=2)
    assert sum("finished earlier: skipped" in s for s in log) == 2
    assert [r["test"] for r in res2["runs"]] == [r["test"] for r in res["runs"]]
    assert len(res2["stale_runs"]) == 2


def test_other_labels_in_the_same_file_make_new_runs(eval_cache, tmp_path):
    """The data's identity, not only its path, is in the hash: new labels at the same path are new runs."""
    labels = tmp_path / "labels.csv"
    with open(eval_cache["patient_labels"]) as f:
        text = f.read()
    labels.write_text(text)
    out = tmp_path / "exp"
    _run(eval_cache, out, fractions="1", labels=str(labels))
    rows = text.strip().split("\n")
    labels.write_text("\n".join(rows[:1] + [r.replace("nodule", "x").replace("clear", "nodule").replace("x", "clear") for r in rows[1:]]) + "\n")
    log, res, md = _run(eval_cache, out, fractions="1", labels=str(labels))
    assert not any("finished earlier" in s for s in log)
    assert len(res["runs"]) == 1 and len(res["stale_runs"]) == 1 and "labels_id" in res["stale_runs"][0]["stale"]


def test_results_state_data_overrides_protocol_and_fractions(eval_cache, tmp_path):
    _, res, md = _run(eval_cache, tmp_path / "exp", methods="random,rotation")
    h = res["header"]
    # the pretraining data: its source and size
    assert h["pretraining data"].startswith(eval_cache["cache"]) and "12 patients" in h["pretraining data"]
    assert "slices" in h["pretraining data"]
    # the actual labelled set of each fraction, in patients and slices
    fr = h["labelled training set per fraction"]
    assert "100 %: 4 of 4 patients (100 %)" in fr and "50 %: 2 of 4 patients (50 %)" in fr and "slices" in fr
    # the lr every arm used and why; the protocol as run
    assert "for every arm (random, rotation)" in h["fine-tuning lr"] and "default base_lr 0.0004" in h["fine-tuning lr"]
    p = h["fine-tuning protocol"]
    assert "cosine" in p and "constant Adam lr 1e-4" in p and "biases" in p and "BatchNorm" in p
    assert "none apply" in h["built-in overrides"] or "left out" in h["built-in overrides"]
    for k in ("pretraining data", "labelled training set per fraction", "fine-tuning lr", "fine-tuning protocol"):
        assert f"- {k}: " in md


def test_a_dropped_builtin_override_is_stated_with_the_lr_of_each_arm(eval_cache):
    """--pretrain-data on the built-in task leaves out the built-in fine-tuning lr: said, with both lrs."""
    builtin = ExperimentConfig(methods="random,spark")
    tcfg, _ = _finetune_configs(builtin, builtin.overrides().get("finetune", {}))
    text = _lr_line(builtin, tcfg, ["random", "spark"])
    assert text.startswith("peak 0.0005 for every arm (random, spark)") and "built-in override" in text
    assert "finetune.base_lr=0.004" in _overrides_line(builtin, builtin.overrides(), ["spark"])

    own = ExperimentConfig(methods="random,spark", pretrain_data=eval_cache["cache"])
    tcfg, _ = _finetune_configs(own, own.overrides().get("finetune", {}))
    text = _lr_line(own, tcfg, ["random", "spark"])
    assert text.startswith("peak 5e-05 for every arm (random, spark)")
    assert "finetune.base_lr=0.004 (lr 0.0005) is not applied because --pretrain-data is given" in text
    assert "left out: " in _overrides_line(own, own.overrides(), ["spark"])
