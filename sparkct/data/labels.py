"""Labels on the training slices: :func:`label_slices` maps a labels CSV (or rows) onto a dataset of
the slice cache, for the hybrid objective, supervised pretraining and the trainer's online probe (data work:
it knows no model); :func:`patient_rows` expands patient rows to series rows (the evaluation reads them too).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from sparkct.data._util import salted_hash
from sparkct.data.datasets import CTLabelledDataset, normalize_label, read_labels_csv
from sparkct.errors import UserError

__all__ = ["label_slices", "patient_rows"]


def label_slices(dataset, labels, *, label_column: str = "label", classes: Sequence | None = None):
    """(a copy of `dataset` with ``targets``: class index of each labelled slice, -1 elsewhere; the
    class names). `labels`: a CSV path or rows, as :class:`sparkct.data.CTLabelledDataset` reads them
    (slice or series rows), or a CSV of patient rows (:func:`patient_rows`: every series of the patient)."""
    path = labels if isinstance(labels, str) else ""
    try:
        if path and os.path.isfile(path):
            rows = read_labels_csv(path)
            cols = set(rows[0]) if rows else set()
            if not cols & {"series_uid", "series_key"} and cols & {"patient", "patient_id"} and label_column in cols:
                labels = patient_rows(dataset.cache, [dict(r, __label__=r[label_column]) for r in rows], path)
                label_column = "label"
        lab = CTLabelledDataset(
            dataset.cache,
            labels,
            label_column=label_column,
            classes=classes,
            missing="drop",
            indices=dataset.indices,
            windows=None,
        )
    except UserError:
        raise
    except (ValueError, OSError, csv.Error) as e:
        raise UserError(f"labels {path}: {e}") from None
    if len(lab.indices) == 0:
        raise UserError("the labels file matches no slice of the training data")
    out = dataset.subset(np.arange(len(dataset)))
    targets = np.full(len(dataset), -1, dtype=np.int64)
    pos = {int(c): i for i, c in enumerate(dataset.indices.tolist())}
    for c, t in zip(lab.indices.tolist(), lab.targets.tolist()):
        targets[pos[int(c)]] = t
    out.targets = targets
    return out, list(lab.classes)


def patient_rows(cache, rows: list[dict], path: str) -> list[dict]:
    """Patient-level rows (a ``patient`` or ``patient_id`` column, the label in ``__label__``) -> one row per
    series of the patient (series_key level); `path` names the file in errors."""
    col = "patient" if "patient" in rows[0] else "patient_id"
    salt = cache.manifest.get("salt", "")
    names = {str(p): i for i, p in enumerate(cache.patients)}
    ser_pat = cache.series["patient_index"] if "patient_index" in cache.series else None
    if ser_pat is None:
        ser_pat = np.array([names[str(p)] for p in cache.series["patient"]])
    keys = cache.series["key"]
    out, unknown = [], []
    first: dict[str, tuple[str, int]] = {}
    for i, r in enumerate(rows):
        v = str(r[col]).strip()
        lab, (seen, line) = (
            normalize_label(r["__label__"]),
            first.setdefault(v, (normalize_label(r["__label__"]), i + 2)),
        )
        if lab != seen:  # checked here: expanded to series rows, the conflict would name a series, not the patient
            raise UserError(f"{path}: {col} {v} is labelled {seen!r} (line {line}) and {lab!r} (line {i + 2})")
        h = v if col == "patient" else salted_hash(salt, "id:" + v)
        p = names.get(h)
        if p is None:
            unknown.append(v)
            continue
        for s in np.flatnonzero(ser_pat == p):
            out.append({"series_key": str(keys[s]), "label": r["__label__"]})
    if unknown:
        hint = (
            "patient ids are DICOM PatientIDs"
            if col == "patient_id"
            else "patient is the cache pseudonym in its series.csv"
        )
        raise UserError(
            f"{path}: {len(unknown)} of {len(rows)} patients are not in the cache (e.g. {unknown[:3]}); {hint}"
        )
    return out
