"""The scale model of issue 21: a synthetic slice cache of N slices (cache.json, index.npz and one
shard file that every series hard-links, so 10^8 slices take ~2 GB of index and no pixel data), and
a fresh-process measurement of what one rank pays to open it: resident memory, start-up time and the
time to draw an epoch's batch order.

    python benchmarks/scale_model.py synth DIR N [--per-series 400]
    python benchmarks/scale_model.py measure DIR [--world 8 --batch 256]     # prints one JSON line

``bench_scale.py`` runs both for 10^6, 10^7 (and 10^8 with --bench-full) slices. The measurement uses
only public API (SliceCache, CTSliceDataset, SliceLoader), so the same script measures an older
sparkct (PYTHONPATH pointing at it) for a before/after comparison.

What is synthetic: every series has `per_series` slices of 224x224 and one patient; series records
(series/<kk>/<key>.json) are not written (a rank never reads them at start-up); the shards are one
sparse file, hard-linked once per series (reads return zeros)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile

import numpy as np

SHAPE = (224, 224)


def _npy_member(zf: zipfile.ZipFile, name: str, dtype, n: int, fill, chunk: int = 1 << 22) -> None:
    """One .npy member of n rows written chunk by chunk (fill(lo, hi) -> rows lo..hi), as np.savez
    stores it (uncompressed), without the whole column in memory."""
    dtype = np.dtype(dtype)
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
        )
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            f.write(np.ascontiguousarray(fill(lo, hi), dtype=dtype).tobytes())


def _small_member(zf: zipfile.ZipFile, name: str, a: np.ndarray) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def synth(root: str, n_slices: int, per_series: int = 400) -> dict:
    """A cache of n_slices slices in series of per_series (the last one shorter) at `root`."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sparkct.data.cache import FORMAT, SERIES_NUM_FIELDS, SERIES_STR_FIELDS, VERSION, shard_rel

    t0 = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    n_series = -(-n_slices // per_series)
    n = np.full(n_series, per_series, dtype=np.int32)
    n[-1] = n_slices - per_series * (n_series - 1)
    offsets = np.concatenate([[0], np.cumsum(n, dtype=np.int64)])
    keys = np.array([f"{s:040x}" for s in range(n_series)])
    patients = np.array([f"p{s:039x}" for s in range(n_series)])
    with zipfile.ZipFile(os.path.join(root, "index.npz"), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _small_member(zf, "format", np.array(FORMAT))
        _small_member(zf, "version", np.array(VERSION))

        def series_of(lo, hi):
            return np.searchsorted(offsets, np.arange(lo, hi), side="right") - 1

        _npy_member(zf, "slice.series", np.int32, n_slices, series_of)
        _npy_member(
            zf, "slice.index", np.int32, n_slices, lambda lo, hi: np.arange(lo, hi) - offsets[series_of(lo, hi)]
        )
        _npy_member(zf, "slice.z", np.float32, n_slices, lambda lo, hi: (np.arange(lo, hi) % per_series) * 1.25)
        _npy_member(zf, "slice.instance", np.int32, n_slices, lambda lo, hi: np.arange(lo, hi) % per_series + 1)
        _npy_member(zf, "slice.patient", np.int32, n_slices, series_of)
        _small_member(zf, "series.offset", offsets[:-1])
        _small_member(zf, "series.n", n)
        _small_member(zf, "series.shape", np.tile(np.array(SHAPE, dtype=np.int32), (n_series, 1)))
        _small_member(zf, "series.spacing", np.tile(np.array([1.25, 0.7, 0.7], np.float32), (n_series, 1)))
        _small_member(zf, "series.patient_index", np.arange(n_series, dtype=np.int32))
        _small_member(zf, "patients", patients)
        for k in SERIES_STR_FIELDS:
            v = {"key": keys, "patient": patients, "series_uid": np.char.add("1.2.826.0.1.", keys)}.get(k)
            _small_member(zf, "series." + k, v if v is not None else np.full(n_series, "CT"))
        for k in SERIES_NUM_FIELDS:
            _small_member(zf, "series." + k, np.full(n_series, 120.0, np.float32))

    # sparse shards of the longest series, each hard-linked by up to 60,000 series (ext4 allows 65,000
    # links to a file); a shorter last series gets its own file
    def sparse_shard(path: str) -> None:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<i2", "fortran_order": False, "shape": (per_series, *SHAPE)}
            )
            f.truncate(f.tell() + per_series * SHAPE[0] * SHAPE[1] * 2)

    links = 60_000
    for s in range(n_series):
        p = os.path.join(root, shard_rel(str(keys[s])))
        if s == 0 or str(keys[s])[:2] != str(keys[s - 1])[:2]:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        if int(n[s]) != per_series:
            np.save(p, np.zeros((int(n[s]), *SHAPE), np.int16))
            continue
        shared = os.path.join(root, f"shared-shard-{s // links}.npy")
        if s % links == 0:
            sparse_shard(shared)
        os.link(shared, p)
    with open(os.path.join(root, "cache.json"), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "settings": {"size": SHAPE[0]}, "synthetic": True}, f)
    return {
        "slices": n_slices,
        "series": n_series,
        "per_series": per_series,
        "index_bytes": os.path.getsize(os.path.join(root, "index.npz")),
        "synth_s": round(time.perf_counter() - t0, 2),
    }


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _mib(b: int) -> float:
    return round(b / 2**20, 1)


def measure(root: str, world: int = 8, batch: int = 256, rank: int = 0) -> dict:
    """One rank's cost in this (fresh) process: import, open + loader, epoch order, first batch."""
    t0 = time.perf_counter()
    import torch  # noqa: F401  (every rank imports it; timed apart from the cache)

    from sparkct.data.datasets import CTSliceDataset, SliceLoader

    t_import = time.perf_counter() - t0
    base = _status()
    t1 = time.perf_counter()
    ds = CTSliceDataset(root)
    loader = SliceLoader(ds, batch, seed=0, shard=(rank, world))
    t_open = time.perf_counter() - t1
    opened = _status()
    t2 = time.perf_counter()
    order = loader.order(0)
    t_order = time.perf_counter() - t2
    first = [int(v) for v in order[:4]]
    del order  # the loader draws its own below
    t3 = time.perf_counter()
    x = next(iter(loader))
    t_first = time.perf_counter() - t3
    after = _status()
    # finding 10^6 random slices' series and rows: through the series sizes (SliceCache.locate, where the
    # cache has it) and through the slice tables (what reads did before): how much of the index becomes
    # resident
    rng = np.random.default_rng(1)
    probe = rng.integers(0, len(ds), 10**6)
    locate = getattr(ds.cache, "locate", None)
    f0 = _status()["RssFile"]
    if locate is not None:
        locate(probe)
    f1 = _status()["RssFile"]
    _ = ds.cache.slice_series[probe], ds.cache.slice_index[probe]
    f2 = _status()["RssFile"]
    return {
        "slices": len(ds),
        "series": int(ds.cache.n_series),
        "world": world,
        "batch": batch,
        "import_s": round(t_import, 3),
        "startup_s": round(t_open, 3),
        "order_s": round(t_order, 3),
        "first_batch_s": round(t_first, 3),
        "order_first": first,
        "batch_shape": list(x.shape),
        "rss_after_import_mib": _mib(base["VmRSS"]),
        "rss_open_mib": _mib(opened["VmRSS"] - base["VmRSS"]),
        "rss_anon_open_mib": _mib(opened["RssAnon"] - base["RssAnon"]),
        "rss_file_open_mib": _mib(opened["RssFile"] - base["RssFile"]),
        "rss_first_batch_mib": _mib(after["VmRSS"] - base["VmRSS"]),
        "rss_anon_first_batch_mib": _mib(after["RssAnon"] - base["RssAnon"]),
        "peak_rss_mib": _mib(after["VmHWM"] - base["VmRSS"]),
        "rss_file_locate_1e6_mib": _mib(f1 - f0) if locate is not None else None,
        "rss_file_tables_1e6_mib": _mib(f2 - f1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth")
    s.add_argument("root")
    s.add_argument("n", type=float)
    s.add_argument("--per-series", type=int, default=400)
    m = sub.add_parser("measure")
    m.add_argument("root")
    m.add_argument("--world", type=int, default=8)
    m.add_argument("--batch", type=int, default=256)
    a = p.parse_args(argv)
    if a.cmd == "synth":
        print(json.dumps(synth(a.root, int(a.n), a.per_series)))
    else:
        print(json.dumps(measure(a.root, a.world, a.batch)))


if __name__ == "__main__":
    main()
