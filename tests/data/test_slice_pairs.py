"""Slice pairs for next-slice prediction: drawn from the cache's series index, deterministic per batch,
sharded like single slices, resumable, and refused when the data has no neighbouring slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkct.data import CTSliceDataset, SliceLoader, SlicePairs
from sparkct.errors import UserError


def _raw_pairs(hu):
    """An identity pair transform: the raw HU of A and B, so batches can be compared exactly."""
    return hu[:, :1].float(), hu[:, 1:].float()


def test_pairs_are_neighbours_or_far_apart_by_the_cache_index(cache_dir):
    ds = CTSliceDataset(cache_dir)
    c = ds.cache
    pairs = SlicePairs(ds, gap=3, p_other=0.25)
    items = np.tile(np.arange(len(c)), 20)
    a, b, y = pairs.draw(items, np.random.default_rng(0))
    ser_a, ser_b = c.slice_series[a], c.slice_series[b]
    ka, kb = c.slice_index[a].astype(int), c.slice_index[b].astype(int)
    pos = y == 1
    # positives: B is slice k+1 of A's series, by the index (and by position along the slice normal)
    assert (ser_a[pos] == ser_b[pos]).all() and (kb[pos] == ka[pos] + 1).all()
    assert (c.slice_z[b[pos]] > c.slice_z[a[pos]]).all()
    assert np.array_equal(pairs.is_next(a, b), pos)
    # negatives: another series, or the same series at least `gap` slices away
    same = ser_a[~pos] == ser_b[~pos]
    assert (np.abs(kb[~pos] - ka[~pos])[same] >= 3).all()
    assert 0.15 < (~same).mean() < 0.35  # ~p_other of the negatives come from other series
    assert same.any()
    assert 0.4 < pos.mean() < 0.6
    # A is the item, or (a positive for the last slice of a series) the slice before it
    items_k = c.slice_index[items].astype(int)
    moved = a != items
    assert (pos[moved]).all() and (c.slice_index[a[moved]] + 1 == items_k[moved]).all()
    assert np.array_equal(b[moved], items[moved])
    # every same-series non-neighbour at distance >= gap can be drawn (uniform over the candidates)
    s0 = int(c.slice_series[0])
    n0 = int(c.series["n"][s0])
    first = np.full(4000, int(c.series["offset"][s0]))
    a0, b0, y0 = SlicePairs(ds, gap=3, p_other=0.0).draw(first, np.random.default_rng(1))
    far = c.slice_index[b0[y0 == 0]]
    assert set(far.tolist()) == set(range(3, n0))


def test_pairs_stay_inside_the_dataset_and_are_a_function_of_the_rng(cache_dir):
    ds = CTSliceDataset(cache_dir)
    keep = np.nonzero(ds.patients != ds.patients[0])[0]  # a patient split without the first patient
    sub = ds.subset(keep)
    pairs = SlicePairs(sub)
    a, b, _ = pairs.draw(np.repeat(sub.indices, 10), np.random.default_rng(3))
    assert np.isin(a, sub.indices).all() and np.isin(b, sub.indices).all()
    again = pairs.draw(np.repeat(sub.indices, 10), np.random.default_rng(3))
    assert all(np.array_equal(u, v) for u, v in zip((a, b), again[:2]))


def test_no_neighbouring_slices_is_a_clear_error(cache_dir):
    ds = CTSliceDataset(cache_dir)
    firsts = ds.cache.series["offset"].astype(np.int64)  # one slice of every series
    with pytest.raises(UserError, match="at least 2 neighbouring slices"):
        SlicePairs(CTSliceDataset(cache_dir, indices=firsts))
    one = np.arange(int(ds.cache.series["n"][0])) + int(firsts[0])  # a single series, too short for the gap
    with pytest.raises(UserError, match="lower the gap"):
        SlicePairs(CTSliceDataset(cache_dir, indices=one), gap=len(one))
    with pytest.raises(UserError, match="gap"):
        SlicePairs(ds, gap=1)


def test_loader_yields_pairs_resumes_exactly_and_shards_like_one_process(cache_dir):
    ds = CTSliceDataset(cache_dir)
    pairs = SlicePairs(ds)
    kw = dict(transform=_raw_pairs, seed=4, pairs=pairs)
    full = list(SliceLoader(ds, 8, **kw))
    xa, xb, y = full[0]
    assert xa.shape == xb.shape == (8, 1, 64, 64) and y.dtype == torch.int64
    # the labels say what the HU says: a positive's B is the slice after its A
    c = ds.cache
    flat = c.read(np.arange(len(c))).reshape(len(c), -1)
    for xa, xb, y in full:
        ia = [int(np.nonzero((flat == r).all(1))[0][0]) for r in xa.short().reshape(len(xa), -1).numpy()]
        ib = [int(np.nonzero((flat == r).all(1))[0][0]) for r in xb.short().reshape(len(xb), -1).numpy()]
        assert np.array_equal(pairs.is_next(ia, ib), y.numpy().astype(bool))
    # resume: starting at batch 2 gives the batches an uninterrupted pass gives there
    ld = SliceLoader(ds, 8, **kw)
    ld.set_epoch(0, 2)
    for got, want in zip(ld, full[2:]):
        assert all(torch.equal(u, v) for u, v in zip(got, want))
    # two ranks together: the same pairs and labels as one process
    ranks = [list(SliceLoader(ds, 8, shard=(r, 2), **kw)) for r in range(2)]
    for b, want in enumerate(full):
        for k in range(3):
            assert torch.equal(torch.cat([ranks[0][b][k], ranks[1][b][k]]), want[k])
    # another epoch draws other pairs
    ld.set_epoch(1)
    assert not all(torch.equal(u[2], v[2]) for u, v in zip(ld, full))


def test_labelled_pairs_carry_the_targets_of_slice_a(cache_dir):
    from sparkct.data import CTLabelledDataset

    c = CTSliceDataset(cache_dir).cache
    rows = [
        {"series_uid": str(u), "slice_index": str(k), "label": str(k % 2)}
        for s, u in enumerate(c.series["series_uid"])
        for k in range(int(c.series["n"][s]))
    ]
    ds = CTLabelledDataset(cache_dir, rows)
    pairs = SlicePairs(ds)
    for (xa, _xb, _nxt), t in SliceLoader(ds, 8, transform=_raw_pairs, seed=0, pairs=pairs):
        flat = c.read(np.arange(len(c))).reshape(len(c), -1)
        ia = [int(np.nonzero((flat == r).all(1))[0][0]) for r in xa.short().reshape(len(xa), -1).numpy()]
        assert np.array_equal(t.numpy(), c.slice_index[ia] % 2)
