"""Datasets over the prepared slice cache, patient-level splits, and the fast batched loader.

- :class:`CTSliceDataset`: unlabelled slices (pretraining). ``ds[i]`` is one windowed slice
  (C, H, W); ``ds.hu(items)`` a batch of raw int16 HU (B, 1, H, W) read in one go from the shards.
- :class:`CTLabelledDataset`: slices with labels from a CSV, per series (every slice of the series
  gets it) or per slice (series_uid + instance_number / slice_index / z_mm).
- :func:`patient_split`: train/val/test by patient (salted hash), never mixing a patient across
  splits; deterministic given the seed; optionally stratified by label.
- :func:`patient_subset`: nested patient subsets (1 %, 10 %, ... of the training patients) for
  small-data fine-tuning curves.
- :class:`SliceLoader`: batches straight from the memory-mapped shards, augmented as whole batches
  (:mod:`sparkct.data.augment`) on the CPU by worker threads or on the GPU after an int16 transfer.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import inspect
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sparkct.errors import UserError

from .cache import SliceCache
from .windows import DEFAULT_WINDOWS, WindowSpec, apply_windows, resolve_windows


def _open_cache(cache) -> SliceCache:
    if isinstance(cache, SliceCache):
        return cache
    return SliceCache(os.fspath(cache))


class CTSliceDataset(torch.utils.data.Dataset):
    """Unlabelled CT slices of a prepared cache.

    indices: which cache slices (default all). windows: HU windows as channels (None returns HU as
    float). transform: a batch transform of int16 HU (B, 1, H, W) -> a batch (a tensor (B, C, h, w),
    a list of views, ...), e.g. CTResize or CTAugment; it replaces `windows`. A transform that takes
    a ``generator`` parameter (or sets ``takes_generator = True``) is called ``transform(hu,
    generator=g)`` and must draw all its randomness from g; see :func:`takes_generator`. ``ds[i]`` returns
    (C, h, w); ``ds.__getitems__(items)`` (used
    by torch's DataLoader) returns the whole batch as one tensor: pass ``collate_fn=collate_batch``.
    """

    def __init__(
        self, cache, indices=None, *, windows: WindowSpec | None = DEFAULT_WINDOWS, transform: Callable | None = None
    ):
        self.cache = _open_cache(cache)
        # indices=None is every slice: kept as None (no per-slice array) until someone asks for
        # `indices`, so a dataset over 10^8 slices costs no memory per slice
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._indices is not None and len(self._indices):
            if self._indices.min() < 0 or self._indices.max() >= len(self.cache):
                raise IndexError(f"indices out of range for a cache of {len(self.cache)} slices")
        self.windows = resolve_windows(windows) if windows is not None else None
        self.transform = transform

    @property
    def indices(self) -> np.ndarray:
        """The cache slice of every item (int64); for a dataset of every slice, made on first use."""
        if self._indices is None:
            self._indices = np.arange(len(self.cache), dtype=np.int64)
        return self._indices

    @indices.setter
    def indices(self, value) -> None:
        self._indices = np.asarray(value, dtype=np.int64).reshape(-1)

    def rows(self, items) -> np.ndarray:
        """The cache slices of item positions `items` (int64), without making ``indices`` for a dataset
        of every slice."""
        items = np.asarray(items, dtype=np.int64)
        return items.copy() if self._indices is None else self._indices[items]

    def __len__(self) -> int:
        return len(self.cache) if self._indices is None else len(self._indices)

    # identity of items -------------------------------------------------------------------------
    @property
    def patients(self) -> np.ndarray:
        """Patient index (into cache.patients) of every item."""
        return (
            self.cache.slice_patient[self.indices]
            if self._indices is not None
            else np.asarray(self.cache.slice_patient)
        )

    @property
    def patient_names(self) -> np.ndarray:
        """The salted patient hashes that ``patients`` indexes."""
        return self.cache.patients

    @property
    def series(self) -> np.ndarray:
        """Series index (into the cache's series table) of every item."""
        return (
            self.cache.slice_series[self.indices] if self._indices is not None else np.asarray(self.cache.slice_series)
        )

    def subset(self, items) -> CTSliceDataset:
        """The same dataset restricted to item positions `items` (e.g. a split)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.indices = self.rows(items)
        if hasattr(self, "targets"):
            new.targets = self.targets[np.asarray(items, dtype=np.int64)]
        return new

    # reading -----------------------------------------------------------------------------------
    def hu(self, items) -> torch.Tensor:
        """Raw HU of items as int16 (B, 1, H, W): one read per shard run."""
        arr = self.cache.read(self.rows(np.asarray(items, dtype=np.int64).reshape(-1)))
        return torch.from_numpy(arr).unsqueeze(1)

    def _convert(self, hu: torch.Tensor, generator=None, rows=None) -> torch.Tensor:
        if self.transform is not None:
            return _call_transform(self.transform, hu, generator, rows)
        if self.windows is not None:
            return apply_windows(hu, self.windows)
        return hu.float()

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        return self._convert(self.hu([i]))[0]

    def __getitems__(self, items):
        return self._convert(self.hu(items))


def takes_generator(transform) -> bool:
    """Whether a batch transform draws its randomness from the loader's generator, and so is called
    ``transform(hu, generator=g)`` rather than ``transform(hu)``.

    The transform says so itself: a ``takes_generator`` attribute (True/False) wins; otherwise, a
    parameter named ``generator`` in its signature (``__call__``'s for an object) means yes. So
    CTAugment, MultiCrop, TwoViews, CTResize and a method's own transform (any callable ``(hu,
    generator)``) get the generator with nothing registered here, and a plain ``f(hu)`` does not."""
    flag = getattr(transform, "takes_generator", None)
    if flag is not None:
        return bool(flag)
    try:
        sig = inspect.signature(transform)
    except (TypeError, ValueError):
        return False
    p = sig.parameters.get("generator")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def takes_rows(transform) -> bool:
    """Whether a batch transform can augment rows of a larger batch as that batch would (a ``rows``
    parameter, or ``takes_rows = True``): it is then called ``transform(hu, generator=g, rows=(lo,
    total))`` with the generator of the whole batch, `hu` being its rows lo .. lo + len(hu) (see
    :mod:`sparkct.data.augment`). CTAugment, MultiCrop, CTResize do."""
    flag = getattr(transform, "takes_rows", None)
    if flag is not None:
        return bool(flag)
    try:
        p = inspect.signature(transform).parameters.get("rows")
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _call_transform(transform, hu: torch.Tensor, generator, rows=None):
    if rows is not None:
        return transform(hu, generator=generator, rows=rows)
    return transform(hu, generator=generator) if takes_generator(transform) else transform(hu)


def collate_batch(batch):
    """collate_fn for torch's DataLoader with these datasets: their __getitems__ already batches."""
    return batch


# ------------------------------------------------------------------------------------------ labels


def read_labels_csv(path: str) -> list[dict]:
    """The rows of a labels CSV as dicts, column names stripped. utf-8-sig: a spreadsheet's export starts
    with a byte-order mark that would otherwise become part of the first column's name."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [{k.strip() if isinstance(k, str) else k: v for k, v in r.items()} for r in csv.DictReader(f)]


def normalize_label(value) -> str:
    """A label as the name of its class: the text stripped, and a number with an integer value written as
    that integer (``1.0``, ``01``, `` 1 `` -> ``1``), so a spreadsheet's 1.0 and a script's 1 are one
    class. Empty and NaN labels come back as ``""`` (no label)."""
    s = "" if value is None else str(value).strip()
    if s.lower() in ("", "nan"):
        return ""
    try:
        return str(int(s))
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else s


_SLICE_KEYS = ("instance_number", "slice_index", "z_mm")


class CTLabelledDataset(CTSliceDataset):
    """Labelled slices: labels per series or per slice from a CSV (or a list of dict rows).

    The series is named by ``series_uid`` (or ``series_key``, the cache's key). Per-slice rows add
    ``instance_number`` (DICOM InstanceNumber), ``slice_index`` (0-based position in the series as
    cached) or ``z_mm`` (position along the slice normal, matched within 0.05 mm). level='auto'
    picks per-slice when such a column is present. Labels in `label_column` may be integers or
    class names (``classes``: sorted unique names unless given); an integer-valued number is that
    integer (``1.0`` is class ``1``, see :func:`normalize_label`). A row with an empty or NaN label, and
    two rows giving one series (or slice) different labels, raise ValueError naming the rows (identical
    repeats are fine). Slices without a row are left out (missing='drop') or raise (missing='error').
    ``targets`` holds each item's class index.
    """

    def __init__(
        self,
        cache,
        labels,
        *,
        label_column: str = "label",
        level: str = "auto",
        classes: Sequence | None = None,
        missing: str = "drop",
        indices=None,
        windows: WindowSpec | None = DEFAULT_WINDOWS,
        transform: Callable | None = None,
    ):
        super().__init__(cache, indices, windows=windows, transform=transform)
        from_file = isinstance(labels, (str, os.PathLike))
        rows = read_labels_csv(labels) if from_file else list(labels)
        if not rows:
            raise ValueError("no label rows")
        cols = set(rows[0])
        listed = ", ".join(str(k) for k in rows[0])
        if label_column not in cols:
            raise ValueError(f"no label column {label_column!r} (columns: {listed})")
        skey = "series_uid" if "series_uid" in cols else "series_key" if "series_key" in cols else None
        if skey is None:
            raise ValueError(f"labels need a series_uid (or series_key) column (columns: {listed})")
        slice_key = next((k for k in _SLICE_KEYS if k in cols), None)
        if level == "auto":
            level = "slice" if slice_key else "series"
        if level not in ("series", "slice"):
            raise ValueError(f"level must be 'auto', 'series' or 'slice', got {level!r}")
        if level == "slice" and slice_key is None:
            raise ValueError(f"per-slice labels need one of the columns {', '.join(_SLICE_KEYS)}")
        if missing not in ("drop", "error"):
            raise ValueError("missing must be 'drop' or 'error'")

        def where(i: int) -> str:  # a row as the user finds it: its line in the file (after the header)
            return f"{'line' if from_file else 'row'} {i + 2 if from_file else i + 1}"

        raw = [normalize_label(r[label_column]) for r in rows]
        for i, v in enumerate(raw):
            if not v:
                raise ValueError(
                    f"{where(i)} ({skey} {str(rows[i].get(skey) or '').strip()}): no label "
                    f"({str(rows[i][label_column]).strip()!r}); label every row, or leave the row out "
                    "(slices without a row are unlabelled)"
                )
        if classes is None:
            try:
                ints = sorted({int(v) for v in raw})
                classes = ints
            except ValueError:
                classes = sorted(set(raw))
        self.classes = list(classes)
        cidx = {normalize_label(c): i for i, c in enumerate(self.classes)}
        unknown = sorted({v for v in raw if v not in cidx})
        if unknown:
            raise ValueError(f"labels not among classes {self.classes}: {unknown[:5]}")
        self.level = level

        c = self.cache
        ser_names = c.series["series_uid" if skey == "series_uid" else "key"]
        sidx = {str(n): i for i, n in enumerate(ser_names)}
        n_slices = len(c)
        target = np.full(n_slices, -1, dtype=np.int64)
        unmatched = 0
        by_instance: dict[int, dict[int, int]] = {}
        # the first row that labelled each series (or slice): a later row with another label is a
        # conflict, which would otherwise be settled silently by the row order
        first: dict[int, tuple[str, int]] = {}

        def check_conflict(place: int, v: str, i: int, what: str) -> None:
            seen = first.setdefault(place, (v, i))
            if seen[0] != v:
                raise ValueError(
                    f"{what} is labelled {seen[0]!r} ({where(seen[1])}) and {v!r} ({where(i)}); "
                    "keep one label per " + level
                )

        for i, (r, v) in enumerate(zip(rows, raw)):
            name = str(r[skey]).strip()
            s = sidx.get(name)
            if s is None:
                unmatched += 1
                continue
            off, n = int(c.series["offset"][s]), int(c.series["n"][s])
            if level == "series":
                check_conflict(s, v, i, f"{skey} {name}")
                target[off : off + n] = cidx[v]
                continue
            key = str(r[slice_key]).strip()
            pos = None
            if slice_key == "slice_index":
                k = int(key)
                pos = off + k if 0 <= k < n else None
            elif slice_key == "instance_number":
                m = by_instance.get(s)
                if m is None:
                    inst = c.slice_instance[off : off + n].tolist()
                    m = by_instance[s] = {iv: off + k for k, iv in reversed(list(enumerate(inst)))}
                pos = m.get(int(key))
            elif n:
                z = c.slice_z[off : off + n]  # ascending within a series
                k = int(np.clip(np.searchsorted(z, float(key)), 1, max(1, n - 1)))
                k = k - 1 if n == 1 or abs(z[k - 1] - float(key)) <= abs(z[min(k, n - 1)] - float(key)) else k
                pos = off + k if abs(float(z[k]) - float(key)) <= 0.05 else None
            if pos is None:
                unmatched += 1
                continue
            check_conflict(pos, v, i, f"{skey} {name} {slice_key} {key}")
            target[pos] = cidx[v]
        self.unmatched_rows = unmatched
        t = target[self.indices]
        if (t < 0).any():
            if missing == "error":
                raise ValueError(f"{int((t < 0).sum())} slices have no label (missing='drop' leaves them out)")
            keep = t >= 0
            self.indices = self.indices[keep]
            t = t[keep]
        self.targets = t

    def __getitem__(self, i):
        x = super().__getitem__(i)
        return x, int(self.targets[int(i)])

    def __getitems__(self, items):
        items = np.asarray(items, dtype=np.int64)
        return self._convert(self.hu(items)), torch.from_numpy(self.targets[items])

    def series_targets(self) -> dict[int, int]:
        """Series index -> label (the max over its slices: positive if any slice is)."""
        out: dict[int, int] = {}
        for s, t in zip(self.series.tolist(), self.targets.tolist()):
            out[s] = max(out.get(s, t), t)
        return out


# ------------------------------------------------------------------------------------------ splits


def _patient_labels(dataset) -> np.ndarray | None:
    t = getattr(dataset, "targets", None)
    if t is None:
        return None
    p = dataset.patients
    lab = np.full(int(p.max()) + 1 if len(p) else 0, -1, dtype=np.int64)
    np.maximum.at(lab, p, t)
    return lab


def patient_split(
    dataset,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
    stratify: bool = False,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, np.ndarray]:
    """Item positions of each split, assigning whole patients to splits.

    `dataset` is a CTSliceDataset, an ImageFolderSlices (anything with ``patients`` and
    ``patient_names``), or a SliceCache (every slice). The patients (salted hashes)
    are sorted, permuted by `seed` and cut by `fractions` (of patients); with stratify=True (a
    labelled dataset) each label stratum (a patient's label is the max of its slices') is cut
    separately, so splits keep the class balance. Deterministic given the seed and the cache.

    A split whose fraction is > 0 but that would get no patient (of some class, when stratified)
    raises :class:`sparkct.errors.UserError` naming the counts; a fraction of 0 asks for an empty
    split."""
    if isinstance(dataset, SliceCache):
        dataset = CTSliceDataset(dataset, windows=None)
    fr = np.asarray(fractions, dtype=np.float64)
    if len(fr) != len(names):
        raise UserError(f"{len(fr)} fractions for {len(names)} names")
    if not np.isfinite(fr).all() or (fr < 0).any() or fr.sum() <= 0:
        raise UserError(f"fractions must be >= 0 with a positive sum, got {list(fractions)}")
    fr = fr / fr.sum()
    pat = dataset.patients
    hashes = dataset.patient_names
    uniq = np.unique(pat)
    uniq = uniq[np.argsort(hashes[uniq], kind="stable")]  # order by hash, not by cache position
    strata = {0: uniq}
    if stratify:
        lab = _patient_labels(dataset)
        if lab is None:
            raise UserError("stratify=True needs a labelled dataset")
        strata = {int(v): uniq[lab[uniq] == v] for v in np.unique(lab[uniq])}
    rng = np.random.default_rng(seed)
    assign = np.full(int(pat.max()) + 1 if len(pat) else 0, -1, dtype=np.int64)
    for key in sorted(strata):
        ps = strata[key][rng.permutation(len(strata[key]))]
        cuts = np.round(np.cumsum(fr) * len(ps)).astype(int)
        sizes = np.diff(np.concatenate([[0], cuts]))
        empty = [n for n, f, k in zip(names, fr, sizes) if f > 0 and k == 0]
        if empty:
            counts = "/".join(str(int(k)) for k in sizes)
            fracs = "/".join(f"{f:.3g}" for f in fr)
            who = f"{len(ps)} patients" if not stratify else f"{len(ps)} patients of class {key}"
            raise UserError(
                f"patient_split: {who} give {counts} patients for {'/'.join(names)} (fractions {fracs}); "
                f"{', '.join(repr(n) for n in empty)} would be empty"
                + (" (a stratified split needs every class in every split)" if stratify else "")
                + ": use more patients, other fractions, or fraction 0 for a split you do not want"
            )
        start = 0
        for k, end in enumerate(cuts):
            assign[ps[start:end]] = k
            start = end
    which = assign[pat]
    return {name: np.nonzero(which == k)[0] for k, name in enumerate(names)}


def patient_subset(dataset, items, fraction: float, *, seed: int = 0, min_patients: int = 1) -> np.ndarray:
    """A subset of item positions `items` holding `fraction` of their patients (at least
    min_patients). For one seed, smaller fractions give subsets of larger ones (nested), so
    learning curves over the labelled-data fraction compare like with like."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    items = np.asarray(items, dtype=np.int64)
    pat = dataset.patients[items]
    uniq = np.unique(pat)
    uniq = uniq[np.argsort(dataset.patient_names[uniq], kind="stable")]
    order = uniq[np.random.default_rng([seed, 0x5EED]).permutation(len(uniq))]
    k = min(len(order), max(min_patients, int(math.ceil(fraction * len(order)))))
    keep = np.isin(pat, order[:k])
    return items[keep]


# ------------------------------------------------------------------------------------------ slice pairs


class SlicePairs:
    """Pairs of slices for next-slice prediction, from the cache's series index.

    For an item (slice k of series s) :meth:`draw` returns a pair (A, B) of cache slices and a label:
    1 (with probability `p_next`) when B is the next slice after A in the same series, i.e. (k, k+1)
    (or (k-1, k) when k is the last slice of its series); 0 otherwise, with B a slice of the same series
    at least `gap` slices away from A (either direction), or, with probability `p_other` (and whenever
    the series has no slice that far), a slice of another series. "Next" follows the cache's order
    within a series (``slice_index``: sorted along the slice normal). Only slices of `dataset` are
    drawn (a patient split stays a patient split); an item without a neighbour gets a negative.

    Raises :class:`sparkct.errors.UserError` when the data has no series with two neighbouring
    slices, or when some slice can have no negative (one series, too short for `gap`)."""

    def __init__(self, dataset, *, gap: int = 3, p_next: float = 0.5, p_other: float = 0.25):
        cache = getattr(dataset, "cache", None)
        if cache is None:
            raise UserError(
                "slice pairs need CT series from a prepared cache (image folders and .npz files have no series)"
            )
        if int(gap) < 2:
            raise UserError(f"the gap of non-neighbour pairs must be >= 2 slices, got {gap}")
        if not (0 < p_next < 1 and 0 <= p_other <= 1):
            raise UserError(f"need 0 < p_next < 1 and 0 <= p_other <= 1, got {p_next}, {p_other}")
        self.cache, self.gap, self.p_next, self.p_other = cache, int(gap), float(p_next), float(p_other)
        members = np.unique(np.asarray(dataset.indices, dtype=np.int64))
        ser = cache.slice_series[members].astype(np.int64)
        k = cache.slice_index[members].astype(np.int64)
        order = np.lexsort((k, ser))
        self.pos = members[order]  # cache slices of the dataset, by (series, position in the series)
        self.ser, self.k = ser[order], k[order]
        M = len(self.pos)
        self.rank = np.full(len(cache), -1, dtype=np.int64)  # cache slice -> row of self.pos
        self.rank[self.pos] = np.arange(M)
        same = self.ser[1:] == self.ser[:-1]
        adj = same & (self.k[1:] == self.k[:-1] + 1)
        self.next_row = np.full(M, -1, dtype=np.int64)
        self.next_row[:-1][adj] = np.arange(1, M)[adj]
        self.prev_row = np.full(M, -1, dtype=np.int64)
        self.prev_row[1:][adj] = np.arange(M - 1)[adj]
        starts = np.concatenate([[0], np.nonzero(~same)[0] + 1]) if M else np.zeros(0, np.int64)
        ends = np.concatenate([starts[1:], [M]]) if M else np.zeros(0, np.int64)
        seg = np.repeat(np.arange(len(starts)), ends - starts)
        self.seg_start, self.seg_end = starts[seg], ends[seg]
        # one sortable key per slice: a far partner of row j lies in [start, lo_end) or [hi_start, end)
        self._key = self.ser * (1 << 32) + self.k
        self.n_series = len(starts)
        if not adj.any():
            longest = int((ends - starts).max()) if M else 0
            raise UserError(
                f"next-slice pairs need a series with at least 2 neighbouring slices; the data has "
                f"{self.n_series} series of at most {longest} slice{'s' if longest != 1 else ''} "
                f"(prepare whole series, not single images)"
            )
        if self.n_series == 1:
            lo, hi = self._far_bounds(np.arange(M))
            if ((lo - self.seg_start) + (self.seg_end - hi) == 0).any():
                raise UserError(
                    f"next-slice pairs: one series of {M} slices, too short for non-neighbours at "
                    f">= {self.gap} slices from every slice and no other series for them; lower the "
                    f"gap or add series"
                )

    def _far_bounds(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = self._key[rows]
        lo = np.searchsorted(self._key, key - self.gap, side="right")
        hi = np.searchsorted(self._key, key + self.gap, side="left")
        return np.maximum(lo, self.seg_start[rows]), np.minimum(hi, self.seg_end[rows])

    def draw(self, slices, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A, B, label) for cache slices `slices` (members of the dataset): A and B cache slice indices,
        label 1 where B is the next slice after A. Randomness only from `rng`."""
        rows = self.rank[np.asarray(slices, dtype=np.int64)]
        if (rows < 0).any():
            raise ValueError("slices outside the dataset the pairs were built for")
        n = len(rows)
        want = rng.random(n) < self.p_next
        other = rng.random(n) < self.p_other
        u = rng.random(n)
        nxt, prv = self.next_row[rows], self.prev_row[rows]
        pos_ok = want & ((nxt >= 0) | (prv >= 0))
        a = rows.copy()
        b = np.where(nxt >= 0, nxt, rows)
        a = np.where(pos_ok & (nxt < 0), prv, a)
        neg = ~pos_ok
        lo, hi = self._far_bounds(rows)
        st, en = self.seg_start[rows], self.seg_end[rows]
        n_far = (lo - st) + (en - hi)
        M = len(self.pos)
        n_elsewhere = M - (en - st)
        use_other = neg & (n_elsewhere > 0) & (other | (n_far == 0))
        use_far = neg & ~use_other
        j = np.minimum((u * n_far).astype(np.int64), np.maximum(n_far - 1, 0))
        far = np.where(j < lo - st, st + j, hi + (j - (lo - st)))
        j2 = np.minimum((u * n_elsewhere).astype(np.int64), np.maximum(n_elsewhere - 1, 0))
        elsewhere = np.where(j2 < st, j2, j2 + (en - st))
        b = np.where(use_far, far, np.where(use_other, elsewhere, b))
        return self.pos[a], self.pos[b], pos_ok.astype(np.int64)

    def is_next(self, a, b) -> np.ndarray:
        """Whether cache slice b is the next slice after cache slice a in the same series (from the cache
        index alone)."""
        c = self.cache
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        return (c.slice_series[a] == c.slice_series[b]) & (c.slice_index[b] == c.slice_index[a] + 1)


# ------------------------------------------------------------------------------------------ loader

_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (no mmap for large
    blocks, no heap trimming). Batches of augmented slices are large (a batch of 64 three-channel
    224x224 crops is 38 MB); without this every batch is fresh memory whose page faults cost
    more than the augmentation itself on some machines. Process-wide; returns whether it applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    _MALLOC_TUNED = ok
    return ok


_tune_malloc = tune_malloc


def run_order(n: int, run_length: int, rng: np.random.Generator) -> np.ndarray:
    """A random order of range(n) made of runs of `run_length` consecutive items (the last run may
    be shorter): the blocks are shuffled, their contents stay in order. run_length=1 is a plain
    permutation."""
    if run_length <= 1:
        return _permutation(n, rng)
    starts = np.arange(0, n, run_length)
    starts = starts[_permutation(len(starts), rng)]
    if not n:
        return np.zeros(0, np.int64)
    # the runs laid side by side (vectorized; the same order as concatenating range(s, s + run_length)):
    # only the run starting at the last start is shorter
    dtype = np.int32 if n < 2**31 else np.int64
    runs = starts.astype(dtype)[:, None] + np.arange(run_length, dtype=dtype)
    keep = runs < n
    return runs[keep] if not keep.all() else runs.reshape(-1)


def _permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    """``rng.permutation(n)`` (the same values from the same draws: numpy's shuffle draws one
    bounded integer per position whatever the item size), as int32 where n allows: half the memory."""
    if n >= 2**31:
        return rng.permutation(n)
    a = np.arange(n, dtype=np.int32)
    rng.shuffle(a)
    return a


class RunBatchSampler(torch.utils.data.Sampler):
    """Batches of item positions for torch's DataLoader (``batch_sampler=``), made of runs of
    `run_length` consecutive items (see :func:`run_order`), reshuffled per epoch from (seed, epoch).
    With the datasets' ``__getitems__`` and ``collate_fn=collate_batch``, each batch is one grouped
    read of the shards."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        run_length: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.n, self.batch_size, self.run_length = int(n), int(batch_size), int(run_length)
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = (
            run_order(self.n, self.run_length, np.random.default_rng([self.seed, self.epoch]))
            if self.shuffle
            else np.arange(self.n)
        )
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class _Lazy:
    """f(start), f(start + 1), ... f(stop - 1) as a sequence, each made when asked for."""

    def __init__(self, f, start: int, stop: int):
        self.f, self.start, self.stop = f, start, max(start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.f(self.start + i)

    def __iter__(self):
        return (self.f(b) for b in range(self.start, self.stop))


class SliceLoader:
    """Batches of (augmented) slices from a cache-backed dataset.

    Each batch is one grouped read from the memory-mapped shards (int16) and one batched transform:
    on the CPU in the consuming thread by default (the transform's batched ops use torch's intra-op
    threads; with workers=N, N threads build batches ahead, best with torch.set_num_threads(1));
    on a GPU (device='cuda'), worker threads read and pin int16 batches and the transform runs there.
    Batches come out in order and are a function of (seed, epoch, batch number) only, whatever the
    number of workers. Yields tensors (B, C, h, w), a list of them for MultiCrop, and (x, y) for
    labelled datasets.

    transform (default: the dataset's): the batch transform; one that declares a ``generator``
    parameter (or ``takes_generator = True``, see :func:`takes_generator`) is called
    ``transform(hu, generator=g)`` with a CPU torch.Generator seeded from (seed, epoch, batch), which
    is what makes batches reproducible; any other callable is called ``transform(hu)``.

    shard=(rank, world): each rank reads its contiguous share of every global batch. A transform that
    takes ``rows`` (:func:`takes_rows`: CTAugment, MultiCrop, CTResize) gets the generator of the
    global batch and its rows in it, so every sample is augmented as in one process reading the whole
    batch, whatever the number of ranks; any other transform gets a generator per (batch, rank).

    run_length > 1 samples runs of that many consecutive cache slices (neighbouring slices of a
    series) to turn random reads into sequential ones when the cache is not in the page cache.
    tune_malloc: see :func:`tune_malloc`; default on when transforming on the CPU.

    pairs (a :class:`SlicePairs`, e.g. from ``Method.pairs``): every item becomes a pair of cache slices
    (A, B) drawn from (seed, epoch, batch, rank) alone, so resume and sharding are as for single slices;
    the transform gets HU (B, 2, H, W) (channel 0: A, 1: B) and returns the two batches (xa, xb), and
    the loader yields ``[xa, xb, label]`` (label 1 where B is the next slice after A); with a labelled
    dataset, ``([xa, xb, label], targets of A)``.
    """

    def __init__(
        self,
        dataset: CTSliceDataset,
        batch_size: int = 64,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        transform: Callable | None = None,
        device: str | torch.device = "cpu",
        workers: int | None = None,
        prefetch: int = 4,
        run_length: int = 1,
        tune_malloc: bool | None = None,
        shard: tuple[int, int] = (0, 1),
        pairs: SlicePairs | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        rank, world = (int(v) for v in shard)
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise ValueError(
                f"shard {shard}: need 0 <= rank < world and a batch size ({batch_size}) divisible by the world size"
            )
        self.rank, self.world = rank, world
        self.start_batch = 0
        self.device = torch.device(device)
        if workers is None:
            # CPU transforms already use torch's intra-op threads on whole batches; extra threads
            # would only compete for the cores. For a GPU, threads read and pin the next batches.
            workers = 0 if self.device.type == "cpu" else 2
        if workers < 0 or prefetch < 1:
            raise ValueError("need workers >= 0 and prefetch >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.transform = transform if transform is not None else dataset.transform
        self.workers, self.prefetch, self.run_length = workers, prefetch, int(run_length)
        self.epoch = 0
        on_cpu = self.device.type == "cpu"
        if tune_malloc is None:
            tune_malloc = on_cpu
        if tune_malloc:
            _tune_malloc()
        self.labelled = hasattr(dataset, "targets")
        self.pairs = pairs
        if pairs is not None and self.labelled:
            # targets by cache slice: A of a pair may be the item's previous slice
            self._target_of = np.full(len(dataset.cache), -1, dtype=np.int64)
            self._target_of[dataset.indices] = dataset.targets

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next pass is epoch `epoch`, starting at its batch `start_batch` (a resumed run continues
        with exactly the batches an uninterrupted one would have seen)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int | None = None) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        return run_order(n, self.run_length, rng)

    def _generator(self, epoch: int, b: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch, b, 0xA6]).integers(2**62)))

    def _transform(self, hu: torch.Tensor, g: torch.Generator, rows):
        if self.transform is self.dataset.transform:
            return self.dataset._convert(hu, g, rows)
        return _call_transform(self.transform, hu, g, rows)

    def _load(self, epoch: int, b, items: np.ndarray):
        if self.pairs is not None:
            return self._load_pairs(epoch, b[0], items)
        hu = self.dataset.hu(items)
        y = torch.from_numpy(self.dataset.targets[items]) if self.labelled else None
        if self.device.type == "cpu":
            x = self._transform(hu, self._generator(epoch, b[0]), b[1])
            return x, y
        if torch.cuda.is_available():
            hu = hu.pin_memory()
        return hu, y

    def _load_pairs(self, epoch: int, b: int, items: np.ndarray):
        """items: the whole global batch (see __iter__); b: this rank's batch id."""
        rng = np.random.default_rng([self.seed, epoch, b // self.world, 0x9A125])
        a, bb, nxt = self.pairs.draw(self.dataset.rows(items), rng)
        bs = self.batch_size
        lo, hi = bs * self.rank // self.world, bs * (self.rank + 1) // self.world
        a, bb, nxt = a[lo:hi], bb[lo:hi], nxt[lo:hi]
        cache = self.dataset.cache
        hu = torch.from_numpy(np.stack([cache.read(a), cache.read(bb)], 1))
        y = torch.from_numpy(self._target_of[a]) if self.labelled else None
        nxt = torch.from_numpy(nxt)
        if self.device.type == "cpu":
            return [*self._transform(hu, self._generator(epoch, b), None), nxt], y
        if torch.cuda.is_available():
            hu = hu.pin_memory()
        return (hu, nxt), y

    def _finish(self, epoch: int, b: int, loaded):
        x, y = loaded
        if self.device.type != "cpu":
            if self.pairs is not None:
                hu, nxt = x
                x = [
                    *self._transform(hu.to(self.device, non_blocking=True), self._generator(epoch, b[0]), None),
                    nxt.to(self.device, non_blocking=True),
                ]
            else:
                x = self._transform(x.to(self.device, non_blocking=True), self._generator(epoch, b[0]), b[1])
            if y is not None:
                y = y.to(self.device, non_blocking=True)
        return (x, y) if self.labelled else x

    def _plan(self, epoch: int, start: int):
        """(number of batches, batch(b) -> this rank's item positions, gen_id(b) -> (generator id, rows))
        for the batches from `start` on. Keeps only this rank's share of the epoch's order (a global
        batch's rows for pairs), made batch by batch, so a rank holds 4 bytes per slice / world."""
        order = self.order(epoch)
        n, nb, bs = len(order), len(self), self.batch_size
        # shard (rank, world): this rank's contiguous share of every global batch, so the ranks together
        # read what one process reads, in the same order; pairs are drawn for the whole global batch and
        # each rank takes its rows, so the ranks together get the pairs (and labels) one process gets
        lo, hi = bs * self.rank // self.world, bs * (self.rank + 1) // self.world
        full = min(nb, n // bs)  # whole global batches (all but a last short one without drop_last)
        mine = order[: full * bs].reshape(full, bs)
        if self.pairs is None and self.world > 1:
            mine = mine[:, lo:hi]
        mine = np.ascontiguousarray(mine[start:])
        tail = order[full * bs :].copy() if nb > full else None
        del order

        def batch(b: int) -> np.ndarray:
            if b < full:
                return mine[b - start]
            return tail if self.pairs is not None else tail[lo:hi]

        def size(b: int) -> int:
            return bs if b < full else len(tail)

        # the transform's randomness is drawn per (epoch, batch): for the global batch, this rank's rows
        # taken, where the transform can (see takes_rows; not for pairs); per rank otherwise.
        if self.world == 1:

            def gen_id(b: int):
                return (b, None)
        elif self.pairs is None and self.transform is not None and takes_rows(self.transform):

            def gen_id(b: int):
                return (b, (min(lo, size(b)), size(b)))
        else:

            def gen_id(b: int):
                return (b * self.world + self.rank, None)

        return nb, batch, gen_id

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch  # fixed for this pass, whatever set_epoch does meanwhile
        nb, batch, gen_id = self._plan(epoch, start)
        ids = _Lazy(gen_id, start, nb)
        batches = _Lazy(batch, start, nb)
        nb = len(batches)
        if self.workers == 0:
            for b, items in zip(ids, batches):
                yield self._finish(epoch, b, self._load(epoch, b, items))
            return
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sparkct-loader") as pool:
            pending: deque = deque()
            nxt = 0
            try:
                while nxt < nb and len(pending) < self.prefetch:
                    pending.append(pool.submit(self._load, epoch, ids[nxt], batches[nxt]))
                    nxt += 1
                b = 0
                while pending:
                    loaded = pending.popleft().result()
                    if nxt < nb:
                        pending.append(pool.submit(self._load, epoch, ids[nxt], batches[nxt]))
                        nxt += 1
                    yield self._finish(epoch, ids[b], loaded)
                    b += 1
            finally:
                for f in pending:
                    f.cancel()


# ------------------------------------------------------------------------------------------ stratified subsets


def patient_subset_stratified(dataset, items, fraction: float, *, seed: int = 0, min_per_class: int = 1) -> np.ndarray:
    """Like :func:`patient_subset`, stratified by class: item positions of `items` holding `fraction`
    of the patients of each class (a patient's class is the largest label of its items in `items`;
    at least `min_per_class` patients of every class, so training sees every class). For one seed
    the subsets are nested across fractions (10 % inside 25 % inside 50 %): each class's patients
    are ranked once by a permutation drawn from (seed, class) and a fraction keeps a prefix."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    t = getattr(dataset, "targets", None)
    if t is None:
        raise ValueError("a stratified subset needs a labelled dataset (with targets)")
    items = np.asarray(items, dtype=np.int64)
    pat = np.asarray(dataset.patients)[items]
    uniq, inv = np.unique(pat, return_inverse=True)
    lab = np.full(len(uniq), -1, dtype=np.int64)
    np.maximum.at(lab, inv, np.asarray(t)[items])
    names = np.asarray(dataset.patient_names)[uniq]
    keep = []
    for c in np.unique(lab):
        ps = uniq[lab == c]
        ps = ps[np.argsort(names[lab == c], kind="stable")]  # by pseudonym, not by cache position
        ps = ps[np.random.default_rng([seed, 0x57A7, int(c)]).permutation(len(ps))]
        k = min(len(ps), max(min_per_class, int(math.ceil(fraction * len(ps) - 1e-9))))
        keep.append(ps[:k])
    return items[np.isin(pat, np.concatenate(keep) if keep else np.zeros(0, np.int64))]
