"""The labelled data users bring, split for fine-tuning: :func:`load_task`.

Sources:

- a prepared CT cache (``sparkct data prepare``) with a labels CSV per slice, series or patient:
  slice and series rows as :class:`sparkct.data.CTLabelledDataset` reads them (``series_uid`` or
  ``series_key``, plus ``instance_number`` / ``slice_index`` / ``z_mm`` per slice); patient rows
  name the patient by ``patient`` (the cache's pseudonym, as in its series.csv) or ``patient_id``
  (the DICOM PatientID, hashed here with the cache's salt) and label every series of the patient;
- an image folder, one subfolder per class (:class:`sparkct.data.ImageFolderSlices`), read as
  grey levels;
- a MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``; e.g.
  OrganSMNIST) from a local path, its own splits kept.

Images that are not HU (folders, .npz) are presented with the cache datasets' interface as
"pseudo-HU": grey level v in [0, 1] -> ``v * 32768 - 1024`` in int16, which :data:`IMAGE_WINDOW` maps
back to v. So one loader (:class:`sparkct.data.SliceLoader`) and one set of augmentations
(:class:`sparkct.data.CTAugment` with ``windows=[IMAGE_WINDOW] * channels``) serve every source, and
padding (-1024) stays black.

Splits are by patient (no patient in two splits), stratified by class, with a fixed ``split_seed``
so every method and seed is tested on the same test set; the training set is then cut to a
class-stratified, nested fraction of its patients (10 % inside 25 % inside 50 % for one ``seed``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sparkct.data.cache import SliceCache
from sparkct.data.datasets import (
    _SLICE_KEYS,
    CTLabelledDataset,
    _call_transform,
    normalize_label,
    patient_split,
    patient_subset_stratified,
    read_labels_csv,
)
from sparkct.data.images import ImageFolderSlices
from sparkct.data.labels import patient_rows
from sparkct.data.windows import DEFAULT_WINDOWS, apply_windows, resolve_windows
from sparkct.errors import UserError

__all__ = ["IMAGE_WINDOW", "TaskData", "ImageSlices", "load_task", "read_labels", "split_task"]

IMAGE_WINDOW = (15360.0, 32768.0)  # (center, width): pseudo-HU [-1024, 31744] -> [0, 1]
_SCALE, _OFFSET = 32768.0, -1024.0
SPLIT_NAMES = ("train", "val", "test")


def to_pseudo_hu(v: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] -> int16 pseudo-HU (see the module docstring)."""
    return np.rint(np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0) * _SCALE + _OFFSET).astype(np.int16)


# ------------------------------------------------------------------------------------------ image sets


class ImageSlices:
    """Grey-level images (an array, or an ImageFolderSlices read lazily) with the interface of the
    cache datasets: ``hu(items)`` (B, 1, H, W) int16 pseudo-HU, ``targets``, ``patients``,
    ``patient_names``, ``subset``, ``transform``, ``__getitems__`` -> (x, y)."""

    def __init__(self, images, targets, *, classes: Sequence, patients=None, patient_names=None, transform=None):
        self._images = images  # (N, H, W) uint8 / float in [0, 1], or an ImageFolderSlices
        n = len(images)
        self.indices = np.arange(n, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(self.targets) != n:
            raise UserError(f"{n} images but {len(self.targets)} labels")
        self.classes = list(classes)
        if patients is None:  # each image its own patient
            patients = np.arange(n, dtype=np.int64)
            patient_names = np.array([f"{i:08d}" for i in range(n)])
        self._patients = np.asarray(patients, dtype=np.int64)
        self.patient_names = np.asarray(patient_names)
        self.windows = [IMAGE_WINDOW]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def patients(self) -> np.ndarray:
        return self._patients[self.indices]

    def subset(self, items) -> ImageSlices:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        items = np.asarray(items, dtype=np.int64)
        new.indices = self.indices[items]
        new.targets = self.targets[items]
        return new

    def _grey(self, i: int) -> np.ndarray:
        img = self._images
        if hasattr(img, "load"):  # ImageFolderSlices: (C, H, W) float in [0, 1]
            return img.load(int(i)).numpy().mean(0)
        a = np.asarray(img[int(i)])
        if a.ndim == 3:  # (H, W, 3) colour -> grey
            a = a.mean(-1)
        return a.astype(np.float32) / 255.0 if img.dtype == np.uint8 else a.astype(np.float32)

    def hu(self, items):
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        arr = (
            np.stack([to_pseudo_hu(self._grey(i)) for i in self.indices[items]])
            if len(items)
            else np.zeros((0, 1, 1), np.int16)
        )
        return torch.from_numpy(arr).unsqueeze(1)

    def _convert(self, hu, generator=None):
        if self.transform is not None:
            return _call_transform(self.transform, hu, generator)
        return apply_windows(hu, self.windows)

    def __getitem__(self, i):
        i = int(i)
        return self._convert(self.hu([i]))[0], int(self.targets[i])

    def __getitems__(self, items):
        items = np.asarray(items, dtype=np.int64)
        return self._convert(self.hu(items)), torch.from_numpy(self.targets[items])


def _load_npz(path: str) -> tuple[dict[str, ImageSlices], list]:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with z:
        keys = set(z.files)
        need = [f"{s}_{k}" for s in SPLIT_NAMES for k in ("images", "labels")]
        missing = [k for k in need if k not in keys]
        if missing:
            raise UserError(f"{path}: a MedMNIST-style .npz needs arrays {', '.join(need)}; missing {missing}")
        parts = {}
        for s in SPLIT_NAMES:
            x, y = z[f"{s}_images"], z[f"{s}_labels"]
            if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
                raise UserError(f"{path}: {s}_images must be (N, H, W) or (N, H, W, 1|3), got {x.shape}")
            if x.ndim == 4 and x.shape[-1] == 1:
                x = x[..., 0]
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[1] != 1:
                raise UserError(
                    f"{path}: {s}_labels has {y.shape[1]} columns: multi-label sets are not supported "
                    f"(single-label only)"
                )
            y = y.reshape(-1)
            if len(y) != len(x):
                raise UserError(f"{path}: {len(x)} {s} images but {len(y)} labels")
            if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
                raise UserError(f"{path}: {s}_labels must be non-negative integer classes")
            if x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 1):
                raise UserError(f"{path}: {s}_images must be uint8 or floats in [0, 1]")
            parts[s] = (np.ascontiguousarray(x), y.astype(np.int64))
    k = int(max(p[1].max() for p in parts.values() if p[1].size)) + 1
    classes = list(range(k))
    return {s: ImageSlices(x, y, classes=classes) for s, (x, y) in parts.items()}, classes


# ------------------------------------------------------------------------------------------ labels on a cache


def read_labels(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"labels file not found: {path}")
    try:
        rows = read_labels_csv(path)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise UserError(f"{path}: no label rows (a header line and one row per slice, series or patient)")
    return rows


def _cache_dataset(cache_dir: str, labels: str, label_column: str, level: str):
    try:
        cache = SliceCache(cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    rows = read_labels(labels)
    cols = set(rows[0])
    if label_column not in cols:
        raise UserError(
            f"{labels}: no label column {label_column!r} (columns: {', '.join(sorted(cols))}); pass --label-column"
        )
    if level not in ("auto", "slice", "series", "patient"):
        raise UserError(f"level must be auto, slice, series or patient, got {level!r}")
    series_col = next((c for c in ("series_uid", "series_key") if c in cols), None)
    patient_col = next((c for c in ("patient", "patient_id") if c in cols), None)
    if level == "auto":
        level = (
            "slice"
            if series_col and any(k in cols for k in _SLICE_KEYS)
            else "series"
            if series_col
            else "patient"
            if patient_col
            else ""
        )
    if not level:
        raise UserError(
            f"{labels}: name each row's series (series_uid or series_key, plus instance_number, "
            f"slice_index or z_mm per slice) or patient (patient or patient_id); columns: "
            f"{', '.join(sorted(cols))}"
        )
    empty = [i + 2 for i, r in enumerate(rows) if not normalize_label(r.get(label_column))]
    if empty:
        raise UserError(f"{labels}: empty label (or NaN) on line(s) {empty[:5]}")
    raw = sorted({normalize_label(r[label_column]) for r in rows})
    if len(raw) < 2:
        raise UserError(f"{labels}: every row has label {raw[0]!r}: a classifier needs at least two classes")
    if level == "patient":
        if patient_col is None:
            raise UserError(f"{labels}: patient-level labels need a patient or patient_id column")
        rows = patient_rows(cache, [dict(r, __label__=r[label_column]) for r in rows], labels)
        label_column, lv = "label", "series"
    else:
        if series_col is None:
            raise UserError(f"{labels}: {level}-level labels need a series_uid or series_key column")
        lv = level
        known = set(map(str, cache.series["series_uid" if series_col == "series_uid" else "key"]))
        unknown = sorted({str(r[series_col]).strip() for r in rows} - known)
        if unknown:
            raise UserError(f"{labels}: {len(unknown)} series not in the cache {cache_dir} (e.g. {unknown[:3]})")
    try:
        ds = CTLabelledDataset(cache, rows, label_column=label_column, level=lv, windows=None)
    except ValueError as e:
        raise UserError(f"{labels}: {e}") from None
    if ds.unmatched_rows:
        raise UserError(
            f"{labels}: {ds.unmatched_rows} of {len(rows)} rows name slices that are not in the "
            f"cache (instance_number / slice_index / z_mm not found in their series)"
        )
    if len(ds) == 0:
        raise UserError(f"{labels}: no slice of the cache has a label")
    present = np.unique(ds.targets)
    if len(present) < 2:
        raise UserError(
            f"{labels}: all labelled slices are of class {ds.classes[int(present[0])]!r}: "
            f"a classifier needs at least two classes"
        )
    ds.level = level
    return ds


# ------------------------------------------------------------------------------------------ the task


@dataclass
class TaskData:
    """A labelled classification task split for fine-tuning: ``train`` (the fraction), ``val``,
    ``test`` datasets (SliceLoader-ready), ``full_train`` (the whole training split), ``classes``,
    ``windows`` (the input channels' HU windows for the transforms; ``[IMAGE_WINDOW]`` for images)."""

    source: str
    kind: str  # "cache" | "folder" | "npz"
    level: str  # "slice", "series", "patient" (labels) or "image"
    classes: list
    windows: list
    train: object
    val: object
    test: object
    full_train: object
    fraction: float = 1.0
    seed: int = 0
    split_seed: int = 0
    split: tuple = (0.7, 0.15, 0.15)
    labels: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """Sizes per split: items, patients, items per class (for reports)."""
        out = {
            "source": self.source,
            "kind": self.kind,
            "level": self.level,
            "labels": self.labels,
            "classes": [str(c) for c in self.classes],
            "fraction": self.fraction,
            "seed": self.seed,
            "split_seed": self.split_seed,
            "split": list(self.split),
        }
        for name in ("train", "val", "test", "full_train"):
            d = getattr(self, name)
            t = np.asarray(d.targets)
            out[name] = {
                "items": int(len(d)),
                "patients": int(len(np.unique(d.patients))),
                "per_class": np.bincount(t, minlength=self.n_classes).tolist(),
            }
        return out


def split_task(dataset, *, split=(0.7, 0.15, 0.15), split_seed: int = 0) -> dict[str, np.ndarray]:
    """Item positions of train/val/test: whole patients, stratified by class (a patient's class is
    its largest label), every class present in every split (else a UserError)."""
    fr = tuple(float(f) for f in split)
    if len(fr) != 3 or min(fr) <= 0:
        raise UserError(f"split must be three positive fractions (train, val, test), got {list(split)}")
    sp = patient_split(dataset, fr, seed=split_seed, stratify=True, names=SPLIT_NAMES)
    _check_classes(dataset, sp)
    return sp


def _check_classes(dataset, sp: dict[str, np.ndarray]) -> None:
    k = len(dataset.classes)
    t = np.asarray(dataset.targets)
    for name, items in sp.items():
        missing = sorted(set(range(k)) - set(np.unique(t[items]).tolist()))
        if missing:
            npat = len(np.unique(dataset.patients))
            raise UserError(
                f"the {name} split has no items of class(es) {[dataset.classes[m] for m in missing]} "
                f"({npat} patients in all): add labelled patients or change --split"
            )


def load_task(
    data: str,
    labels: str | None = None,
    *,
    label_column: str = "label",
    level: str = "auto",
    split=(0.7, 0.15, 0.15),
    split_seed: int = 0,
    fraction: float = 1.0,
    seed: int = 0,
    windows=None,
    image_size: int | None = None,
    group: str | None = None,
) -> TaskData:
    """Open `data` (a prepared cache with `labels`, an image folder, or a .npz), split it by patient
    (stratified; the .npz's own splits are kept) and cut the training split to `fraction` of its
    patients per class (nested across fractions for one `seed`).

    windows: HU windows of a cache's input channels (default lung, mediastinum, bone). image_size:
    resize folder images (default: keep; all images must then share a size). group: for image
    folders, the regular expression naming a file's patient (see ImageFolderSlices)."""
    if not 0 < float(fraction) <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if not os.path.exists(data):
        raise UserError(f"data not found: {data}")
    if os.path.isfile(data) and data.endswith(".npz"):
        if labels is not None:
            raise UserError("a .npz holds its own labels: drop --labels")
        parts, classes = _load_npz(data)
        if len(classes) < 2:
            raise UserError(f"{data}: every label is {classes[0]}: a classifier needs at least two classes")
        for name, d in parts.items():
            if len(d) == 0:
                raise UserError(f"{data}: the {name} split is empty")
        base = parts["train"]
        sp = None
        kind, lv, win = "npz", "image", [IMAGE_WINDOW]
        for name, d in parts.items():
            _check_classes(d, {name: np.arange(len(d))})
    elif os.path.isdir(data) and os.path.exists(os.path.join(data, "index.npz")):
        if labels is None:
            raise UserError(
                f"{data} is a prepared cache: give its labels with --labels (a CSV per slice, series or patient)"
            )
        base = _cache_dataset(data, labels, label_column, level)
        classes = base.classes
        kind, lv = "cache", base.level
        try:
            win = resolve_windows(windows if windows is not None else DEFAULT_WINDOWS)
        except ValueError as e:
            raise UserError(str(e)) from None
        base.windows = win  # what ds[i] shows; training and evaluation transforms bring their own
        sp = split_task(base, split=split, split_seed=split_seed)
    elif os.path.isdir(data):
        if labels is not None:
            raise UserError("an image folder is labelled by its class subfolders: drop --labels")
        try:
            folder = ImageFolderSlices(data, size=image_size, channels=1, group=group)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        if len(folder.classes) < 2:
            raise UserError(f"{data}: one class folder ({folder.classes[0]}): a classifier needs at least two")
        base = ImageSlices(
            folder, folder.targets, classes=folder.classes, patients=folder.patients, patient_names=folder.patient_names
        )
        classes = base.classes
        kind, lv, win = "folder", "image", [IMAGE_WINDOW]
        sp = split_task(base, split=split, split_seed=split_seed)
    else:
        raise UserError(
            f"{data}: expected a prepared cache folder, an image folder (one subfolder per class) or "
            f"a MedMNIST-style .npz"
        )

    if sp is None:  # the .npz's own splits
        train_full, val, test = parts["train"], parts["val"], parts["test"]
    else:
        train_full, val, test = (base.subset(sp[n]) for n in SPLIT_NAMES)
    items = np.arange(len(train_full))
    sub = items if fraction >= 1 else patient_subset_stratified(train_full, items, float(fraction), seed=seed)
    train = train_full.subset(sub)
    return TaskData(
        source=os.path.abspath(data),
        kind=kind,
        level=lv,
        classes=list(classes),
        windows=list(win),
        train=train,
        val=val,
        test=test,
        full_train=train_full,
        fraction=float(fraction),
        seed=seed,
        split_seed=split_seed,
        split=tuple(split),
        labels=os.path.abspath(labels) if labels else None,
    )
