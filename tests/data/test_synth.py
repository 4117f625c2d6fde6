"""The synthetic chest CT generator: real DICOM, plausible HU, labels, determinism."""

from __future__ import annotations

import csv
import os
from collections import defaultdict

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import UID

from sparkct.data.dicom import iter_series
from sparkct.data.synthetic import Nodule, inside_lung, make_acquisition, make_patient, render_slice, synth


def read_csv(path):
    return list(csv.DictReader(open(path)))


def test_files_are_valid_ct_dicom(synth_dir, dicom_files):
    files = dicom_files(os.path.join(synth_dir, "dicom"))
    sops = set()
    n_loc = 0
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert UID(uid).is_valid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert str(ds.PatientName).startswith("SYNTH^") and str(ds.PatientID).startswith("SYN")
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns) and arr.dtype in (np.int16, np.uint16)
        if "LOCALIZER" in ds.ImageType:
            n_loc += 1
        else:
            assert len(ds.ImagePositionPatient) == 3 and len(ds.PixelSpacing) == 2 and float(ds.SliceThickness) == 5
        sops.add(ds.SOPInstanceUID)
    assert len(sops) == len(files) and n_loc == 4


def test_hu_are_plausible_per_tissue(synth_dir):
    vols = list(iter_series(os.path.join(synth_dir, "dicom")))
    hu = np.concatenate([v.hu.ravel() for v in vols])
    frac = lambda lo, hi: float(((hu >= lo) & (hu < hi)).mean())  # noqa: E731
    assert hu.min() >= -1024 and hu.max() > 700  # air clipped at -1024; cortical bone
    assert frac(-1100, -950) > 0.2  # air around the body
    assert frac(-920, -780) > 0.03  # lung parenchyma
    assert frac(-130, -60) > 0.03  # fat
    assert frac(0, 80) > 0.03  # muscle, blood, organs
    assert frac(250, 2000) > 0.002  # bone
    for v in vols:
        mid = v.hu[len(v.hu) // 2]
        assert np.median(mid) < -500  # mostly air and lung at mid-chest


def test_labels_are_consistent(synth_dir):
    series = read_csv(os.path.join(synth_dir, "labels.csv"))
    slices = read_csv(os.path.join(synth_dir, "slice_labels.csv"))
    nodules = read_csv(os.path.join(synth_dir, "nodules.csv"))
    per = defaultdict(list)
    for r in slices:
        per[r["series_uid"]].append(int(r["label"]))
    assert {r["series_uid"] for r in series} == set(per)
    for r in series:
        assert int(r["label"]) == max(per[r["series_uid"]])
        assert int(r["n_slices"]) == len(per[r["series_uid"]])
        if int(r["label"]):
            assert int(r["n_nodules"]) >= 1 and float(r["max_diameter_mm"]) >= 4
    assert any(int(r["label"]) for r in series) and not all(int(r["label"]) for r in series)
    assert {r["series_uid"] for r in nodules} <= set(per)
    for r in nodules:
        assert r["type"] in ("solid", "part-solid", "ground-glass", "calcified")
    vols = {v.meta["series_uid"]: v for v in iter_series(os.path.join(synth_dir, "dicom"))}
    for r in series:
        assert vols[r["series_uid"]].shape[0] == int(r["n_slices"])


def test_nodule_slices_show_the_nodule():
    """A solid nodule raises the HU of its slices at its centre against the same place one slice
    off the nodule (the lung there is ~-850)."""
    for idx in range(40):
        p = make_patient(11, idx, p_finding=1.0)
        big = [n for n in p.nodules if n.kind == "solid" and n.diameter > 12]
        if big:
            break
    else:
        pytest.skip("no large solid nodule drawn")
    from sparkct.data.synthetic import make_acquisition, render_slice

    rng = np.random.default_rng(0)
    acq = make_acquisition(rng, p, 256, 2.5)
    n = big[0]
    ps = acq.fov / acq.size
    j = int(round(n.x / ps + (acq.size - 1) / 2))
    i = int(round(n.y / ps + (acq.size - 1) / 2))
    on, shown = render_slice(p, acq, n.z, rng)
    off, _ = render_slice(p, acq, n.z + n.diameter, rng)
    assert n in [s for s, _ in shown]
    assert on[i - 1 : i + 2, j - 1 : j + 2].mean() > off[i - 1 : i + 2, j - 1 : j + 2].mean() + 300


def test_patients_differ(synth_dir):
    a, b = make_patient(0, 0), make_patient(0, 1)
    assert abs(a.a - b.a) > 1 or abs(a.height - b.height) > 1
    assert a.pid != b.pid and a.name != b.name
    assert make_patient(0, 0).pid == a.pid  # a function of the seed


def test_min_nodule_size():
    """min_nodule_mm (the experiment's built-in task) raises the smallest nodule diameter and leaves the
    patients' anatomy as it was; out-of-range values are refused."""
    from sparkct.errors import UserError

    pats = [(make_patient(4, i), make_patient(4, i, min_nodule_mm=12.0)) for i in range(12)]
    small, big = ([n.diameter for p in ps for n in p.nodules] for ps in zip(*pats))
    assert len(big) >= 5 and min(big) >= 12.0 and min(small) < 12.0
    assert all(pa.pid == pb.pid and pa.height == pb.height for pa, pb in pats)
    with pytest.raises(UserError, match="min_nodule_mm"):
        synth("/nonexistent/never-written", patients=1, min_nodule_mm=0.5)


def test_seeded_and_deterministic(tmp_path, dicom_files):
    kw = dict(patients=2, size=32, slices=4, thickness=3.0, localizer=False)
    r1 = synth(str(tmp_path / "a"), seed=5, **kw)
    synth(str(tmp_path / "b"), seed=5, **kw)
    synth(str(tmp_path / "c"), seed=6, **kw)
    fa, fb, fc = (dicom_files(str(tmp_path / d)) for d in "abc")
    assert r1.slices == len(fa) == len(fb) and r1.series >= 2
    assert [os.path.relpath(f, tmp_path / "a") for f in fa] == [os.path.relpath(f, tmp_path / "b") for f in fb]
    for x, y in zip(fa, fb):
        assert open(x, "rb").read() == open(y, "rb").read()
    assert open(tmp_path / "a" / "labels.csv").read() == open(tmp_path / "b" / "labels.csv").read()
    assert open(tmp_path / "a" / "labels.csv").read() != open(tmp_path / "c" / "labels.csv").read()
    with pytest.raises(ValueError):
        synth(str(tmp_path / "d"), patients=0)


def test_stored_encodings_round_trip(tmp_path):
    """Every stored-value encoding the generator uses (int16, int16 + intercept, uint16, slope 0.5)
    decodes to the same HU."""
    from sparkct.data.synthetic import _encode

    hu = np.linspace(-1024, 3071, 64 * 64).reshape(64, 64).astype(np.float32)
    for enc in ("int16", "int16-offset", "uint16", "uint16-slope"):
        stored, slope, icpt, rep = _encode(hu, enc)
        assert stored.dtype == (np.int16 if rep else np.uint16)
        np.testing.assert_array_equal(stored.astype(np.float64) * slope + icpt, np.rint(hu))


def _lone_nodule_patient(z: float, diameter: float = 10.0):
    """Patient 0 of seed 2 with one round solid nodule centred at height z, in its right lung."""
    p = make_patient(2, 0, p_finding=0.0)
    x, y = next(
        (x, y)
        for x in np.linspace(-1.2 * p.lung_w, 1.2 * p.lung_w, 25)
        for y in np.linspace(-0.6 * p.lung_d, 0.6 * p.lung_d, 13)
        if inside_lung(p, x, y, z, margin=diameter)
    )
    p.nodules = [Nodule(float(x), float(y), float(z), diameter, "solid", 40.0, ((0.0, 0.0),) * 5)]
    return p


def test_a_slice_shows_a_nodule_exactly_when_it_is_labelled():
    # Issue 19 (5b): caps of a nodule whose centre lies past the slice's slab were drawn but not labelled.
    p = _lone_nodule_patient(0.5 * make_patient(2, 0).height)
    nod = p.nodules[0]
    acq = make_acquisition(np.random.default_rng(0), p, 64, 5.0)
    for dz in (0.0, 5.0, 7.0, 7.3, 7.4, 7.6, 8.0):  # slab half-width 2.5 + radius 5 = 7.5
        p.nodules = [nod]
        with_nodule, shown = render_slice(p, acq, nod.z + dz, np.random.default_rng(1))
        p.nodules = []
        without, _ = render_slice(p, acq, nod.z + dz, np.random.default_rng(1))
        assert (not np.array_equal(with_nodule, without)) == bool(shown), dz
        assert bool(shown) == (dz < 7.5 - 1e-9 and nod.radius_at(max(0.0, dz - 2.5)) >= 1.5), dz


def test_a_nodule_centred_outside_the_series_is_labelled_with_its_type(tmp_path, monkeypatch):
    # 4 slices of 5 mm centred on mid-chest cover [mid - 10, mid + 10]; a 10 mm nodule centred 3 mm
    # below the lowest slab still shows in the lowest slice (3 mm from its centre: 8 mm across).
    from sparkct.data import synthetic

    mid = 0.5 * make_patient(2, 0).height
    zc = mid - 7.5 - 2.5 - 3.0
    monkeypatch.setattr(synthetic, "make_patient", lambda *a, **k: _lone_nodule_patient(zc))
    synth(
        str(tmp_path), patients=1, seed=2, size=64, slices=4, thickness=5.0, series_per_patient=(1, 1), localizer=False
    )
    (series,) = read_csv(tmp_path / "labels.csv")
    slices = sorted(read_csv(tmp_path / "slice_labels.csv"), key=lambda r: float(r["z_mm"]))
    nodules = read_csv(tmp_path / "nodules.csv")
    assert [int(r["label"]) for r in slices] == [1, 0, 0, 0]
    assert float(slices[0]["max_diameter_mm"]) == pytest.approx(8.0, abs=0.01)
    assert series["label"] == "1" and series["n_nodules"] == "1" and series["nodule_types"] == "solid"
    assert len(nodules) == 1 and float(nodules[0]["z_mm"]) == pytest.approx(zc, abs=0.01)
    assert zc < float(slices[0]["z_mm"]) - 2.5  # outside the series' slabs
