"""sparkct.eval.report: results.md, auc_vs_fraction.png, results.json, runs.csv from synthetic runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sparkct import io as sio
from sparkct.errors import UserError
from sparkct.eval.report import RUN_FIELDS, collect_runs, write_report

QUALITY = {"random": 0.6, "spark": 2.0, "simclr": 1.2}  # separation of the classes' scores


def finished_run(method, fraction, seed, y, patients, prob, n_resamples=100):
    """A finished fine-tuning run as collect_runs returns it (result.json and its predictions), patient-level
    test units; also test_report_robustness's."""
    from sparkct.eval.metrics import bootstrap_ci

    n = len(np.unique(patients))
    ci = bootstrap_ci(y, prob, groups=patients, n_resamples=n_resamples)
    return {
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "status": "done",
        "task": {
            "source": "/data/synthetic",
            "kind": "cache",
            "level": "patient",
            "labels": "/data/labels.csv",
            "classes": ["clear", "nodule"],
            "full_train": {"patients": 80},
            "val": {"patients": 20},
            "test": {"patients": n, "per_class": [n // 2, n // 2]},
            "train": {"items": int(80 * fraction), "patients": int(80 * fraction)},
        },
        "train": {"arch": "resnet18", "crop": 64, "epochs": 3, "batch": 16},
        "finetune": {"linear_probe": False},
        "effective_batch": 16,
        "tested_checkpoint": {"step": 12, "best_val_auc": 0.7},
        "test": {"metrics": ci, "unit": "patient", "n_units": n, "n_patients": n},
        "seconds": {"train": 1.5, "test": 0.1},
        "predictions": {"probabilities": prob, "labels": y, "patients": patients},
    }


def _run(method, fraction, seed, n=60, per_patient=1):
    rng = np.random.default_rng([list(QUALITY).index(method), int(fraction * 100), seed])
    y = np.repeat(np.arange(n) % 2, per_patient)
    patients = np.repeat(np.arange(n), per_patient)
    z = rng.normal(size=len(y)) + QUALITY[method] * fraction * (2 * y - 1)
    p1 = 1 / (1 + np.exp(-z))
    prob = np.stack([1 - p1, p1], 1)
    return finished_run(method, fraction, seed, y, patients, prob)


def _runs():
    runs = [_run(m, f, s) for m in QUALITY for f in (1.0, 0.5, 0.1) for s in (0, 1)]
    runs.append(
        {
            "method": "simclr",
            "fraction": 0.1,
            "seed": 2,
            "status": "failed",
            "error": "TrainingDiverged: loss is nan at step 3",
        }
    )
    return runs


def test_report_files_written_and_well_formed(tmp_path):
    runs = _runs()
    paths = write_report(
        runs,
        str(tmp_path / "rep"),
        n_resamples=200,
        extra={"pretraining": "2 epochs"},
        config={"methods": list(QUALITY)},
    )
    md = open(paths["md"]).read()
    assert "| method | 100 % | 50 % | 10 % |" in md
    table = [
        ln
        for ln in md.splitlines()
        if ln.startswith("| random") or ln.startswith("| spark") or ln.startswith("| simclr")
    ]
    assert len(table) == 3 + 2 * 3  # the AUC table, and the comparison table (2 methods x 3 fractions)
    res = json.load(open(paths["json"]))
    for k, f in enumerate((1.0, 0.5, 0.1)):  # the best mean AUC of each column, and only it, is bold
        best = max((c for c in res["cells"] if c["fraction"] == f), key=lambda c: c["auc"]["value"])
        for ln in table[:3]:
            cell = ln.split("|")[2 + k]
            assert ("**" in cell) == ln.startswith(f"| {best['method']} |"), (f, ln)
    assert "1 failed" in md and "## Failed runs" in md and "TrainingDiverged" in md
    assert "pretraining: 2 epochs" in md and "/data/synthetic" in md
    assert len(res["cells"]) == 9 and len(res["runs"]) == 19
    cell = next(c for c in res["cells"] if c["method"] == "spark" and c["fraction"] == 1.0)
    assert cell["auc"]["low"] < cell["auc"]["value"] < cell["auc"]["high"]
    assert cell["auc"]["value"] == pytest.approx(np.mean(cell["auc_per_seed"]))
    failed_cell = next(c for c in res["cells"] if c["method"] == "simclr" and c["fraction"] == 0.1)
    assert failed_cell["failed_seeds"] == [2] and failed_cell["seeds"] == [0, 1]
    comp = next(c for c in res["comparisons"] if c["method"] == "spark" and c["fraction"] == 1.0)
    assert comp["diff"] > 0.1 and comp["p_bootstrap"] < 0.05 and comp["p_delong"] < 0.05
    assert comp["low"] < comp["diff"] < comp["high"]
    assert res["versions"]["numpy"] == np.__version__ and res["config"] == {"methods": list(QUALITY)}
    assert "predictions" not in res["runs"][0]
    assert "¹" not in open(paths["md"]).read()  # DeLong's p given: no footnote
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 19 and list(rows[0]) == list(RUN_FIELDS)
    assert sum(r["status"] == "failed" for r in rows) == 1
    assert all(0 <= float(r["auc"]) <= 1 for r in rows if r["status"] == "done")
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 300
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(px, axis=0)) > 20  # lines, bands and text were drawn


def test_slice_level_units_skip_delong(tmp_path):
    runs = [_run(m, 1.0, s, n=30, per_patient=3) for m in ("random", "spark") for s in (0,)]
    paths = write_report(runs, str(tmp_path / "r"), n_resamples=100)
    res = json.load(open(paths["json"]))
    assert res["comparisons"][0]["p_delong"] is None and "DeLong not applicable" in res["comparisons"][0]["note"]
    md = open(paths["md"]).read()
    assert "| n/a¹ |" in md  # and the table says why
    assert "¹ DeLong's test treats the test units as independent; these test sets hold several units" in md


def test_collect_runs_from_folders(tmp_path):
    runs = [_run("random", 1.0, 0), _run("spark", 1.0, 0)]
    for r in runs:
        d = tmp_path / "exp" / r["method"]
        d.mkdir(parents=True)
        sio.write_npz_atomic(str(d / "predictions.npz"), r.pop("predictions"))
        sio.write_json_atomic(str(d / "result.json"), r)
    (tmp_path / "exp" / "broken").mkdir()
    sio.write_json_atomic(
        str(tmp_path / "exp" / "broken" / "failed.json"),
        {"method": "simclr", "fraction": 1.0, "seed": 0, "error": "out of memory"},
    )
    found = collect_runs(str(tmp_path / "exp"))
    assert sorted(r["method"] for r in found) == ["random", "simclr", "spark"]
    paths = write_report(found, str(tmp_path / "out"), n_resamples=100)
    md = open(paths["md"]).read()
    assert "| simclr | failed |" in md and "out of memory" in md
    with pytest.raises(UserError, match="no fine-tuning results"):
        collect_runs(str(tmp_path / "out"))


def test_two_runs_of_one_method_fraction_and_seed_are_refused_not_averaged(tmp_path):
    """Runs of two setups (e.g. two experiments' runs of random at 100 %, seed 0) are not seeds of one."""
    a, b = _run("random", 1.0, 0), _run("random", 1.0, 0)
    a["run_dir"], b["run_dir"] = "old/f1-s0-aaaa", "new/f1-s0-bbbb"
    with pytest.raises(UserError, match=r"two runs of random at 100 %, seed 0: old/f1-s0-aaaa and new/f1-s0-bbbb"):
        write_report([a, b, _run("spark", 1.0, 0)], str(tmp_path), n_resamples=50)
    assert not (tmp_path / "results.md").exists()


def test_report_states_the_coverage_of_intervals_from_a_small_test_set(tmp_path):
    # Issue 19: at 18 test patients the patient-bootstrap BCa interval holds the true AUC less than
    # 95 % of the time (simulated); the report says so beside the intervals, and not for large sets.
    from sparkct.eval.metrics import COVERAGE, coverage_note

    small = [_run(m, 1.0, 0, n=18, per_patient=3) for m in ("random", "spark")]
    md = open(write_report(small, str(tmp_path / "small"), n_resamples=50)["md"]).read()
    note = next(ln for ln in md.splitlines() if ln.startswith("Coverage:"))
    assert "18 test patients" in note and f"{100 * COVERAGE[18]:.0f} %" in note
    assert md.index("Bold: the best") < md.index("Coverage:") < md.index("## Paired comparison")
    big = max(COVERAGE) + 1
    assert coverage_note(big) is None and coverage_note(18, confidence=0.9) is None


def test_auc_figure_chance_line_offset_error_bars_legend_outside_caption(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.container import ErrorbarContainer

    from sparkct.eval.report import aggregate, auc_figure, plot_caption

    runs = _runs()
    for r in runs:
        if "task" in r:
            r["task"]["test"]["items"] = 60
    agg = aggregate(runs, n_resamples=200)
    caption = plot_caption(agg, runs, "built-in synthetic chest CT")
    fig = auc_figure(agg, "t", caption)
    ax = fig.axes[0]
    # a horizontal line at 0.5, no translucent CI bands
    assert any(list(ln.get_ydata()) == [0.5, 0.5] for ln in ax.lines)
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # one per method, each with its CI as error bars
    xs = [tuple(np.round(b.lines[0].get_xdata(), 6)) for b in bars]
    assert len({x for xx in xs for x in xx}) == 9  # 3 methods x 3 fractions: no two at one x
    # the legend lies outside the data area
    fig.canvas.draw()
    leg = ax.get_legend().get_window_extent()
    assert leg.x0 >= ax.get_window_extent().x1
    text = " ".join(t.get_text() for t in fig.texts)
    assert "built-in synthetic chest CT" in text and "60 patients, 60 slices" in text
    assert "significant vs random" in text and "spark at 100%" in text
    plt.close(fig)
    # nothing significant: said so
    agg["comparisons"] = [dict(c, p_bootstrap=0.5) for c in agg["comparisons"] if "diff" in c]
    assert "none of 6 differences vs random is significant" in plot_caption(agg, runs)
    assert "/data/synthetic" in plot_caption(agg, runs)
    paths = write_report(runs, str(tmp_path / "rep"), n_resamples=50)
    assert paths["png"].endswith("auc_vs_fraction.png")


def _probe_and_history(run, probe, aucs=None):
    """`run` as a linear probe (result.json's finetune.linear_probe) or with a validation history."""
    run["finetune"] = {"linear_probe": probe, "eval_every": 10}
    if aucs is not None:
        run["val_history"] = [{"epoch": i + 1, "step": 10 * (i + 1), "val_auc": v} for i, v in enumerate(aucs)]
    return run


def test_linear_probes_get_their_own_table_and_the_fine_tuning_runs_a_convergence_table(tmp_path):
    from PIL import Image

    curves = {"random": [0.6, 0.7, 0.8, 0.9], "spark": [0.88, 0.9, 0.92, 0.92]}  # target 0.855: 40 vs 10 steps
    runs = [_probe_and_history(_run(m, f, s), False, curves[m]) for m in curves for f in (1.0, 0.5) for s in (0, 1)]
    runs += [_probe_and_history(_run(m, f, s), True) for m in curves for f in (1.0, 0.5) for s in (0, 1)]
    paths = write_report(runs, str(tmp_path / "rep"), n_resamples=50)  # same method, fraction, seed: no refusal
    md = open(paths["md"]).read()
    tuned = md.split("## Test AUC")[1].split("## Linear probe")[0]
    probed = md.split("## Linear probe: test AUC")[1].split("## Convergence")[0]
    res = json.load(open(paths["json"]))
    for protocol, text in (("finetune", tuned), ("linear", probed)):
        cells = [c for c in res["cells"] if c["protocol"] == protocol]
        assert len(cells) == 4
        for c in cells:  # each table shows its own protocol's cells
            row = next(ln for ln in text.splitlines() if ln.startswith(f"| {c['method']} |"))
            assert f"{c['auc']['value']:.3f} [" in row
        comps = [c for c in res["comparisons"] if c["protocol"] == protocol]
        assert {(c["method"], c["fraction"]) for c in comps} == {("spark", 1.0), ("spark", 0.5)}
    assert "## Paired comparison with random (same test set)" in tuned
    assert "## Linear probe: paired comparison with random's linear probe (same test set)" in probed
    rows = list(csv.DictReader(open(paths["csv"])))
    assert sorted(r["protocol"] for r in rows) == ["finetune"] * 8 + ["linear"] * 8
    # convergence from the fine-tuning runs only
    conv = md.split("## Convergence")[1]
    assert "| target (val AUC) | 0.855 | 0.855 |" in conv and "validated every 10 step(s)" in conv
    assert "| random | 40 | 40 |" in conv and "| spark | 10 (saving 75 %) | 10 (saving 75 %) |" in conv
    assert {(r["method"], r["fraction"], r["steps"]) for r in res["convergence"]["rows"]} == {
        ("random", 1.0, 40),
        ("random", 0.5, 40),
        ("spark", 1.0, 10),
        ("spark", 0.5, 10),
    }
    with Image.open(paths["convergence"]) as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert paths["convergence"].endswith("convergence.png")
    # without validation histories there is nothing to plot: no convergence.png, no section
    bare = write_report([_run(m, 1.0, 0) for m in curves], str(tmp_path / "bare"), n_resamples=50)
    assert "convergence" not in bare and "## Convergence" not in open(bare["md"]).read()


def test_auc_figure_has_a_linear_probe_panel(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from sparkct.eval.report import aggregate, auc_figure, plot_caption

    tuned = [_run(m, f, 0) for m in QUALITY for f in (1.0, 0.5)]
    probed = [_probe_and_history(_run(m, f, 0), True) for m in ("random", "spark") for f in (1.0, 0.5)]
    agg, probe = aggregate(tuned, n_resamples=50), aggregate(probed, n_resamples=50)
    caption = plot_caption(agg, tuned, probe=probe)
    assert caption.splitlines()[1].startswith("fine-tuning: ") and caption.splitlines()[2].startswith("linear probe: ")
    fig = auc_figure(agg, "t", caption, probe)
    a, b = fig.axes
    assert (a.get_title(), b.get_title()) == ("full fine-tuning", "linear probe (backbone frozen)")
    assert [len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) for ax in (a, b)] == [3, 2]
    # one colour per method in both panels
    colour = {ax: {c.get_label(): c.lines[0].get_color() for c in ax.containers} for ax in (a, b)}
    assert colour[a]["spark"] == colour[b]["spark"]
    fig.canvas.draw()
    assert b.get_legend().get_window_extent().x0 >= b.get_window_extent().x1 and a.get_legend() is None
    assert "simclr" in [t.get_text() for t in b.get_legend().get_texts()]  # only fine-tuned, still in the legend
    plt.close(fig)


def _agg(comps, base_auc=(0.74, 0.66, 0.81)):
    v, lo, hi = base_auc
    return {
        "baseline": "random",
        "cells": [
            {"method": "random", "fraction": 1.0, "auc": {"value": v, "low": lo, "high": hi}},
            {"method": "random", "fraction": 0.1, "auc": {"value": 0.6, "low": 0.5, "high": 0.7}},
        ],
        "comparisons": [
            {"method": m, "fraction": 0.1, "diff": d, "low": d - 0.05, "high": d + 0.05, "p_bootstrap": p}
            for m, d, p in comps
        ],
    }


def test_answer_says_what_the_paired_tests_and_intervals_show():
    from sparkct.eval.report import answer

    ref = {"name": "blob detector (no training)", "test": {"auc": {"value": 0.66, "low": 0.56, "high": 0.75}}}
    lines = answer({"finetune": _agg([("spark", 0.08, 0.01), ("moco", -0.07, 0.03), ("simclr", 0.01, 0.6)])}, ref)
    assert lines[0].startswith("random at 100 % (full fine-tuning): test AUC 0.740 [0.660, 0.810], above chance")
    at10 = lines[1]
    assert at10.startswith("At 10 % of the labelled patients (full fine-tuning): better than random")
    assert "better than random (paired bootstrap p < 0.05): spark (+0.080" in at10
    assert "worse than random (p < 0.05): moco (-0.070" in at10
    assert "no difference shown from random at p < 0.05: simclr (+0.010" in at10
    assert lines[2].startswith("The no-training reference (blob detector (no training)) reaches test AUC 0.660")
    # no difference at all, and a baseline whose CI includes 0.5: said as such, nothing claimed
    lines = answer({"finetune": _agg([("spark", 0.03, 0.2)], (0.55, 0.45, 0.65))})
    assert "not distinguishable from chance" in lines[0]
    assert "better" not in lines[1] and "no method differs from random at p < 0.05: spark" in lines[1]
    # the linear probe is summarized under its own name
    lines = answer({"linear": _agg([("spark", 0.1, 0.001)])})
    assert lines == [
        "At 10 % of the labelled patients (linear probe): better than random (paired bootstrap p < 0.05): "
        "spark (+0.100 [+0.050, +0.150], p 0.001)."
    ]
    # another fraction is named only where a method differs there
    agg = _agg([("spark", 0.02, 0.5)])
    agg["comparisons"].append(
        {"method": "spark", "fraction": 1.0, "diff": 0.077, "low": 0.037, "high": 0.121, "p_bootstrap": 0.002}
    )
    lines = answer({"finetune": agg})
    assert lines[1].startswith("At 10 % of the labelled patients (full fine-tuning): no method differs")
    assert lines[2].startswith("At 100 % of the labelled patients (full fine-tuning): better than random")
    agg["comparisons"][-1]["p_bootstrap"] = 0.3
    assert len(answer({"finetune": agg})) == 2
