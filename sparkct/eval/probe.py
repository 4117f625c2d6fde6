"""Embedding bias probes: what DICOM metadata a frozen backbone's slice embeddings give away.

The bias check of the chest-CT pretext-task study (Tariq et al., J. Med. Imaging 2024): embed CT slices
with a pretrained backbone, frozen, and fit linear probes predicting metadata the images were never
labelled with -- patient sex, age band, scanner manufacturer, reconstruction kernel, tube voltage (kVp).
A probe well above chance says the embedding encodes the attribute, so a classifier fine-tuned on it can
use it as a shortcut. Run it on ``--init random`` too: part of what a probe finds is in the pixels
themselves (body size differs by sex; noise and sharpness by kernel and kVp), not learnt.

- Values come from the cache's series records (``SliceCache.series``: ``patient_sex``, ``age_years``,
  ``manufacturer``, ``kernel``, ``kvp``); every slice of a series gets its series' value. Missing values
  (empty, NaN) leave the slice out of that target.
- Age bands: < 40, 40-59, 60-79, >= 80 years (decades split the few patients of a small cache into
  classes too small to test; these four are the usual adult bands).
- Patients are split once (``sparkct.data.patient_split``, by salted pseudonym), so no patient is in both
  the probe's training and test slices; every target uses the same split.
- The probe: scikit-learn's LogisticRegression (L2, C = 1, classes weighted by inverse frequency, so a
  rare class is not ignored) on standardized features.
- Metrics on the test slices: AUC (one-vs-rest macro for > 2 classes), balanced accuracy, accuracy, with
  95 % bootstrap CIs resampling test patients stratified by class (``sparkct.eval.metrics.bootstrap_ci``),
  each beside its chance level: AUC 0.5, balanced accuracy 1/K, and the accuracy of always answering the
  training set's most common class. "above chance" means the AUC's lower bound exceeds 0.5.
- A class needs a training patient and two test patients (the bootstrap resamples patients per class);
  classes short of that are left out and named. A target with no values, a single value, or fewer than
  two testable classes is reported as skipped, with the reason.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sparkct import io as sio
from sparkct.data import CTResize, CTSliceDataset, SliceLoader, patient_split
from sparkct.data.windows import resolve_windows
from sparkct.device import resolve_device
from sparkct.errors import UserError
from sparkct.eval.config import PROBE_TARGETS as TARGETS  # one list for the module and the CLI parser
from sparkct.eval.finetune import init_name, resolve_init
from sparkct.eval.metrics import bootstrap_ci
from sparkct.models.backbone import build_backbone

__all__ = [
    "TARGETS",
    "AGE_BANDS",
    "parse_targets",
    "metadata_values",
    "probe_target",
    "embed",
    "run_probe",
    "render_markdown",
]

#: (lower bound inclusive, upper bound exclusive, name)
AGE_BANDS = ((0.0, 40.0, "<40"), (40.0, 60.0, "40-59"), (60.0, 80.0, "60-79"), (80.0, math.inf, ">=80"))
_FIELD = {
    "sex": "patient_sex",
    "age_band": "age_years",
    "manufacturer": "manufacturer",
    "kernel": "kernel",
    "kvp": "kvp",
}
METRICS = ("auc", "balanced_accuracy", "accuracy")


def parse_targets(spec) -> list[str]:
    """Target names from a comma-separated string or a list; unknown names raise UserError."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if str(t).strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise UserError(f"--targets: unknown {bad or 'none given'}; choose from {', '.join(TARGETS)}")
    return list(dict.fromkeys(names))


def _age_band(years: float) -> str:
    if not np.isfinite(years) or years < 0:
        return ""
    return next(name for lo, hi, name in AGE_BANDS if lo <= years < hi)


def metadata_values(cache, target: str, slices=None) -> np.ndarray:
    """The target's value (a string; '' where missing) of each cache slice in `slices` (default all)."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    field = _FIELD[target]
    if field not in cache.series:
        return np.full(len(cache) if slices is None else len(slices), "", dtype=object)
    raw = cache.series[field]
    if target == "age_band":
        per_series = np.array([_age_band(float(v)) for v in raw], dtype=object)
    elif target == "kvp":
        per_series = np.array([f"{float(v):g}" if np.isfinite(v) else "" for v in raw], dtype=object)
    else:
        per_series = np.array([str(v).strip() for v in raw], dtype=object)
    ser = cache.slice_series if slices is None else cache.slice_series[np.asarray(slices, dtype=np.int64)]
    return per_series[ser]


def _ordered(classes) -> list[str]:
    """Classes in a reader's order: numbers by value (kVp), age bands youngest first, else by name."""
    bands = [name for _, _, name in AGE_BANDS]
    classes = list(classes)
    if all(c in bands for c in classes):
        return sorted(classes, key=bands.index)
    try:
        return sorted(classes, key=float)
    except ValueError:
        return sorted(classes)


def _skip(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def probe_target(
    features,
    values,
    patients,
    train,
    test,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_test_patients: int = 2,
) -> dict:
    """Fit a linear probe on the `train` rows and test it on the `test` rows (index arrays).

    features (N, D); values (N,) class names ('' = missing); patients (N,) patient ids (bootstrap
    groups). Returns {"status": "done", "classes", "metrics": {name: {value, low, high, se}}, "chance",
    "above_chance", counts, "dropped_classes"} or {"status": "skipped", "reason"}."""
    X = np.asarray(features, dtype=np.float64)
    v = np.asarray(values, dtype=object)
    pat = np.asarray(patients)
    train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
    if not (len(X) == len(v) == len(pat)):
        raise ValueError(f"{len(X)} feature rows, {len(v)} values, {len(pat)} patients")
    present = v != ""
    if not present.any():
        return _skip("no values in the cache's series records")
    uniq = _ordered(set(v[present].tolist()))
    if len(uniq) < 2:
        return _skip(f"a single value ({uniq[0]!r}) in every series that has one")
    train, test = train[present[train]], test[present[test]]
    dropped: dict = {}
    keep = list(uniq)
    while True:
        # the bootstrap resamples test patients within strata (a patient's stratum is its largest class,
        # e.g. two series at 100 and 120 kVp count as 120): a class needs a training patient and
        # `min_test_patients` test patients of its stratum; leaving one out can empty another, so repeat
        tr, te = train[np.isin(v[train], keep)], test[np.isin(v[test], keep)]
        rank = {c: i for i, c in enumerate(keep)}
        top: dict = {}
        for p_, c in zip(pat[te].tolist(), v[te].tolist()):
            top[p_] = max(top.get(p_, -1), rank[c])
        short = {}
        for i, c in enumerate(keep):
            n_tr = len(np.unique(pat[tr][v[tr] == c]))
            n_te = sum(1 for r in top.values() if r == i)
            if n_tr < 1 or n_te < min_test_patients:
                short[c] = {"train_patients": n_tr, "test_patients": n_te}
        if not short:
            break
        dropped.update(short)
        keep = [c for c in keep if c not in short]
        if len(keep) < 2:
            break
    if len(keep) < 2:
        counts = "; ".join(
            f"{c}: {d['train_patients']} train / {d['test_patients']} test patients" for c, d in dropped.items()
        )
        return _skip(
            f"fewer than 2 classes with a training patient and {min_test_patients} test patients ({counts})",
            dropped_classes=dropped,
        )
    idx = {c: i for i, c in enumerate(keep)}
    train = train[np.isin(v[train], keep)]
    test = test[np.isin(v[test], keep)]
    y_tr = np.array([idx[c] for c in v[train]], dtype=np.int64)
    y_te = np.array([idx[c] for c in v[test]], dtype=np.int64)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    clf.fit(X[train], y_tr)
    prob = np.zeros((len(test), len(keep)))
    prob[:, clf.classes_] = clf.predict_proba(X[test])
    try:
        ci = bootstrap_ci(
            y_te, prob, groups=pat[test], n_resamples=n_resamples, seed=seed, confidence=confidence, metrics=METRICS
        )
    except UserError as e:
        return _skip(f"no confidence interval: {e}", dropped_classes=dropped)
    majority = int(np.bincount(y_tr, minlength=len(keep)).argmax())
    chance = {
        "auc": 0.5,
        "balanced_accuracy": 1.0 / len(keep),
        "accuracy": float(np.mean(y_te == majority)),
        "majority_class": keep[majority],
    }
    return {
        "status": "done",
        "classes": keep,
        "metrics": ci,
        "chance": chance,
        "above_chance": bool(ci["auc"]["low"] > 0.5),
        "n_train": {"slices": int(len(train)), "patients": int(len(np.unique(pat[train])))},
        "n_test": {"slices": int(len(test)), "patients": int(len(np.unique(pat[test])))},
        "per_class_test_slices": {c: int(n) for c, n in zip(keep, np.bincount(y_te, minlength=len(keep)))},
        "dropped_classes": dropped,
    }


def embed(backbone, dataset, *, crop: int, windows, batch: int = 128, device="cpu") -> np.ndarray:
    """(N, D) float32 embeddings of every item of `dataset`, in order: the whole slice resized to `crop`
    and windowed (the fine-tuning evaluation transform), the backbone in eval mode without gradients."""
    dev = torch.device(device)
    backbone.to(dev).eval()
    loader = SliceLoader(
        dataset,
        batch,
        shuffle=False,
        drop_last=False,
        transform=CTResize(crop, windows=windows),
        device=dev,
        tune_malloc=False,
    )
    out = []
    with torch.no_grad():
        for x in loader:
            out.append(backbone(x.to(dev)).float().flatten(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _run_settings(init: str) -> dict:
    """The pretraining run's training settings (arch, windows, crop), when --init is a run folder."""
    path = os.path.join(init, "config.json") if init and os.path.isdir(init) else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("train", {}) or {}
    return {}


def run_probe(
    init: str,
    data: str,
    *,
    targets=TARGETS,
    out: str = "runs/probe",
    arch: str = "resnet18",
    windows: str | None = None,
    crop: int | None = None,
    split=(0.7, 0.3),
    split_seed: int = 0,
    max_slices: int = 20000,
    n_resamples: int = 1000,
    seed: int = 0,
    batch: int = 128,
    device: str = "auto",
    log=print,
) -> dict:
    """Embed the slices of the cache `data` with the frozen backbone `init` (random, a state_dict file or a
    pretraining run folder), probe each target, write probe.json and probe.md into `out`; return the
    result. windows / crop default to the run's (or lung,mediastinum,bone / 224)."""
    targets = parse_targets(targets)
    t0 = time.perf_counter()
    if max_slices < 2 or n_resamples < 1 or batch < 1:
        raise UserError(
            f"need --max-slices >= 2, --resamples >= 1, --batch >= 1 (got {max_slices}, {n_resamples}, {batch})"
        )
    fr = tuple(float(f) for f in split)
    if len(fr) != 2 or min(fr) <= 0:
        raise UserError(f"--split: two positive fractions (train,test), got {split}")
    weights, arch, kind = resolve_init(init, arch)
    run = _run_settings(init)
    windows = windows or run.get("windows") or "lung,mediastinum,bone"
    crop = int(crop or run.get("crop") or 224)
    try:
        win = resolve_windows(windows)
    except (ValueError, KeyError) as e:
        raise UserError(f"--windows {windows!r}: {e}") from None
    if crop < 32 or crop % 32:
        raise UserError(f"--crop must be a positive multiple of 32, got {crop}")
    dev = resolve_device(device)
    if not os.path.exists(data):
        raise UserError(f"--data {data}: no such file or folder")
    if not os.path.isfile(os.path.join(data, "cache.json")):
        raise UserError(
            f"--data {data}: not a prepared cache (the probe reads the DICOM metadata of the cache's "
            f"series records; make one with `sparkct data prepare SRC DST`)"
        )

    ds = CTSliceDataset(data, windows=None)
    n_all = len(ds)
    if n_all > max_slices:  # evenly over the cache, reproducibly
        keep = np.sort(np.random.default_rng([split_seed, 0x9B0BE]).choice(n_all, max_slices, replace=False))
        ds = ds.subset(keep)
    parts = patient_split(ds, fr, seed=split_seed, names=("train", "test"))
    pat = np.asarray(ds.patients)
    torch.manual_seed(seed)
    backbone, _ = build_backbone(arch, in_chans=len(win), weights=weights, img_size=crop)
    src = "random init" if kind == "random" else f"{kind} {init}"
    log(
        f"probe: embedding {len(ds)} slices of {len(np.unique(pat))} patients with the frozen {arch} ({src}) at "
        f"{crop}x{crop}, windows {windows}"
    )
    t_embed = time.perf_counter()
    feats = embed(backbone, ds, crop=crop, windows=win, batch=batch, device=dev)
    t_embed = time.perf_counter() - t_embed
    results = {}
    for t in targets:
        values = metadata_values(ds.cache, t, ds.indices)
        r = probe_target(feats, values, pat, parts["train"], parts["test"], n_resamples=n_resamples, seed=seed)
        results[t] = r
        if r["status"] == "done":
            m = r["metrics"]["auc"]
            log(
                f"  {t}: AUC {m['value']:.3f} (95% CI {m['low']:.3f}-{m['high']:.3f}; chance 0.5), "
                f"{len(r['classes'])} classes, {r['n_test']['patients']} test patients"
            )
        else:
            log(f"  {t}: skipped ({r['reason']})")
    result = {
        "init": {
            "kind": kind,
            "source": None if kind == "random" else os.path.abspath(init),
            "weights": weights,
            "name": init_name(init),
            "arch": arch,
        },
        "data": os.path.abspath(data),
        "slices": int(len(ds)),
        "slices_in_cache": int(n_all),
        "patients": int(len(np.unique(pat))),
        "feature_dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
        "split": {
            "fractions": list(fr),
            "seed": split_seed,
            "train_patients": int(len(np.unique(pat[parts["train"]]))),
            "test_patients": int(len(np.unique(pat[parts["test"]]))),
        },
        "settings": {
            "crop": crop,
            "windows": windows,
            "max_slices": max_slices,
            "n_resamples": n_resamples,
            "confidence": 0.95,
            "seed": seed,
            "device": str(dev),
            "probe": "StandardScaler + LogisticRegression(C=1, class_weight='balanced')",
            "age_bands": [name for _, _, name in AGE_BANDS],
        },
        "targets": results,
        "seconds": {"embed": round(t_embed, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    os.makedirs(out, exist_ok=True)
    sio.write_json_atomic(os.path.join(out, "probe.json"), result)
    sio.write_text_atomic(os.path.join(out, "probe.md"), render_markdown(result))
    log(f"wrote {os.path.join(out, 'probe.md')} and probe.json")
    return result


def _ci(m: dict) -> str:
    return f"{m['value']:.3f} ({m['low']:.3f}-{m['high']:.3f})"


def render_markdown(result: dict) -> str:
    init = result["init"]
    lines = [
        f"# Embedding bias probes: {init['name']}",
        "",
        f"Frozen {init['arch']} backbone ({init['kind']}{': ' + init['source'] if init['source'] else ''}); "
        f"{result['slices']} slices of {result['patients']} patients from {result['data']} "
        f"({result['split']['train_patients']} patients to fit the probes, {result['split']['test_patients']} to "
        f"test them; no patient in both). Linear probe: {result['settings']['probe']} on the "
        f"{result['feature_dim']}-d embeddings of whole slices ({result['settings']['crop']} px, windows "
        f"{result['settings']['windows']}). 95 % CIs: bootstrap over test patients, stratified by class, "
        f"{result['settings']['n_resamples']} resamples. Age bands: {', '.join(result['settings']['age_bands'])} "
        "years.",
        "",
        "| target | classes | test slices (patients) | AUC (95 % CI) | chance | balanced acc. (95 % CI) | chance "
        "| accuracy (95 % CI) | majority class | above chance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for name, r in result["targets"].items():
        if r["status"] != "done":
            skipped.append(f"- {name}: {r['reason']}")
            continue
        m, c = r["metrics"], r["chance"]
        lines.append(
            f"| {name} | {', '.join(map(str, r['classes']))} | {r['n_test']['slices']} ({r['n_test']['patients']}) "
            f"| {_ci(m['auc'])} | 0.5 | {_ci(m['balanced_accuracy'])} | {c['balanced_accuracy']:.3f} "
            f"| {_ci(m['accuracy'])} | {c['accuracy']:.3f} ({c['majority_class']}) "
            f"| {'yes' if r['above_chance'] else 'no'} |"
        )
        if r.get("dropped_classes"):
            skipped.append(
                f"- {name}: classes left out (too few patients in train or test): "
                + ", ".join(
                    f"{k} ({v['train_patients']} train / {v['test_patients']} test patients)"
                    for k, v in r["dropped_classes"].items()
                )
            )
    if not any(r["status"] == "done" for r in result["targets"].values()):
        lines.append("| (no target could be probed: see below) |  |  |  |  |  |  |  |  |  |")
    if skipped:
        lines += ["", "Skipped and left out:", ""] + skipped
    lines += [
        "",
        '"above chance": the AUC\'s lower 95 % bound is above 0.5. Compare with the same probe on '
        "`--init random`: part of what a probe finds is in the pixels themselves, not learnt.",
        "",
    ]
    return "\n".join(lines)
