"""DICOM CT series -> Hounsfield units (pydicom 3).

Reading is two-step so that a series can be sorted before its pixels are decoded:

- :func:`read_header` parses one file's header (pixels deferred) into :class:`FileHeader`: one
  :class:`FrameInfo` per image frame (single-frame CT, or every frame of an enhanced / legacy
  converted multi-frame CT, from its per-frame and shared functional groups), plus series metadata.
  Files that cannot serve as CT slices raise :class:`SkipFile` with a reason from a fixed vocabulary
  (never a header value, so reasons are safe to log).
- :func:`plan_series` drops duplicates and frames inconsistent with the series majority (size,
  orientation), sorts frames along the slice normal (ImagePositionPatient projected on
  ImageOrientationPatient's row x column direction; InstanceNumber as fallback) and derives spacing.
- :class:`PixelReader` decodes pixels (every transfer syntax pydicom can decode, compressed ones
  through its plugins) and applies the modality LUT per frame: RescaleSlope/Intercept, or a Modality
  LUT Sequence through pydicom's own :func:`pydicom.pixels.apply_modality_lut`. A frame whose
  conversion fails is skipped with the reason; the other frames of its series are kept.

Image sizes are bounded before anything is decoded (:class:`PixelLimits`): a file whose Rows x
Columns, or Rows x Columns x NumberOfFrames, is over the limit is skipped, so a small file that
claims a huge image cannot make a reader allocate gigabytes.

Rescale values: RescaleSlope / RescaleIntercept are required (type 1) in the CT Image module and in
an enhanced CT's Pixel Value Transformation; a value that is present but empty, not a number or not
finite, a slope of 0, or a rescale that maps every storable value outside int16 skips the frame with
the reason (it is never replaced by a default). Where the values are absent, the stored values are
used as they are (slope 1, intercept 0, as pydicom's ``apply_modality_lut`` does); a multi-frame
frame without its own values takes the shared functional group's (the standard's rule), then the
top-level ones.

:func:`read_series` puts these together into a :class:`CTVolume` (float32 HU, spacing, orientation,
positions, metadata). No patient name, ID or birth date is ever kept: patient identity is a salted
hash (``meta["patient"]``) when a salt is given, else absent.
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sparkct.errors import UserError

from ._util import salted_hash
from .options import MAX_FILE_PIXELS, MAX_SLICE_PIXELS

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
CT_SOP_CLASSES = {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE}


class SkipFile(Exception):
    """A file (or frame) that cannot be used as a CT slice; ``reason`` is safe to log and report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PixelLimits:
    """Largest images read (checked on the header, before any pixel is decoded or any memory is
    allocated for them). ``max_slice_pixels`` bounds Rows x Columns of one frame (default 4096 x
    4096); ``max_file_pixels`` bounds Rows x Columns x NumberOfFrames of one file, which is decoded
    at once (default 2**29, 1 GiB of 16-bit pixels)."""

    max_slice_pixels: int = MAX_SLICE_PIXELS
    max_file_pixels: int = MAX_FILE_PIXELS

    def __post_init__(self):
        for k in ("max_slice_pixels", "max_file_pixels"):
            v = getattr(self, k)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise UserError(f"{k} must be a positive integer, got {v!r}")

    def check(self, rows: int, cols: int, frames: int) -> None:
        """Raise SkipFile when an image of this size is over the limits."""
        if rows * cols > self.max_slice_pixels:
            raise SkipFile("image too large (Rows x Columns over the pixel limit)")
        if rows * cols * frames > self.max_file_pixels:
            raise SkipFile("image too large (Rows x Columns x frames over the pixel limit)")


DEFAULT_LIMITS = PixelLimits()


def _pydicom():
    import pydicom  # noqa: PLC0415 (lazy: optional dependency)
    from pydicom import config  # noqa: PLC0415 (lazy: optional dependency)

    # Header values that violate their VR are read as they are, without a warning that would print
    # the value (a warning could otherwise carry a name or an ID into the logs).
    config.settings.reading_validation_mode = config.IGNORE
    return pydicom


def _safe_code(v, n: int = 16) -> str:
    """A DICOM code string (CS) reduced to characters that cannot carry free text."""
    return re.sub(r"[^A-Z0-9_ ]", "", str(v).upper())[:n].strip() or "?"


@dataclass
class FrameInfo:
    """Geometry and rescale of one image frame."""

    path: str
    frame: int  # -1 for a single-frame file, else the frame's index in its multi-frame file
    sop_uid: str
    rows: int
    cols: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # 6 direction cosines: row direction, column direction
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    thickness: float | None
    instance: int | None
    slope: float = 1.0
    intercept: float = 0.0
    lut: bool = False  # a Modality LUT Sequence replaces slope/intercept


@dataclass
class FileHeader:
    path: str
    series_uid: str
    frames: list[FrameInfo]
    meta: dict
    # (byte offset, numpy dtype, item count) of uncompressed little-endian pixel data whose stored
    # bits fill their allocation: then the pixels are exactly those bytes and are read directly
    native: tuple | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # frames left out: (path, reason)


@dataclass
class CTVolume:
    """A CT series in Hounsfield units.

    ``hu`` is (slices, rows, cols) float32, slices sorted along the slice normal; ``spacing`` is
    (slice, row, column) spacing in mm (slice spacing NaN for a single slice); ``positions`` the
    ImagePositionPatient of each slice (None where absent); ``z`` each slice's position along the
    normal in mm (or its InstanceNumber when positions are absent); ``meta`` series metadata
    (UIDs, salted patient hash, kVp, thickness, age, sex, ...)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...] | None
    positions: np.ndarray | None
    z: np.ndarray
    instance_numbers: np.ndarray
    meta: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (slice, row, col, 1) to patient coordinates (LPS, mm)."""
        if self.orientation is None or self.positions is None:
            raise ValueError("affine needs ImageOrientationPatient and ImagePositionPatient")
        o = np.asarray(self.orientation, dtype=np.float64)
        row_dir, col_dir = o[:3], o[3:]
        a = np.eye(4)
        dz = self.positions[1] - self.positions[0] if len(self.positions) > 1 else np.cross(row_dir, col_dir)
        a[:3, 0] = dz
        a[:3, 1] = col_dir * self.spacing[1]
        a[:3, 2] = row_dir * self.spacing[2]
        a[:3, 3] = self.positions[0]
        return a


# ----------------------------------------------------------------------------------------- headers


def _first(seq_owner, name):
    seq = getattr(seq_owner, name, None) if seq_owner is not None else None
    if seq:
        return seq[0]
    return None


def _fg_item(per_frame, shared, name):
    """The first item of functional group `name`: per-frame first, then shared."""
    item = _first(per_frame, name)
    if item is None:
        item = _first(shared, name)
    return item


def _floats(v, n: int):
    if v is None:
        return None
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    if len(t) != n or not all(np.isfinite(t)):
        return None
    return t


def _float(v):
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _int(v):
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def parse_age(v) -> float | None:
    """PatientAge ('045Y', '006M', '003W', '010D') in years."""
    if not v:
        return None
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(v).upper())
    if not m:
        return None
    n = int(m.group(1))
    return round(n / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0, "": 1.0}[m.group(2)], 3)


def patient_pseudonym(ds, salt: str) -> str:
    """Salted hash of the patient's identity: PatientID; else name + birth date; else the study
    (each study then counts as its own patient). The identifying values never leave this function."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return salted_hash(salt, "id:" + pid)
    name = str(ds.get("PatientName", "") or "").strip()
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    if name:
        return salted_hash(salt, "name:" + name + "|" + birth)
    return salted_hash(salt, "study:" + str(ds.get("StudyInstanceUID", "")))


def _series_meta(ds, shared, first_frame, salt: str | None) -> dict:
    kvp = _float(ds.get("KVP"))
    if kvp is None:
        item = _fg_item(first_frame, shared, "CTXRayDetailsSequence")
        kvp = _float(item.get("KVP")) if item is not None else None
    kernel = ds.get("ConvolutionKernel")
    if kernel is None:
        item = _fg_item(first_frame, shared, "CTReconstructionSequence")
        kernel = item.get("ConvolutionKernel") if item is not None else None
    if isinstance(kernel, (list, tuple)) or (
        kernel is not None and not isinstance(kernel, str) and hasattr(kernel, "__iter__")
    ):
        kernel = "\\".join(str(k) for k in kernel)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    age = str(ds.get("PatientAge", "") or "").strip()
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta = {
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "modality": _safe_code(ds.get("Modality", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "transfer_syntax": str(ts) if ts else "",
        "kvp": kvp,
        "patient_age": age if re.fullmatch(r"\d{1,3}[DWMY]", age) else "",
        "age_years": parse_age(age),
        "patient_sex": sex if sex in ("M", "F", "O") else "",
        "manufacturer": str(ds.get("Manufacturer", "") or "")[:64],
        "model": str(ds.get("ManufacturerModelName", "") or "")[:64],
        "kernel": str(kernel or "")[:64],
        "body_part": _safe_code(ds.get("BodyPartExamined", ""), 32) if ds.get("BodyPartExamined") else "",
        "contrast": bool(ds.get("ContrastBolusAgent")),
    }
    if salt is not None:
        meta["patient"] = patient_pseudonym(ds, salt)
    return meta


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_DEFLATED_HEAD = 64 << 20  # the most inflated bytes kept to parse a deflated file's header


def _is_deflated(path: str) -> bool:
    """Whether the file meta names the deflated transfer syntax (a look at the first 4 KB, where the
    file meta is)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return _DEFLATED.encode() in head


def _inflate(f, step: int = 1 << 22):
    """The raw-deflate stream from f's position, as chunks of at most `step` bytes (a small input
    never becomes a huge output in one step)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    while not d.eof:
        data = f.read(1 << 20)
        if not data:
            break
        while data and not d.eof:
            out = d.decompress(data, step)
            data = d.unconsumed_tail
            if out:
                yield out
    out = d.flush()
    if out:
        yield out


def _parse_to_pixels(head: bytes):
    """(dataset of the elements before PixelData, offset of the PixelData element) from an
    explicit VR little endian data set, or (dataset or None, None) when PixelData is not in `head`."""
    from pydicom.filebase import DicomBytesIO  # noqa: PLC0415 (lazy: optional dependency)
    from pydicom.filereader import read_dataset  # noqa: PLC0415 (lazy: optional dependency)

    buf = DicomBytesIO(head)
    found = []

    def at_pixels(tag, vr, length):
        if tag == 0x7FE00010:
            found.append(length)
            return True
        return False

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(buf, False, True, stop_when=at_pixels)
    except Exception:
        return None, None
    return ds, (buf.tell() if found else None)


def _check_deflated(path: str, limits: PixelLimits) -> None:
    """pydicom inflates a deflated data set whole, in memory, before it parses a single element, so
    a small file can claim, and inflate to, gigabytes. Inflate it here as a stream first, keeping
    only the elements before the pixel data: skip the file as soon as its image is over the limits,
    or once it inflates to more than its header declares."""
    from pydicom.filereader import _read_file_meta_info, read_preamble  # noqa: PLC0415 (lazy: optional dependency)

    head = bytearray()
    total = 0
    declared = None  # the most inflated bytes the header allows, once it is parsed
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        for out in _inflate(f):
            total += len(out)
            if declared is None:
                head += out
                ds, at = _parse_to_pixels(bytes(head))
                if at is not None:
                    rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
                    bits = ds.get("BitsAllocated")
                    if not rows or not cols or bits not in (8, 16, 32):
                        return  # the ordinary checks report these
                    frames = _n_frames(ds)
                    limits.check(rows, cols, frames)
                    declared = at + 12 + rows * cols * frames * bits // 8 + (1 << 20)
                    head = bytearray()
                elif len(head) > _DEFLATED_HEAD:
                    raise SkipFile("damaged DICOM header (deflated header too large)")
            if declared is not None and total > declared:
                raise SkipFile("deflated data larger than its header declares")


def _n_frames(ds) -> int:
    """NumberOfFrames (1 when absent); SkipFile when present but not a positive integer."""
    if "NumberOfFrames" not in ds:
        return 1
    try:
        v = ds.get("NumberOfFrames")
    except Exception:
        v = None
    if v is None or v == "":
        return 1
    n = _int(v)
    if n is None or n < 1:
        raise SkipFile("bad header (NumberOfFrames not a positive integer)")
    return n


def _open_checked(path: str, limits: PixelLimits = DEFAULT_LIMITS):
    """Parse a header (pixels deferred) and check it can hold CT slices within `limits`; raises
    SkipFile. Returns (dataset, n_frames, series_uid, native pixel locator or None)."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415 (lazy: optional dependency)

    deflated = _is_deflated(path)
    try:
        if deflated:
            _check_deflated(path, limits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, defer_size=2048)
    except SkipFile:
        raise
    except InvalidDicomError:
        raise SkipFile("not a DICOM file") from None
    except (OSError, EOFError) as e:
        raise SkipFile(f"unreadable file ({type(e).__name__})") from None
    except Exception as e:  # pydicom raises many types on damaged headers
        raise SkipFile(f"damaged DICOM header ({type(e).__name__})") from None
    fm = getattr(ds, "file_meta", None)
    if fm is not None and str(fm.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
        raise SkipFile("DICOMDIR (not an image)")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality != "CT":
        if modality or sop_class not in CT_SOP_CLASSES:
            raise SkipFile(f"not CT (modality {_safe_code(modality) if modality else 'missing'})")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise SkipFile("float pixel data (not stored CT values)")
        raise SkipFile("no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SkipFile("not grayscale (SamplesPerPixel != 1)")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if not series_uid:
        raise SkipFile("no SeriesInstanceUID")
    rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not cols or rows < 0 or cols < 0:
        raise SkipFile("missing Rows/Columns")
    bits = ds.get("BitsAllocated")
    if bits not in (8, 16, 32):
        raise SkipFile("unsupported BitsAllocated")
    n_frames = _n_frames(ds)
    limits.check(rows, cols, n_frames)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        raise SkipFile("localizer")
    ts = fm.get("TransferSyntaxUID") if fm is not None else None
    native = None
    if ts is not None and not ts.is_compressed:
        expected = rows * cols * n_frames * bits // 8
        raw = ds._dict.get(0x7FE00010)
        length = getattr(raw, "length", None)
        if length is None:
            try:
                length = len(ds.PixelData)
            except Exception:
                length = None
        # Offsets into a deflated file are offsets into the inflated data set, not the file.
        tell = None if deflated else getattr(raw, "value_tell", None)
        if length is not None and length != 0xFFFFFFFF:
            if length < expected:
                raise SkipFile("truncated pixel data")
            try:
                if tell is not None and tell + expected > os.path.getsize(path):
                    raise SkipFile("truncated pixel data")
            except OSError:
                pass
            if (
                str(ts) in _NATIVE_LE
                and tell is not None
                and ds.get("BitsStored") == bits
                and ds.get("PixelRepresentation") in (0, 1)
            ):
                kind = "i" if ds.PixelRepresentation == 1 else "u"
                native = (int(tell), f"<{kind}{bits // 8}", rows * cols * n_frames)
    return ds, n_frames, series_uid, native


def scan_file(path: str, limits: PixelLimits = DEFAULT_LIMITS) -> tuple[str, int]:
    """(SeriesInstanceUID, number of frames) of a file usable as CT; raises SkipFile otherwise.
    The cheap check the prepare scan runs on every file."""
    _, n_frames, series_uid, _ = _open_checked(path, limits)
    return series_uid, n_frames


_ABSENT = object()


def _rescale_value(owner, name: str):
    """RescaleSlope / RescaleIntercept of a data set or functional-group item: _ABSENT when the
    element is not there, a finite float, or a reason string when present but unusable."""
    if owner is None or name not in owner:
        return _ABSENT
    try:
        v = owner.get(name)
    except Exception:
        return f"invalid {name} (not a number)"
    if v is None or (isinstance(v, (str, bytes)) and not v.strip()):
        return f"invalid {name} (empty)"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return f"invalid {name} (not a number)"
    if not np.isfinite(f):
        return f"invalid {name} (not finite)"
    return f


def _stored_range(ds) -> tuple[int, int]:
    bits = _int(ds.get("BitsStored")) or _int(ds.get("BitsAllocated")) or 16
    bits = min(max(bits, 1), 32)
    if ds.get("PixelRepresentation") == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _rescale(slope, icpt, stored: tuple[int, int]) -> tuple[float, float]:
    """The (slope, intercept) a frame uses, from the values _rescale_value found (the first that is
    not _ABSENT of each list: per-frame, shared, top level); raises SkipFile with the reason."""
    s = next((v for v in slope if v is not _ABSENT), _ABSENT)
    i = next((v for v in icpt if v is not _ABSENT), _ABSENT)
    s = 1.0 if s is _ABSENT else s
    i = 0.0 if i is _ABSENT else i
    for v in (s, i):
        if isinstance(v, str):
            raise SkipFile(v)
    if s == 0:
        raise SkipFile("invalid RescaleSlope (zero)")
    lo, hi = sorted((stored[0] * s + i, stored[1] * s + i))
    if hi < -32768 or lo > 32767:
        raise SkipFile("rescale maps every stored value outside the int16 HU range")
    return float(s), float(i)


def read_header(
    path: str,
    salt: str | None = None,
    *,
    keep_dataset: bool = False,
    with_meta: bool = True,
    limits: PixelLimits = DEFAULT_LIMITS,
):
    """Parse one file into a :class:`FileHeader` (pixels deferred). Raises :class:`SkipFile`.

    Frames of a multi-frame file that cannot be used (bad rescale values) are left out and listed in
    ``FileHeader.skipped``. With keep_dataset=True returns (FileHeader, Dataset) so pixels can be read
    without a re-parse. with_meta=False leaves out the series metadata (``meta`` holds only the UIDs)."""
    ds, n_frames, series_uid, native = _open_checked(path, limits)
    rows, cols = int(ds.Rows), int(ds.Columns)
    lut = bool(ds.get("ModalityLUTSequence"))
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frames: list[FrameInfo] = []
    skipped: list[tuple[str, str]] = []
    top_pos = _floats(ds.get("ImagePositionPatient"), 3)
    top_ori = _floats(ds.get("ImageOrientationPatient"), 6)
    top_ps = _floats(ds.get("PixelSpacing"), 2)
    top_th = _float(ds.get("SliceThickness"))
    stored = _stored_range(ds)
    top_slope = _ABSENT if lut else _rescale_value(ds, "RescaleSlope")
    top_icpt = _ABSENT if lut else _rescale_value(ds, "RescaleIntercept")
    if n_frames == 1 and not per_frame:
        slope, icpt = _rescale([top_slope], [top_icpt], stored)  # a single frame: SkipFile skips the file
        frames.append(
            FrameInfo(
                path,
                -1,
                sop_uid,
                rows,
                cols,
                top_pos,
                top_ori,
                top_ps,
                top_th,
                _int(ds.get("InstanceNumber")),
                slope,
                icpt,
                lut,
            )
        )
    else:
        if per_frame is not None and len(per_frame) != n_frames:
            raise SkipFile("per-frame functional groups do not match NumberOfFrames")
        shared_pvt = _first(shared, "PixelValueTransformationSequence")
        sh_slope = _rescale_value(shared_pvt, "RescaleSlope")
        sh_icpt = _rescale_value(shared_pvt, "RescaleIntercept")
        for i in range(n_frames):
            pf = per_frame[i] if per_frame is not None else None
            ftype = _fg_item(pf, shared, "CTImageFrameTypeSequence")
            if ftype is not None and "LOCALIZER" in [str(v).upper() for v in (ftype.get("FrameType") or [])]:
                continue
            pos = _fg_item(pf, shared, "PlanePositionSequence")
            ori = _fg_item(pf, shared, "PlaneOrientationSequence")
            meas = _fg_item(pf, shared, "PixelMeasuresSequence")
            pvt = _first(pf, "PixelValueTransformationSequence")
            content = _fg_item(pf, None, "FrameContentSequence")
            try:
                slope, icpt = (
                    (1.0, 0.0)
                    if lut
                    else _rescale(
                        [_rescale_value(pvt, "RescaleSlope"), sh_slope, top_slope],
                        [_rescale_value(pvt, "RescaleIntercept"), sh_icpt, top_icpt],
                        stored,
                    )
                )
            except SkipFile as e:
                skipped.append((path, e.reason))
                continue
            inst = _int(content.get("InStackPositionNumber")) if content is not None else None
            frames.append(
                FrameInfo(
                    path,
                    i,
                    sop_uid,
                    rows,
                    cols,
                    (
                        _floats(pos.get("ImagePositionPatient"), 3)
                        if pos is not None
                        else (top_pos if n_frames == 1 else None)
                    ),
                    _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else top_ori,
                    _floats(meas.get("PixelSpacing"), 2) if meas is not None else top_ps,
                    (_float(meas.get("SliceThickness")) if meas is not None else None) or top_th,
                    inst if inst is not None else i + 1,
                    slope,
                    icpt,
                    lut,
                )
            )
        if not frames:  # the file counts once, by the reason of its first unusable frame
            raise SkipFile(skipped[0][1] if skipped else "localizer")
    if with_meta:
        meta = _series_meta(ds, shared, per_frame[0] if per_frame else None, salt)
    else:
        meta = {"series_uid": series_uid}
    header = FileHeader(path, series_uid, frames, meta, None if lut else native, skipped)
    return (header, ds) if keep_dataset else header


# ------------------------------------------------------------------------------------------ series


@dataclass
class SeriesPlan:
    """The frames of a series that will become slices, in order, with the series geometry."""

    frames: list[FrameInfo]
    skipped: list[tuple[str, str]]
    rows: int
    cols: int
    orientation: tuple[float, ...] | None
    z: np.ndarray  # position along the normal (mm), or InstanceNumber / order when unknown
    sorted_by: str  # "position", "instance" or "file"
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None
    thickness: float | None

    @property
    def positions(self) -> np.ndarray | None:
        if all(f.position is not None for f in self.frames):
            return np.array([f.position for f in self.frames], dtype=np.float64)
        return None


def _majority(values):
    c = Counter(values)
    return max(c.items(), key=lambda kv: (kv[1], str(kv[0])))[0] if c else None


def plan_series(headers: Sequence[FileHeader]) -> SeriesPlan:
    """Order and check the frames of one series (see the module docstring)."""
    skipped: list[tuple[str, str]] = [sk for h in headers for sk in h.skipped]
    seen: set = set()
    frames: list[FrameInfo] = []
    for h in headers:
        for f in h.frames:
            key = (f.sop_uid, f.frame) if f.sop_uid else (f.path, f.frame)
            if key in seen:
                skipped.append((f.path, "duplicate SOPInstanceUID in series"))
                continue
            seen.add(key)
            frames.append(f)
    if not frames:
        return SeriesPlan([], skipped, 0, 0, None, np.zeros(0), "file", None, None, None)
    shape = _majority([(f.rows, f.cols) for f in frames])
    keep = []
    for f in frames:
        if (f.rows, f.cols) != shape:
            skipped.append((f.path, "inconsistent size in series"))
        else:
            keep.append(f)
    frames = keep
    oris = [tuple(round(v, 3) for v in f.orientation) for f in frames if f.orientation is not None]
    ori_key = _majority(oris)
    orientation = None
    if ori_key is not None:
        keep = []
        for f in frames:
            if f.orientation is not None and tuple(round(v, 3) for v in f.orientation) != ori_key:
                skipped.append((f.path, "inconsistent orientation in series"))
            else:
                keep.append(f)
        frames = keep
        orientation = next(f.orientation for f in frames if f.orientation is not None)

    sorted_by = "file"
    if orientation is not None and all(f.position is not None for f in frames):
        o = np.asarray(orientation, dtype=np.float64)
        normal = np.cross(o[:3], o[3:])
        nn = np.linalg.norm(normal)
        if nn > 1e-6:
            normal /= nn
            z = np.array([np.dot(f.position, normal) for f in frames], dtype=np.float64)
            inst = np.array([f.instance if f.instance is not None else 0 for f in frames])
            order = np.lexsort((np.array([f.frame for f in frames]), inst, z))
            sorted_by = "position"
    if sorted_by == "file":
        if all(f.instance is not None for f in frames):
            z = np.array([f.instance for f in frames], dtype=np.float64)
            order = np.lexsort((np.array([f.frame for f in frames]), z))
            sorted_by = "instance"
        else:
            order = np.array(sorted(range(len(frames)), key=lambda i: (frames[i].path, frames[i].frame)))
            z = np.arange(len(frames), dtype=np.float64)[np.argsort(order)]
    frames = [frames[i] for i in order]
    z = z[order]

    spacings = [f.pixel_spacing for f in frames if f.pixel_spacing is not None]
    pixel_spacing = _majority([tuple(round(v, 6) for v in s) for s in spacings]) if spacings else None
    thick = [f.thickness for f in frames if f.thickness is not None]
    thickness = float(np.median(thick)) if thick else None
    slice_spacing = None
    if sorted_by == "position" and len(z) > 1:
        d = np.diff(z)
        d = d[np.abs(d) > 1e-4]
        if len(d):
            slice_spacing = float(np.median(d))
    if slice_spacing is None and len(frames) > 1:
        slice_spacing = thickness
    return SeriesPlan(
        frames, skipped, shape[0], shape[1], orientation, z, sorted_by, pixel_spacing, slice_spacing, thickness
    )


# ------------------------------------------------------------------------------------------ pixels


def stored_to_hu(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The rescale of the modality LUT in float64 (as pydicom computes it), returned as float32."""
    out = arr.astype(np.float64) * slope
    out += intercept
    return out.astype(np.float32)


def stored_to_hu_int16(
    arr: np.ndarray, slope: float, intercept: float, lo: int = -32768, hi: int = 32767, out: np.ndarray | None = None
) -> np.ndarray:
    """HU rounded to int16 and clipped to [lo, hi] (into `out` if given, e.g. a shard row); integer
    arithmetic where slope is 1 and the intercept integral (the usual CT case), so nothing is lost
    to float rounding, in two passes over the slice."""
    if slope == 1.0 and float(intercept).is_integer() and abs(intercept) < 2**31 - 2**17:
        tmp = np.add(arr, np.int32(intercept), dtype=np.int32)
    else:
        tmp = np.rint(arr.astype(np.float64) * slope + intercept)
    if out is None:
        out = np.empty(arr.shape, dtype=np.int16)
    np.clip(tmp, lo, hi, out=out, casting="unsafe")
    return out


class PixelReader:
    """Decodes frames of the files of one series, keeping the last multi-frame file's pixels so its
    frames are decoded once."""

    def __init__(self, datasets: dict | None = None, native: dict | None = None):
        # Datasets already parsed by read_header(keep_dataset=True): their deferred pixel data is
        # read from the file on first access, so the header is not parsed a second time.
        self._datasets = dict(datasets or {})
        # path -> FileHeader.native: uncompressed pixels read straight from the file
        self._native = dict(native or {})
        self._path = None
        self._ds = None
        self._arr = None

    def dataset(self, path: str):
        if self._path != path:
            ds = self._datasets.pop(path, None)
            if ds is None:
                pydicom = _pydicom()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(path)
            self._path, self._ds, self._arr = path, ds, None
        return self._ds

    def stored(self, f: FrameInfo) -> np.ndarray:
        """The stored values of frame f (rows x cols), as pydicom decodes them. Raises SkipFile."""
        loc = self._native.get(f.path)
        if loc is not None:
            if self._path != f.path:
                try:
                    arr = np.fromfile(f.path, dtype=loc[1], count=loc[2], offset=loc[0])
                except (OSError, ValueError) as e:
                    raise SkipFile(f"pixel data unreadable ({type(e).__name__})") from None
                if arr.size != loc[2]:
                    raise SkipFile("truncated pixel data")
                self._path, self._ds, self._arr = f.path, None, arr.reshape(-1, f.rows, f.cols)
            return self._arr[max(f.frame, 0)]
        try:
            ds = self.dataset(f.path)
            if self._arr is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._arr = ds.pixel_array
            arr = self._arr
        except SkipFile:
            raise
        except Exception as e:
            self._path = None
            raise SkipFile(f"pixel data unreadable ({type(e).__name__})") from None
        if f.frame >= 0:
            if arr.ndim == 2 and f.frame == 0:
                pass
            elif arr.ndim != 3 or f.frame >= arr.shape[0]:
                raise SkipFile("pixel data unreadable (frame count)")
            else:
                arr = arr[f.frame]
        if arr.shape != (f.rows, f.cols):
            raise SkipFile("pixel data unreadable (shape)")
        return arr

    def _lut(self, arr: np.ndarray) -> np.ndarray:
        from pydicom.pixels import apply_modality_lut  # noqa: PLC0415 (lazy: optional dependency)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.asarray(apply_modality_lut(arr, self._ds), dtype=np.float64)
        except Exception as e:  # a malformed sequence raises anything from struct.error to IndexError
            raise SkipFile(f"malformed Modality LUT Sequence ({type(e).__name__})") from None

    def hu(self, f: FrameInfo) -> np.ndarray:
        """Frame f in HU, float32: per-frame RescaleSlope/Intercept, or the Modality LUT Sequence.
        Raises SkipFile when the frame cannot be decoded or converted."""
        arr = self.stored(f)
        if f.lut:
            return self._lut(arr).astype(np.float32)
        try:
            return stored_to_hu(arr, f.slope, f.intercept)
        except (ArithmeticError, ValueError) as e:
            raise SkipFile(f"HU conversion failed ({type(e).__name__})") from None

    def hu_int16(self, f: FrameInfo, lo: int = -32768, hi: int = 32767, out: np.ndarray | None = None) -> np.ndarray:
        arr = self.stored(f)
        if f.lut:
            hu = np.rint(self._lut(arr))
            if out is None:
                out = np.empty(arr.shape, dtype=np.int16)
            np.clip(hu, lo, hi, out=out, casting="unsafe")
            return out
        try:
            return stored_to_hu_int16(arr, f.slope, f.intercept, lo, hi, out)
        except (ArithmeticError, ValueError) as e:
            raise SkipFile(f"HU conversion failed ({type(e).__name__})") from None


# ------------------------------------------------------------------------------------------ public


def list_files(root: str) -> list[str]:
    """Regular files under root (recursively, sorted, hidden files and folders left out)."""
    if os.path.isfile(root):
        return [root]
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(files) if not f.startswith("."))
    return out


def scan_headers(paths: Iterable[str], salt: str | None = None, limits: PixelLimits = DEFAULT_LIMITS):
    """Headers of `paths` grouped by SeriesInstanceUID: ({series_uid: [FileHeader]}, [(path, reason)])."""
    groups: dict[str, list[FileHeader]] = {}
    skipped: list[tuple[str, str]] = []
    for p in paths:
        try:
            h = read_header(p, salt, limits=limits)
        except SkipFile as e:
            skipped.append((p, e.reason))
            continue
        groups.setdefault(h.series_uid, []).append(h)
    return groups, skipped


def volume_from_headers(headers: Sequence[FileHeader], skipped=None) -> CTVolume:
    """Decode a planned series into a float32 HU :class:`CTVolume`."""
    plan = plan_series(headers)
    skipped = list(skipped or []) + plan.skipped
    reader = PixelReader()
    slices, kept = [], []
    for f in plan.frames:
        try:
            slices.append(reader.hu(f))
            kept.append(True)
        except SkipFile as e:
            skipped.append((f.path, e.reason))
            kept.append(False)
    if not slices:
        raise ValueError(
            "no readable CT slice in the series"
            + (f" (skipped: {dict(Counter(r for _, r in skipped))})" if skipped else "")
        )
    kept = np.array(kept)
    frames = [f for f, k in zip(plan.frames, kept) if k]
    hu = np.stack(slices)
    positions = plan.positions
    if positions is not None:
        positions = positions[kept]
    ps = plan.pixel_spacing or (float("nan"), float("nan"))
    meta = dict(headers[0].meta)
    meta.update(thickness=plan.thickness, sorted_by=plan.sorted_by)
    return CTVolume(
        hu=hu,
        spacing=(plan.slice_spacing if plan.slice_spacing is not None else float("nan"), ps[0], ps[1]),
        orientation=plan.orientation,
        positions=positions,
        z=plan.z[kept].astype(np.float64),
        instance_numbers=np.array([f.instance if f.instance is not None else -1 for f in frames], dtype=np.int64),
        meta=meta,
        skipped=skipped,
    )


def read_series(
    source: str | Sequence[str],
    *,
    series_uid: str | None = None,
    salt: str | None = None,
    limits: PixelLimits = DEFAULT_LIMITS,
) -> CTVolume:
    """Read one CT series into float32 HU.

    `source` is a folder (searched recursively) or a list of files. When the files hold several
    series, pass `series_uid` (see :func:`iter_series` to read them all). Files that are not usable
    CT slices are skipped and listed in ``volume.skipped`` as (path, reason); so are files over
    `limits` (see :class:`PixelLimits`)."""
    paths = list_files(source) if isinstance(source, (str, os.PathLike)) else [str(p) for p in source]
    if not paths:
        raise FileNotFoundError(f"no files in {source!r}")
    groups, skipped = scan_headers(paths, salt, limits)
    if series_uid is not None:
        if series_uid not in groups:
            raise ValueError(f"series {series_uid!r} not found among {len(groups)} CT series")
        headers = groups[series_uid]
    elif len(groups) == 1:
        headers = next(iter(groups.values()))
    elif not groups:
        reasons = dict(Counter(r for _, r in skipped))
        raise ValueError(f"no CT series found in {len(paths)} files (skipped: {reasons})")
    else:
        raise ValueError(f"the files hold {len(groups)} CT series; pass series_uid= or use iter_series()")
    return volume_from_headers(headers, skipped)


def iter_series(source: str | Sequence[str], *, salt: str | None = None, limits: PixelLimits = DEFAULT_LIMITS):
    """Yield a :class:`CTVolume` for every CT series under `source` (sorted by SeriesInstanceUID)."""
    paths = list_files(source) if isinstance(source, (str, os.PathLike)) else [str(p) for p in source]
    groups, skipped = scan_headers(paths, salt, limits)
    for i, uid in enumerate(sorted(groups)):
        yield volume_from_headers(groups[uid], skipped if i == 0 else None)
