"""DICOM -> HU on the real CT files that ship with pydicom, and series assembly."""

from __future__ import annotations

import copy
import os
import random
import shutil
from collections import Counter

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from sparkct.data.dicom import (
    ENHANCED_CT_IMAGE_STORAGE,
    CTVolume,
    SkipFile,
    iter_series,
    parse_age,
    plan_series,
    read_header,
    read_series,
)

REAL_CT = ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"]


def pydicom_hu(path_or_ds) -> np.ndarray:
    ds = pydicom.dcmread(path_or_ds) if isinstance(path_or_ds, str) else path_or_ds
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


@pytest.mark.parametrize("name", REAL_CT)
def test_hu_equals_pydicom_modality_lut(testdata, name):
    path = testdata(name)
    vol = read_series([path])
    assert vol.hu.dtype == np.float32 and vol.shape[0] == 1
    np.testing.assert_array_equal(vol.hu[0], pydicom_hu(path))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert vol.spacing[1:] == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert vol.meta["kvp"] == pytest.approx(float(ds.KVP))
    assert vol.meta["series_uid"] == ds.SeriesInstanceUID


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_transfer_syntaxes_decode_to_the_same_hu(testdata, tmp_path, syntax):
    path = testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    out = str(tmp_path / "c.dcm")
    ds.save_as(out, enforce_file_format=True)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == syntax
    vol = read_series([out])
    np.testing.assert_array_equal(vol.hu[0], pydicom_hu(path))
    assert vol.meta["transfer_syntax"] == str(syntax)


def test_fractional_rescale_and_modality_lut_sequence(testdata, tmp_path):
    path = testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = "0.73", "-1000.25"
    p1 = str(tmp_path / "rescale.dcm")
    ds.save_as(p1, enforce_file_format=True)
    np.testing.assert_array_equal(read_series([p1]).hu[0], pydicom_hu(p1))

    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept
    item = Dataset()
    item.add_new("LUTDescriptor", "SS", [4096, -2000, 16])
    item.ModalityLUTType = "HU"
    item.add_new("LUTData", "US", [int(v) for v in np.linspace(0, 4000, 4096)])
    ds.ModalityLUTSequence = Sequence([item])
    p2 = str(tmp_path / "lut.dcm")
    ds.save_as(p2, enforce_file_format=True)
    got = read_series([p2]).hu[0]
    np.testing.assert_array_equal(got, pydicom_hu(p2))
    assert not np.array_equal(got, pydicom_hu(path))


def _series_from_ct_small(
    path,
    out_dir,
    positions,
    *,
    orientation=(1, 0, 0, 0, 1, 0),
    instance=None,
    shuffle_names=True,
    drop_positions=False,
    seed=0,
):
    """A series built from CT_small: slice k gets pixels CT_small + 10 k at positions[k]."""
    base = pydicom.dcmread(path)
    series_uid = generate_uid()
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    names = [f"{k:03d}.dcm" for k in range(len(positions))]
    if shuffle_names:
        rng.shuffle(names)
    arr = base.pixel_array
    for k, pos in enumerate(positions):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = list(orientation)
        if drop_positions:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = [float(v) for v in pos]
        ds.InstanceNumber = instance[k] if instance is not None else k + 1
        ds.PixelData = (arr + 10 * k).astype(arr.dtype).tobytes()
        ds.save_as(os.path.join(out_dir, names[k]), enforce_file_format=True)
    return series_uid


def test_series_sorted_along_slice_normal_not_by_file_or_instance(testdata, tmp_path):
    path = testdata("CT_small.dcm")
    rng = np.random.default_rng(0)
    zs = rng.permutation(np.arange(8) * 2.5 - 30.0)
    # misleading InstanceNumbers: reversed against position
    inst = list((-zs).argsort().argsort() + 1)
    pos = [(-158.1, -179.0, z) for z in zs]
    _series_from_ct_small(path, str(tmp_path / "s"), pos, instance=inst)
    vol = read_series(str(tmp_path / "s"))
    assert vol.meta["sorted_by"] == "position"
    np.testing.assert_allclose(vol.z, np.sort(zs))
    assert vol.spacing[0] == pytest.approx(2.5)
    # slice k was written with pixels + 10 k; after sorting, the offsets follow z
    base = pydicom_hu(path)
    order = np.argsort(zs)
    for j, k in enumerate(order):
        np.testing.assert_array_equal(vol.hu[j], base + 10 * k)
    assert vol.positions.shape == (8, 3)
    a = vol.affine()
    np.testing.assert_allclose(a[:3, 3], vol.positions[0])


def test_oblique_series_sorted_by_projection_on_normal(testdata, tmp_path):
    path = testdata("CT_small.dcm")
    t = np.deg2rad(30)
    row = np.array([1.0, 0, 0])
    col = np.array([0, np.cos(t), np.sin(t)])
    normal = np.cross(row, col)
    steps = [3, 0, 4, 1, 2]
    # an in-plane offset (along the column direction) moves z but not the projection on the normal
    pos = [s * 2.0 * normal + (7.0 * (i % 3)) * col for i, s in enumerate(steps)]
    assert np.argsort([p[2] for p in pos]).tolist() != np.argsort(steps).tolist()
    _series_from_ct_small(path, str(tmp_path / "s"), pos, orientation=(*row, *col))
    vol = read_series(str(tmp_path / "s"))
    np.testing.assert_allclose(vol.z, np.arange(5) * 2.0, atol=1e-4)
    assert vol.spacing[0] == pytest.approx(2.0, abs=1e-4)


def test_instance_number_fallback_without_positions(testdata, tmp_path):
    path = testdata("CT_small.dcm")
    inst = [5, 2, 4, 1, 3]
    _series_from_ct_small(path, str(tmp_path / "s"), [None] * 5, instance=inst, drop_positions=True)
    vol = read_series(str(tmp_path / "s"))
    assert vol.meta["sorted_by"] == "instance"
    np.testing.assert_array_equal(vol.instance_numbers, [1, 2, 3, 4, 5])
    base = pydicom_hu(path)
    for j, n in enumerate([1, 2, 3, 4, 5]):
        np.testing.assert_array_equal(vol.hu[j], base + 10 * inst.index(n))


def test_pydicom_dicomdir_tree_series_and_skips(testdata):
    root = os.path.join(os.path.dirname(testdata("CT_small.dcm")), "dicomdirtests")
    vols = list(iter_series(root))
    assert sorted(v.shape for v in vols) == [(4, 16, 16), (5, 16, 16)]
    reasons = Counter(r for v in vols for _, r in v.skipped)
    assert reasons["localizer"] == 2
    assert reasons["not CT (modality MR)"] > 0 and reasons["not CT (modality CR)"] == 3
    assert reasons["DICOMDIR (not an image)"] > 0
    five = next(v for v in vols if v.shape[0] == 5)
    assert np.all(np.diff(five.z) > 0) and five.spacing[0] == pytest.approx(2.5)
    # values equal pydicom's, slice by slice
    for v in vols:
        folder = os.path.join(root, "77654033/CT2") if v.shape[0] == 4 else os.path.join(root, "98892001/CT5N")
        by_z = {}
        for f in os.listdir(folder):
            ds = pydicom.dcmread(os.path.join(folder, f))
            by_z[round(float(ds.ImagePositionPatient[2]), 3)] = pydicom_hu(ds)
        for j, z in enumerate(v.z):
            np.testing.assert_array_equal(v.hu[j], by_z[round(float(z), 3)])


def _enhanced_ct(path, frames, positions, slopes, intercepts, frame_types=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "MF-PATIENT-123"
    ds.PatientName = "Frame^Multi"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    n, h, w = frames.shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [0.7, 0.8]
    pm.SliceThickness = 1.5
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    xr = Dataset()
    xr.KVP = 120
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.CTXRayDetailsSequence = Sequence([xr])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(n):
        fg = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [0.0, 0.0, float(positions[k])]
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slopes[k], intercepts[k], "HU"
        fc = Dataset()
        fc.InStackPositionNumber = k + 1
        fg.PlanePositionSequence = Sequence([pp])
        fg.PixelValueTransformationSequence = Sequence([pvt])
        fg.FrameContentSequence = Sequence([fc])
        if frame_types is not None:
            ft = Dataset()
            ft.FrameType = frame_types[k]
            fg.CTImageFrameTypeSequence = Sequence([ft])
        per.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = frames.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_multiframe_enhanced_ct_per_frame_rescale_and_order(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(-1000, 3000, size=(5, 12, 10)).astype(np.int16)
    positions = [4.0, -2.0, 1.0, 7.0, 10.0]
    slopes = [1.0, 0.5, 2.0, 1.0, 1.0]
    intercepts = [-1024.0, 0.0, -10.5, 0.0, 0.0]
    types = [["ORIGINAL", "PRIMARY", "AXIAL"]] * 4 + [["ORIGINAL", "PRIMARY", "LOCALIZER"]]
    p = str(tmp_path / "mf.dcm")
    _enhanced_ct(p, frames, positions, slopes, intercepts, types)
    vol = read_series([p], salt="00" * 16)
    assert vol.shape == (4, 12, 10)  # the LOCALIZER frame is left out
    np.testing.assert_allclose(vol.z, [-2.0, 1.0, 4.0, 7.0])
    assert vol.spacing == pytest.approx((3.0, 0.7, 0.8))
    assert vol.meta["kvp"] == 120.0
    for j, k in enumerate([1, 2, 0, 3]):
        ref = Dataset()
        ref.RescaleSlope, ref.RescaleIntercept = slopes[k], intercepts[k]
        np.testing.assert_array_equal(vol.hu[j], apply_modality_lut(frames[k], ref).astype(np.float32))
    assert "MF-PATIENT-123" not in str(vol.meta) and "Frame^Multi" not in str(vol.meta)


def test_bad_files_are_skipped_with_reasons(testdata, tmp_path):
    path = testdata("CT_small.dcm")
    d = tmp_path / "s"
    _series_from_ct_small(path, str(d), [(0, 0, z) for z in (0.0, 5.0, 10.0, 15.0)])
    good = sorted(os.listdir(d))
    raw = open(d / good[0], "rb").read()
    open(d / "truncated.dcm", "wb").write(raw[: len(raw) - 5000])
    open(d / "garbage.dcm", "wb").write(os.urandom(3000))
    open(d / "empty.dcm", "wb").write(b"")
    shutil.copy(testdata("MR_small.dcm"), d / "mr.dcm")
    ds = pydicom.dcmread(d / good[1])
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(d / "nopixels.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(d / good[2])  # a different size in the same series
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [0, 0, 20.0]
    ds.save_as(d / "othersize.dcm", enforce_file_format=True)
    vol = read_series(str(d))
    assert vol.shape == (4, 128, 128)
    reasons = Counter(r for _, r in vol.skipped)
    assert reasons == Counter(
        {
            "truncated pixel data": 1,
            "not a DICOM file": 2,
            "not CT (modality MR)": 1,
            "no pixel data": 1,
            "inconsistent size in series": 1,
        }
    )


def test_read_header_reasons_and_age(testdata, tmp_path):
    with pytest.raises(SkipFile, match="not a DICOM file"):
        p = tmp_path / "x.txt"
        p.write_text("hello")
        read_header(str(p))
    h = read_header(testdata("CT_small.dcm"), salt="ab" * 16)
    assert len(h.frames) == 1 and h.meta["patient_age"] == "000Y" and h.meta["age_years"] == 0
    assert h.meta["patient"] != read_header(testdata("CT_small.dcm"), salt="cd" * 16).meta["patient"]
    assert parse_age("045Y") == 45 and parse_age("006M") == 0.5 and parse_age("bogus") is None


def test_read_series_errors(tmp_path, testdata):
    with pytest.raises(FileNotFoundError):
        read_series(str(tmp_path))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no CT series"):
        read_series(str(tmp_path))
    _series_from_ct_small(testdata("CT_small.dcm"), str(tmp_path / "a"), [(0, 0, 0.0)])
    _series_from_ct_small(testdata("CT_small.dcm"), str(tmp_path / "b"), [(0, 0, 0.0)])
    with pytest.raises(ValueError, match="2 CT series"):
        read_series(str(tmp_path))


def test_plan_drops_duplicates(testdata, tmp_path):
    path = testdata("CT_small.dcm")
    _series_from_ct_small(path, str(tmp_path / "s"), [(0, 0, 0.0), (0, 0, 5.0)])
    f = sorted(os.listdir(tmp_path / "s"))[0]
    shutil.copy(tmp_path / "s" / f, tmp_path / "s" / "copy.dcm")
    hs = [read_header(str(tmp_path / "s" / f)) for f in sorted(os.listdir(tmp_path / "s"))]
    plan = plan_series(hs)
    assert len(plan.frames) == 2 and [r for _, r in plan.skipped] == ["duplicate SOPInstanceUID in series"]
    assert isinstance(read_series(str(tmp_path / "s")), CTVolume)


# One file per transfer syntax that pydicom decodes (its own test files, relabelled as CT with a
# rescale): implicit/explicit little endian, big endian, deflated, JPEG extended, JPEG-LS lossless and
# near-lossless, JPEG 2000 lossless and lossy, RLE.
TS_FILES = [
    "MR_small_implicit.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "JPGExtended.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
]


def test_every_transfer_syntax_pydicom_decodes_is_read(testdata, tmp_path):
    from sparkct.data import SliceCache, prepare

    refs, syntaxes = {}, set()
    for name in TS_FILES:
        ds = pydicom.dcmread(testdata(name))
        ds.Modality, ds.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"
        p = str(tmp_path / "src" / name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        written = pydicom.dcmread(p)
        assert written.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        try:
            ref = pydicom_hu(written)
        except Exception:  # a decoder plugin missing here
            continue
        syntaxes.add(str(written.file_meta.TransferSyntaxUID))
        vol = read_series([p])
        assert vol.meta["transfer_syntax"] == str(written.file_meta.TransferSyntaxUID)
        np.testing.assert_array_equal(vol.hu[0], ref, err_msg=name)
        refs[str(ds.SeriesInstanceUID)] = ref
    assert {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5"} <= syntaxes
    rep = prepare(str(tmp_path / "src"), str(tmp_path / "c"), progress=False, clip_min=-32768)
    assert rep.skipped == Counter() and rep.series == len(TS_FILES)
    c = SliceCache(str(tmp_path / "c"))
    got = {str(c.series["series_uid"][s]): c.shard(s)[0] for s in range(c.n_series)}
    for uid, ref in refs.items():
        np.testing.assert_array_equal(got[uid], np.clip(np.rint(ref), -32768, 32767))


def test_deflated_ct_is_read(testdata, tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = str(tmp_path / "d.dcm")
    ds.save_as(out, enforce_file_format=True)
    assert os.path.getsize(out) < os.path.getsize(path)
    np.testing.assert_array_equal(read_series([out]).hu[0], pydicom_hu(path))


def test_multiframe_bad_rescale_skips_that_frame_only(tmp_path):
    frames = np.random.default_rng(2).integers(-1000, 3000, size=(4, 8, 8)).astype(np.int16)
    p = str(tmp_path / "mf.dcm")
    _enhanced_ct(p, frames, [0.0, 1.0, 2.0, 3.0], [1.0, "NaN", 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    vol = read_series([p])
    assert vol.shape[0] == 3 and vol.skipped == [(p, "invalid RescaleSlope (not finite)")]
    np.testing.assert_array_equal(vol.hu, frames[[0, 2, 3]].astype(np.float32))
