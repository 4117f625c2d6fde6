"""Datasets on the cache, labels, patient-level splits, the batched loader."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from sparkct.data.augment import CTAugment, CTResize, MultiCrop
from sparkct.data.cache import SliceCache
from sparkct.data.datasets import (
    CTLabelledDataset,
    CTSliceDataset,
    SliceLoader,
    collate_batch,
    patient_split,
    patient_subset,
    run_order,
)
from sparkct.data.windows import apply_windows


def test_slice_dataset(cache_dir):
    ds = CTSliceDataset(cache_dir)
    c = ds.cache
    assert len(ds) == len(c)
    x = ds[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, apply_windows(torch.from_numpy(c[3])))
    hu = ds.hu([3, 0, 9])
    assert hu.shape == (3, 1, 64, 64) and hu.dtype == torch.int16
    b = ds.__getitems__([3, 0, 9])
    torch.testing.assert_close(b[0], x)
    raw = CTSliceDataset(c, windows=None)
    assert raw[3].shape == (1, 64, 64) and float(raw[3].min()) >= -1024
    sub = CTSliceDataset(c, indices=[5, 6], transform=CTResize(32, windows="lung"))
    assert len(sub) == 2 and sub[1].shape == (1, 32, 32)
    with pytest.raises(IndexError):
        CTSliceDataset(c, indices=[len(c)])
    dl = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_batch)
    first = next(iter(dl))
    assert first.shape == (8, 3, 64, 64)
    torch.testing.assert_close(first[3], x)


def test_series_labels(synth_dir, cache_dir):
    ds = CTLabelledDataset(cache_dir, os.path.join(synth_dir, "labels.csv"))
    assert ds.level == "series" and ds.classes == [0, 1] and len(ds) == len(ds.cache)
    rows = {r["series_uid"]: int(r["label"]) for r in csv.DictReader(open(os.path.join(synth_dir, "labels.csv")))}
    uids = ds.cache.series["series_uid"]
    for i in range(0, len(ds), 17):
        assert ds.targets[i] == rows[str(uids[ds.series[i]])]
    x, y = ds[5]
    assert x.shape == (3, 64, 64) and y == int(ds.targets[5])
    X, Y = ds.__getitems__([1, 2])
    assert X.shape == (2, 3, 64, 64) and Y.tolist() == ds.targets[[1, 2]].tolist()
    assert set(ds.series_targets().values()) <= {0, 1}


def test_slice_labels_by_instance_number_index_and_z(synth_dir, cache_dir, tmp_path):
    path = os.path.join(synth_dir, "slice_labels.csv")
    ds = CTLabelledDataset(cache_dir, path)
    assert ds.level == "slice" and len(ds) == len(ds.cache) and ds.unmatched_rows == 0
    rows = list(csv.DictReader(open(path)))
    want = {(r["series_uid"], int(r["instance_number"])): int(r["label"]) for r in rows}
    c = ds.cache
    got = {
        (str(c.series["series_uid"][c.slice_series[i]]), int(c.slice_instance[i])): int(ds.targets[k])
        for k, i in enumerate(ds.indices)
    }
    assert got == want
    assert ds.targets.sum() > 0  # the synthetic set has nodules
    # the same labels keyed by z position and by slice index
    by_z = [{"series_uid": r["series_uid"], "z_mm": r["z_mm"], "label": r["label"]} for r in rows]
    dz = CTLabelledDataset(cache_dir, by_z)
    np.testing.assert_array_equal(dz.targets, ds.targets)
    sidx = []
    for i in range(len(c)):
        sidx.append(
            {
                "series_key": str(c.series["key"][c.slice_series[i]]),
                "slice_index": int(c.slice_index[i]),
                "label": "pos" if ds.targets[i] else "neg",
            }
        )
    dn = CTLabelledDataset(cache_dir, sidx[: len(sidx) // 2])
    assert dn.classes == ["neg", "pos"] and len(dn) == len(sidx) // 2
    np.testing.assert_array_equal(dn.targets, ds.targets[: len(sidx) // 2])
    with pytest.raises(ValueError, match="no label"):
        CTLabelledDataset(cache_dir, sidx[:10], missing="error")
    with pytest.raises(ValueError, match="label column"):
        CTLabelledDataset(cache_dir, path, label_column="nope")
    with pytest.raises(ValueError, match="series_uid"):
        CTLabelledDataset(cache_dir, [{"x": 1, "label": 0}])


def test_patient_split(synth_dir, cache_dir):
    ds = CTLabelledDataset(cache_dir, os.path.join(synth_dir, "labels.csv"))
    sp = patient_split(ds, (0.5, 0.25, 0.25), seed=0)
    assert set(sp) == {"train", "val", "test"}
    allidx = np.concatenate(list(sp.values()))
    assert sorted(allidx.tolist()) == list(range(len(ds)))  # a partition of the items
    pats = {k: set(ds.patients[v].tolist()) for k, v in sp.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert all(len(v) for v in sp.values())
    again = patient_split(ds, (0.5, 0.25, 0.25), seed=0)
    assert all(np.array_equal(sp[k], again[k]) for k in sp)
    others = [patient_split(ds, (0.5, 0.25, 0.25), seed=s)["train"] for s in range(1, 8)]
    assert any(not np.array_equal(o, sp["train"]) for o in others)
    # splits of the cache itself, and through a subset
    csp = patient_split(SliceCache(cache_dir), (1, 1), names=("a", "b"), seed=0)
    assert len(csp["a"]) + len(csp["b"]) == len(ds)
    tr = ds.subset(sp["train"])
    assert len(tr) == len(sp["train"]) and np.array_equal(tr.targets, ds.targets[sp["train"]])
    with pytest.raises(ValueError):
        patient_split(ds, (0.5, 0.5))


class _FakeItems:
    """The attributes patient_split reads: 40 patients (10 positive), 3 items each."""

    def __init__(self):
        self.patients = np.repeat(np.arange(40), 3)
        self.patient_names = np.array([f"{k * 7919 % 1000:04d}{k:02d}" for k in range(40)])
        self.targets = np.repeat((np.arange(40) % 4 == 0).astype(np.int64), 3)


def test_stratified_split_keeps_the_class_balance():
    ds = _FakeItems()
    for seed in range(5):
        sp = patient_split(ds, (0.5, 0.3, 0.2), seed=seed, stratify=True)
        pos = {k: len(set(ds.patients[v][ds.targets[v] == 1].tolist())) for k, v in sp.items()}
        neg = {k: len(set(ds.patients[v][ds.targets[v] == 0].tolist())) for k, v in sp.items()}
        assert pos == {"train": 5, "val": 3, "test": 2} and neg == {"train": 15, "val": 9, "test": 6}
    ds2 = _FakeItems()
    del ds2.targets
    with pytest.raises(ValueError, match="labelled"):
        patient_split(ds2, stratify=True)


def test_patient_subsets_are_nested(cache_dir):
    ds = CTSliceDataset(cache_dir)
    items = np.arange(len(ds))
    sizes = []
    prev = None
    for f in (1.0, 0.75, 0.5, 0.25):
        sub = patient_subset(ds, items, f, seed=4)
        pats = set(ds.patients[sub].tolist())
        if prev is not None:
            assert pats <= prev
        prev = pats
        sizes.append(len(pats))
        # whole patients only
        assert len(sub) == int(np.isin(ds.patients, list(pats)).sum())
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 1
    with pytest.raises(ValueError):
        patient_subset(ds, items, 0.0)


def test_run_order():
    rng = np.random.default_rng(0)
    o = run_order(23, 4, rng)
    assert sorted(o.tolist()) == list(range(23))
    starts = [i for i in range(len(o)) if i == 0 or o[i] != o[i - 1] + 1]
    assert len(starts) <= 6
    assert sorted(run_order(10, 1, rng).tolist()) == list(range(10))


def test_loader_is_deterministic_and_independent_of_workers(cache_dir):
    ds = CTSliceDataset(cache_dir)
    aug = CTAugment(32)
    a = list(SliceLoader(ds, 16, transform=aug, seed=1, workers=0))
    b = list(SliceLoader(ds, 16, transform=aug, seed=1, workers=3, prefetch=2))
    assert len(a) == len(ds) // 16 and a[0].shape == (16, 3, 32, 32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ld = SliceLoader(ds, 16, transform=aug, seed=1)
    ld.set_epoch(1)
    c = list(ld)
    assert not torch.equal(a[0], c[0])
    # no shuffle, no drop_last: every slice once, in order, untransformed windows
    plain = list(SliceLoader(ds, 50, shuffle=False, drop_last=False))
    assert sum(len(x) for x in plain) == len(ds)
    torch.testing.assert_close(plain[0][7], ds[7])


def test_loader_labels_follow_items(synth_dir, cache_dir):
    ds = CTLabelledDataset(cache_dir, os.path.join(synth_dir, "slice_labels.csv"), transform=CTResize(16))
    ld = SliceLoader(ds, 8, seed=2, workers=2)
    order = ld.order()
    for b, (x, y) in enumerate(ld):
        assert x.shape == (8, 3, 16, 16)
        np.testing.assert_array_equal(y.numpy(), ds.targets[order[b * 8 : (b + 1) * 8]])
        if b == 3:
            break


def test_loader_multicrop(cache_dir):
    ds = CTSliceDataset(cache_dir)
    views = next(iter(SliceLoader(ds, 4, transform=MultiCrop(32, 16, n_global=2, n_local=2))))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2


def test_loader_on_device(cache_dir, device):
    ds = CTSliceDataset(cache_dir)
    aug = CTAugment(24, geometry="grid", p_noise=0)
    cpu = next(iter(SliceLoader(ds, 8, transform=aug, seed=3)))
    dev = next(iter(SliceLoader(ds, 8, transform=aug, seed=3, device=device)))
    assert dev.device.type == device
    torch.testing.assert_close(dev.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_run_batch_sampler_with_torch_dataloader(cache_dir):
    from sparkct.data.datasets import RunBatchSampler

    ds = CTSliceDataset(cache_dir, transform=CTResize(16))
    bs = RunBatchSampler(len(ds), 8, run_length=4, seed=1)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=bs, collate_fn=collate_batch, num_workers=0)
    batches = list(bs)
    assert len(batches) == len(ds) // 8 and all(len(b) == 8 for b in batches)
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)
    x = next(iter(dl))
    assert x.shape == (8, 3, 16, 16)
    torch.testing.assert_close(x[1], ds[batches[0][1]])
    bs.set_epoch(1)
    assert list(bs)[0] != batches[0]


class _Patients:
    """n patients (the first n_pos positive), 2 items each."""

    def __init__(self, n, n_pos=0):
        self.patients = np.repeat(np.arange(n), 2)
        self.patient_names = np.array([f"p{k:03d}" for k in range(n)])
        self.targets = np.repeat((np.arange(n) < n_pos).astype(np.int64), 2)


def test_patient_split_refuses_an_empty_split():
    from sparkct.errors import UserError

    with pytest.raises(UserError, match=r"4 patients give 3/0/1 patients for train/val/test.*'val' would be empty"):
        patient_split(_Patients(4), (0.7, 0.15, 0.15))
    sp = patient_split(_Patients(7), (0.7, 0.15, 0.15))
    assert [len(set(_Patients(7).patients[v])) for v in sp.values()] == [5, 1, 1]
    sp = patient_split(_Patients(4), (1, 0), names=("a", "b"))  # a fraction of 0 asks for an empty split
    assert len(sp["a"]) == 8 and len(sp["b"]) == 0
    # stratified: every class must reach every split
    with pytest.raises(UserError, match=r"2 patients of class 1 give 1/1/0 .*'test' would be empty.*every class"):
        patient_split(_Patients(20, n_pos=2), (0.6, 0.2, 0.2), stratify=True)
    sp = patient_split(_Patients(20, n_pos=2), (0.6, 0.2, 0.2))  # unstratified, the same patients fit
    assert all(len(v) for v in sp.values())
    with pytest.raises(UserError, match="fractions"):
        patient_split(_Patients(4), (0.5, float("nan"), 0.5))


class _ViewsWithGenerator:
    """A method's own transform (two random crops), written without anything from sparkct.data."""

    def __init__(self, size):
        self.size = size

    def __call__(self, hu, generator):
        views = []
        for _ in range(2):
            y, x = (int(v) for v in torch.randint(0, hu.shape[-1] - self.size + 1, (2,), generator=generator))
            views.append(hu[..., y : y + self.size, x : x + self.size].float())
        return views


class _Declared:
    takes_generator = True

    def __call__(self, hu, *args, **kwargs):  # nothing named `generator` in the signature
        return hu.float() + torch.rand(1, generator=kwargs["generator"])


class _Refuses:
    takes_generator = False

    def __call__(self, hu, generator=None):
        assert generator is None
        return hu.float()


def test_transforms_declare_whether_they_take_the_generator(cache_dir):
    from sparkct.data.datasets import takes_generator

    assert takes_generator(CTAugment(32)) and takes_generator(CTResize(32)) and takes_generator(MultiCrop(32, 16))
    assert takes_generator(_ViewsWithGenerator(16)) and takes_generator(_Declared())
    assert not takes_generator(_Refuses()) and not takes_generator(lambda hu: hu)
    ds = CTSliceDataset(cache_dir)
    a = list(SliceLoader(ds, 4, transform=_ViewsWithGenerator(16), seed=5, workers=0))
    b = list(SliceLoader(ds, 4, transform=_ViewsWithGenerator(16), seed=5, workers=2))
    assert len(a[0]) == 2 and a[0][0].shape == (4, 1, 16, 16)
    assert all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y))  # reproducible: drawn from g
    c = list(SliceLoader(ds, 4, transform=_ViewsWithGenerator(16), seed=6, workers=0))
    assert not all(torch.equal(u, v) for x, y in zip(a, c) for u, v in zip(x, y))
    d = next(iter(SliceLoader(ds, 4, transform=_Declared(), seed=5)))
    assert torch.equal(d, next(iter(SliceLoader(ds, 4, transform=_Declared(), seed=5))))
    assert next(iter(SliceLoader(ds, 4, transform=_Refuses()))).shape == (4, 1, 64, 64)
    assert next(iter(SliceLoader(ds, 4, transform=lambda hu: hu[..., :8, :8]))).shape == (4, 1, 8, 8)
    # the dataset's own transform follows the same protocol
    ds2 = CTSliceDataset(cache_dir, transform=_ViewsWithGenerator(8))
    assert [tuple(v.shape) for v in next(iter(SliceLoader(ds2, 2)))] == [(2, 1, 8, 8)] * 2


def test_sharded_loader_augments_each_sample_as_one_process_does(cache_dir):
    """shard=(rank, world): a transform that takes rows gets the global batch's draw, so the ranks'
    shares concatenated are the 1-process batch (noise, blur, rotation, gamma all on); a transform that
    does not take rows falls back to a generator per (batch, rank)."""
    from sparkct.data.datasets import takes_rows

    ds = CTSliceDataset(cache_dir)
    aug = MultiCrop(24, 16, n_global=1, n_local=1, p_noise=0.5, p_blur=0.5, p_rotate=0.5, p_gamma=0.5)
    assert takes_rows(aug) and takes_rows(CTAugment(8)) and takes_rows(CTResize(8))
    assert not takes_rows(_ViewsWithGenerator(8))
    one = list(SliceLoader(ds, 8, transform=aug, seed=4))
    for world in (2, 4):
        shares = [list(SliceLoader(ds, 8, transform=aug, seed=4, shard=(r, world))) for r in range(world)]
        for b, batch in enumerate(one):
            for v, view in enumerate(batch):
                torch.testing.assert_close(torch.cat([s[b][v] for s in shares]), view, atol=0, rtol=0)
    a = next(iter(SliceLoader(ds, 8, transform=_ViewsWithGenerator(8), seed=4, shard=(0, 2))))
    b = next(iter(SliceLoader(ds, 8, transform=_ViewsWithGenerator(8), seed=4, shard=(1, 2))))
    assert a[0].shape == (4, 1, 8, 8) and not torch.equal(a[0], b[0])
