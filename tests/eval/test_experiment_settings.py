"""`sparkct experiment`'s bookkeeping: runs are selected by the hash of their full settings (runs made
with other settings are listed as stale, never averaged with current ones; a re-run still skips finished
runs; a stale linear probe is compared with the current probe), and results.md states the pretraining
data, the built-in overrides, the fine-tuning lr of every arm, the protocol actually run and the labelled
patients and slices each fraction got."""

from __future__ import annotations

import json
import os

from sparkct.eval.config import ExperimentConfig
from sparkct.eval.experiment import _finetune_configs, _lr_line, _overrides_line

# the linear probes' bookkeeping: their own test below
SETTINGS = dict(methods="random", fractions="0.5", protocols="finetune")


def _run(tiny_experiment, out, **kw):
    lines = tiny_experiment(out, SETTINGS, kw)
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    return lines, res, md


def test_runs_with_other_settings_are_stale_not_extra_seeds(eval_cache, tiny_experiment, tmp_path):
    labels = tmp_path / "labels.csv"
    with open(eval_cache["patient_labels"]) as f:
        text = f.read()
    labels.write_text(text)
    out = tmp_path / "exp"
    _run(tiny_experiment, out, labels=str(labels))
    log, res, md = _run(tiny_experiment, out, labels=str(labels), finetune_steps=3)
    # the first invocation's run is neither counted as a seed nor averaged in
    assert [c["seeds"] for c in res["cells"]] == [[0]]
    assert [r["train"]["max_steps"] for r in res["runs"]] == [3]
    assert "(n=1)" in md and "(n=2)" not in md
    stale = res["stale_runs"]
    assert len(stale) == 1 and stale[0]["stale"] == "train.max_steps 2 (now 3)"
    assert "## Stale runs" in md and "train.max_steps 2 (now 3)" in md
    assert os.path.isdir(stale[0]["run_dir"])  # kept on disk
    # the same settings again: the finished run is skipped, the stale one still listed
    log, res2, _ = _run(tiny_experiment, out, labels=str(labels), finetune_steps=3)
    assert sum("finished earlier: skipped" in s for s in log) == 1
    assert [r["test"] for r in res2["runs"]] == [r["test"] for r in res["runs"]]
    assert len(res2["stale_runs"]) == 1
    # the data's identity, not only its path, is in the hash: other labels in the same file are a new run
    rows = text.strip().split("\n")
    flipped = [r.replace("nodule", "x").replace("clear", "nodule").replace(",x", ",clear") for r in rows[1:]]
    labels.write_text("\n".join(rows[:1] + flipped) + "\n")
    log, res3, _ = _run(tiny_experiment, out, labels=str(labels), finetune_steps=3)
    assert not any("finished earlier" in s for s in log)
    assert len(res3["runs"]) == 1 and len(res3["stale_runs"]) == 2
    assert all("labels contents differ" in s["stale"] for s in res3["stale_runs"])
    assert sum("train.max_steps 2 (now 3)" in s["stale"] for s in res3["stale_runs"]) == 1


def test_a_dropped_builtin_override_is_stated_with_the_lr_of_each_arm(eval_cache):
    """--pretrain-data on the built-in task leaves out the built-in fine-tuning lr: said, with both lrs."""
    builtin = ExperimentConfig(methods="random,spark")
    tcfg, _ = _finetune_configs(builtin, builtin.overrides().get("finetune", {}))
    text = _lr_line(builtin, tcfg, ["random", "spark"])
    assert text.startswith("peak 0.001 for every arm (random, spark)") and "built-in override" in text
    assert "finetune.base_lr=0.008" in _overrides_line(builtin, builtin.overrides(), ["spark"])
    mine = ExperimentConfig(methods="random,spark", set=["finetune.base_lr=1e-3"])
    assert _overrides_line(mine, mine.overrides(), ["spark"]).endswith("; replaced by --set: finetune.base_lr")

    own = ExperimentConfig(methods="random,spark", pretrain_data=eval_cache["cache"])
    tcfg, _ = _finetune_configs(own, own.overrides().get("finetune", {}))
    text = _lr_line(own, tcfg, ["random", "spark"])
    assert text.startswith("peak 5e-05 for every arm (random, spark)")
    assert "finetune.base_lr=0.008 (lr 0.001) is not applied because --pretrain-data is given" in text
    assert "left out: " in _overrides_line(own, own.overrides(), ["spark"])


def test_linear_probes_alone_and_stale_by_their_own_settings(tiny_experiment, tmp_path):
    out = tmp_path / "exp"
    _run(tiny_experiment, out, protocols="linear")
    log, res, md = _run(tiny_experiment, out, protocols="linear", finetune_steps=3)
    # a probe of other settings is stale with what differs from the current probe, not from a fine-tuning run
    assert [(c["protocol"], c["seeds"]) for c in res["cells"]] == [("linear", [0])]
    assert [(s["protocol"], s["stale"]) for s in res["stale_runs"]] == [("linear", "train.max_steps 2 (now 3)")]
    assert "- random (linear probe) at 50 %, seed 0 (`linear-f0.5-s0-" in md
    # probes alone: their table, no fine-tuning table, no convergence (the probes' histories are not used)
    assert "## Linear probe: test AUC" in md and "## Test AUC" not in md and "## Convergence" not in md
    assert "fine-tuning protocol" not in res["header"] and "linear probe protocol" in res["header"]
    assert res["convergence"]["rows"] == [] and not os.path.exists(os.path.join(out, "convergence.png"))
    # fine-tuning alone now: the probes are stale as not requested
    log, res, md = _run(tiny_experiment, out, finetune_steps=3)
    assert [c["protocol"] for c in res["cells"]] == ["finetune"] and "## Convergence" in md
    assert sorted(s["stale"] for s in res["stale_runs"]) == [
        "method, protocol, fraction or seed not requested now",
        "method, protocol, fraction or seed not requested now",
    ]
