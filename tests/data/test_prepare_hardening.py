"""`sparkct data prepare` on bad input: odd file names, bad slices in good series, bad rescale values,
images claiming huge sizes, folders that cannot be listed, a killed parent."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections import Counter

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless, generate_uid

from sparkct.data import PixelLimits, SliceCache, prepare, read_series
from sparkct.errors import UserError


def hu_of(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def skipped_rows(dst) -> list[dict]:
    with open(os.path.join(dst, "skipped.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_file_names_that_are_not_utf8_are_read(tmp_path, ct_series):
    src, dst = tmp_path / "src", tmp_path / "c"
    paths = ct_series(str(src / "s"), 3)
    s = os.fsencode(src / "s")
    os.rename(paths[1], os.path.join(s, b"bad_\xff\xfe.dcm"))
    with open(os.path.join(s, b"junk_\xff.dcm"), "wb") as f:
        f.write(os.urandom(2000))
    rep = prepare(str(src), str(dst), progress=False, show_paths=True)
    assert rep.slices == 3 and rep.series_failed == 0
    assert rep.skipped == Counter({"not a DICOM file": 1})
    assert [r["file"] for r in skipped_rows(dst)] == ["s/junk_\\xff.dcm"]  # shown as escapes
    json.loads((dst / "report.json").read_text())
    c = SliceCache(str(dst))
    odd = os.fsdecode(os.path.join(s, b"bad_\xff\xfe.dcm"))  # str with surrogate escapes
    np.testing.assert_array_equal(c.shard(0)[1], np.clip(np.rint(hu_of(odd)), -1024, 32767))
    again = prepare(str(src), str(dst), progress=False)  # the record matches the odd name: nothing redone
    assert again.series_cached == 1 and again.series_written == 0
    assert skipped_rows(dst)[0]["file"].startswith("file:")  # tokens unless --show-paths


def _bad_lut(ds):
    del ds.RescaleSlope, ds.RescaleIntercept
    item = Dataset()
    item.add_new("LUTDescriptor", "SS", [4096, -2000, 16])
    item.ModalityLUTType = "HU"
    item.add_new("LUTData", "OW", b"\x01\x02\x03")  # 3 bytes for 4096 entries: struct.error in pydicom
    ds.ModalityLUTSequence = Sequence([item])


def test_one_bad_slice_is_skipped_and_the_good_slices_of_its_series_kept(tmp_path, ct_series):
    def edit(k, ds):
        if k == 1:
            ds.RescaleIntercept = "1e12"  # OverflowError in the HU conversion before
        elif k == 3:
            _bad_lut(ds)

    paths = ct_series(str(tmp_path / "src" / "s"), 5, edit)
    with pytest.raises(struct.error):
        apply_modality_lut(pydicom.dcmread(paths[3]).pixel_array, pydicom.dcmread(paths[3]))
    expect = Counter(
        {"rescale maps every stored value outside the int16 HU range": 1, "malformed Modality LUT Sequence (error)": 1}
    )
    for kw in ({}, {"spacing": 0.5}):  # both paths: straight to int16, and through resampling
        dst = str(tmp_path / f"c{len(kw)}")
        rep = prepare(str(tmp_path / "src"), dst, progress=False, **kw)
        assert rep.series_failed == 0 and rep.slices == 3 and rep.skipped == expect
        c = SliceCache(dst)
        np.testing.assert_allclose(c.slice_z, [0.0, 10.0, 20.0])
        if not kw:
            for j, k in enumerate((0, 2, 4)):
                np.testing.assert_array_equal(c.shard(0)[j], np.clip(np.rint(hu_of(paths[k])), -1024, 32767))
    vol = read_series(str(tmp_path / "src" / "s"))
    assert vol.shape[0] == 3 and Counter(r for _, r in vol.skipped) == expect


@pytest.mark.parametrize(
    "element, value, reason",
    [
        ("RescaleSlope", "NaN", "invalid RescaleSlope (not finite)"),
        ("RescaleSlope", "Inf", "invalid RescaleSlope (not finite)"),
        ("RescaleSlope", "abc", "invalid RescaleSlope (not a number)"),
        ("RescaleSlope", "", "invalid RescaleSlope (empty)"),
        ("RescaleSlope", "0", "invalid RescaleSlope (zero)"),
        ("RescaleIntercept", "NaN", "invalid RescaleIntercept (not finite)"),
    ],
)
def test_bad_rescale_values_skip_the_slice_never_a_default(tmp_path, ct_series, element, value, reason):
    def edit(k, ds):
        if k == 1:
            tag = {"RescaleSlope": 0x00281053, "RescaleIntercept": 0x00281052}[element]
            ds.add_new(tag, "LO" if value == "abc" else "DS", value)  # LO: a DS cannot hold "abc"

    paths = ct_series(str(tmp_path / "src"), 3, edit)
    assert element in pydicom.dcmread(paths[1])
    vol = read_series(str(tmp_path / "src"))
    assert vol.shape[0] == 2 and [r for _, r in vol.skipped] == [reason]
    np.testing.assert_array_equal(vol.hu[1], hu_of(paths[2]))
    rep = prepare(str(tmp_path / "src"), str(tmp_path / "c"), progress=False)
    assert rep.slices == 2 and rep.skipped == Counter({reason: 1})


def test_absent_rescale_keeps_stored_values_like_pydicom(tmp_path, ct_series):
    def edit(k, ds):
        del ds.RescaleSlope, ds.RescaleIntercept

    paths = ct_series(str(tmp_path / "src"), 2, edit)
    vol = read_series(str(tmp_path / "src"))
    np.testing.assert_array_equal(vol.hu[0], hu_of(paths[0]))  # apply_modality_lut: stored values as they are
    np.testing.assert_array_equal(vol.hu[0], pydicom.dcmread(paths[0]).pixel_array)


def test_number_of_frames_not_positive_is_a_bad_header(tmp_path, testdata):
    from sparkct.data.dicom import SkipFile, read_header

    for v in ("-3", "0"):
        ds = pydicom.dcmread(testdata("CT_small.dcm"))
        ds.NumberOfFrames = v
        p = str(tmp_path / f"n{v}.dcm")
        ds.save_as(p, enforce_file_format=True)
        with pytest.raises(SkipFile, match=r"bad header \(NumberOfFrames"):
            read_header(p)


# ---------------------------------------------------------------------------------------- huge images


def _claiming(testdata, path, rows, cols, syntax):
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    ds.Rows, ds.Columns = rows, cols
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x01" + b"\x00" * 63 + os.urandom(27000)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _deflated_zip_bomb(testdata, path, n):
    """A valid Deflated Explicit VR Little Endian CT of n x n zero pixels, ~1.5 KB per MB of pixels:
    a block of deflated zeros ended by a full flush is repeated (a full flush makes the blocks
    independent, so the copies concatenate into one valid stream)."""
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    ds.Rows = ds.Columns = n
    del ds.PixelData
    meta_end = lambda raw: 144 + struct.unpack("<I", raw[140:144])[0]  # noqa: E731
    b = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(b, enforce_file_format=True)
    body = b.getvalue()[meta_end(b.getvalue()) :]
    b = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(b, enforce_file_format=True)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    nbytes = n * n * 2
    mb = 1 << 16
    assert nbytes % mb == 0
    head = c.compress(body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes)) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(mb)) + c.flush(zlib.Z_FULL_FLUSH)
    with open(path, "wb") as f:
        f.write(b.getvalue()[: meta_end(b.getvalue())] + head + block * (nbytes // mb) + c.flush())


def test_huge_images_are_skipped_before_they_are_decoded(tmp_path, testdata):
    src = tmp_path / "src"
    src.mkdir()
    _claiming(testdata, str(src / "rle_30000.dcm"), 30000, 30000, RLELossless)  # 1.8 GB of pixels
    _claiming(testdata, str(src / "rle_65535.dcm"), 65535, 65535, RLELossless)  # an 8.6 GB shard
    _deflated_zip_bomb(testdata, str(src / "deflated_16384.dcm"), 16384)  # inflates to 512 MB
    assert os.path.getsize(src / "deflated_16384.dcm") < 2 << 20
    prepare(str(src), str(tmp_path / "warm"), progress=False)  # imports done outside the measurement
    tracemalloc.start()
    try:
        rep = prepare(str(src), str(tmp_path / "c"), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MB"  # the deflated header pass keeps <= 3 x 4 MB
    assert rep.skipped == Counter({"image too large (Rows x Columns over the pixel limit)": 3})
    assert rep.series == 0 and not os.path.exists(tmp_path / "c" / "shards")
    # the limits are the caller's: within them the same deflated data is read (and decoded)
    ok = tmp_path / "ok"
    ok.mkdir()
    _deflated_zip_bomb(testdata, str(ok / "d.dcm"), 512)
    assert prepare(str(ok), str(tmp_path / "c2"), progress=False).slices == 1
    rep = prepare(str(ok), str(tmp_path / "c3"), progress=False, limits=PixelLimits(max_slice_pixels=256 * 256))
    assert rep.slices == 0 and rep.skipped == Counter({"image too large (Rows x Columns over the pixel limit)": 1})
    rep = prepare(
        str(ok),
        str(tmp_path / "c4"),
        progress=False,
        limits=PixelLimits(max_slice_pixels=10**6, max_file_pixels=512 * 511),
    )
    assert rep.skipped == Counter({"image too large (Rows x Columns x frames over the pixel limit)": 1})


def test_deflated_data_longer_than_its_header_declares_is_skipped(tmp_path, testdata):
    from sparkct.data.dicom import SkipFile, scan_file

    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    ds.Rows = ds.Columns = 512  # declares 512 KB of pixels, carries 16 MB
    del ds.PixelData
    meta_end = lambda raw: 144 + struct.unpack("<I", raw[140:144])[0]  # noqa: E731
    b = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(b, enforce_file_format=True)
    body = b.getvalue()[meta_end(b.getvalue()) :]
    b = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(b, enforce_file_format=True)
    n = 16 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    p = tmp_path / "b.dcm"
    p.write_bytes(
        b.getvalue()[: meta_end(b.getvalue())]
        + c.compress(body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n) + bytes(n))
        + c.flush()
    )
    with pytest.raises(SkipFile, match="deflated data larger than its header declares"):
        scan_file(str(p))


# ---------------------------------------------------------------------------------------- folders


def test_a_folder_that_cannot_be_listed_is_counted(tmp_path, ct_series, monkeypatch):
    ct_series(str(tmp_path / "src" / "a"), 2)
    ct_series(str(tmp_path / "src" / "b"), 2)
    locked = os.path.join(str(tmp_path / "src"), "b")
    real = os.scandir

    def scandir(path="."):  # like a folder without read permission (the tests may run as root)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rep = prepare(str(tmp_path / "src"), str(tmp_path / "c"), progress=False, show_paths=True)
    assert rep.slices == 2 and rep.series == 1
    assert rep.skipped == Counter({"cannot list folder (PermissionError)": 1})
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["skipped"] == {"cannot list folder (PermissionError)": 1}
    assert skipped_rows(tmp_path / "c") == [{"file": "b", "reason": "cannot list folder (PermissionError)"}]


# ---------------------------------------------------------------------------------------- orphans


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2 :].split()
        out[int(d)] = (int(fields[1]), fields[19], fields[0])
    return out


def _descendants(pid: int) -> dict[int, str]:
    table = _proc_table()
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for c, (pp, start, _) in table.items():
            if pp == p and c not in found:
                found[c] = start
                todo.append(c)
    return found


def _alive(pid: int, start: str) -> bool:
    t = _proc_table().get(pid)
    return t is not None and t[1] == start and t[2] != "Z"  # an exited orphan may stay a zombie


@pytest.mark.skipif(not os.path.isdir("/proc") or sys.platform != "linux", reason="needs Linux /proc")
def test_workers_exit_when_prepare_is_killed(synth_dir, tmp_path):
    """SIGKILL of `prepare -j 2` leaves no process behind: not the workers, not the fork server,
    not multiprocessing's resource tracker."""
    # Series jobs sleep in the workers (a module the fork server preloads), so the run is surely in
    # its series phase, with both workers busy, when it is killed.
    (tmp_path / "slow_series.py").write_text(
        "import time\n"
        "from sparkct.data import preparing\n"
        "_real = preparing._process_dicom\n"
        "def _slow(job, st):\n"
        "    time.sleep(300)\n"
        "    return _real(job, st)\n"
        "preparing._process_dicom = _slow\n"
    )
    dst = str(tmp_path / "c")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from sparkct.data import prepare, workers\n"
        "workers.PRELOAD.append('slow_series')\n"
        f"prepare({synth_dir!r}, {dst!r}, workers=2, progress=False)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    kids = {}
    try:
        running = os.path.join(dst, ".running")  # a marker per series job being run
        t0 = time.monotonic()
        while not (os.path.isdir(running) and len(os.listdir(running)) >= 2):
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.monotonic() - t0 < 120, "the workers did not start"
            time.sleep(0.05)
        kids = _descendants(p.pid)
        assert len(kids) >= 3  # the fork server, two workers (and the resource tracker)
        p.send_signal(signal.SIGKILL)
        p.wait()
        t1 = time.monotonic()
        while any(_alive(k, s) for k, s in kids.items()) and time.monotonic() - t1 < 20:
            time.sleep(0.1)
        left = [k for k, s in kids.items() if _alive(k, s)]
        assert not left, f"{len(left)} of {len(kids)} processes outlived prepare"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for k, s in kids.items():
            if _alive(k, s):
                os.kill(k, signal.SIGKILL)


def test_nifti_volumes_over_the_limits_are_skipped(tmp_path):
    nib = pytest.importorskip("nibabel")
    (tmp_path / "src").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 6), np.int16), np.eye(4)), str(tmp_path / "src" / "v.nii.gz"))
    rep = prepare(
        str(tmp_path / "src"), str(tmp_path / "c"), progress=False, limits=PixelLimits(max_slice_pixels=20 * 24 - 1)
    )
    assert rep.slices == 0 and rep.skipped == Counter({"image too large (Rows x Columns over the pixel limit)": 1})
    assert prepare(str(tmp_path / "src"), str(tmp_path / "c2"), progress=False).slices == 6


def test_a_full_disk_is_an_error_naming_the_shard_not_a_bus_error(tmp_path, ct_series, monkeypatch):
    # Writing through a memmap onto a full disk raises SIGBUS (the process dies, nothing said); the shard's
    # blocks are reserved first so that a full disk is an OSError that names it and leaves no partial file.
    import errno

    src, dst = tmp_path / "src", tmp_path / "c"
    ct_series(str(src / "s"), 3)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(
        UserError, match=r"cannot reserve .* MiB for shard .*No space left on device.*run the same command again"
    ):
        prepare(str(src), str(dst), progress=False, workers=1)
    leftovers = [f for _, _, fs in os.walk(dst) for f in fs if f.endswith(".npy") or f.endswith(".tmp")]
    assert leftovers == []
    monkeypatch.undo()  # space again: the same command completes
    assert prepare(str(src), str(dst), progress=False, workers=1).slices == 3
