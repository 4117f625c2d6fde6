"""The experiment's report from fine-tuning runs (method x labelled fraction x seed):

- ``results.md``: per method and fraction the test AUC (mean over seeds) with its 95 % bootstrap CI,
  the best per column in bold, then the paired comparison with the baseline (random init): the AUC
  difference with its paired-bootstrap CI and p-value, and DeLong's p where test units are
  independent (one per patient); the data, sizes, epochs and failed runs are stated above the tables;
- the same table and comparison for the linear probes (the backbone frozen throughout) where there are
  any, each method compared with the baseline's linear probe;
- ``auc_vs_fraction.png``: AUC against the labelled fraction, one line per method with its CI band (a
  second panel for the linear probes);
- ``convergence.png`` and the Convergence table of results.md: validation AUC against the fine-tuning
  step, and the steps each method needs to reach 95 % of the baseline's best validation AUC
  (:mod:`sparkct.eval.convergence`), where the fine-tuning runs recorded a validation history;
- ``robustness.png`` and a Robustness section of ``results.md``, where fine-tuning runs were tested under
  the fixed perturbations of :mod:`sparkct.eval.robustness`: per method the AUC under each, with the paired
  bootstrap against the baseline under the same perturbation; the no-training reference
  (:mod:`sparkct.eval.reference`), when given, is a line below the first AUC table, never a method;
- ``results.json``: every number (per run, per cell, per comparison), the configs, versions, timings;
- ``runs.csv``: one row per fine-tuning run (failed ones too).

All files are written atomically (sparkct.io). A run is the ``result.json`` that
:func:`sparkct.eval.finetune.finetune` writes with its ``predictions.npz``, or a ``failed.json``
({method, fraction, seed, error}) for a run that failed: it is reported as failed, never dropped.

The CI of a cell is that of the mean over seeds: every bootstrap resample of the (shared) test set
recomputes each seed's AUC and averages them, so it holds the test-set uncertainty of the seed-mean;
the seeds' standard deviation is reported beside it.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import platform
import time
from collections import defaultdict

import numpy as np

from sparkct import io as sio
from sparkct.errors import UserError
from sparkct.eval.config import PERTURBED_KEY
from sparkct.eval.convergence import convergence, convergence_figure
from sparkct.eval.figures import panel_legend, place_caption
from sparkct.eval.metrics import Models, bootstrap_ci, coverage_note, delong_test, paired_bootstrap

__all__ = [
    "collect_runs",
    "aggregate",
    "robustness_aggregate",
    "write_report",
    "run_protocol",
    "RUN_FIELDS",
    "PROTOCOL_NAMES",
]

#: how the report names each protocol (sparkct.eval.config.PROTOCOLS), in the order of its tables
PROTOCOL_NAMES = {"finetune": "full fine-tuning", "linear": "linear probe"}

RUN_FIELDS = (
    "method",
    "protocol",
    "fraction",
    "seed",
    "status",
    "auc",
    "auc_low",
    "auc_high",
    "accuracy",
    "balanced_accuracy",
    "f1",
    "precision",
    "recall",
    "test_units",
    "test_unit",
    "train_items",
    "train_patients",
    "best_val_auc",
    "tested_step",
    "effective_batch",
    "epochs",
    "train_seconds",
    "run_dir",
    "error",
)


def collect_runs(paths) -> list[dict]:
    """Every result.json / failed.json under `paths` (folders, searched recursively), with its folder
    as ``run_dir``."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    out = []
    for root in paths:
        if not os.path.isdir(root):
            raise UserError(f"not a folder: {root}")
        for dp, dirs, files in os.walk(root):
            dirs.sort()
            for name in ("result.json", "failed.json"):
                if name in files:
                    r = sio.read_json(os.path.join(dp, name))
                    r.setdefault("status", "done" if name == "result.json" else "failed")
                    r["run_dir"] = dp
                    out.append(r)
    if not out:
        raise UserError(f"no fine-tuning results (result.json) under {', '.join(paths)}")
    return out


def run_protocol(run: dict) -> str:
    """'linear' for a linear-probe run (result.json's and a run's settings' finetune.linear_probe; the
    experiment's failed.json names its protocol), else 'finetune'."""
    if run.get("protocol"):
        return run["protocol"]
    return "linear" if (run.get("finetune") or {}).get("linear_probe") else "finetune"


def _by_protocol(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs of each protocol present, in the order of PROTOCOL_NAMES."""
    out = {p: [r for r in runs if run_protocol(r) == p] for p in PROTOCOL_NAMES}
    return {p: rs for p, rs in out.items() if rs}


def _predictions(run: dict) -> dict | None:
    p = run.get("predictions")
    if p is not None:
        return p
    path = os.path.join(run.get("run_dir", ""), "predictions.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _row(run: dict) -> dict:
    row = {k: "" for k in RUN_FIELDS}
    row.update(
        method=run.get("method", "?"),
        protocol=run_protocol(run),
        fraction=run.get("fraction"),
        seed=run.get("seed"),
        status=run.get("status", "done"),
        run_dir=run.get("run_dir", ""),
        error=run.get("error", ""),
    )
    if row["status"] != "done":
        return row
    m = run["test"]["metrics"]
    row.update(
        auc=m["auc"]["value"],
        auc_low=m["auc"]["low"],
        auc_high=m["auc"]["high"],
        **{k: m[k]["value"] for k in ("accuracy", "balanced_accuracy", "f1", "precision", "recall")},
        test_units=run["test"].get("n_units"),
        test_unit=run["test"].get("unit"),
        train_items=run.get("task", {}).get("train", {}).get("items"),
        train_patients=run.get("task", {}).get("train", {}).get("patients"),
        best_val_auc=run.get("tested_checkpoint", {}).get("best_val_auc"),
        tested_step=run.get("tested_checkpoint", {}).get("step"),
        effective_batch=run.get("effective_batch"),
        epochs=run.get("train", {}).get("epochs"),
        train_seconds=run.get("seconds", {}).get("train"),
    )
    return row


def _same_test_set(preds: list[dict]) -> bool:
    a = preds[0]
    return all(
        len(p["labels"]) == len(a["labels"])
        and np.array_equal(p["labels"], a["labels"])
        and np.array_equal(p["patients"], a["patients"])
        for p in preds[1:]
    )


def aggregate(runs: list[dict], *, baseline: str = "random", n_resamples: int = 1000, seed: int = 0) -> dict:
    """Cells (method, fraction) -> mean AUC over seeds with its bootstrap CI, and paired comparisons
    of every method with `baseline` at each fraction (paired bootstrap; DeLong where the test units
    are one per patient)."""
    cells: dict = defaultdict(list)
    for r in runs:
        cells[(r.get("method", "?"), float(r.get("fraction", float("nan"))))].append(r)
    out_cells, preds_of = [], {}
    for (method, frac), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        done = [r for r in rs if r.get("status", "done") == "done"]
        failed = [r for r in rs if r.get("status", "done") != "done"]
        cell = {
            "method": method,
            "fraction": frac,
            "seeds": sorted(r.get("seed") for r in done),
            "failed_seeds": sorted(r.get("seed") for r in failed),
            "n_runs": len(rs),
        }
        aucs = [r["test"]["metrics"]["auc"]["value"] for r in done]
        cell["auc_per_seed"] = aucs
        cell["auc_seed_sd"] = float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None
        preds = [p for p in (_predictions(r) for r in done) if p is not None]
        if done and len(preds) == len(done) and _same_test_set(preds):
            ci = bootstrap_ci(
                preds[0]["labels"],
                Models([p["probabilities"] for p in preds]),
                groups=preds[0]["patients"],
                n_resamples=n_resamples,
                seed=seed,
            )
            cell["metrics"] = ci
            cell["auc"] = ci["auc"]
            preds_of[(method, frac)] = preds
        elif done:  # predictions missing or test sets differ: the seeds' mean, CI from the runs' own
            cell["auc"] = {
                "value": float(np.mean(aucs)),
                "low": float(np.mean([r["test"]["metrics"]["auc"]["low"] for r in done])),
                "high": float(np.mean([r["test"]["metrics"]["auc"]["high"] for r in done])),
                "note": "mean of per-run CIs (predictions not comparable across seeds)",
            }
        else:
            cell["auc"] = None
        out_cells.append(cell)

    comparisons = []
    for (method, frac), preds in sorted(preds_of.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        base = preds_of.get((baseline, frac))
        if method == baseline or base is None:
            continue
        if not _same_test_set([preds[0], base[0]]):
            comparisons.append(
                {"method": method, "fraction": frac, "baseline": baseline, "note": "different test sets: not compared"}
            )
            continue
        y, g = preds[0]["labels"], preds[0]["patients"]
        a, b = Models([p["probabilities"] for p in preds]), Models([p["probabilities"] for p in base])
        pb = paired_bootstrap(y, a, b, groups=g, n_resamples=n_resamples, seed=seed, metrics=["auc"])["auc"]
        comp = {
            "method": method,
            "fraction": frac,
            "baseline": baseline,
            "auc": pb["a"],
            "baseline_auc": pb["b"],
            "diff": pb["diff"],
            "low": pb["low"],
            "high": pb["high"],
            "p_bootstrap": pb["p"],
        }
        independent = len(np.unique(g)) == len(g)
        if independent:
            d = delong_test(y, a, b)
            comp.update(p_delong=d["p"], z_delong=d["z"])
        else:
            comp["p_delong"] = None
            comp["note"] = "DeLong not applicable: several test units per patient"
        comparisons.append(comp)
    return {"cells": out_cells, "comparisons": comparisons, "baseline": baseline, "n_resamples": n_resamples}


def _fmt(v, nd=3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def _pct(f: float) -> str:
    return f"{100 * f:g} %"


def _coverage_lines(runs: list[dict]) -> list[str]:
    """A note beside the intervals where the test set is small enough that 95 % intervals hold the
    true AUC less often than 95 % (simulated coverage, :func:`sparkct.eval.metrics.coverage_note`)."""
    sizes = {r["test"].get("n_patients") for r in runs if r.get("status", "done") == "done" and "test" in r}
    sizes.discard(None)
    note = coverage_note(min(sizes)) if sizes else None
    return [f"Coverage: {note}", ""] if note else []


def _markdown(aggs: dict[str, dict], runs: list[dict], meta: dict, conv: dict | None = None) -> str:
    """results.md: the header, per protocol (`aggs`: protocol -> aggregate) the AUC table and the paired
    comparison, the no-training reference (meta["reference"]) below the first table, the Convergence table
    (`conv`), the failed runs."""
    lines = ["# Fine-tuning results", ""]
    if meta.get("notice"):
        lines += [f"> **Warning:** {meta['notice']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta["lines"]]
    lines.append("")
    lines += _answer_lines(aggs, meta.get("reference"))
    footnote = True  # DeLong's footnote, once
    for i, (protocol, agg) in enumerate(aggs.items()):
        first = i == 0  # full fine-tuning's where it ran
        section = _auc_section(agg, runs if first else [], protocol, footnote, meta.get("reference") if first else None)
        footnote = footnote and "¹ DeLong's test" not in "\n".join(section)
        lines += section
    if conv and conv["rows"]:
        lines += _convergence_lines(conv, runs)
    failed = [r for r in runs if r.get("status", "done") != "done"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {_label(r)} at {_pct(float(r.get('fraction', float('nan'))))}, seed {r.get('seed')}: "
            f"{r.get('error', 'failed')}"
            for r in failed
        ]
        lines.append("")
    return "\n".join(lines)


#: the significance level of the plain-words summary (the paired bootstrap's two-sided p)
ALPHA = 0.05


def answer(aggs: dict[str, dict], reference: dict | None = None) -> list[str]:
    """What the run shows, in plain words, from the numbers of the tables: per protocol, at the smallest
    fraction, which methods differ from the baseline (paired bootstrap p < ALPHA, by the sign of the
    difference) and which do not; whether the baseline at the largest fraction is above chance (its CI's
    lower bound above 0.5); and the no-training reference beside it. Nothing here is decided by hand."""
    out = []
    for protocol, agg in aggs.items():
        base = agg["baseline"]
        name = PROTOCOL_NAMES.get(protocol, protocol)
        fracs = sorted({c["fraction"] for c in agg["cells"]})
        if not fracs:
            continue
        lo, hi = fracs[0], fracs[-1]
        cell = next((c for c in agg["cells"] if c["method"] == base and c["fraction"] == hi), None)
        if protocol == "finetune" and cell and cell.get("auc"):
            a = cell["auc"]
            where = "above chance" if a["low"] > 0.5 else "not distinguishable from chance"
            out.append(
                f"{base} at {_pct(hi)} ({name}): test AUC {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}], {where}."
            )

        def say(cs):
            return ", ".join(
                f"{c['method']} ({c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], p {c['p_bootstrap']:.3g})"
                for c in cs
            )

        # the smallest fraction, the question of the experiment, always; the others where a method differs
        for frac in [lo, *sorted((f for f in fracs if f != lo), reverse=True)]:
            comps = [c for c in agg["comparisons"] if c["fraction"] == frac and c.get("p_bootstrap") is not None]
            better = [c for c in comps if c["p_bootstrap"] < ALPHA and c["diff"] > 0]
            worse = [c for c in comps if c["p_bootstrap"] < ALPHA and c["diff"] < 0]
            same = [c for c in comps if c["p_bootstrap"] >= ALPHA]
            if not comps or (frac != lo and not better and not worse):
                continue
            parts = []
            if better:
                parts.append(f"better than {base} (paired bootstrap p < {ALPHA:g}): {say(better)}")
            if worse:
                parts.append(f"worse than {base} (p < {ALPHA:g}): {say(worse)}")
            if same:
                what = "no method differs" if not better and not worse else "no difference shown"
                parts.append(f"{what} from {base} at p < {ALPHA:g}: {say(same)}")
            out.append(f"At {_pct(frac)} of the labelled patients ({name}): " + "; ".join(parts) + ".")
    if reference and not reference.get("skipped") and "test" in reference:
        a = reference["test"]["auc"]
        out.append(
            f"The no-training reference ({reference.get('name', 'reference')}) reaches test AUC {a['value']:.3f} "
            f"[{a['low']:.3f}, {a['high']:.3f}]."
        )
    return out


def _answer_lines(aggs: dict[str, dict], reference: dict | None) -> list[str]:
    found = answer(aggs, reference)
    return ["## What this run shows", "", *[f"- {s}" for s in found], ""] if found else []


def _auc_section(
    agg: dict, runs: list[dict], protocol: str, footnote: bool, reference: dict | None = None
) -> list[str]:
    """One protocol's AUC table and paired comparison with the baseline of the same protocol; `runs`: for
    the coverage note (given to the first table only); `footnote`: whether DeLong's footnote is still to
    be written where a p is n/a; `reference`: the no-training reference, a line below the table (given to
    the first table only)."""
    cells = agg["cells"]
    methods = sorted({c["method"] for c in cells}, key=lambda m: (m != agg["baseline"], m))
    fracs = sorted({c["fraction"] for c in cells}, reverse=True)
    by = {(c["method"], c["fraction"]): c for c in cells}
    best = {}
    for f in fracs:
        vals = [(by[(m, f)]["auc"]["value"], m) for m in methods if (m, f) in by and by[(m, f)]["auc"]]
        if vals:
            best[f] = max(vals)[0]
    probe = protocol == "linear"
    ci = (
        f"mean over seeds, 95 % CI by bootstrap of the test set, {agg['n_resamples']} resamples, stratified by "
        "class, by patient"
    )
    lines = [
        f"## Linear probe: test AUC (the backbone frozen throughout; {ci})" if probe else f"## Test AUC ({ci})",
        "",
    ]
    lines.append("| method | " + " | ".join(_pct(f) for f in fracs) + " |")
    lines.append("|---|" + "---|" * len(fracs))
    for m in methods:
        row = []
        for f in fracs:
            c = by.get((m, f))
            if c is None:
                row.append("not run")
                continue
            a = c["auc"]
            if a is None:
                row.append("failed")
                continue
            txt = f"{_fmt(a['value'])} [{_fmt(a['low'])}, {_fmt(a['high'])}]"
            if f in best and a["value"] == best[f]:
                txt = f"**{txt}**"
            n = len(c["seeds"])
            txt += f" (n={n}{', ' + str(len(c['failed_seeds'])) + ' failed' if c['failed_seeds'] else ''})"
            row.append(txt)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Bold: the best mean AUC of the column. n: seeds that finished.", ""]
    lines += _reference_lines(reference)
    lines += _coverage_lines(runs)
    comps = [c for c in agg["comparisons"] if "diff" in c]
    if comps:
        lines += [
            f"## Linear probe: paired comparison with {agg['baseline']}'s linear probe (same test set)"
            if probe
            else f"## Paired comparison with {agg['baseline']} (same test set)",
            "",
            "| method | fraction | AUC − baseline [95 % CI] | p (paired bootstrap) | p (DeLong) |",
            "|---|---|---|---|---|",
        ]
        floor = 2 / (agg["n_resamples"] + 1)  # the smallest p the bootstrap can give
        for c in comps:
            pb = f"≤ {floor:.2g}" if c["p_bootstrap"] <= floor * (1 + 1e-9) else f"{c['p_bootstrap']:.3g}"
            pd = "n/a¹" if c.get("p_delong") is None else f"{c['p_delong']:.3g}"
            lines.append(
                f"| {c['method']} | {_pct(c['fraction'])} | "
                f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | {pb} | {pd} |"
            )
        lines.append("")
        if footnote and any(c.get("p_delong") is None for c in comps):
            lines += [
                "¹ DeLong's test treats the test units as independent; these test sets hold several units "
                "(slices or series) per patient, so only the paired bootstrap, which resamples whole patients, "
                "applies. One unit per patient (patient labels, or `sparkct finetune --aggregate patient`) "
                "gives DeLong's p.",
                "",
            ]
    elif agg["baseline"] not in methods:
        what = f"{agg['baseline']}'s linear probe" if probe else f"the baseline {agg['baseline']!r}"
        lines += [f"No paired comparison: {what} has no finished runs.", ""]
    return lines


def _convergence_lines(conv: dict, runs: list[dict]) -> list[str]:
    """The Convergence table: per method and fraction the steps to reach the target and the saving
    against the baseline (:func:`sparkct.eval.convergence.convergence`)."""
    base, share = conv["baseline"], f"{100 * conv['share']:g} %"
    rows = conv["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fracs = sorted({r["fraction"] for r in rows}, reverse=True)
    by = {(r["method"], r["fraction"]): r for r in rows}
    every = sorted(
        {(r.get("finetune") or {}).get("eval_every") for r in runs if run_protocol(r) == "finetune"} - {None}
    )
    when = f"every {', '.join(map(str, every))} step(s)" if every and every != [0] else "after every epoch"
    lines = [
        f"## Convergence (fine-tuning steps to reach {share} of {base}'s best validation AUC)",
        "",
        f"Target at each fraction: {share} of {base}'s best validation AUC there (the mean over its seeds of "
        f"each seed's best). Steps: the first validation at or above it (validated {when}), the mean over the "
        f"seeds that reached it (how many, where not all). Saving: 1 − steps / {base}'s steps. "
        "Curves: `convergence.png`.",
        "",
        "| method | " + " | ".join(_pct(f) for f in fracs) + " |",
        "|---|" + "---|" * len(fracs),
        "| target (val AUC) | "
        + " | ".join(_fmt(next((r["target"] for r in rows if r["fraction"] == f), None)) for f in fracs)
        + " |",
    ]
    for m in methods:
        cells = []
        for f in fracs:
            r = by.get((m, f))
            if r is None:
                cells.append("not run")
            elif r["target"] is None:
                cells.append(f"no {base} run")
            elif r["steps"] is None:
                cells.append("not reached")
            else:
                notes = [] if m == base or r["saving"] is None else [f"saving {100 * r['saving']:.0f} %"]
                if r["seeds_reached"] < len(r["seeds"]):
                    notes.append(f"{r['seeds_reached']} of {len(r['seeds'])} seeds")
                cells.append(f"{r['steps']:.0f}" + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def _refuse_duplicates(runs: list[dict]) -> None:
    """Two runs of one method, fraction and seed come from different settings (an experiment's runs are
    unique in these): averaged, they would pass for two seeds of one setup."""
    seen: dict[tuple, str] = {}
    for r in runs:
        k = (r.get("method"), float(r.get("fraction") or 0), r.get("seed"), run_protocol(r))
        if k in seen:
            raise UserError(
                f"two runs of {_label(r)} at {_pct(k[1])}, seed {k[2]}: {seen[k]} and {r.get('run_dir', '?')} "
                "(runs of different settings); report the runs of one setup (e.g. one experiment's current "
                "runs: sparkct experiment lists the others as stale)"
            )
        seen[k] = r.get("run_dir", "?")


def _label(run: dict) -> str:
    """The run's method, and its protocol where that is not full fine-tuning."""
    p = run_protocol(run)
    return str(run.get("method")) + ("" if p == "finetune" else f" ({PROTOCOL_NAMES.get(p, p)})")


def _stale_markdown(stale: list[dict]) -> str:
    """The runs left out because their settings differ from the experiment's: kept on disk, named here."""
    if not stale:
        return ""
    lines = [
        "## Stale runs (other settings: kept on disk, not in the tables above)",
        "",
        "A run counts only when its full settings (pretraining run, fine-tuning options, data, labels, split) "
        "hash to its folder's name; these were made with other settings:",
        "",
    ]
    for r in sorted(stale, key=lambda r: (str(r.get("method")), -float(r.get("fraction") or 0), str(r.get("seed")))):
        lines.append(
            f"- {_label(r)} at {_pct(float(r.get('fraction') or 0))}, seed {r.get('seed')} "
            f"(`{os.path.basename(r.get('run_dir', ''))}`, {r.get('status', 'done')}): {r.get('stale')}"
        )
    return "\n".join(lines) + "\n"


def _save_figure(make, path: str) -> None:
    """Draw `make()` (a matplotlib figure) with the Agg backend into the PNG `path`, atomically."""
    import matplotlib  # noqa: PLC0415 (lazy: optional dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    fig = make()
    with sio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def auc_figure(agg: dict, title: str, caption: str = "", probe: dict | None = None):
    """The figure of auc_vs_fraction.png: per method, markers with the CI as error bars, offset
    sideways so the methods' bars do not overlap (bands would merge into one mass); a chance line at
    0.5; the legend outside the axes; `caption` under them (data, test size, significance). `probe`: the
    linear probes' aggregate, drawn in a second panel on the same AUC axis, each method in its colour."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    panels = [(agg, "full fine-tuning")] + ([(probe, "linear probe (backbone frozen)")] if probe else [])
    cells_of = [[c for c in a["cells"] if c["auc"] is not None] for a, _ in panels]
    methods = sorted({c["method"] for cs in cells_of for c in cs}, key=lambda m: (m != agg["baseline"], m))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7.8 + 4.8 * (len(panels) - 1), 4.6), dpi=120, sharey=True, squeeze=False
    )
    for ax, (_, name), cells in zip(axes[0], panels, cells_of):
        fr = sorted({c["fraction"] for c in cells})
        # categorical x positions: the fractions are few and a log axis would squeeze the offsets unevenly
        pos = {f: i for i, f in enumerate(fr)}
        width = 0.7 / max(len(methods), 1)
        for i, m in enumerate(methods):
            cs = sorted((c for c in cells if c["method"] == m), key=lambda c: c["fraction"])
            if not cs:
                continue
            x = np.array([pos[c["fraction"]] for c in cs]) + (i - (len(methods) - 1) / 2) * width
            y = np.array([c["auc"]["value"] for c in cs])
            lo = np.array([c["auc"]["low"] for c in cs])
            hi = np.array([c["auc"]["high"] for c in cs])
            base = m == agg["baseline"]
            ax.errorbar(
                x,
                y,
                yerr=np.vstack([y - lo, hi - y]),
                fmt="s" if base else "o",
                color="black" if base else f"C{i}",
                ms=5,
                capsize=3,
                lw=1.2,
                label=f"{m} (baseline)" if base else m,
            )
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (AUC 0.5)")
        ax.set_xticks(range(len(fr)))
        ax.set_xticklabels([f"{100 * f:g}%" for f in fr])
        ax.set_xlim(-0.5, len(fr) - 0.5)
        ax.set_xlabel("labelled training data (fraction of patients)")
        ax.grid(axis="y", alpha=0.3)
        if probe:
            ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("test AUC (95 % CI)")
    if probe:
        fig.suptitle(title, fontsize=9)
    else:
        axes[0][0].set_title(title, fontsize=9)
    panel_legend(axes[0])
    place_caption(fig, caption)
    return fig


def plot_caption(agg: dict, runs: list[dict], data: str | None = None, probe: dict | None = None) -> str:
    """The caption of auc_vs_fraction.png: the data (`data`, else the task's source), the test size
    (patients, slices) and which differences from the baseline are significant by the paired
    bootstrap of results.md (p < 0.05), or that none is; with `probe` (the linear probes' aggregate),
    the same for the probes on a line of their own."""
    lines = [_data_line(runs, data)]
    for a, prefix in ((agg, "fine-tuning: " if probe else ""), (probe, "linear probe: ")):
        if a is not None:
            lines.append(prefix + _significance(a))
    return "\n".join(lines)


def _data_line(runs: list[dict], data: str | None) -> str:
    """The data (`data`, else the task's source) and the test size, for the figures' captions."""
    done = [r for r in runs if r.get("status", "done") == "done"]
    t = done[0].get("task", {}) if done else {}
    test = t.get("test", {})
    item = "slices" if t.get("kind") == "cache" else "images"
    return (
        f"data: {data or t.get('source', '?')}; test set: {test.get('patients', '?')} patients, "
        f"{test.get('items', '?')} {item}"
    )


def _significance(agg: dict) -> str:
    comps = [c for c in agg["comparisons"] if "diff" in c]
    sig = [c for c in comps if c["p_bootstrap"] < 0.05]
    if not comps:
        return f"no paired comparison with {agg['baseline']}"
    if sig:
        return f"significant vs {agg['baseline']} (paired bootstrap, p < 0.05): " + "; ".join(
            f"{c['method']} at {100 * c['fraction']:g}% ({c['diff']:+.3f})" for c in sig
        )
    return f"none of {len(comps)} differences vs {agg['baseline']} is significant (paired bootstrap, p < 0.05)"


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("sparkct", "torch", "torchvision", "numpy", "scipy", "sklearn", "matplotlib"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # a missing optional package is recorded as absent
            out[mod] = None
    return out


def _meta(runs: list[dict], extra: dict | None) -> dict:
    done = [r for r in runs if r.get("status", "done") == "done"]
    lines = []
    if done:
        t = done[0].get("task", {})
        lines.append(
            (
                "data",
                f"{t.get('source')} ({t.get('kind')}, labels per {t.get('level')}"
                f"{', ' + t['labels'] if t.get('labels') else ''})",
            )
        )
        lines.append(("classes", ", ".join(t.get("classes", []))))
        lines.append(
            (
                "split (patients)",
                f"train {t.get('full_train', {}).get('patients')}, val "
                f"{t.get('val', {}).get('patients')}, "
                f"test {t.get('test', {}).get('patients')} "
                f"(test items per class {t.get('test', {}).get('per_class')})",
            )
        )
        tr = done[0].get("train", {})
        lines.append(
            (
                "fine-tuning",
                f"{tr.get('arch')}, crop {tr.get('crop')}, "
                + (f"{tr['max_steps']} steps" if tr.get("max_steps") else f"{tr.get('epochs')} epochs")
                + ", batch "
                f"{tr.get('batch')}, optimizer {tr.get('optimizer') or 'adam'}, "
                "protocols " + ", ".join(PROTOCOL_NAMES[p] for p in _by_protocol(done)),
            )
        )
        units = {(r["test"].get("unit"), r["test"].get("n_units")) for r in done}
        lines.append(("test units", ", ".join(f"{n} {u}s" for u, n in sorted(units, key=str))))
    seeds = sorted({r.get("seed") for r in runs}, key=str)
    lines.append(("runs", f"{len(runs)} ({len(done)} finished, {len(runs) - len(done)} failed), seeds {seeds}"))
    for k, v in (extra or {}).items():
        lines.append((k, v))
    return {"lines": lines}


def write_report(
    runs: list[dict],
    out: str,
    *,
    baseline: str = "random",
    n_resamples: int = 1000,
    extra: dict | None = None,
    config: dict | None = None,
    stale: list[dict] | None = None,
    notice: str | None = None,
    reference: dict | None = None,
) -> dict[str, str]:
    """Write results.md, auc_vs_fraction.png, results.json and runs.csv into `out`, convergence.png where
    fine-tuning runs recorded a validation history, and robustness.png where fine-tuning runs were tested
    under the robustness perturbations; returns their paths. Each protocol (full fine-tuning, linear probe:
    :func:`run_protocol`) is aggregated and compared with its own baseline runs; results.json's cells and
    comparisons name their ``protocol``. `extra`: lines for the header (e.g. pretraining sizes); `config`:
    the experiment's config for results.json; `stale`: runs with other settings, listed (results.md,
    results.json), never aggregated; `notice`: a warning for the top of results.md; `reference`: the
    no-training reference (:func:`sparkct.eval.reference.blob_reference`), a line below the first AUC table."""
    if not runs:
        raise UserError("no runs to report")
    _refuse_duplicates(runs)
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    groups = _by_protocol(runs)
    aggs = {}
    for protocol, rs in groups.items():
        aggs[protocol] = aggregate(rs, baseline=baseline, n_resamples=n_resamples)
        for c in aggs[protocol]["cells"] + aggs[protocol]["comparisons"]:
            c["protocol"] = protocol
    conv = convergence(groups.get("finetune", []), baseline=baseline)
    meta = _meta(runs, extra)
    meta["notice"] = notice
    meta["reference"] = reference
    # robustness is a test of the fully fine-tuned models, against the baseline's fine-tuned runs
    rob = (
        robustness_aggregate(groups["finetune"], aggs["finetune"], n_resamples=n_resamples)
        if "finetune" in aggs
        else None
    )
    paths = {
        k: os.path.join(out, f)
        for k, f in (
            ("md", "results.md"),
            ("png", "auc_vs_fraction.png"),
            ("json", "results.json"),
            ("csv", "runs.csv"),
        )
    }
    if conv["rows"]:
        paths["convergence"] = os.path.join(out, "convergence.png")
    sio.write_text_atomic(
        paths["md"],
        _markdown(aggs, runs, meta, conv)
        + "\n"
        + _robustness_markdown(rob, n_resamples)
        + _stale_markdown(stale or []),
    )
    done = [r for r in runs if r.get("status", "done") == "done"]
    about = ""
    if done:
        about = f" · {done[0].get('train', {}).get('arch')} · {len({r.get('seed') for r in done})} seed(s)"
    data = (extra or {}).get("experiment data")
    builtin = isinstance(data, str) and data.startswith("built-in synthetic")
    data = "built-in synthetic chest CT" if builtin else None
    # the fine-tuning panel, and the linear probes' beside it (alone where only probes were run)
    agg, probe = (aggs["finetune"], aggs.get("linear")) if "finetune" in aggs else (aggs["linear"], None)
    title = "test AUC vs labelled fraction" + ("" if "finetune" in aggs else " · linear probe") + about
    caption = plot_caption(agg, runs, data, probe)
    _save_figure(lambda: auc_figure(agg, title, caption, probe), paths["png"])
    if conv["rows"]:
        conv_caption = _data_line(runs, data) + (
            f"\nmean over seeds (thin lines: each seed); dashed: {100 * conv['share']:g} % of {baseline}'s best "
            "validation AUC, the target of results.md's Convergence table"
        )
        _save_figure(
            lambda: convergence_figure(
                groups["finetune"], conv, "validation AUC vs fine-tuning step" + about, conv_caption
            ),
            paths["convergence"],
        )
    if rob is not None:
        paths["robustness"] = os.path.join(out, "robustness.png")
        rob_caption = _data_line(groups["finetune"], data) + (
            ", each perturbed in HU before windowing (fixed seed)\nthe unperturbed test at the level that "
            "changes nothing; CIs and paired tests in results.md"
        )
        _save_figure(
            lambda: robustness_figure(rob, "test AUC under perturbations of the test slices" + about, rob_caption),
            paths["robustness"],
        )
    rows = [_row(r) for r in runs]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RUN_FIELDS), lineterminator="\n")
    w.writeheader()
    order = list(PROTOCOL_NAMES)
    for row in sorted(
        rows, key=lambda r: (str(r["method"]), order.index(r["protocol"]), -float(r["fraction"] or 0), str(r["seed"]))
    ):
        w.writerow(row)
    sio.write_text_atomic(paths["csv"], buf.getvalue())
    slim = [{k: v for k, v in r.items() if k != "predictions"} for r in runs]
    sio.write_json_atomic(
        paths["json"],
        {
            "header": dict(meta["lines"]),
            "cells": [c for a in aggs.values() for c in a["cells"]],
            "comparisons": [c for a in aggs.values() for c in a["comparisons"]],
            "answer": answer(aggs, reference),
            "robustness": rob,
            "reference": reference,
            "baseline": baseline,
            "n_resamples": n_resamples,
            "runs": slim,
            "stale_runs": [
                {
                    **{k: r.get(k) for k in ("method", "fraction", "seed", "status", "run_dir", "stale")},
                    "protocol": run_protocol(r),
                }
                for r in stale or []
            ],
            "convergence": conv,
            "config": config or {},
            "versions": _versions(),
            "timings": {
                "fine_tuning_seconds": float(sum(r.get("seconds", {}).get("train") or 0 for r in done)),
                "report_seconds": round(time.perf_counter() - t0, 2),
            },
        },
    )
    return paths


# ------------------------------------------------------------------------------------------ robustness


def _robust_fractions(fracs: list[float]) -> list[float]:
    """The fractions the robustness section reports: the largest and the smallest (each a full table of
    perturbations with paired tests; the ones between add little and cost a bootstrap per cell)."""
    fr = sorted(set(fracs), reverse=True)
    return fr[:1] + fr[-1:] if len(fr) > 1 else fr


def robustness_aggregate(runs: list[dict], agg: dict, *, n_resamples: int = 1000, seed: int = 0) -> dict | None:
    """Per method, at the largest and smallest fraction, the test AUC under each robustness perturbation
    (mean over seeds with its patient-bootstrap CI, as the clean cells of `agg`) and its paired bootstrap
    against the baseline under the same perturbation; None where no run was tested for robustness.
    Perturbations are those every robustness-tested run holds, in their runs' order."""
    done = [r for r in runs if r.get("status", "done") == "done" and r.get("robustness")]
    if not done:
        return None
    held = [{d["name"] for d in r["robustness"]["perturbations"]} for r in done]
    defs = [
        {k: v for k, v in d.items() if k not in ("auc", "n_units", "n_patients")}
        for d in done[0]["robustness"]["perturbations"]
        if all(d["name"] in h for h in held)
    ]
    names = [d["name"] for d in defs]
    baseline = agg["baseline"]
    fracs = _robust_fractions([float(r["fraction"]) for r in done])
    clean = {(c["method"], c["fraction"]): c for c in agg["cells"]}
    comps = {(c["method"], c["fraction"]): c for c in agg["comparisons"] if "diff" in c}
    by: dict = defaultdict(list)
    for r in runs:
        if r.get("status", "done") == "done" and float(r["fraction"]) in fracs:
            by[(r.get("method", "?"), float(r["fraction"]))].append(r)
    preds_of = {}
    for key, rs in by.items():
        preds = [_predictions(r) for r in rs]
        keys = [PERTURBED_KEY + n for n in names]
        if all(p is not None and all(k in p for k in keys) for p in preds) and _same_test_set(preds):
            preds_of[key] = preds
    cells = []
    for (method, frac), preds in sorted(preds_of.items(), key=lambda kv: (kv[0][0] != baseline, kv[0][0], -kv[0][1])):
        y, g = preds[0]["labels"], preds[0]["patients"]
        base = preds_of.get((baseline, frac))
        paired = method != baseline and base is not None and _same_test_set([preds[0], base[0]])
        cl = clean.get((method, frac), {})
        comp = comps.get((method, frac))
        cell = {
            "method": method,
            "fraction": frac,
            "seeds": sorted(r.get("seed") for r in by[(method, frac)]),
            "clean": {
                "auc": cl.get("auc"),
                **({"diff": comp["diff"], "p": comp["p_bootstrap"]} if comp else {}),
            },
            "perturbed": {},
        }
        for n in names:
            probs = Models([p[PERTURBED_KEY + n] for p in preds])
            a = bootstrap_ci(y, probs, groups=g, n_resamples=n_resamples, seed=seed, metrics=("auc",))["auc"]
            entry = {"auc": {k: a[k] for k in ("value", "low", "high")}}
            if paired:
                b = Models([p[PERTURBED_KEY + n] for p in base])
                pb = paired_bootstrap(y, probs, b, groups=g, n_resamples=n_resamples, seed=seed, metrics=["auc"])
                entry.update(diff=pb["auc"]["diff"], low=pb["auc"]["low"], high=pb["auc"]["high"], p=pb["auc"]["p"])
            cell["perturbed"][n] = entry
        cells.append(cell)
    return {
        "perturbations": defs,
        "noise_seed": done[0]["robustness"].get("noise_seed"),
        "fractions": fracs,
        "baseline": baseline,
        "cells": cells,
    }


def _p_text(p: float, n_resamples: int) -> str:
    floor = 2 / (n_resamples + 1)  # the smallest p the bootstrap can give
    return f"≤ {floor:.2g}" if p <= floor * (1 + 1e-9) else f"{p:.2g}"


def _robustness_markdown(rob: dict | None, n_resamples: int) -> str:
    if not rob:
        return ""
    defs = rob["perturbations"]
    what = ", ".join(d["label"] for d in defs)
    lines = [
        "## Robustness: test AUC under fixed perturbations of the test slices",
        "",
        f"Every test slice perturbed in HU before windowing and resizing ({what}; noise per pixel of the model's "
        f"input, from fixed seed {rob['noise_seed']}): each method and seed is tested on the same perturbed slices "
        "(sparkct.eval.robustness). Cells: mean test AUC over seeds [95 % CI, patient bootstrap]; p: paired "
        f"bootstrap against {rob['baseline']} under the same perturbation.",
        "",
    ]
    for f in rob["fractions"]:
        cells = [c for c in rob["cells"] if c["fraction"] == f]
        if not cells:
            continue
        lines += [f"### {_pct(f)} of the labelled training patients", ""]
        lines.append("| method | clean | " + " | ".join(d["label"] for d in defs) + " |")
        lines.append("|---|---|" + "---|" * len(defs))
        for c in cells:
            row = []
            for e in [c["clean"], *(c["perturbed"][d["name"]] for d in defs)]:
                a = e.get("auc")
                txt = "–" if a is None else f"{_fmt(a['value'])} [{_fmt(a['low'])}, {_fmt(a['high'])}]"
                if "p" in e:
                    txt += f" (p {_p_text(e['p'], n_resamples)})"
                row.append(txt)
            lines.append(f"| {c['method']} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def robustness_figure(rob: dict, title: str, caption: str = ""):
    """The figure of robustness.png: one panel per kind of perturbation, test AUC (mean over seeds)
    against its level (the clean test at the level that changes nothing), a line per method, solid at
    the largest fraction and dashed at the smallest; a chance line at 0.5; `caption` under the panels."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: optional dependency)

    kinds: dict = {}
    for d in rob["perturbations"]:
        kinds.setdefault(d["kind"], []).append(d)
    methods = sorted({c["method"] for c in rob["cells"]}, key=lambda m: (m != rob["baseline"], m))
    fig, axs = plt.subplots(1, len(kinds), figsize=(2.6 * len(kinds) + 1.6, 3.6), dpi=120, sharey=True, squeeze=False)
    styles = dict(zip(rob["fractions"], ("-", "--")))
    for ax, ds in zip(axs[0], kinds.values()):
        for i, m in enumerate(methods):
            for f, ls in styles.items():
                c = next((c for c in rob["cells"] if c["method"] == m and c["fraction"] == f), None)
                if c is None:
                    continue
                pts = [(d["level"], c["perturbed"][d["name"]]["auc"]["value"]) for d in ds]
                if c["clean"].get("auc"):
                    pts.append((ds[0]["identity_level"], c["clean"]["auc"]["value"]))
                x, y = zip(*sorted(pts))
                base = m == rob["baseline"]
                ax.plot(
                    x,
                    y,
                    ls=ls,
                    marker="s" if base else "o",
                    ms=4,
                    lw=1.2,
                    color="black" if base else f"C{i}",
                    label=(f"{m} (baseline)" if base else m) if f == rob["fractions"][0] else None,
                )
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (AUC 0.5)" if ax is axs[0][0] else None)
        ax.axvline(ds[0]["identity_level"], color="grey", lw=0.6, alpha=0.5)
        ax.set_title(ds[0]["kind_label"], fontsize=9)
        ax.set_xlabel(ds[0]["unit"], fontsize=8)
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel("test AUC (mean over seeds)")
    handles, labels = axs[0][0].get_legend_handles_labels()
    for f, ls in styles.items():
        handles.append(plt.Line2D([], [], color="grey", ls=ls))
        labels.append(f"{100 * f:g}% labelled")
    fig.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(title, fontsize=9)
    place_caption(fig, caption, bottom=0.06, per_line=0.04)
    return fig


def _reference_lines(ref: dict | None) -> list[str]:
    """The no-training reference (sparkct.eval.reference) below the AUC table: its validation and test
    AUC, never a method of the table or of the paired tests."""
    if not ref:
        return []
    if "test" not in ref:
        return [f"Reference without training, {ref.get('name')}: not computed ({ref.get('skipped', '?')}).", ""]

    def auc(split):
        a = ref[split]["auc"]
        return f"{_fmt(a['value'])} [{_fmt(a['low'])}, {_fmt(a['high'])}]"

    t = ref["test"]
    return [
        f"Reference without training, **{ref['name']}**: test AUC {auc('test')}, validation AUC {auc('val')} "
        f"({t['n_units']} test {t['unit']}s of {t['n_patients']} patients): each slice scored by its strongest "
        f"scale-normalised Laplacian-of-Gaussian blob response inside a lung mask, on {ref['input']}, sigmas "
        f"{', '.join(f'{v:g}' for v in ref['sigmas_px'])} px for nodules of "
        f"{ref['diameters_mm'][0]:g}-{ref['diameters_mm'][1]:g} mm at {ref['pixel_mm']:g} mm per pixel "
        f"({ref['pixel_size']}). A check on the task's difficulty, not a method: not in the paired tests.",
        "",
    ]


def load_results(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
