"""Overlap between the pretraining data and the labelled validation / test patients of an experiment.

Pretraining on the patients a method is later tested on leaks them into the comparison (the backbone
has seen their scans), so :func:`run_experiment <sparkct.eval.experiment.run_experiment>` measures it
before any work and refuses it unless asked. A labelled series overlaps when its Series Instance UID,
or its Study Instance UID, is among the pretraining series' (another reconstruction of the same study
is the same scan); a labelled patient overlaps when one of its series does, or, where both caches were
prepared with the same salt, when its pseudonym is among the pretraining patients'. Caches with their
own salts (``sparkct data prepare``'s default) cannot be compared by patient: only UIDs tell then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Overlap", "find_overlap", "without_patients"]

SPLITS = ("val", "test")


@dataclass
class Overlap:
    """Per split (``val``, ``test``): overlapping series and patients, and the split's totals."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    by_patient: bool = False  # pseudonyms were compared (the salts agree)

    @property
    def any(self) -> bool:
        return any(c["series"] or c["patients"] for c in self.counts.values())

    @property
    def checked_by(self) -> str:
        return "Study/Series Instance UID" + (" and patient pseudonym" if self.by_patient else "")

    def describe(self) -> str:
        """E.g. 'val 2 of 5 series, 1 of 3 patients; test 0 of 6 series, 0 of 3 patients'."""
        return "; ".join(
            f"{s} {c['series']} of {c['n_series']} series, {c['patients']} of {c['n_patients']} patients"
            for s, c in self.counts.items()
        )


def _uids(cache, series: np.ndarray, name: str) -> np.ndarray:
    col = cache.series.get(name)
    if col is None:
        return np.full(len(series), "", dtype="U1")
    return np.asarray(col, dtype=str)[series]


def find_overlap(task, pretrain) -> Overlap | None:
    """The overlap of `pretrain` (a dataset over a prepared cache: ``cache``, ``series``, ``patients``)
    with `task`'s (a TaskData) val and test splits; None where either is not over a prepared cache
    (image folders and .npz files carry no UIDs)."""
    pre_cache = getattr(pretrain, "cache", None)
    if task.kind != "cache" or pre_cache is None:
        return None
    pre_series = np.unique(np.asarray(pretrain.series))
    pre_uids = {u for u in _uids(pre_cache, pre_series, "series_uid") if u}
    pre_studies = {u for u in _uids(pre_cache, pre_series, "study_uid") if u}
    task_cache = task.val.cache
    salt = task_cache.manifest.get("salt")
    by_patient = bool(salt) and salt == pre_cache.manifest.get("salt")
    pre_patients = set(map(str, np.asarray(pre_cache.patients)[np.unique(np.asarray(pretrain.patients))]))
    out = Overlap(by_patient=by_patient)
    for name in SPLITS:
        d = getattr(task, name)
        series = np.unique(np.asarray(d.series))
        uid, study = _uids(task_cache, series, "series_uid"), _uids(task_cache, series, "study_uid")
        hit = np.array([bool(u and u in pre_uids) or bool(s and s in pre_studies) for u, s in zip(uid, study)], bool)
        owner = np.asarray(task_cache.series["patient_index"])[series]
        names = np.asarray(task_cache.patients).astype(str)
        patients = np.unique(np.asarray(d.patients))
        hit_patients = set(owner[hit].tolist())
        if by_patient:
            hit_patients |= {int(p) for p in patients if names[p] in pre_patients}
        out.counts[name] = {
            "series": int(hit.sum()),
            "n_series": len(series),
            "patients": len(hit_patients),
            "n_patients": len(patients),
        }
    return out


def without_patients(dataset, task):
    """`dataset` (over `task`'s cache) less the slices of `task`'s val and test patients."""
    drop = set()
    for name in SPLITS:
        d = getattr(task, name)
        drop |= set(map(str, np.asarray(d.patient_names)[np.unique(np.asarray(d.patients))]))
    names = np.asarray(dataset.patient_names).astype(str)
    keep = ~np.isin(names[np.asarray(dataset.patients)], sorted(drop))
    return dataset.subset(np.flatnonzero(keep))
