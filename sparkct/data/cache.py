"""Reading the prepared slice cache (:class:`SliceCache`) and its layout; ``sparkct data prepare``
(:mod:`sparkct.data.preparing`) writes it.

Layout of a cache folder::

    cache.json                 format, version, settings, salt (patient pseudonyms are salted hashes)
    shards/<kk>/<key>.npy      one series: int16 HU slices (n, H, W), sorted along the slice normal
    series/<kk>/<key>.json     the series record, written after its shard: its presence marks the
                               series done (metadata, slice positions, source fingerprint)
    index.npz                  one row per slice (+ per-series and per-patient tables), see SliceCache
    series.csv                 one row per series, for people
    report.json, skipped.csv   what the last run did, skipped and why

Nothing here imports torch or pydicom.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np

from sparkct.errors import UserError

FORMAT = "sparkct-ct-slice-cache"
VERSION = 1

# Per-series fields of index.npz besides offset, n, shape, spacing and patient_index.
SERIES_STR_FIELDS = (
    "key",
    "series_uid",
    "study_uid",
    "patient",
    "modality",
    "kind",
    "patient_sex",
    "patient_age",
    "manufacturer",
    "model",
    "kernel",
    "body_part",
    "transfer_syntax",
    "sorted_by",
)
SERIES_NUM_FIELDS = ("kvp", "age_years", "thickness")


def shard_rel(key: str) -> str:
    return f"shards/{key[:2]}/{key}.npy"


def record_rel(key: str) -> str:
    return f"series/{key[:2]}/{key}.json"


class SliceCache:
    """Read access to a prepared cache: ``len(cache)`` slices, ``cache[i]`` an int16 (H, W) HU slice,
    ``cache.read(indices)`` a batch (B, H, W), shards memory-mapped lazily (an LRU of open maps).

    Tables (numpy arrays, one row per slice): ``slice_series``, ``slice_index`` (row in its shard),
    ``slice_z`` (mm along the normal), ``slice_instance``, ``slice_patient`` (index into
    ``patients``, the salted patient hashes). Per series: ``series[name]`` for the fields of
    SERIES_STR_FIELDS / SERIES_NUM_FIELDS plus 'offset', 'n', 'shape', 'spacing'."""

    def __init__(self, root: str, max_open: int = 1024):
        self.root = root
        path = os.path.join(root, "index.npz")
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"no cache at {root!r}: no such folder (make one with `sparkct data prepare SRC {root}`)"
            )
        if not os.path.exists(path):
            if os.path.exists(os.path.join(root, "cache.json")):
                raise FileNotFoundError(
                    f"{root!r} has no index.npz: its prepare did not finish (run the same "
                    f"`sparkct data prepare` again to resume)"
                )
            raise UserError(f"{root!r} is not a prepared cache (no cache.json, no index.npz)")
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT or int(z["version"]) != VERSION:
                raise UserError(f"{root!r}: unsupported cache format/version")
            data = {k: z[k] for k in z.files}
        with open(os.path.join(root, "cache.json")) as f:
            self.manifest = json.load(f)
        self.slice_series = data["slice.series"]
        self.slice_index = data["slice.index"]
        self.slice_z = data["slice.z"]
        self.slice_instance = data["slice.instance"]
        self.slice_patient = data["slice.patient"]
        self.patients = data["patients"]
        self.series = {k[len("series.") :]: v for k, v in data.items() if k.startswith("series.")}
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._max_open = max_open
        shapes = self.series["shape"]
        self.uniform_shape = tuple(int(v) for v in shapes[0]) if len(shapes) and (shapes == shapes[0]).all() else None

    def __len__(self) -> int:
        return len(self.slice_series)

    @property
    def n_series(self) -> int:
        return len(self.series["key"])

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        d = dict(self.__dict__)
        d["_maps"] = OrderedDict()
        return d

    def shard(self, s: int) -> np.ndarray:
        m = self._maps.get(s)
        if m is None:
            m = np.load(os.path.join(self.root, shard_rel(str(self.series["key"][s]))), mmap_mode="r")
            self._maps[s] = m
            if len(self._maps) > self._max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(s)
        return m

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range for a cache of {len(self)} slices")
        return np.array(self.shard(int(self.slice_series[i]))[self.slice_index[i]])

    def read(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Slices `indices` as one (B, H, W) int16 array (all slices must share a shape). Reads are
        grouped by shard, in shard order, so runs of adjacent slices become one memcpy."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"slice indices out of range [0, {len(self)})")
        ser = self.slice_series[idx]
        shapes = self.series["shape"][ser]
        if len(idx) and not (shapes == shapes[0]).all():
            raise ValueError("slices of different sizes in one batch: prepare with --size, or read one by one")
        h, w = (int(v) for v in shapes[0]) if len(idx) else (0, 0)
        if out is None:
            out = np.empty((len(idx), h, w), dtype=np.int16)
        order = np.lexsort((self.slice_index[idx], ser))
        pos = 0
        while pos < len(order):
            s = ser[order[pos]]
            end = pos
            while end < len(order) and ser[order[end]] == s:
                end += 1
            rows = order[pos:end]
            local = self.slice_index[idx[rows]]
            m = self.shard(int(s))
            if len(local) > 1 and (np.diff(local) == 1).all():
                out[rows] = m[local[0] : local[-1] + 1]
            else:
                out[rows] = m[local]
            pos = end
        return out

    def series_of(self, i: int) -> dict:
        s = int(self.slice_series[i])
        return {k: (v[s].tolist() if hasattr(v[s], "tolist") else v[s]) for k, v in self.series.items()}

    def record(self, s: int) -> dict:
        """The full JSON record of series `s` (positions, per-series skip reasons, ...)."""
        with open(os.path.join(self.root, record_rel(str(self.series["key"][s])))) as f:
            return json.load(f)
