"""`sparkct data prepare`: the slice cache, privacy, bad files, crash + resume, idempotence."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from sparkct.data import CacheSettingsError, SliceCache, prepare
from sparkct.data.dicom import iter_series
from sparkct.data.resample import resample_slices


def all_bytes(root: str) -> bytes:
    out = []
    for dp, _, fs in os.walk(root):
        for f in fs:
            with open(os.path.join(dp, f), "rb") as fh:
                out.append(fh.read())
    return b"\n".join(out)


def index_arrays(root: str) -> dict:
    with np.load(os.path.join(root, "index.npz")) as z:
        return {k: z[k] for k in z.files}


def assert_same_cache(a: str, b: str) -> None:
    ia, ib = index_arrays(a), index_arrays(b)
    assert ia.keys() == ib.keys()
    for k in ia:
        np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)
    ca, cb = SliceCache(a), SliceCache(b)
    assert len(ca) == len(cb)
    for s in range(ca.n_series):
        np.testing.assert_array_equal(ca.shard(s), cb.shard(s))
    with open(os.path.join(a, "series.csv")) as fa, open(os.path.join(b, "series.csv")) as fb:
        assert fa.read() == fb.read()


def synth_identities(synth_dir: str) -> list[bytes]:
    """The fake names, IDs and birth dates the synthetic DICOM carries."""
    found = set()
    for dp, _, fs in os.walk(os.path.join(synth_dir, "dicom")):
        for f in fs[:1]:
            ds = pydicom.dcmread(os.path.join(dp, f), stop_before_pixels=True)
            found |= {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)}
            found |= set(str(ds.PatientName).split("^")) - {"SYNTH"}
    return sorted(v.encode() for v in found if v)


def test_cache_matches_the_reader(synth_dir, cache_dir, salt):
    c = SliceCache(cache_dir)
    vols = {v.meta["series_uid"]: v for v in iter_series(os.path.join(synth_dir, "dicom"), salt=salt)}
    assert c.n_series == len(vols) and len(c) == sum(v.shape[0] for v in vols.values())
    assert c.uniform_shape == (64, 64)
    for s in range(c.n_series):
        v = vols[str(c.series["series_uid"][s])]
        expect = np.clip(np.rint(v.hu), -1024, 32767).astype(np.int16)
        np.testing.assert_array_equal(c.shard(s), expect)
        off, n = int(c.series["offset"][s]), int(c.series["n"][s])
        np.testing.assert_allclose(c.slice_z[off : off + n], v.z, atol=1e-3)
        np.testing.assert_array_equal(c.slice_instance[off : off + n], v.instance_numbers)
        assert c.patients[c.slice_patient[off]] == v.meta["patient"] == c.series["patient"][s]
        assert c.series["spacing"][s][0] == pytest.approx(5.0)
    # one row per slice, random access and batched reads agree
    idx = np.array([5, 0, len(c) - 1, 7, 6])
    batch = c.read(idx)
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(batch[j], c[i])
    rep = json.load(open(os.path.join(cache_dir, "report.json")))
    assert rep["skipped"] == {"localizer": 4} and rep["series_failed"] == 0


def test_no_identity_in_cache_or_logs(synth_dir, tmp_path, caplog, salt):
    ids = synth_identities(synth_dir)
    assert len(ids) >= 8
    with caplog.at_level(logging.DEBUG, logger="sparkct.data"):
        prepare(synth_dir, str(tmp_path / "c"), progress=False, salt=salt)
    blob = all_bytes(str(tmp_path / "c"))
    logs = caplog.text.encode()
    for v in ids:
        assert v not in blob, v
        assert v not in logs, v
    # nor source paths (folders may carry identities in real exports)
    assert b"case_0000" not in blob and b"case_0000" not in logs
    assert b"dicom/" not in blob


def test_bad_files_are_counted_and_the_run_completes(synth_dir, tmp_path, testdata, caplog):
    src = str(tmp_path / "src")
    shutil.copytree(synth_dir, src)
    case = os.path.join(src, "dicom", "case_0000", "series_1")
    files = sorted(os.listdir(case))
    raw = open(os.path.join(case, files[0]), "rb").read()
    open(os.path.join(case, "zz_truncated.dcm"), "wb").write(raw[: len(raw) // 2])
    open(os.path.join(case, "zz_garbage.dcm"), "wb").write(os.urandom(4096))
    shutil.copy(testdata("MR_small.dcm"), os.path.join(case, "zz_mr.dcm"))
    ds = pydicom.dcmread(os.path.join(case, files[1]))
    ds.Rows = ds.Columns = 32
    ds.PixelData = np.zeros((32, 32), np.int16).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(os.path.join(case, "zz_size.dcm"), enforce_file_format=True)
    # a file whose header is fine but whose pixel data cannot be decoded
    ds = pydicom.dcmread(os.path.join(case, files[2]))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImagePositionPatient = [0, 0, -5000.0]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\x07" + os.urandom(999)])
    ds.save_as(os.path.join(case, "zz_badrle.dcm"), enforce_file_format=False)
    with caplog.at_level(logging.WARNING, logger="sparkct.data"):
        rep = prepare(src, str(tmp_path / "c"), progress=False)
    assert rep.skipped["truncated pixel data"] == 1
    assert rep.skipped["not a DICOM file"] == 1
    assert rep.skipped["not CT (modality MR)"] == 1
    assert rep.skipped["inconsistent size in series"] == 1
    assert sum(n for r, n in rep.skipped.items() if r.startswith("pixel data unreadable")) == 1
    assert rep.series_failed == 0 and rep.slices > 0
    assert "truncated pixel data" in caplog.text and "localizer" not in caplog.text  # expected skips: no warning
    rows = list(csv.DictReader(open(tmp_path / "c" / "skipped.csv")))
    assert len(rows) == sum(rep.skipped.values())
    assert all(r["file"].startswith("file:") for r in rows)  # tokens, not paths, by default
    assert "truncated pixel data" in rep.summary()
    rep2 = prepare(src, str(tmp_path / "c2"), progress=False, show_paths=True)
    rows = list(csv.DictReader(open(tmp_path / "c2" / "skipped.csv")))
    assert {"dicom/case_0000/series_1/zz_garbage.dcm"} <= {r["file"] for r in rows}
    assert rep2.skipped == rep.skipped


def test_interrupted_run_resumes_to_the_same_cache(synth_dir, cache_dir, tmp_path, salt, faults, monkeypatch):
    dst = str(tmp_path / "c")
    faults.crash_after(2)
    with pytest.raises(faults.SimulatedCrash):
        prepare(synth_dir, dst, progress=False, salt=salt)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(dst, "index.npz"))
    with pytest.raises(FileNotFoundError, match="resume"):
        SliceCache(dst)
    rep = prepare(synth_dir, dst, progress=False, salt=salt)
    assert rep.series_cached == 2 and rep.series_written == rep.series - 2
    assert_same_cache(dst, cache_dir)


def test_killed_mid_shard_leaves_no_partial_shard_and_resumes(synth_dir, cache_dir, tmp_path, salt, faults):
    dst = str(tmp_path / "c")
    code = faults.exit_after_slices_code(100) + (
        f"from sparkct.data import prepare\nprepare({synth_dir!r}, {dst!r}, progress=False, salt={salt!r})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 137, r.stderr.decode()[-2000:]
    temps = [f for dp, _, fs in os.walk(dst) for f in fs if f.endswith(".tmp")]
    assert temps, "the kill should have happened while a shard was being written"
    done = [f for dp, _, fs in os.walk(os.path.join(dst, "series")) for f in fs if f.endswith(".json")]
    shards = [f for dp, _, fs in os.walk(os.path.join(dst, "shards")) for f in fs if f.endswith(".npy")]
    assert len(shards) == len(done) >= 1  # every shard in place is complete and recorded
    rep = prepare(synth_dir, dst, progress=False, salt=salt)
    assert rep.series_cached == len(done)
    assert not [f for dp, _, fs in os.walk(dst) for f in fs if f.endswith(".tmp")]
    assert_same_cache(dst, cache_dir)


def test_rerun_is_idempotent_and_change_detection(synth_dir, tmp_path, salt):
    src = str(tmp_path / "src")
    shutil.copytree(synth_dir, src)
    dst = str(tmp_path / "c")
    first = prepare(src, dst, progress=False, salt=salt)
    shards = {
        os.path.join(dp, f): os.stat(os.path.join(dp, f)).st_mtime_ns
        for dp, _, fs in os.walk(os.path.join(dst, "shards"))
        for f in fs
    }
    before = index_arrays(dst)
    again = prepare(src, dst, progress=False)
    assert again.series_written == 0 and again.series_cached == first.series and again.slices == first.slices
    assert again.skipped == first.skipped
    after = index_arrays(dst)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert {p: os.stat(p).st_mtime_ns for p in shards} == shards
    # touching one source file redoes that series only
    f = sorted(os.listdir(os.path.join(src, "dicom", "case_0001", "series_1")))[3]
    p = os.path.join(src, "dicom", "case_0001", "series_1", f)
    os.utime(p, ns=(time.time_ns(), time.time_ns()))
    third = prepare(src, dst, progress=False)
    assert third.series_written == 1 and third.series_cached == first.series - 1
    # a series removed from the source leaves the index
    shutil.rmtree(os.path.join(src, "dicom", "case_0002"))
    fourth = prepare(src, dst, progress=False)
    assert fourth.slices < first.slices and fourth.stale_series >= 1
    assert len(SliceCache(dst)) == fourth.slices


def test_settings_mismatch_and_reset(synth_dir, tmp_path):
    dst = str(tmp_path / "c")
    prepare(synth_dir, dst, progress=False, size=32)
    with pytest.raises(CacheSettingsError, match="settings"):
        prepare(synth_dir, dst, progress=False, size=48)
    rep = prepare(synth_dir, dst, progress=False, size=48, reset=True)
    assert SliceCache(dst).uniform_shape == (48, 48) and rep.series_written == rep.series
    with pytest.raises(ValueError):
        prepare(synth_dir, synth_dir, progress=False)
    with pytest.raises(FileNotFoundError):
        prepare(str(tmp_path / "nope"), dst, progress=False)


def test_resampled_cache(synth_dir, tmp_path, salt):
    dst = str(tmp_path / "c")
    prepare(synth_dir, dst, progress=False, spacing=2.0, size=80, salt=salt)
    c = SliceCache(dst)
    assert c.uniform_shape == (80, 80)
    np.testing.assert_allclose(c.series["spacing"][:, 1:], 2.0)
    vols = {v.meta["series_uid"]: v for v in iter_series(os.path.join(synth_dir, "dicom"))}
    s = 0
    v = vols[str(c.series["series_uid"][s])]
    ref, sp = resample_slices(np.maximum(v.hu, -1024), v.spacing[1:], spacing=2.0, size=80, device="cpu")
    ref = np.clip(np.rint(ref), -1024, 32767)
    d = np.abs(c.shard(s).astype(np.float64) - ref)
    assert d.max() <= 1.0 and (d == 0).mean() > 0.99


def test_parallel_workers_give_the_same_cache(synth_dir, cache_dir, tmp_path, salt):
    dst = str(tmp_path / "c")
    rep = prepare(synth_dir, dst, progress=False, salt=salt, workers=2)
    assert rep.workers == 2
    assert_same_cache(dst, cache_dir)


def test_nifti_volumes_are_prepared(tmp_path):
    nib = pytest.importorskip("nibabel")
    src = tmp_path / "src"
    (src / "p1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1500, size=(20, 24, 6)).astype(np.int16)  # (x, y, z) RAS
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), str(src / "p1" / "ct.nii.gz"))
    (src / "notes.txt").write_text("not an image")
    rep = prepare(str(src), str(tmp_path / "c"), progress=False)
    assert rep.series_written == 1 and rep.ignored[".txt"] == 1
    c = SliceCache(str(tmp_path / "c"))
    assert len(c) == 6 and c.uniform_shape == (24, 20)
    np.testing.assert_array_equal(c.shard(0), np.maximum(vol[::-1, ::-1, :].transpose(2, 1, 0), -1024))
    np.testing.assert_allclose(c.series["spacing"][0], [2.5, 0.9, 0.8], rtol=1e-6)
    assert "ct.nii" not in all_bytes(str(tmp_path / "c")).decode("latin-1")


def test_dst_inside_src_and_symlink_loops(synth_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_dir, src)
    os.symlink(src / "dicom", src / "dicom" / "loop")  # a cycle
    first = prepare(str(src), str(src / "cache"), progress=False)
    again = prepare(str(src), str(src / "cache"), progress=False)
    assert again.files == first.files and again.series_written == 0
    assert first.series == len(list((src / "dicom").glob("case_*/series_*")))


def test_a_killed_worker_is_replaced_and_its_series_retried(
    synth_dir, cache_dir, tmp_path, salt, caplog, faults, monkeypatch
):
    dst = str(tmp_path / "c")
    first = str(SliceCache(cache_dir).series["key"][0])  # the first series submitted (jobs go by key)
    faults.kill_worker(first, marker=str(tmp_path / "killed"))
    with caplog.at_level(logging.WARNING, logger="sparkct.data"):
        rep = prepare(synth_dir, dst, progress=False, salt=salt, workers=2)
    assert os.path.exists(tmp_path / "killed") and "worker process died" in caplog.text
    assert rep.series_failed == 0 and rep.series_written == rep.series
    assert_same_cache(dst, cache_dir)
    # a series whose worker always dies is reported failed; the others are written
    dst2 = str(tmp_path / "c2")
    monkeypatch.undo()
    faults.kill_worker(first)
    rep = prepare(synth_dir, dst2, progress=False, salt=salt, workers=2)
    monkeypatch.undo()
    assert rep.series_failed == 1 and rep.series_written == rep.series - 1
    assert rep.skipped["worker process died (killed or out of memory)"] > 0
    rep = prepare(synth_dir, dst2, progress=False, salt=salt)  # and a later run completes the cache
    assert rep.series_written == 1
    assert_same_cache(dst2, cache_dir)
