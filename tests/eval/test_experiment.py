"""`sparkct experiment` end to end on a tiny labelled cache: the report files and where their numbers come
from, resume (finished runs skipped, an interrupted run continued to the same result), a failing method
reported as failed, bad labels refused through the experiment; and `sparkct finetune` resumed after an
interruption giving the uninterrupted run's result."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from sparkct.cli import main
from sparkct.eval.config import ExperimentConfig
from sparkct.eval.finetune import Classifier

#: two methods (one pretrained) at two fractions: the report's tables, comparisons and progress have rows
SETTINGS = dict(methods="random,rotation", fractions="1,0.5", finetune_steps=4, resamples=50)


@pytest.fixture(scope="module")
def experiment(tiny_experiment, tmp_path_factory):
    import sparkct.eval.experiment as E

    out = tmp_path_factory.mktemp("exp") / "run"
    hashed: list = []
    real = E._data_id
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "_data_id", lambda path: hashed.append(path) or real(path))
        log = tiny_experiment(out, SETTINGS)
    return {"out": str(out), "log": log, "hashed": hashed}


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _finetune_dirs(out):
    return sorted(os.path.join(dp) for dp, _, files in os.walk(os.path.join(out, "finetune")) if "config.json" in files)


def test_report_files_and_their_numbers(experiment, eval_cache):
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    out = experiment["out"]
    md = open(os.path.join(out, "results.md")).read()
    assert "| method | 100 % | 50 % |" in md
    table = md.split("## Test AUC")[1].split("##")[0]
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| r")}
    assert set(rows) == {"random", "rotation"}
    res = _results(out)
    # the header states the data, sizes and epochs used, from the config
    assert res["header"]["pretraining"].startswith("rotation: resnet18, crop 32, 1 epochs, batch 8")
    assert "4 optimizer steps at every fraction, batch 8" in res["header"]["fine-tuning schedule"]
    assert eval_cache["cache"] in res["header"]["data"]
    assert res["config"]["methods"] == SETTINGS["methods"] and res["config"]["finetune_steps"] == 4
    assert res["versions"]["numpy"] == np.__version__
    # one row per fine-tuning run, each traceable to its run folder's result.json and predictions.npz
    all_rows = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
    csv_rows = [r for r in all_rows if r["protocol"] == "finetune"]  # the linear probes: their own test
    assert sorted((r["method"], float(r["fraction"]), r["status"]) for r in csv_rows) == [
        ("random", 0.5, "done"),
        ("random", 1.0, "done"),
        ("rotation", 0.5, "done"),
        ("rotation", 1.0, "done"),
    ]
    assert len(_finetune_dirs(out)) == len(all_rows) == 8
    for r in csv_rows:
        result = json.load(open(os.path.join(r["run_dir"], "result.json")))
        z = np.load(os.path.join(r["run_dir"], "predictions.npz"))
        auc = roc_auc_score(z["labels"], z["probabilities"][:, 1])
        assert float(r["auc"]) == pytest.approx(result["test"]["metrics"]["auc"]["value"]) == pytest.approx(auc)
        assert result["method"] == r["method"] and result["train"]["max_steps"] == 4 and result["train"]["crop"] == 32
        cell = next(
            c
            for c in res["cells"]
            if c["method"] == r["method"] and c["fraction"] == float(r["fraction"]) and c["protocol"] == "finetune"
        )
        assert cell["auc"]["value"] == pytest.approx(auc) and cell["auc_per_seed"] == [pytest.approx(auc)]
        lo, hi = cell["auc"]["low"], cell["auc"]["high"]
        assert 0 <= lo <= cell["auc"]["value"] <= hi <= 1
        assert f"{cell['auc']['value']:.3f} [{lo:.3f}, {hi:.3f}]" in rows[r["method"]]  # the table shows them
    # the pretrained method's fine-tuning started from its pretraining run's export
    rot = json.load(
        open(os.path.join(next(r["run_dir"] for r in csv_rows if r["method"] == "rotation"), "result.json"))
    )
    assert rot["init"]["kind"] == "run" and os.path.isfile(os.path.join(rot["init"]["source"], "summary.json"))
    comp = {(c["method"], c["fraction"]) for c in res["comparisons"] if c["protocol"] == "finetune"}
    assert comp == {("rotation", 1.0), ("rotation", 0.5)}
    with Image.open(os.path.join(out, "auc_vs_fraction.png")) as im:
        assert im.format == "PNG" and im.size[0] > 500
    # disk use bounded: each fine-tuning run keeps the tested weights, not its checkpoints
    for d in _finetune_dirs(out):
        kept = set(os.listdir(d))
        assert "tested.pt" in kept and not kept & {"checkpoints", "last.ckpt", "best.ckpt", "backbone.pt"}, kept
    # progress: which run of how many, and (once one run has finished) the time left
    prog = [ln for ln in experiment["log"] if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in prog] == [f"[{i}/9" for i in range(1, 10)]
    # the time left is estimated per kind of run: before any run of a kind is timed it says so
    assert prog[0].endswith(
        " elapsed, 1 pretraining run not timed yet; 4 fine-tuning runs not timed yet; "
        "4 linear probe runs not timed yet)"
    )
    assert "4 fine-tuning runs not timed yet" in prog[1] and "about" not in prog[1]  # pretraining done
    assert prog[2].startswith("[3/9] linear probe of random on 100% of the labelled patients")
    assert "about" in prog[2] and prog[2].endswith("; 4 linear probe runs not timed yet)")
    assert "about" in prog[3] and "not timed" not in prog[3]


def test_the_data_is_hashed_once_per_invocation(experiment, eval_cache):
    """Its contents are read for the runs' settings hash once, not per run (9 runs here); --data, also the
    pretraining cache, once."""
    assert sorted(experiment["hashed"]) == sorted([eval_cache["cache"], eval_cache["patient_labels"]])


def test_rerun_skips_finished_runs_with_identical_results(experiment, tiny_experiment):
    out = experiment["out"]
    before = _results(out)
    marks = {
        p: os.path.getmtime(p)
        for d in _finetune_dirs(out)
        for p in (os.path.join(d, "result.json"), os.path.join(d, "tested.pt"))
    }
    log = tiny_experiment(out, SETTINGS)
    assert sum("finished earlier: skipped" in ln for ln in log) == 9  # 1 pretraining, 4 fine-tuning, 4 probes
    assert not any("resumed" in ln or "test AUC" in ln for ln in log)
    assert {p: os.path.getmtime(p) for p in marks} == marks
    after = _results(out)
    assert after["cells"] == before["cells"] and after["comparisons"] == before["comparisons"]
    # every run is counted, the skipped ones too
    assert [ln.split("]")[0] for ln in log if ln.startswith("[")] == [f"[{i}/9" for i in range(1, 10)]
    # the experiment's time is what its runs recorded, whichever invocation ran them
    pre = [os.path.join(out, "pretrain", d, "summary.json") for d in os.listdir(os.path.join(out, "pretrain"))]
    recorded = sum(json.load(open(p))["seconds"] for p in pre)
    recorded += sum(sum(r["seconds"].values()) for r in after["runs"])
    assert after["header"]["experiment time"].startswith(f"{recorded / 60:.1f} min of pretraining and fine-tuning")
    assert after["header"]["experiment time"].split(" (")[0] == before["header"]["experiment time"].split(" (")[0]


def test_interrupted_experiment_continues_to_the_same_result(experiment, tiny_experiment, tmp_path, monkeypatch):
    # Stop the first fine-tuning run at the first step of its second epoch, after its first checkpoint (as a
    # kill would: nothing is saved on the way out), then run the same command again.
    after_step = Classifier.after_step

    def dying(self, step, total):
        after_step(self, step, total)
        if step == self.steps_per_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Classifier, "after_step", dying)
    out = tmp_path / "exp"
    with pytest.raises(KeyboardInterrupt):
        # random only, fine-tuning only: no pretraining to repeat here
        tiny_experiment(out, SETTINGS, methods="random", protocols="finetune")
    monkeypatch.setattr(Classifier, "after_step", after_step)
    dirs = _finetune_dirs(str(out))
    assert len(dirs) == 1 and not os.path.isfile(os.path.join(dirs[0], "result.json"))
    log = tiny_experiment(out, SETTINGS, methods="random", protocols="finetune")
    resumed = [ln for ln in log if "resumed" in ln]
    assert len(resumed) == 1 and dirs[0] in resumed[0]
    assert sum("test AUC" in ln for ln in log) == 2  # the resumed run and the second one
    a = [c for c in _results(experiment["out"])["cells"] if c["method"] == "random" and c["protocol"] == "finetune"]
    b = _results(str(out))["cells"]
    assert [(c["fraction"], c["auc"]) for c in a] == [(c["fraction"], c["auc"]) for c in b]
    for d in _finetune_dirs(str(out)):  # the same predictions as the uninterrupted experiment's runs
        twin = os.path.join(experiment["out"], "finetune", "random", os.path.basename(d))
        pa, pb = (np.load(os.path.join(x, "predictions.npz"))["probabilities"] for x in (twin, d))
        assert np.array_equal(pa, pb)
        ra, rb = (json.load(open(os.path.join(x, "result.json"))) for x in (twin, d))
        assert ra["val_history"] == rb["val_history"]  # the log up to the checkpoint survived the interruption


def test_a_failing_method_is_reported_as_failed(tiny_experiment, tmp_path, monkeypatch):
    import sparkct.eval.experiment as E

    real, checked = E.build_method, set()

    def broken(name, *a, **kw):  # a failure that no check before the run can see: the run's own build
        if name in checked:
            raise RuntimeError("out of rotations")
        checked.add(name)  # the up-front check builds each method once
        return real(name, *a, **kw)

    monkeypatch.setattr(E, "build_method", broken)
    out = tmp_path / "exp"
    # a fine-tuning option for every fine-tuning run
    log = tiny_experiment(out, SETTINGS, fractions="1", set=["finetune.base_lr=1e-3"])
    assert any("FAILED" in ln and "out of rotations" in ln for ln in log)
    assert "fine-tuning options: base_lr=1e-3" in log
    res = json.load(open(next(os.path.join(d, "result.json") for d in _finetune_dirs(str(out)) if "random" in d)))
    assert res["train"]["base_lr"] == 1e-3
    md = open(out / "results.md").read()
    assert "| rotation | failed |" in md and "## Failed runs" in md and "out of rotations" in md
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert sorted((r["method"], r["protocol"], r["status"]) for r in rows) == [
        ("random", "finetune", "done"),
        ("random", "linear", "done"),
        ("rotation", "finetune", "failed"),
        ("rotation", "linear", "failed"),
    ]
    assert "- rotation (linear probe) at 100 %, seed 0: pretraining failed" in md
    res = _results(str(out))
    assert "rotation" in res["header"]["failed pretraining"]
    assert next(c for c in res["cells"] if c["method"] == "rotation")["auc"] is None


def test_builtin_data_defaults_and_their_checks(eval_cache, tiny_experiment, tmp_path):
    """Without --data the fine-tuning lr, the split and the synthetic series follow the built-in task's
    defaults; with --data the published ones; a bad fine-tuning option is refused before any training."""
    from sparkct.errors import UserError

    builtin = ExperimentConfig()
    assert builtin.overrides()["finetune"] == {"base_lr": 8e-3} and builtin.split_fractions() == (0.5, 0.15, 0.35)
    data = ExperimentConfig(data=eval_cache["cache"])
    assert "finetune" not in data.overrides() and data.split_fractions() == (0.5, 0.2, 0.3)
    assert ExperimentConfig(set=["finetune.lr=1e-3"]).overrides()["finetune"] == {"base_lr": 8e-3, "lr": "1e-3"}
    for kw, msg in (
        (dict(synth_thickness=0.1), "--synth-thickness"),
        (dict(synth_min_nodule=40), "--synth-min-nodule"),
        (dict(synth_min_nodule=30, synth_max_nodule=25), "--synth-max-nodule"),
        (dict(pretrain_finding=1.5), "--pretrain-finding"),
        (dict(split="0.5,x,0.3"), "--split"),
        (dict(protocols="finetune,probe"), r"--protocols: unknown \['probe'\]; choose from finetune, linear"),
        (dict(protocols=","), "--protocols: unknown none given"),
        (dict(set=["finetune.linear_probe=true"]), "choose the protocols with --protocols"),
    ):
        with pytest.raises(UserError, match=msg):
            ExperimentConfig(**kw).validate()
    with pytest.raises(UserError, match="no option 'nope'"):
        tiny_experiment(tmp_path / "bad", SETTINGS, set=["finetune.nope=1"])
    assert not os.path.isdir(tmp_path / "bad" / "finetune")


@pytest.mark.parametrize(
    "option,msg",
    [
        ("nosuchmethod.field=1", "no method 'nosuchmethod'"),
        ("moco.queue_size=8", "'moco' is not among --methods"),
        ("random.lr=1", "random pretrains nothing"),
        ("spark.nonexistent=1", "spark has no option 'nonexistent'"),
        ("spark.mask_ratio=1", "spark: mask ratio must be"),
        ("spark.mask_ratio=abc", "--set spark.mask_ratio=abc: "),
        ("spark.epochs=-3", "spark: --epochs must be >= 1, got -3"),
        ("spark.mask_ratio=0.1", "spark: --mask-ratio 0.1 hides no cell"),
        ("finetune.epochs=0", "finetune: --epochs must be >= 1, got 0"),
        ("finetune.label_smoothing=1", "finetune: --label-smoothing must be in [0, 1)"),
    ],
)
def test_set_options_are_checked_for_every_method_before_any_work(option, msg, eval_cache, tmp_path, capsys):
    """Each method's options (spark's after rotation's, the fine-tuning runs' after all pretraining) are
    refused in one line before anything is written: no method pretrains first, none is reported failed."""
    out = tmp_path / "exp"
    args = ["--methods", "random,rotation,spark", "--fractions", "1", "--seeds", "0", "--crop", "64"]
    args += ["--windows", "lung", "--pretrain-epochs", "1", "--finetune-steps", "2", "--resamples", "20"]
    code = main(
        ["experiment", "--data", eval_cache["cache"], "--labels", eval_cache["patient_labels"], "--out", str(out)]
        + ["--device", "cpu", "--split", "0.34,0.33,0.33", "--set", option, *args]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0] and err[0].startswith("sparkct experiment: error:"), err
    assert not out.exists()


def test_set_accepts_windows_as_center_width(eval_cache):
    from sparkct.eval.experiment import _pretrain_configs

    cfg = ExperimentConfig(data=eval_cache["cache"], methods="spark", set=["spark.windows=40/400"], **{"crop": 64})
    tcfg, _ = _pretrain_configs(cfg, "spark", cfg.overrides()["spark"])
    assert tcfg.windows == "40/400"


def _slice_labels(cache_dir, path, label_of, extra_row=None):
    from sparkct.data import SliceCache

    c = SliceCache(cache_dir)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["series_key", "slice_index", "label"])
        for s in range(c.n_series):
            for k in range(int(c.series["shape"][s][0])):  # (slices, rows, cols)
                w.writerow([c.series["key"][s], k, label_of(s, k)])
        if extra_row:
            w.writerow(extra_row(c))
    return str(path)


@pytest.mark.parametrize(
    "case,msg",
    [
        ("missing column", "no label column 'label'"),
        ("unknown slice", "name slices that are not in the cache"),
        ("single class", "a classifier needs at least two classes"),
    ],
)
def test_bad_labels_are_one_line_errors(case, msg, eval_cache, tmp_path, capsys):
    path = tmp_path / "labels.csv"
    if case == "missing column":
        path.write_text(open(eval_cache["patient_labels"]).read().replace("patient,label", "patient,diagnosis"))
    elif case == "unknown slice":
        _slice_labels(eval_cache["cache"], path, lambda s, k: s % 2, extra_row=lambda c: [c.series["key"][0], 999, 1])
    else:
        _slice_labels(eval_cache["cache"], path, lambda s, k: 1)
    code = main(
        [
            "experiment",
            "--data",
            eval_cache["cache"],
            "--labels",
            str(path),
            "--out",
            str(tmp_path / "exp"),
            "--methods",
            "random",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and msg in err[-1] and err[-1].startswith("sparkct experiment: error:"), err
    assert not os.path.isdir(tmp_path / "exp" / "finetune")  # refused before any training


def test_finetune_resumed_after_an_interruption_equals_an_uninterrupted_run(
    tmp_path, write_npz, finetune_flags, monkeypatch
):
    ft = [*finetune_flags, *"--epochs 3 --freeze-epochs 1 --ramp-epochs 1 --ckpt-every 1000 --log-every 1".split()]
    data = write_npz(tmp_path / "d.npz", n=(24, 12, 12), k=3, size=20)  # 3 steps per epoch, 9 in all
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    assert main(["finetune", "--data", data, "--out", ref, *ft]) == 0
    after_step = Classifier.after_step

    def dying(self, step, total):
        after_step(self, step, total)
        if step == 6:  # first step of epoch 3; checkpoints are written at epoch ends where val AUC improved
            raise KeyboardInterrupt

    monkeypatch.setattr(Classifier, "after_step", dying)
    assert main(["finetune", "--data", data, "--out", run, *ft]) == 130  # interrupted
    monkeypatch.setattr(Classifier, "after_step", after_step)
    assert not os.path.isfile(os.path.join(run, "result.json"))
    assert main(["finetune", "--data", data, "--out", run, "--resume", *ft]) == 0
    a, b = (json.load(open(os.path.join(d, "result.json"))) for d in (ref, run))
    assert a["test"]["metrics"] == b["test"]["metrics"] and a["val_history"] == b["val_history"]
    assert a["tested_checkpoint"]["step"] == b["tested_checkpoint"]["step"]
    za, zb = (np.load(os.path.join(d, "predictions.npz")) for d in (ref, run))
    assert np.array_equal(za["probabilities"], zb["probabilities"])
    la = [r["loss"] for r in csv.DictReader(open(os.path.join(ref, "metrics.csv")))]
    lb = [r["loss"] for r in csv.DictReader(open(os.path.join(run, "metrics.csv")))]
    assert la == lb and len(la) == 9


def test_results_state_data_overrides_protocol_and_fractions(experiment, eval_cache):
    """results.md names the pretraining data (source, size), the labelled patients and slices of each
    fraction, the lr every arm used and why, the protocol as run and the built-in overrides."""
    res = _results(experiment["out"])
    h = res["header"]
    assert h["pretraining data"].startswith(eval_cache["cache"]) and "patients" in h["pretraining data"]
    assert "slices" in h["pretraining data"]
    fr = h["labelled training set per fraction"]
    assert "100 %: 4 of 4 patients (100 %)" in fr and "50 %: 2 of 4 patients (50 %)" in fr and "slices" in fr
    lr = h["fine-tuning lr"]
    assert "for every arm (random, rotation)" in lr and "default base_lr 0.0004" in lr
    p = h["fine-tuning protocol"]
    assert "cosine" in p and "constant Adam lr 1e-4" in p and "biases" in p and "BatchNorm" in p
    assert "backbone frozen for the first 1 step(s)" in p
    assert "linear probe: the backbone frozen throughout" in h["linear probe protocol"]
    assert "protocols: full fine-tuning, linear probe (the same steps)" in h["fine-tuning schedule"]
    assert h["built-in overrides"] == "none in effect (--data given); left out: finetune.base_lr=0.008"
    with open(os.path.join(experiment["out"], "results.md")) as f:
        md = f.read()
    for k in ("pretraining data", "labelled training set per fraction", "fine-tuning lr", "fine-tuning protocol"):
        assert f"- {k}: " in md


def test_a_linear_probe_beside_every_fine_tuning_run(experiment):
    """Every method (random init too), fraction and seed is also linear-probed on the same patients with the
    same steps: its own run folder and hash, linear_probe true in its result.json, its own table."""
    out = experiment["out"]
    results = {d: json.load(open(os.path.join(d, "result.json"))) for d in _finetune_dirs(out)}
    by = {(r["method"], r["fraction"], r["finetune"]["linear_probe"]): (d, r) for d, r in results.items()}
    assert sorted(by) == sorted((m, f, p) for m in ("random", "rotation") for f in (1.0, 0.5) for p in (False, True))
    for (m, f, probe), (d, r) in by.items():
        if not probe:
            continue
        tuned_dir, tuned = by[(m, f, False)]
        settings = [json.load(open(os.path.join(x, "settings.json"))) for x in (d, tuned_dir)]
        assert settings[0]["key"] != settings[1]["key"] and os.path.basename(d).startswith("linear-f")
        assert settings[0]["settings"]["finetune"]["linear_probe"] is True
        assert r["task"]["train"] == tuned["task"]["train"]  # the same patients and items
        assert r["train"]["max_steps"] == tuned["train"]["max_steps"] == 4
        assert r["summary"]["steps"] == tuned["summary"]["steps"]
        assert r["init"] == tuned["init"]
    res = _results(out)
    md = open(os.path.join(out, "results.md")).read()
    probed = md.split("## Linear probe: test AUC")[1].split("## Convergence")[0]
    for c in (c for c in res["cells"] if c["protocol"] == "linear"):
        row = next(ln for ln in probed.splitlines() if ln.startswith(f"| {c['method']} |"))
        assert f"{c['auc']['value']:.3f} [" in row
        assert c["auc"]["value"] == pytest.approx(
            by[(c["method"], c["fraction"], True)][1]["test"]["metrics"]["auc"]["value"]
        )
    assert {(c["method"], c["fraction"]) for c in res["comparisons"] if c["protocol"] == "linear"} == {
        ("rotation", 1.0),
        ("rotation", 0.5),
    }
    assert "## Linear probe: paired comparison with random's linear probe" in md
    rows = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
    assert sorted(r["protocol"] for r in rows) == ["finetune"] * 4 + ["linear"] * 4


def test_convergence_from_the_fine_tuning_runs(experiment):
    from PIL import Image

    out = experiment["out"]
    res = _results(out)
    conv = res["convergence"]
    assert {(r["method"], r["fraction"]) for r in conv["rows"]} == {
        (m, f) for m in ("random", "rotation") for f in (1.0, 0.5)
    }
    for r in conv["rows"]:  # from the fine-tuning runs' validation histories, validated every step
        run = next(
            x
            for x in res["runs"]
            if x["method"] == r["method"] and x["fraction"] == r["fraction"] and not x["finetune"]["linear_probe"]
        )
        assert r["best_val_auc_per_seed"] == [max(h["val_auc"] for h in run["val_history"])]
        steps = [h["step"] for h in run["val_history"]]  # at epoch ends (--eval-every 1), the last at step 4
        assert steps == sorted(set(steps)) and steps[-1] == 4 and set(r["steps_per_seed"]) <= {*steps, None}
    md = open(os.path.join(out, "results.md")).read()
    assert "## Convergence (fine-tuning steps to reach 95 % of random's best validation AUC)" in md
    assert "| target (val AUC) |" in md and "validated every 1 step(s)" in md
    with Image.open(os.path.join(out, "convergence.png")) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_report_robustness_and_the_no_training_reference(experiment):
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from sparkct.eval.config import PERTURBED_KEY
    from sparkct.eval.reference import NAME
    from sparkct.eval.robustness import PERTURBATIONS

    out = experiment["out"]
    md = open(os.path.join(out, "results.md")).read()
    res = _results(out)
    # every fine-tuning run was tested under every perturbation, its probabilities kept; the linear probes
    # were not (robustness is a test of the fully fine-tuned models)
    rob = res["robustness"]
    assert [d["name"] for d in rob["perturbations"]] == [p.name for p in PERTURBATIONS]
    assert rob["fractions"] == [1.0, 0.5] and len(rob["cells"]) == 4
    probes = [r for r in res["runs"] if r["finetune"]["linear_probe"]]
    assert len(probes) == 4 and not any("robustness" in r for r in probes)
    for r in probes:
        assert not any(k.startswith(PERTURBED_KEY) for k in np.load(os.path.join(r["run_dir"], "predictions.npz")))
    for r in (r for r in res["runs"] if not r["finetune"]["linear_probe"]):
        z = np.load(os.path.join(r["run_dir"], "predictions.npz"))
        cell = next(c for c in rob["cells"] if c["method"] == r["method"] and c["fraction"] == r["fraction"])
        for d in r["robustness"]["perturbations"]:
            auc = roc_auc_score(z["labels"], z[PERTURBED_KEY + d["name"]][:, 1])
            assert d["auc"]["value"] == pytest.approx(auc)
            assert cell["perturbed"][d["name"]]["auc"]["value"] == pytest.approx(auc)  # one seed: the run's
    sec = md.split("## Robustness")[1]
    assert "### 100 % of the labelled" in sec and "### 50 % of the labelled" in sec
    with Image.open(os.path.join(out, "robustness.png")) as im:
        assert im.format == "PNG"
    # the reference: computed once, its own line, not a method
    ref = res["reference"]
    assert ref["name"] == NAME and set(ref["val"]) >= {"auc", "unit", "n_units"} and ref["test"]["unit"] == "patient"
    # below the fine-tuning table, not the linear probes'
    ref_line = f"Reference without training, **{NAME}**: test AUC"
    assert md.count(ref_line) == 1 and ref_line in md.split("## Test AUC")[1].split("## Linear probe")[0]
    assert not any(c["method"] == NAME for c in res["cells"])
    assert sum(ln.startswith(f"reference, {NAME}") for ln in experiment["log"]) == 1
    # results.md keeps every section, and the report's paths name every figure
    heads = [ln for ln in md.splitlines() if ln.startswith("## ")]
    for h in ("## Test AUC", "## Paired comparison", "## Linear probe: test AUC", "## Linear probe: paired", "## Conv"):
        assert any(x.startswith(h) for x in heads), (h, heads)
    assert heads[-1].startswith("## Robustness")
    report = next(ln for ln in experiment["log"] if ln.startswith("report: "))
    for f in ("results.md", "auc_vs_fraction.png", "convergence.png", "robustness.png", "results.json", "runs.csv"):
        assert os.path.join(out, f) in report
