"""sparkct.eval.report: the robustness section and robustness.png from runs tested under the robustness
perturbations, and the no-training reference's line; results.json holds both."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sparkct.eval.config import PERTURBED_KEY
from sparkct.eval.metrics import bootstrap_ci
from sparkct.eval.report import write_report
from sparkct.eval.robustness import PERTURBATIONS

QUALITY = {"random": 0.8, "spark": 2.0}
N = 60


def _probs(rng, y, q):
    z = rng.normal(size=len(y)) + q * (2 * y - 1)
    p1 = 1 / (1 + np.exp(-z))
    return np.stack([1 - p1, p1], 1)


def _run(method, fraction, seed, robust=True):
    """A finished run; under noise_40 spark's predictions carry no signal."""
    rng = np.random.default_rng([list(QUALITY).index(method), int(fraction * 100), seed])
    y, patients = np.arange(N) % 2, np.arange(N)
    prob = _probs(rng, y, QUALITY[method] * fraction)
    preds = {"probabilities": prob, "labels": y, "patients": patients}
    summary = []
    for p in PERTURBATIONS if robust else ():
        q = 0.0 if (method, p.name) == ("spark", "noise_40") else QUALITY[method] * fraction * 0.8
        preds[PERTURBED_KEY + p.name] = pp = _probs(rng, y, q)
        a = bootstrap_ci(y, pp, groups=patients, n_resamples=50, metrics=("auc",))["auc"]
        summary.append({**p.describe(), "auc": a, "n_units": N, "n_patients": N})
    from test_report import finished_run

    run = finished_run(method, fraction, seed, y, patients, prob, n_resamples=50)
    run["task"]["test"]["items"] = N
    run["predictions"] = preds
    if robust:
        run["robustness"] = {"noise_seed": 7, "perturbations": summary}
    return run


REFERENCE = {
    "name": "blob detector (no training)",
    "input": "the slice resized to the crop (64 px) in HU",
    "pixel_mm": 5.4,
    "pixel_size": "median of the cache's pixel spacing",
    "diameters_mm": [20.0, 30.0],
    "sigmas_px": [1.3, 1.95],
    "val": {"auc": {"value": 0.81, "low": 0.7, "high": 0.9}, "unit": "slice", "n_units": 300, "n_patients": 18},
    "test": {"auc": {"value": 0.66, "low": 0.55, "high": 0.77}, "unit": "slice", "n_units": 310, "n_patients": 18},
}


def test_robustness_section_figure_and_json(tmp_path):
    from PIL import Image

    runs = [_run(m, f, s) for m in QUALITY for f in (1.0, 0.5, 0.1) for s in (0, 1)]
    paths = write_report(runs, str(tmp_path / "rep"), n_resamples=100, reference=REFERENCE)
    md = open(paths["md"]).read()
    sec = md.split("## Robustness")[1]
    # the largest and the smallest fraction, a row per method, a column per perturbation after the clean one
    assert "### 100 % of the labelled" in sec and "### 10 % of the labelled" in sec and "### 50 %" not in sec
    header = "| method | clean | " + " | ".join(p.label for p in PERTURBATIONS) + " |"
    assert sec.count(header) == 2
    rows = [ln for ln in sec.splitlines() if ln.startswith("| random") or ln.startswith("| spark")]
    assert len(rows) == 4 and all(ln.count("|") == len(PERTURBATIONS) + 3 for ln in rows)
    assert all("(p " in ln for ln in rows if ln.startswith("| spark"))  # paired against random
    assert not any("(p " in ln for ln in rows if ln.startswith("| random"))
    res = json.load(open(paths["json"]))
    rob = res["robustness"]
    assert [d["name"] for d in rob["perturbations"]] == [p.name for p in PERTURBATIONS]
    assert rob["fractions"] == [1.0, 0.1] and rob["baseline"] == "random"
    cell = next(c for c in rob["cells"] if c["method"] == "spark" and c["fraction"] == 1.0)
    # the cell is the mean over seeds of the AUC of the stored perturbed probabilities
    mine = [r for r in runs if r["method"] == "spark" and r["fraction"] == 1.0]
    for name in ("noise_40", "zoom_0.85"):
        want = np.mean(
            [roc_auc_score(r["predictions"]["labels"], r["predictions"][PERTURBED_KEY + name][:, 1]) for r in mine]
        )
        e = cell["perturbed"][name]
        assert e["auc"]["value"] == pytest.approx(want) and e["auc"]["low"] <= want <= e["auc"]["high"]
    assert cell["perturbed"]["noise_40"]["auc"]["value"] < 0.7 < cell["perturbed"]["zoom_0.85"]["auc"]["value"]
    assert cell["perturbed"]["noise_40"]["diff"] < 0 and cell["perturbed"]["zoom_0.85"]["p"] < 0.05
    # the clean column is the main table's cell
    main = next(c for c in res["cells"] if c["method"] == "spark" and c["fraction"] == 1.0)
    assert cell["clean"]["auc"] == main["auc"]
    with Image.open(paths["robustness"]) as im:
        assert im.format == "PNG" and im.size[0] > 800
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    # the reference: its own line with validation and test AUC, not a method of the tables
    line = next(ln for ln in md.splitlines() if ln.startswith("Reference without training"))
    assert "**blob detector (no training)**: test AUC 0.660 [0.550, 0.770], validation AUC 0.810 [0.700, 0.900]" in line
    assert "| blob" not in md and res["reference"] == REFERENCE


def test_runs_without_robustness_give_no_section_and_a_skipped_reference_says_why(tmp_path):
    runs = [_run(m, 1.0, 0, robust=False) for m in QUALITY]
    skipped = {"name": REFERENCE["name"], "skipped": "it scores nodules in HU: needs two classes of CT, not npz"}
    paths = write_report(runs, str(tmp_path / "rep"), n_resamples=50, reference=skipped)
    md = open(paths["md"]).read()
    assert "## Robustness" not in md and "robustness" not in paths
    assert "blob detector (no training): not computed (it scores nodules in HU" in md
    assert json.load(open(paths["json"]))["robustness"] is None
