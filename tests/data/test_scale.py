"""Scale (issue 21): the index is memory-mapped, a dataset of every slice holds no per-slice array, the
loader keeps only its rank's share of the epoch's order, and the batches are exactly those of the
earlier in-memory implementation (pinned here as the reference)."""

from __future__ import annotations

import math
import os
import shutil
import sys
import zipfile

import numpy as np
import pytest

from sparkct.data import cache as cache_mod
from sparkct.data.cache import SliceCache, verify_index
from sparkct.data.datasets import CTSliceDataset, SliceLoader, SlicePairs, takes_rows
from sparkct.errors import UserError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import scale_model

# ---------------------------------------------------------------- the earlier implementation, as reference


def _old_run_order(n, run_length, rng):
    if run_length <= 1:
        return rng.permutation(n)
    starts = np.arange(0, n, run_length)
    starts = starts[rng.permutation(len(starts))]
    return np.concatenate([np.arange(s, min(s + run_length, n)) for s in starts]) if n else np.zeros(0, np.int64)


def _old_plan(ld: SliceLoader, epoch: int, start: int):
    n = len(ld.dataset)
    order = _old_run_order(n, ld.run_length, np.random.default_rng([ld.seed, epoch])) if ld.shuffle else np.arange(n)
    nb, bs = len(ld), ld.batch_size
    lo, hi = bs * ld.rank // ld.world, bs * (ld.rank + 1) // ld.world
    batches = [order[b * bs : (b + 1) * bs][lo:hi] for b in range(nb)]
    if ld.pairs is not None:
        batches = [order[b * bs : (b + 1) * bs] for b in range(nb)]
    if ld.world == 1:
        ids = [(b, None) for b in range(nb)]
    elif ld.pairs is None and ld.transform is not None and takes_rows(ld.transform):
        ids = [(b, (min(lo, m), m)) for b in range(nb) for m in [len(order[b * bs : (b + 1) * bs])]]
    else:
        ids = [(b * ld.world + ld.rank, None) for b in range(nb)]
    return batches[start:], ids[start:]


class _Rows:  # a transform that takes rows (as CTAugment does)
    takes_generator = True

    def __call__(self, hu, generator=None, rows=None):
        return hu


@pytest.mark.parametrize("n", [0, 1, 97, 1000])
@pytest.mark.parametrize("run_length", [1, 3, 8])
def test_run_order_is_the_earlier_one(n, run_length):
    from sparkct.data.datasets import run_order

    for seed in range(3):
        a = run_order(n, run_length, np.random.default_rng([seed, 1]))
        b = _old_run_order(n, run_length, np.random.default_rng([seed, 1]))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("run_length", [1, 5])
@pytest.mark.parametrize("kind", ["plain", "rows", "pairs", "noshuffle"])
def test_batches_are_the_earlier_ones_bit_for_bit(cache_dir, world, drop_last, run_length, kind):
    ds = CTSliceDataset(cache_dir)
    pairs = SlicePairs(ds) if kind == "pairs" else None
    for rank in range(world):
        for start in (0, 2):
            ld = SliceLoader(
                ds,
                12,
                seed=7,
                shard=(rank, world),
                drop_last=drop_last,
                run_length=run_length,
                transform=_Rows() if kind == "rows" else None,
                pairs=pairs,
                shuffle=kind != "noshuffle",
            )
            ld.set_epoch(3, start)
            nb, batch, gen_id = ld._plan(3, start)
            want_b, want_ids = _old_plan(ld, 3, start)
            assert nb - start == len(want_b) > 0
            got_b = [batch(b) for b in range(start, nb)]
            got_ids = [gen_id(b) for b in range(start, nb)]
            assert got_ids == want_ids
            for g, w in zip(got_b, want_b):
                np.testing.assert_array_equal(g, w)


def test_every_slice_dataset_holds_no_per_slice_array(cache_dir):
    ds = CTSliceDataset(cache_dir)
    assert ds._indices is None and len(ds) == len(ds.cache)
    x = next(iter(SliceLoader(ds, 8, seed=0)))
    assert x.shape[0] == 8 and ds._indices is None  # reading made no index array
    np.testing.assert_array_equal(ds.rows([4, 1]), [4, 1])
    np.testing.assert_array_equal(ds.indices, np.arange(len(ds.cache)))  # made on demand, as before
    sub = CTSliceDataset(cache_dir).subset([5, 2])
    np.testing.assert_array_equal(sub.indices, [5, 2])
    np.testing.assert_array_equal(sub.rows([1]), [2])


def test_the_index_is_memory_mapped_and_equal_to_np_load(cache_dir, monkeypatch):
    monkeypatch.setattr(cache_mod, "_MAP_BYTES", 0)  # map every member, however small
    c = SliceCache(cache_dir)
    assert isinstance(c.slice_series, np.memmap) and isinstance(c.series["key"], np.memmap)
    with np.load(os.path.join(cache_dir, "index.npz")) as z:
        np.testing.assert_array_equal(c.slice_index, z["slice.index"])
        np.testing.assert_array_equal(c.slice_z, z["slice.z"])
        np.testing.assert_array_equal(c.series["shape"], z["series.shape"])
        np.testing.assert_array_equal(c.patients, z["patients"])
    np.testing.assert_array_equal(c.read([3, 1]), np.stack([c[3], c[1]]))


def test_a_compressed_index_is_read(cache_dir, tmp_path):
    root = str(tmp_path / "c")
    shutil.copytree(cache_dir, root)
    p = os.path.join(root, "index.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(p, **arrays)
    c = SliceCache(root)
    np.testing.assert_array_equal(c.slice_series, arrays["slice.series"])


def test_a_flipped_byte_is_found_by_verify_index(cache_dir, tmp_path, capsys):
    from sparkct.cli import main

    root = str(tmp_path / "c")
    shutil.copytree(cache_dir, root)
    p = os.path.join(root, "index.npz")
    verify_index(p)
    assert main(["data", "info", root, "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("slice.z.npy")
    with open(p, "r+b") as f:
        f.seek(info.header_offset + 26)
        local = f.read(4)
        start = info.header_offset + 30 + int.from_bytes(local[:2], "little") + int.from_bytes(local[2:], "little")
        f.seek(start + info.file_size - 1)  # the member's last byte: pixel data, not its header
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    SliceCache(root)  # opening reads no CRC (it would read the whole index)
    with pytest.raises(UserError, match="slice.z.npy fails its CRC check"):
        verify_index(p)
    assert main(["data", "info", root]) == 0
    assert main(["data", "info", root, "--verify"]) != 0
    assert "fails its CRC check" in capsys.readouterr().err


def test_a_shard_of_the_right_size_with_a_foreign_header_is_named_when_read(cache_dir, tmp_path):
    root = str(tmp_path / "c")
    shutil.copytree(cache_dir, root)
    c = SliceCache(root)
    p = os.path.join(root, cache_mod.shard_rel(str(c.series["key"][0])))
    a = np.load(p)
    np.save(p, a.reshape(a.shape[0], -1))  # same bytes, other shape: same size
    c = SliceCache(root)
    with pytest.raises(UserError, match="the index expects int16"):
        c.read([0])


def test_the_scale_model_synthesizes_a_cache_the_loader_reads(tmp_path):
    root = str(tmp_path / "s")
    info = scale_model.synth(root, 2_345, per_series=100)
    assert info["series"] == 24
    out = scale_model.measure(root, world=2, batch=64)
    assert out["slices"] == 2_345 and out["batch_shape"] == [32, 3, 224, 224]
    want = np.random.default_rng([0, 0]).permutation(2_345)[:4].tolist()
    assert out["order_first"] == want
    assert math.isfinite(out["startup_s"]) and out["rss_open_mib"] < 100


def test_the_run_fingerprint_is_unchanged_and_makes_no_index_array(cache_dir):
    import hashlib
    import json

    from sparkct.train import trainer

    ds = CTSliceDataset(cache_dir)
    got = trainer._data_fingerprint(ds)
    assert ds._indices is None
    s = ds.cache.series
    h = hashlib.sha256()  # the earlier formula, on the materialized indices
    h.update(json.dumps([[str(k) for k in s["key"]], np.asarray(s["n"]).tolist()]).encode())
    h.update(np.asarray(s["shape"], np.int64).tobytes())
    h.update(np.arange(len(ds.cache), dtype=np.int64).tobytes())
    assert got == h.hexdigest()[:16]
    sub = ds.subset([3, 1, 2])
    h2 = hashlib.sha256()
    h2.update(json.dumps([[str(k) for k in s["key"]], np.asarray(s["n"]).tolist()]).encode())
    h2.update(np.asarray(s["shape"], np.int64).tobytes())
    h2.update(np.array([3, 1, 2], np.int64).tobytes())
    assert trainer._data_fingerprint(sub) == h2.hexdigest()[:16]


def test_a_pickled_cache_maps_its_tables_again(cache_dir, monkeypatch):
    import pickle

    monkeypatch.setattr(cache_mod, "_MAP_BYTES", 0)
    c = SliceCache(cache_dir)
    st = c.__getstate__()  # what pickling carries: no table (a map pickles as a copy of the whole table)
    assert st["slice_z"] is None and st["series"]["key"] is None
    d = pickle.loads(pickle.dumps(c))
    assert isinstance(d.slice_series, np.memmap) and isinstance(d.series["key"], np.memmap)
    for k in ("slice_series", "slice_index", "slice_z", "slice_instance", "slice_patient", "patients"):
        np.testing.assert_array_equal(getattr(d, k), getattr(c, k))
    assert d.series.keys() == c.series.keys()
    for k in c.series:
        np.testing.assert_array_equal(d.series[k], c.series[k])
    np.testing.assert_array_equal(d.read([5, 2]), c.read([5, 2]))
    monkeypatch.undo()
    e = pickle.loads(pickle.dumps(SliceCache(cache_dir, check_shards=False)))  # small tables: read, carried
    assert not isinstance(e.slice_z, np.memmap)
    np.testing.assert_array_equal(e.slice_z, c.slice_z)


class _Untouchable:
    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        raise AssertionError("a read looked up a slice table")


def test_reads_find_slices_from_the_series_sizes_not_the_slice_tables(cache_dir):
    c = SliceCache(cache_dir)
    ref = SliceCache(cache_dir)
    n = len(c)
    c.slice_series, c.slice_index = _Untouchable(), _Untouchable()  # a read must not touch their pages
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, 40)
    want = np.stack(
        [
            np.load(os.path.join(cache_dir, cache_mod.shard_rel(str(ref.series["key"][s]))))[k]
            for s, k in zip(ref.slice_series[idx], ref.slice_index[idx])
        ]
    )
    np.testing.assert_array_equal(c.read(idx), want)
    np.testing.assert_array_equal(c[int(idx[0])], want[0])
    ser, row = c.locate(np.arange(n))
    np.testing.assert_array_equal(ser, ref.slice_series)
    np.testing.assert_array_equal(row, ref.slice_index)


def test_an_index_with_slices_out_of_series_order_is_read_through_its_tables(cache_dir, tmp_path):
    root = str(tmp_path / "c")
    shutil.copytree(cache_dir, root)
    p = os.path.join(root, "index.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    for k in ("slice.series", "slice.index", "slice.z", "slice.instance", "slice.patient"):
        arrays[k] = arrays[k][::-1].copy()  # the last slice first
    np.savez(p, **arrays)
    c, ref = SliceCache(root), SliceCache(cache_dir)
    assert c._ends is None
    n = len(c)
    np.testing.assert_array_equal(c[0], ref[n - 1])
    np.testing.assert_array_equal(c.read([0, n - 1, 3]), ref.read([n - 1, 0, n - 4]))
    arrays["slice.index"][5] = 10**6  # and a row outside its series is still refused
    np.savez(p, **arrays)
    with pytest.raises(UserError, match="slice rows point outside their series"):
        SliceCache(root)
