"""sparkct.eval.data: labels on a cache (slice / series / patient), image folders, .npz; splits."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from sparkct.data.datasets import SliceLoader, patient_subset_stratified
from sparkct.data.windows import apply_windows
from sparkct.errors import UserError
from sparkct.eval.data import IMAGE_WINDOW, ImageSlices, load_task, to_pseudo_hu


def _check_task(t, n_patients=None):
    pats = {n: set(getattr(t, n).patients.tolist()) for n in ("full_train", "val", "test")}
    assert (
        not (pats["full_train"] & pats["val"])
        and not (pats["full_train"] & pats["test"])
        and not (pats["val"] & pats["test"])
    )
    if n_patients is not None:
        assert len(pats["full_train"] | pats["val"] | pats["test"]) == n_patients
    for n in ("train", "val", "test"):
        assert set(np.unique(getattr(t, n).targets).tolist()) == set(range(t.n_classes)), n
    assert set(t.train.patients.tolist()) <= pats["full_train"]


def test_patient_level_labels(eval_cache):
    t = load_task(eval_cache["cache"], eval_cache["patient_labels"], split=(0.5, 0.25, 0.25))
    assert t.kind == "cache" and t.level == "patient" and t.classes == ["clear", "nodule"]
    _check_task(t, n_patients=12)
    # every slice carries its patient's label
    names = t.full_train.patient_names
    for d in (t.full_train, t.val, t.test):
        assert d.targets.tolist() == [eval_cache["patients"][str(names[p])] for p in d.patients]
    d = t.describe()  # 6 patients per class: 3 / 1 / 2 (rounded cuts of 0.5, 0.25, 0.25)
    assert [d[n]["patients"] for n in ("full_train", "val", "test")] == [6, 2, 4]
    assert d["test"]["items"] == len(t.test) and sum(d["test"]["per_class"]) == len(t.test)
    x, y = t.test.__getitems__([0, 1])
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64


def test_patient_ids_are_hashed_like_prepare():
    # patient_id rows (DICOM PatientID) match the pseudonyms prepare stores for DICOM series
    import pydicom

    from sparkct.data.dicom import patient_pseudonym
    from sparkct.data.labels import patient_rows

    salt = "ab" * 16
    pseud = []
    for pid in ("P001", "P002"):
        ds = pydicom.Dataset()
        ds.PatientID = pid
        pseud.append(patient_pseudonym(ds, salt))

    class Cache:
        manifest = {"salt": salt}
        patients = np.array(pseud)
        series = {"patient_index": np.array([0, 1, 1]), "key": np.array(["s0", "s1", "s2"])}

    rows = patient_rows(
        Cache, [{"patient_id": "P002", "__label__": "1"}, {"patient_id": "P001", "__label__": "0"}], "x.csv"
    )
    assert rows == [
        {"series_key": "s1", "label": "1"},
        {"series_key": "s2", "label": "1"},
        {"series_key": "s0", "label": "0"},
    ]
    with pytest.raises(UserError, match="1 of 1 patients are not in the cache"):
        patient_rows(Cache, [{"patient_id": "P003", "__label__": "1"}], "x.csv")


def test_series_and_slice_labels(eval_cache, tmp_path, write_csv):
    from sparkct.data.cache import SliceCache

    t = load_task(eval_cache["cache"], eval_cache["series_labels"], split=(0.5, 0.25, 0.25))
    assert t.level == "series" and t.classes == [0, 1]
    _check_task(t, n_patients=12)
    p = load_task(eval_cache["cache"], eval_cache["patient_labels"], split=(0.5, 0.25, 0.25))
    np.testing.assert_array_equal(t.test.indices, p.test.indices)
    c = SliceCache(eval_cache["cache"])
    rows = [[c.series["key"][c.slice_series[i]], int(c.slice_index[i]), int(i % 3 == 0)] for i in range(len(c))]
    s = load_task(
        eval_cache["cache"],
        write_csv(tmp_path / "s.csv", ["series_key", "slice_index", "label"], rows),
        split=(0.5, 0.25, 0.25),
    )
    assert s.level == "slice" and len(s.full_train) + len(s.val) + len(s.test) == len(c)
    for d in (s.full_train, s.val, s.test):
        assert d.targets.tolist() == [int(i % 3 == 0) for i in d.indices]


def test_bad_labels_files(eval_cache, tmp_path, write_csv):
    cache = eval_cache["cache"]
    rows = list(csv.DictReader(open(eval_cache["series_labels"])))
    key = rows[0]["series_key"]
    cases = {
        "no label column": (["series_key", "diagnosis"], [[r["series_key"], r["label"]] for r in rows]),
        "name each row": (["scan", "label"], [["a", 1], ["b", 0]]),
        "not in the cache": (["series_key", "label"], [[key, 1], ["nosuchseries", 0]]),
        "slices that are not in the": (["series_key", "slice_index", "label"], [[key, 1, 1], [key, 999, 0]]),
        "at least two classes": (["series_key", "label"], [[r["series_key"], 1] for r in rows]),
        "empty label": (["series_key", "label"], [[key, ""], [rows[1]["series_key"], 1]]),
        "patients are not in the cache": (["patient", "label"], [["0123456789abcdef", 1], ["x", 0]]),
    }
    for msg, (header, body) in cases.items():
        path = write_csv(tmp_path / "bad.csv", header, body)
        with pytest.raises(UserError, match=msg):
            load_task(cache, path)
    write_csv(tmp_path / "empty.csv", ["series_key", "label"], [])
    with pytest.raises(UserError, match="no label rows"):
        load_task(cache, str(tmp_path / "empty.csv"))
    with pytest.raises(UserError, match="labels file not found"):
        load_task(cache, str(tmp_path / "nope.csv"))
    with pytest.raises(UserError, match="--labels"):
        load_task(cache)
    # two classes in the file but a split left without one: a clear error, not a crash later
    with pytest.raises(UserError, match="split has no items of class|would be empty"):
        load_task(cache, eval_cache["patient_labels"], split=(0.9, 0.05, 0.05))


def test_fractions_nested_stratified_and_test_set_fixed(eval_cache):
    tasks = {
        (f, s): load_task(
            eval_cache["cache"], eval_cache["patient_labels"], split=(0.5, 0.25, 0.25), fraction=f, seed=s
        )
        for f in (1.0, 0.5, 0.25)
        for s in (0, 1)
    }
    for s in (0, 1):
        pats = [set(tasks[(f, s)].train.patients.tolist()) for f in (1.0, 0.5, 0.25)]
        assert pats[2] <= pats[1] <= pats[0] and len(pats[0]) == 6 and len(pats[1]) == 4 and len(pats[2]) == 2
        for f in (0.5, 0.25):
            assert set(np.unique(tasks[(f, s)].train.targets).tolist()) == {0, 1}
    for t in tasks.values():  # one test set for every fraction and seed
        np.testing.assert_array_equal(t.test.indices, tasks[(1.0, 0)].test.indices)
    assert set(tasks[(0.5, 0)].train.patients.tolist()) != set(tasks[(0.5, 1)].train.patients.tolist()) or set(
        tasks[(0.25, 0)].train.patients.tolist()
    ) != set(tasks[(0.25, 1)].train.patients.tolist())


class _Items:
    def __init__(self):
        self.patients = np.repeat(np.arange(100), 2)
        self.patient_names = np.array([f"{k * 7919 % 1000:04d}{k:02d}" for k in range(100)])
        self.targets = np.repeat((np.arange(100) % 5 == 0).astype(np.int64), 2)  # 20 positive patients


def test_patient_subset_stratified_unit():
    ds = _Items()
    items = np.arange(200)
    prev = None
    for f in (1.0, 0.5, 0.25, 0.1, 0.01):
        sub = patient_subset_stratified(ds, items, f, seed=3)
        pats = set(ds.patients[sub].tolist())
        pos = len({p for p in pats if p % 5 == 0})
        assert pos == max(1, int(np.ceil(f * 20))) and len(pats) - pos == max(1, int(np.ceil(f * 80)))
        assert len(sub) == 2 * len(pats)  # whole patients
        if prev is not None:
            assert pats <= prev
        prev = pats
    a = patient_subset_stratified(ds, items, 0.3, seed=1)
    np.testing.assert_array_equal(a, patient_subset_stratified(ds, items, 0.3, seed=1))
    assert set(a.tolist()) != set(patient_subset_stratified(ds, items, 0.3, seed=2).tolist())
    with pytest.raises(ValueError, match="fraction"):
        patient_subset_stratified(ds, items, 0)


def test_npz_task(tmp_path, write_npz):
    path = write_npz(tmp_path / "organs.npz", k=3)
    t = load_task(str(path), fraction=0.5, seed=0)
    assert t.kind == "npz" and t.classes == [0, 1, 2] and t.windows == [IMAGE_WINDOW]
    assert (len(t.full_train), len(t.val), len(t.test)) == (60, 20, 20)
    assert np.bincount(t.train.targets).tolist() == [10, 10, 10]
    x, y = t.test.__getitems__(np.arange(6))
    assert x.shape == (6, 1, 16, 16) and y.tolist() == [0, 1, 2, 0, 1, 2]
    z = np.load(path)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(z["test_images"][:6] / 255.0).float(), atol=2e-5, rtol=0)
    # through the loader with CT augmentations in pseudo-HU
    from sparkct.data.augment import CTAugment

    xb, yb = next(iter(SliceLoader(t.train, 8, transform=CTAugment(12, windows=[IMAGE_WINDOW] * 3))))
    assert xb.shape == (8, 3, 12, 12) and 0 <= float(xb.min()) and float(xb.max()) <= 1
    rgb = load_task(str(write_npz(tmp_path / "rgb.npz", rgb=True)))
    assert rgb.test.hu([0]).shape == (1, 1, 16, 16)


def test_bad_npz(tmp_path, write_npz):
    np.savez(tmp_path / "a.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 1)))
    with pytest.raises(UserError, match="missing"):
        load_task(str(tmp_path / "a.npz"))
    arrays = {
        f"{s}_{k}": (np.zeros((4, 8, 8), np.uint8) if k == "images" else np.zeros((4, 14), np.uint8))
        for s in ("train", "val", "test")
        for k in ("images", "labels")
    }
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(UserError, match="multi-label"):
        load_task(str(tmp_path / "b.npz"))
    arrays = {k: (v if "images" in k else np.zeros((4, 1), np.uint8)) for k, v in arrays.items()}
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(UserError, match="two classes"):
        load_task(str(tmp_path / "c.npz"))
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="readable"):
        load_task(str(tmp_path / "d.npz"))
    with pytest.raises(UserError, match="own labels"):
        load_task(write_npz(tmp_path / "e.npz"), labels="x.csv")


def test_image_folder_task(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, level in (("benign", 40), ("malignant", 180)):
        for p in range(6):
            d = tmp_path / "set" / c / f"patient{c}{p}"
            d.mkdir(parents=True)
            for k in range(2):
                Image.fromarray((rng.integers(0, 40, (20, 20)) + level).astype(np.uint8)).save(d / f"{k}.png")
    t = load_task(str(tmp_path / "set"), split=(0.5, 0.25, 0.25), fraction=0.5)
    assert t.kind == "folder" and t.classes == ["benign", "malignant"]
    _check_task(t, n_patients=12)
    assert len(t.train) == 2 * 2 * 2  # 2 patients per class, 2 images each
    x, y = t.val.__getitems__([0, 1])
    assert x.shape == (2, 1, 20, 20)
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(UserError, match="at least two"):
        load_task(str(tmp_path / "one"))
    with pytest.raises(UserError, match="not found"):
        load_task(str(tmp_path / "missing"))


def test_pseudo_hu_round_trip():
    v = np.linspace(0, 1, 256, dtype=np.float32)
    back = apply_windows(torch.from_numpy(to_pseudo_hu(v))[None, None], [IMAGE_WINDOW])
    torch.testing.assert_close(back[0, 0, 0], torch.from_numpy(v), atol=2e-5, rtol=0)
    assert float(apply_windows(torch.tensor([[-1024.0]]), [IMAGE_WINDOW])) == 0.0
    ds = ImageSlices(np.zeros((3, 4, 4), np.uint8), [0, 1, 0], classes=[0, 1])
    assert len(ds.subset([0, 2])) == 2 and ds.subset([1]).targets.tolist() == [1]
