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

import functools
import io
import json
import mmap
import os
import zipfile
import zlib
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


# What a folder prepared by `sparkct data prepare` holds besides cache.json.
CACHE_PARTS = ("index.npz", "shards", "series", "series.csv", "report.json")

# index.npz arrays every reader needs (write_index writes these and more).
INDEX_KEYS = (
    "format",
    "version",
    "slice.series",
    "slice.index",
    "slice.z",
    "slice.instance",
    "slice.patient",
    "patients",
    "series.offset",
    "series.n",
    "series.shape",
    "series.key",
    "series.series_uid",
)


def _again(root: str) -> str:
    # prepare resumes from the series records, re-makes each series whose shard does not load with its
    # recorded shape, and rewrites the index
    return f"run the `sparkct data prepare SRC {root}` that made it again (it re-makes what is damaged)"


def _reset(root: str) -> str:
    # a damaged cache.json: prepare cannot resume from it
    return f"prepare it again with `sparkct data prepare SRC {root} --reset` (or into a new folder)"


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _read_manifest(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({_one_line(e)}); {_reset(os.path.dirname(path))}") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise UserError(f"{path}: not the manifest of a sparkct slice cache; {_reset(os.path.dirname(path))}")
    return man


def _member_array(f, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member of an npz archive: memory-mapped where it is stored uncompressed (as np.savez
    writes it), so opening the index costs no memory in the number of slices; read otherwise."""
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as m:
            return np.lib.format.read_array(m, allow_pickle=False)
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of {info.filename}")
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(start)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError(f"{info.filename}: pickled data (object arrays are not allowed)")
    data = f.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data - start + nbytes > info.file_size or data + nbytes > os.fstat(f.fileno()).st_size:
        raise EOFError(f"{info.filename}: truncated")
    if nbytes < _MAP_BYTES:  # small tables: read (a map per member costs more than it saves)
        f.seek(data)
        a = np.frombuffer(bytearray(f.read(nbytes)), dtype=dtype) if nbytes else np.zeros(0, dtype)
        return a.reshape(shape, order="F" if fortran else "C")
    return np.memmap(f, dtype=dtype, mode="r", offset=data, shape=tuple(shape), order="F" if fortran else "C")


def _read_index(path: str) -> dict[str, np.ndarray]:
    """index.npz's arrays, memory-mapped (see _member_array): a damaged archive or member header fails
    here, not in the middle of a run. The members' CRCs are not read (that would read the whole index):
    :func:`verify_index` does, and ``sparkct data verify`` runs it."""
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            data = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                data[info.filename[:-4]] = _member_array(f, zf, info)
    except zipfile.BadZipFile as e:
        why = "not an npz archive" if "not a zip file" in str(e) else _one_line(e)
        raise UserError(f"{path}: not a readable slice index ({why}); {_again(os.path.dirname(path))}") from e
    except (OSError, ValueError, EOFError, zlib.error, SyntaxError) as e:
        raise UserError(f"{path}: not a readable slice index ({_one_line(e)}); {_again(os.path.dirname(path))}") from e
    missing = [k for k in INDEX_KEYS if k not in data]
    if missing:
        raise UserError(f"{path}: no {missing[0]!r} array ({len(missing)} missing); {_again(os.path.dirname(path))}")
    return data


def verify_index(path: str) -> None:
    """Read every member of index.npz and check its CRC (UserError naming the index if one differs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a readable slice index ({_one_line(e)}); {_again(os.path.dirname(path))}") from e
    if bad is not None:
        raise UserError(f"{path}: {bad} fails its CRC check; {_again(os.path.dirname(path))}")


def _check_tables(path: str, data: dict[str, np.ndarray]) -> bool:
    """The index's tables agree in length and point inside each other (cheap: no shard is read). Returns
    whether the slice rows are in series order (as `prepare` writes them: series 0's slices in order,
    then series 1's, ...), so that a slice's series and row follow from the series' sizes alone."""
    try:
        return _check_table_rows(path, data)
    except (TypeError, ValueError, IndexError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: tables of the wrong type ({_one_line(e)}); {_again(os.path.dirname(path))}") from e


def _check_table_rows(path: str, data: dict[str, np.ndarray]) -> bool:
    n_slices = len(data["slice.series"])
    n_series = len(data["series.key"])
    for k in ("slice.index", "slice.z", "slice.instance", "slice.patient"):
        if len(data[k]) != n_slices:
            raise UserError(
                f"{path}: {k!r} has {len(data[k])} rows, 'slice.series' {n_slices}; {_again(os.path.dirname(path))}"
            )
    for k in ("series.offset", "series.n", "series.shape", "series.series_uid"):
        if len(data[k]) != n_series:
            raise UserError(
                f"{path}: {k!r} has {len(data[k])} rows, 'series.key' {n_series}; {_again(os.path.dirname(path))}"
            )
    if data["series.shape"].ndim != 2 or data["series.shape"].shape[1] != 2:
        raise UserError(f"{path}: 'series.shape' is not (series, 2); {_again(os.path.dirname(path))}")
    if int(np.sum(data["series.n"], dtype=np.int64)) != n_slices:
        raise UserError(
            f"{path}: the series hold {int(np.sum(data['series.n']))} slices, the slice table {n_slices}; "
            + _again(os.path.dirname(path))
        )
    series_n = np.asarray(data["series.n"])
    n_patients = len(data["patients"])
    ends = np.cumsum(series_n, dtype=np.int64)
    starts = ends - series_n
    in_order = True
    # the slice-level checks read the whole slice table: in chunks, giving the memory-mapped pages back
    # after each, so a rank's resident memory does not grow with the cache
    for lo in range(0, n_slices, _CHECK_ROWS):
        hi = min(n_slices, lo + _CHECK_ROWS)
        ser, idx = np.asarray(data["slice.series"][lo:hi]), np.asarray(data["slice.index"][lo:hi])
        if in_order:  # the rows prepare writes for [lo, hi): each series' slices in order, series by series
            s0, s1 = int(np.searchsorted(ends, lo, "right")), int(np.searchsorted(ends, hi - 1, "right"))
            counts = np.maximum(np.minimum(ends[s0 : s1 + 1], hi) - np.maximum(starts[s0 : s1 + 1], lo), 0)
            want = np.repeat(np.arange(s0, s1 + 1, dtype=np.int64), counts)
            in_order = np.array_equal(ser, want) and np.array_equal(idx, np.arange(lo, hi) - starts[want])
        if not in_order and (ser.min() < 0 or ser.max() >= n_series or idx.min() < 0 or (idx >= series_n[ser]).any()):
            raise UserError(f"{path}: slice rows point outside their series; {_again(os.path.dirname(path))}")
        pat = np.asarray(data["slice.patient"][lo:hi])
        if pat.min() < 0 or pat.max() >= n_patients:
            raise UserError(f"{path}: 'slice.patient' points outside 'patients'; {_again(os.path.dirname(path))}")
        del ser, idx, pat
        for k in ("slice.series", "slice.index", "slice.patient"):
            _release(data[k])
    return in_order


_CHECK_ROWS = 1 << 22
_MAP_BYTES = 1 << 20


def _release(a: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set (they stay in the page
    cache); nothing for an array in memory."""
    m = getattr(a, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


def _shard_problem(path: str, shape: tuple[int, int, int]) -> str | None:
    """What is wrong with a shard that should hold int16 `shape`, from its header and size; None if nothing."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "the file is empty"
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            have, fortran, dtype = read(f)
            start = f.tell()
    except FileNotFoundError:
        return "the file is missing"
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        return f"not an .npy array ({_one_line(e)})"
    if dtype != np.int16 or tuple(have) != shape or fortran:
        return f"holds {dtype} {tuple(have)}, the index expects int16 {shape}"
    want = start + int(np.prod(shape)) * 2
    if size < want:
        return f"truncated: {size} bytes of {want}"
    return None


@functools.lru_cache(maxsize=4096)
def _header_bytes(shape: tuple[int, int, int]) -> int:
    """The .npy header's length that np.save writes for an int16 array of `shape`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i2", "fortran_order": False, "shape": shape})
    return len(buf.getvalue())


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

    def __init__(self, root: str, max_open: int = 1024, *, check_shards: bool = True):
        self.root = root
        path = os.path.join(root, "index.npz")
        man_path = os.path.join(root, "cache.json")
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"no cache at {root!r}: no such folder (make one with `sparkct data prepare SRC {root}`)"
            )
        if not os.path.exists(man_path):
            there = [n for n in CACHE_PARTS if os.path.exists(os.path.join(root, n))]
            raise UserError(
                f"{root!r} is not a prepared cache: it has no cache.json"
                + (f" (but {', '.join(there)}: a damaged cache; prepare it again into a new folder)" if there else "")
            )
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{root!r} has no index.npz: its prepare did not finish (run the same "
                f"`sparkct data prepare` again to resume)"
            )
        self.manifest = _read_manifest(man_path)
        data = _read_index(path)
        if str(data["format"]) != FORMAT or int(data["version"]) != VERSION:
            raise UserError(f"{root!r}: unsupported cache format/version")
        in_order = _check_tables(path, data)
        self.slice_series = data["slice.series"]
        self.slice_index = data["slice.index"]
        self.slice_z = data["slice.z"]
        self.slice_instance = data["slice.instance"]
        self.slice_patient = data["slice.patient"]
        self.patients = data["patients"]
        self.series = {k[len("series.") :]: v for k, v in data.items() if k.startswith("series.")}
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._max_open = max_open
        # where the slice rows are in series order (always, from prepare), reads find a slice's series and
        # row from the series' sizes (16 bytes a series) instead of the slice tables: their pages never
        # become resident, however many slices an epoch reads
        n = np.asarray(self.series["n"], dtype=np.int64)
        self._ends = np.cumsum(n) if in_order else None
        self._starts = self._ends - n if in_order else None
        shapes = self.series["shape"]
        self.uniform_shape = tuple(int(v) for v in shapes[0]) if len(shapes) and (shapes == shapes[0]).all() else None
        if check_shards:
            self.check_shards()

    def _damaged(self, s: int, what: str) -> UserError:
        path = os.path.join(self.root, shard_rel(str(self.series["key"][s])))
        return UserError(
            f"{path} (series {self.series['series_uid'][s]}): {what}; the cache is damaged: {_again(self.root)}"
        )

    def check_shards(self) -> None:
        """Every shard against the index, from its .npy header and its size alone (no pixel is read): a
        missing, zero-byte, foreign, truncated or wrongly shaped shard raises UserError naming the shard,
        its series and how many others are damaged. A run checks this before it writes anything."""
        # From each shard's size first (one stat, no open): a shard of the size np.save gives its shape
        # is taken as sound, the header is read only of the others, to say what is wrong. (A shard of the
        # right size with a foreign header is named at its first read.)
        bad: list[tuple[int, str]] = []
        n = np.asarray(self.series["n"], dtype=np.int64)
        hw = np.asarray(self.series["shape"], dtype=np.int64)
        want = n * hw[:, 0] * hw[:, 1] * 2
        keys = self.series["key"].tolist()
        for s in np.flatnonzero(n > 0).tolist():
            p = os.path.join(self.root, shard_rel(keys[s]))
            try:
                head = os.stat(p).st_size - int(want[s])
            except OSError:
                head = -1
            shape = (int(n[s]), int(hw[s, 0]), int(hw[s, 1]))
            if head == _header_bytes(shape):
                continue
            what = _shard_problem(p, shape)
            if what:
                bad.append((s, what))
        if bad:
            s, what = bad[0]
            more = f" ({len(bad) - 1} more shards are damaged too)" if len(bad) > 1 else ""
            raise self._damaged(s, what + more)

    def __len__(self) -> int:
        return len(self.slice_series)

    @property
    def n_series(self) -> int:
        return len(self.series["key"])

    # attribute -> index.npz table, for the tables a pickled cache maps again instead of carrying
    _TABLES = {
        "slice_series": "slice.series",
        "slice_index": "slice.index",
        "slice_z": "slice.z",
        "slice_instance": "slice.instance",
        "slice_patient": "slice.patient",
        "patients": "patients",
    }

    def __getstate__(self):
        # shards and memory-mapped index tables are mapped again where it is unpickled (a DataLoader worker,
        # another process): pickling a map would copy the whole table
        d = dict(self.__dict__)
        d["_maps"] = OrderedDict()
        remap = [k for k in self._TABLES if isinstance(d.get(k), np.memmap)]
        remap += ["series." + k for k, v in d["series"].items() if isinstance(v, np.memmap)]
        if remap:
            d["series"] = {k: (None if isinstance(v, np.memmap) else v) for k, v in d["series"].items()}
            for k in remap:
                if not k.startswith("series."):
                    d[k] = None
            d["_remap"] = remap
        return d

    def __setstate__(self, d):
        remap = d.pop("_remap", None)
        self.__dict__.update(d)
        if remap:
            data = _read_index(os.path.join(self.root, "index.npz"))
            for k in remap:
                if k.startswith("series."):
                    self.series[k[len("series.") :]] = data[k]
                else:
                    setattr(self, k, data[self._TABLES[k]])

    def shard(self, s: int) -> np.ndarray:
        m = self._maps.get(s)
        if m is None:
            try:
                m = np.load(
                    os.path.join(self.root, shard_rel(str(self.series["key"][s]))), mmap_mode="r", allow_pickle=False
                )
            except (OSError, ValueError, EOFError) as e:  # damaged since the cache was opened (checked then)
                raise self._damaged(s, f"cannot be read ({_one_line(e)})") from e
            want = (int(self.series["n"][s]), *(int(v) for v in self.series["shape"][s]))
            if m.shape != want or m.dtype != np.int16:
                raise self._damaged(s, f"holds {m.dtype} {m.shape}, the index expects int16 {want}")
            self._maps[s] = m
            if len(self._maps) > self._max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(s)
        return m

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(series, row in its shard) of slices `indices` (int64 arrays; indices must be in range)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._ends is not None:
            ser = np.searchsorted(self._ends, idx, side="right")
            return ser, idx - self._starts[ser]
        return np.asarray(self.slice_series[idx], np.int64), np.asarray(self.slice_index[idx], np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range for a cache of {len(self)} slices")
        ser, row = self.locate([i])
        return np.array(self.shard(int(ser[0]))[row[0]])

    def read(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Slices `indices` as one (B, H, W) int16 array (all slices must share a shape). Reads are
        grouped by shard, in shard order, so runs of adjacent slices become one memcpy."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"slice indices out of range [0, {len(self)})")
        ser, rows_in = self.locate(idx)
        shapes = self.series["shape"][ser]
        if len(idx) and not (shapes == shapes[0]).all():
            raise ValueError("slices of different sizes in one batch: prepare with --size, or read one by one")
        h, w = (int(v) for v in shapes[0]) if len(idx) else (0, 0)
        if out is None:
            out = np.empty((len(idx), h, w), dtype=np.int16)
        order = np.lexsort((rows_in, ser))
        pos = 0
        while pos < len(order):
            s = ser[order[pos]]
            end = pos
            while end < len(order) and ser[order[end]] == s:
                end += 1
            rows = order[pos:end]
            local = rows_in[rows]
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
