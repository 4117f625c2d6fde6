"""``sparkct data prepare SRC DST``: every CT series under SRC into the slice cache DST (its layout
and reader: :mod:`sparkct.data.cache`).

The run: walk SRC; scan every file's header (in parallel with ``workers``) and group DICOM files
into series (NIfTI files are one series each); plan one job per series; run the jobs in worker
processes (:mod:`sparkct.data.workers`), each writing its shard and then its record; write the
index, series.csv, report.json and skipped.csv.

Every file is written to a temporary name, fsynced and renamed, so an interrupted run leaves no
half-written shard; the next run skips series whose record matches the source files (path, size,
mtime), the settings and the pixel limits, and rewrites the index. Re-running on an unchanged
source writes nothing but the (identical) index.

Bad input never stops a run: a file (or frame) that cannot be used is skipped and counted with its
reason, a folder that cannot be listed too, and a series whose worker fails is reported failed.
Images over the pixel limits (:class:`sparkct.data.dicom.PixelLimits`) are skipped before they
are decoded.

Privacy: no patient name, ID, birth date or source path is stored in the cache (source files are
identified by salted hashes of their relative paths). skipped.csv and the log name skipped files by
the same token unless ``show_paths=True`` (``--show-paths``).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from sparkct import __version__
from sparkct import io as sio
from sparkct.errors import UserError

from . import _util
from ._util import log, salted_hash, stable_hash
from .cache import FORMAT, SERIES_NUM_FIELDS, SERIES_STR_FIELDS, VERSION, record_rel, shard_rel
from .dicom import DEFAULT_LIMITS, PixelLimits, PixelReader, SkipFile, plan_series, read_header, scan_file
from .nifti import nifti_stem, read_nifti
from .options import PATIENT_FROM, PREPARE_DEFAULTS
from .workers import WorkerPool

CHUNK = 16  # slices resampled together

# Files never read as images (labels, notes, archives of metadata) are counted as "ignored".
IGNORED_SUFFIXES = (
    ".csv",
    ".tsv",
    ".txt",
    ".json",
    ".md",
    ".xml",
    ".html",
    ".pdf",
    ".log",
    ".yaml",
    ".yml",
    ".py",
    ".ini",
    ".cfg",
    ".xlsx",
    ".xls",
    ".npz",
    ".npy",
    ".pkl",
    ".zip",
    ".gz",
    ".tar",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".mhd",
    ".raw",
)


# Skips that are normal in a CT export (scouts, other modalities, reports): counted, not warned about.
EXPECTED_SKIPS = ("localizer", "not CT", "DICOMDIR", "no pixel data", "not grayscale")


class CacheSettingsError(UserError):
    """DST was prepared with other settings (or holds something else)."""


@dataclass(frozen=True)
class PrepareSettings:
    """The settings a cache is prepared with (stored in its manifest); their meaning and defaults:
    :class:`sparkct.data.options.PrepareOptions`."""

    spacing: float | None  # target in-plane spacing (mm); None keeps the source spacing
    size: int | None  # output rows = cols; with spacing: centre crop/pad, alone: resize
    clip_min: int  # HU below (padding, outside the field of view) are set to this
    clip_max: int
    order: int  # interpolation order when resampling
    antialias: bool

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def resamples(self) -> bool:
        return self.spacing is not None or self.size is not None


# ------------------------------------------------------------------------------------------ report


@dataclass
class PrepareReport:
    files: int = 0
    series: int = 0  # CT series found in SRC
    series_cached: int = 0  # already done by an earlier run (unchanged)
    series_written: int = 0
    series_empty: int = 0  # series with no usable slice
    series_failed: int = 0
    slices: int = 0  # slices in the index
    slices_written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> files (or frames, or folders)
    ignored: Counter = field(default_factory=Counter)  # reason -> files not meant to be images
    seconds: float = 0.0
    prepare_seconds: float = 0.0  # the series phase (decode, resample, write)
    workers: int = 1
    device: str = "cpu"
    stale_series: int = 0  # series cached in DST but no longer in SRC (kept on disk, not indexed)

    @property
    def slices_per_s(self) -> float:
        return self.slices_written / self.prepare_seconds if self.prepare_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = dict(sorted(self.skipped.items()))
        d["ignored"] = dict(sorted(self.ignored.items()))
        d["slices_per_s"] = round(self.slices_per_s, 1)
        return d

    def summary(self) -> str:
        lines = [
            f"files      {self.files} scanned",
            f"series     {self.series} CT series: {self.series_written} written, {self.series_cached} "
            f"already cached, {self.series_empty} without usable slices, {self.series_failed} failed",
            f"slices     {self.slices} in the index, {self.slices_written} written this run "
            f"({self.slices_per_s:.0f} slices/s in the series phase with {self.workers} worker(s) on "
            f"{self.device}, {self.slices_per_s / max(1, self.workers):.0f} per worker)",
        ]
        if self.skipped:
            lines.append(f"skipped    {sum(self.skipped.values())}:")
            lines += [f"             {n:6d}  {r}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1])]
        if self.ignored:
            lines.append(
                f"ignored    {sum(self.ignored.values())} (not images): "
                + ", ".join(f"{r} {n}" for r, n in sorted(self.ignored.items()))
            )
        if self.stale_series:
            lines.append(f"stale      {self.stale_series} cached series no longer in SRC (not indexed)")
        lines.append(f"time       {self.seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the walk


@dataclass
class _SrcFile:
    rel: str  # may hold surrogate escapes: file names are bytes, not always UTF-8
    size: int
    mtime_ns: int
    token: str  # salted hash of rel: how the cache refers to source files


def display_path(rel: str) -> str:
    """A relative path as printable text: bytes that are not UTF-8 show as \\xNN escapes."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk(src: str, salt: str, skip: str | None = None) -> tuple[list[_SrcFile], list[tuple[str, str, str]]]:
    """Regular files under src (hidden ones and the folder `skip` left out; symlinked folders
    followed once), and what could not be read: (token, relative path, reason) per folder that
    cannot be listed or entry that cannot be examined."""
    out: list[_SrcFile] = []
    problems: list[tuple[str, str, str]] = []
    stack = [src]
    seen: set = set()
    skip_real = os.path.realpath(skip) if skip else None

    def problem(path: str, what: str, e: OSError):
        rel = os.path.relpath(path, src).replace(os.sep, "/")
        problems.append((salted_hash(salt, "path:" + rel), rel, f"{what} ({type(e).__name__})"))

    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen or os.path.realpath(d) == skip_real:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if d == src:
                raise UserError(f"cannot list SRC {src!r} ({e.strerror or type(e).__name__})") from None
            problem(d, "cannot list folder", e)
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=True):
                    subdirs.append(e.path)
                elif e.is_file(follow_symlinks=True):
                    st = e.stat(follow_symlinks=True)
                    rel = os.path.relpath(e.path, src).replace(os.sep, "/")
                    out.append(_SrcFile(rel, st.st_size, st.st_mtime_ns, salted_hash(salt, "path:" + rel)))
            except OSError as err:
                problem(e.path, "cannot examine entry", err)
        stack.extend(reversed(subdirs))
    out.sort(key=lambda f: f.rel)
    return out, problems


def _classify(rel: str) -> str:
    low = rel.lower()
    if low.endswith((".nii", ".nii.gz")):
        return "nifti"
    if os.path.basename(low) == "dicomdir":
        return "ignored"
    if low.endswith(IGNORED_SUFFIXES):
        return "ignored"
    return "dicom"


def _scan_chunk(src: str, rels: list[str], limits: PixelLimits) -> list[tuple]:
    """Worker: (rel, series_uid, n_frames, None) or (rel, None, 0, reason) per file."""
    out = []
    for rel in rels:
        try:
            uid, n_frames = scan_file(os.path.join(src, rel), limits)
            out.append((rel, uid, n_frames, None))
        except SkipFile as e:
            out.append((rel, None, 0, e.reason))
        except Exception as e:  # never let one file end the run
            out.append((rel, None, 0, f"unexpected error ({type(e).__name__})"))
    return out


# ------------------------------------------------------------------------------------ series worker


def _fingerprint(files: Sequence[_SrcFile], settings: dict, limits: PixelLimits) -> str:
    # The limits decide which slices are kept, so a series prepared under other limits is redone.
    return stable_hash(
        json.dumps([sorted((f.token, f.size, f.mtime_ns) for f in files), settings, asdict(limits)], sort_keys=True), 32
    )


@dataclass
class _Job:
    key: str
    kind: str  # "dicom" | "nifti"
    src: str
    dst: str
    files: list[_SrcFile]
    settings: dict
    salt: str
    device: str
    fingerprint: str
    limits: PixelLimits
    patient_from: str
    n_frames: int = 0  # frames found by the scan (for the progress bar)


def _reserve(tmp: str, path: str) -> None:
    """Give the memmap's sparse file its blocks now: on a full disk, writing through a memmap kills the
    process with SIGBUS (a bus error, nothing saved, no message); reserving first turns that into an
    OSError that names the shard."""
    size = os.path.getsize(tmp)
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise OSError(e.errno, f"cannot reserve {size / 2**20:.1f} MiB for shard {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _write_shard(dst: str, key: str, n: int, shape: tuple[int, int], fill) -> int:
    """Create the shard of `n` slices through `fill(memmap) -> rows written`, atomically; a shard with
    fewer rows than planned (frames that failed to decode) is rewritten at its real length."""
    path = os.path.join(dst, shard_rel(key))
    with sio.atomic_path(path, ".npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n, *shape))
        _reserve(tmp, path)
        k = fill(mm)
        mm.flush()
        if k < n:
            part = np.array(mm[:k])
            del mm
            with open(tmp, "wb") as f:
                np.save(f, part)
        else:
            del mm
    return k


def _process_dicom(job: _Job, st: PrepareSettings) -> dict:
    from .resample import output_geometry, resample_slices  # noqa: PLC0415 (lazy: scipy loads only to resample)

    skipped: list[tuple[str, str]] = []
    headers, datasets, native = [], {}, {}
    for f in job.files:
        p = os.path.join(job.src, f.rel)
        try:
            # series metadata comes from the first readable header; the rest only give geometry
            h, ds = read_header(p, job.salt, keep_dataset=True, with_meta=not headers, limits=job.limits)
        except SkipFile as e:
            skipped.append((f.token, e.reason))
            continue
        headers.append(h)
        if h.native is not None:
            native[p] = h.native  # pixels read straight from the file; the dataset is not kept
        else:
            datasets[p] = ds
    tok = {os.path.join(job.src, f.rel): f.token for f in job.files}
    plan = plan_series(headers)
    skipped += [(tok[p], r) for p, r in plan.skipped]
    rec = _base_record(job)
    if not plan.frames:
        return _finish_empty(job, rec, skipped, headers[0].meta if headers else {})
    try:
        (oh, ow), out_spacing, _ = output_geometry((plan.rows, plan.cols), plan.pixel_spacing, st.spacing, st.size)
    except ValueError:
        skipped += [(tok[f.path], "no PixelSpacing (cannot resample)") for f in plan.frames]
        return _finish_empty(job, rec, skipped, headers[0].meta)
    if oh * ow > job.limits.max_slice_pixels:
        skipped += [(tok[f.path], "resampled slice over the pixel limit (--spacing too fine)") for f in plan.frames]
        return _finish_empty(job, rec, skipped, headers[0].meta)
    reader = PixelReader(datasets, native)
    kept: list[int] = []
    lo, hi = st.clip_min, st.clip_max

    def fill(mm) -> int:
        k = 0
        if not st.resamples:
            for i, f in enumerate(plan.frames):
                try:
                    reader.hu_int16(f, lo, hi, out=mm[k])
                except SkipFile as e:  # this slice only: the others of the series are kept
                    skipped.append((tok[f.path], e.reason))
                    continue
                kept.append(i)
                k += 1
            return k
        for c0 in range(0, len(plan.frames), CHUNK):
            chunk, idx = [], []
            for i in range(c0, min(c0 + CHUNK, len(plan.frames))):
                f = plan.frames[i]
                try:
                    chunk.append(reader.hu(f))
                except SkipFile as e:
                    skipped.append((tok[f.path], e.reason))
                    continue
                idx.append(i)
            if not chunk:
                continue
            arr = np.stack(chunk)
            np.maximum(arr, lo, out=arr)  # padding/outside-FOV values must not bleed into the image
            out, _ = resample_slices(
                arr,
                plan.pixel_spacing,
                spacing=st.spacing,
                size=st.size,
                order=st.order,
                cval=float(lo),
                antialias=st.antialias,
                device=job.device,
            )
            out = np.clip(np.rint(out), lo, hi).astype(np.int16)
            mm[k : k + len(idx)] = out
            k += len(idx)
            kept.extend(idx)
        return k

    n = _write_shard(job.dst, job.key, len(plan.frames), (oh, ow), fill)
    if n == 0:
        os.unlink(os.path.join(job.dst, shard_rel(job.key)))
        return _finish_empty(job, rec, skipped, headers[0].meta)
    frames = [plan.frames[i] for i in kept]
    meta = headers[0].meta
    ps = plan.pixel_spacing
    positions = plan.positions
    rec.update(
        meta_fields(meta),
        n_slices=n,
        shape=[n, oh, ow],
        spacing=[plan.slice_spacing, out_spacing[0] if out_spacing else None, out_spacing[1] if out_spacing else None],
        source_shape=[len(plan.frames), plan.rows, plan.cols],
        source_pixel_spacing=list(ps) if ps else None,
        thickness=plan.thickness,
        orientation=list(plan.orientation) if plan.orientation else None,
        sorted_by=plan.sorted_by,
        z=[float(v) for v in plan.z[kept]],
        instance=[f.instance if f.instance is not None else -1 for f in frames],
        positions=positions[kept].tolist() if positions is not None else None,
        skipped=skipped,
    )
    sio.write_json_atomic(os.path.join(job.dst, record_rel(job.key)), rec)
    return rec


def meta_fields(meta: dict) -> dict:
    keys = (
        "series_uid",
        "study_uid",
        "frame_of_reference_uid",
        "patient",
        "modality",
        "sop_class_uid",
        "transfer_syntax",
        "kvp",
        "patient_age",
        "age_years",
        "patient_sex",
        "manufacturer",
        "model",
        "kernel",
        "body_part",
        "contrast",
    )
    return {k: meta.get(k) for k in keys if k in meta}


def _base_record(job: _Job) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": job.key,
        "kind": job.kind,
        "fingerprint": job.fingerprint,
        "files": [[f.token, f.size, f.mtime_ns] for f in job.files],
    }


def _finish_empty(job: _Job, rec: dict, skipped, meta) -> dict:
    rec.update(meta_fields(meta), n_slices=0, shape=[0, 0, 0], skipped=skipped)
    sio.write_json_atomic(os.path.join(job.dst, record_rel(job.key)), rec)
    return rec


def _process_nifti(job: _Job, st: PrepareSettings) -> dict:
    from .resample import resample_slices  # noqa: PLC0415 (lazy: scipy loads only to resample)

    f = job.files[0]
    rec = _base_record(job)
    try:
        vol = read_nifti(os.path.join(job.src, f.rel), limits=job.limits)
    except (ValueError, OSError, EOFError) as e:
        reason = str(e) if isinstance(e, ValueError) else f"unreadable file ({type(e).__name__})"
        return _finish_empty(job, rec, [(f.token, reason)], {})
    rel_id = (
        os.path.dirname(f.rel) if job.patient_from == "dir" else os.path.join(os.path.dirname(f.rel), nifti_stem(f.rel))
    )
    meta = dict(
        vol.meta,
        series_uid="nifti-" + job.key,
        patient=salted_hash(job.salt, "file:" + rel_id),
        transfer_syntax="nifti",
    )
    hu = np.maximum(vol.hu, st.clip_min)
    ps = (vol.spacing[1], vol.spacing[2])
    out, out_spacing = resample_slices(
        hu,
        ps,
        spacing=st.spacing,
        size=st.size,
        order=st.order,
        cval=float(st.clip_min),
        antialias=st.antialias,
        device=job.device,
    )
    out = np.asarray(out)
    n, oh, ow = out.shape

    def fill(mm):
        mm[:] = np.clip(np.rint(out), st.clip_min, st.clip_max).astype(np.int16)
        return n

    _write_shard(job.dst, job.key, n, (oh, ow), fill)
    rec.update(
        meta_fields(meta),
        n_slices=n,
        shape=[n, oh, ow],
        spacing=[vol.spacing[0], out_spacing[0], out_spacing[1]],
        source_shape=list(vol.hu.shape),
        source_pixel_spacing=list(ps),
        thickness=vol.spacing[0],
        orientation=list(vol.orientation),
        sorted_by="position",
        z=vol.z.tolist(),
        instance=vol.instance_numbers.tolist(),
        positions=vol.positions.tolist(),
        skipped=[],
    )
    sio.write_json_atomic(os.path.join(job.dst, record_rel(job.key)), rec)
    return rec


def running_marker(job: _Job) -> str:
    return os.path.join(job.dst, ".running", job.key)


def _run_job(job: _Job) -> dict:
    """Worker entry: never raises; an unexpected error becomes a failed-series result. A marker
    file exists while the job runs, so that after a worker dies the jobs it was running are known."""
    st = PrepareSettings(**job.settings)
    marker = running_marker(job)
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    except OSError:
        pass
    try:
        if job.kind == "nifti":
            return _process_nifti(job, st)
        return _process_dicom(job, st)
    except Exception as e:
        log.debug("series %s failed", job.key, exc_info=True)
        out = {"key": job.key, "failed": f"series failed ({type(e).__name__})", "n_frames": len(job.files)}
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            out["fatal"] = str(e)  # every later series would fail the same way: stop (see finish)
        return out
    finally:
        try:
            os.unlink(marker)
        except OSError:
            pass


def _worker_died(job: _Job) -> dict:
    return {"key": job.key, "failed": "worker process died (killed or out of memory)", "n_frames": len(job.files)}


# ---------------------------------------------------------------------------------------- prepare


def _init_dst(dst: str, settings: PrepareSettings, salt: str | None, reset: bool) -> dict:
    man_path = os.path.join(dst, "cache.json")
    if reset and os.path.isdir(dst):
        for name in ("shards", "series"):
            shutil.rmtree(os.path.join(dst, name), ignore_errors=True)
        for name in ("cache.json", "index.npz", "series.csv", "report.json", "skipped.csv"):
            if os.path.exists(os.path.join(dst, name)):
                os.unlink(os.path.join(dst, name))
    os.makedirs(dst, exist_ok=True)
    if os.path.exists(man_path):
        with open(man_path) as f:
            man = json.load(f)
        if man.get("format") != FORMAT:
            raise CacheSettingsError(f"{dst} holds something other than a sparkct slice cache")
        if man.get("version") != VERSION:
            raise CacheSettingsError(
                f"{dst} is cache version {man.get('version')}, this sparkct writes "
                f"{VERSION}: prepare into a new folder or pass --reset"
            )
        if man.get("settings") != settings.as_dict():
            raise CacheSettingsError(
                f"{dst} was prepared with settings {man.get('settings')}, this run asks for "
                f"{settings.as_dict()}: use another DST, the same settings, or --reset to start over"
            )
        if salt is not None and salt != man["salt"]:
            raise CacheSettingsError(f"{dst} was prepared with another salt; pass the same salt or --reset")
        return man
    man = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings.as_dict(),
        "salt": salt or _util.new_salt(),
        "created_by": f"sparkct {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    sio.write_json_atomic(man_path, man)
    return man


def _load_record(dst: str, key: str) -> dict | None:
    p = os.path.join(dst, record_rel(key))
    try:
        with open(p) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if rec.get("version") != VERSION:
        return None
    if rec.get("n_slices", 0) > 0:
        sp = os.path.join(dst, shard_rel(key))
        try:
            arr = np.load(sp, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if list(arr.shape) != rec["shape"] or arr.dtype != np.int16:
            return None
    return rec


def _load_all_records(dst: str) -> dict[str, dict]:
    out = {}
    root = os.path.join(dst, "series")
    if not os.path.isdir(root):
        return out
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith(".json") and not f.startswith("."):
                try:
                    with open(os.path.join(dirpath, f)) as fh:
                        rec = json.load(fh)
                except (OSError, ValueError):
                    continue
                if rec.get("version") == VERSION and "key" in rec:
                    out[rec["key"]] = rec
    return out


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str, unit: str):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1, file=sys.stderr)

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _positive_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise UserError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _settings(spacing, size, clip_min, clip_max, order, antialias) -> PrepareSettings:
    if spacing is not None:
        try:
            spacing = float(spacing)
        except (TypeError, ValueError):
            raise UserError(f"spacing must be a number of mm, got {spacing!r}") from None
        if not (math.isfinite(spacing) and spacing > 0):
            raise UserError(f"spacing must be > 0 mm, got {spacing}")
    if size is not None:
        size = _positive_int("size", size)
    for k, v in (("clip_min", clip_min), ("clip_max", clip_max)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise UserError(f"{k} must be an integer HU value, got {v!r}")
    if not -32768 <= clip_min < clip_max <= 32767:
        raise UserError(f"need -32768 <= clip_min < clip_max <= 32767, got {clip_min}, {clip_max}")
    if order not in range(6) or isinstance(order, bool):
        raise UserError(f"order (of the interpolating spline) must be 0..5, got {order!r}")
    return PrepareSettings(
        spacing=spacing,
        size=size,
        clip_min=int(clip_min),
        clip_max=int(clip_max),
        order=int(order),
        antialias=bool(antialias),
    )


_D = PREPARE_DEFAULTS


def prepare(
    src: str,
    dst: str,
    *,
    spacing: float | None = _D.spacing,
    size: int | None = _D.size,
    clip_min: int = _D.clip_min,
    clip_max: int = _D.clip_max,
    order: int = _D.order,
    antialias: bool = _D.antialias,
    workers: int = _D.workers,
    device: str = _D.device,
    progress: bool = True,
    reset: bool = _D.reset,
    salt: str | None = None,
    show_paths: bool = _D.show_paths,
    patient_from: str = _D.patient_from,
    max_warnings: int = 20,
    limits: PixelLimits = DEFAULT_LIMITS,
) -> PrepareReport:
    """Prepare the slice cache of every CT series under `src` into `dst` (see the module docstring).
    The options' meaning and defaults: :class:`sparkct.data.options.PrepareOptions`.

    workers: parallel processes (header scan and series). device: where resampling runs ('cpu',
    'cuda' with cupy, 'auto'). patient_from: for NIfTI files, whether a 'file' or its parent 'dir'
    is one patient. limits: the largest images read (:class:`sparkct.data.dicom.PixelLimits`);
    larger ones are skipped before they are decoded. Arguments are checked before anything is read
    or written; a bad one raises :class:`sparkct.errors.UserError`.
    """
    t0 = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"SRC {src!r} does not exist")
    if not os.path.isdir(src):
        raise UserError(f"SRC {src!r} is not a folder")
    if os.path.abspath(dst) == os.path.abspath(src):
        raise UserError("DST must differ from SRC")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"DST {dst!r} exists and is not a folder")
    workers = _positive_int("workers (-j)", workers)
    if patient_from not in PATIENT_FROM:
        raise UserError(f"patient_from must be {' or '.join(map(repr, PATIENT_FROM))}, got {patient_from!r}")
    if not isinstance(limits, PixelLimits):
        raise UserError("limits must be a sparkct.data.dicom.PixelLimits")
    settings = _settings(spacing, size, clip_min, clip_max, order, antialias)
    if settings.size is not None and settings.size**2 > limits.max_slice_pixels:
        raise UserError(f"size {settings.size} gives slices over the pixel limit ({limits.max_slice_pixels})")
    from .resample import backend  # noqa: PLC0415 (lazy: scipy loads only to resample)

    try:
        dev_name = backend(device)[2]
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    man = _init_dst(dst, settings, salt, reset)
    salt = man["salt"]
    shutil.rmtree(os.path.join(dst, ".running"), ignore_errors=True)
    n_tmp = sio.clean_stale_temps(dst)
    if n_tmp:
        log.info("removed %d temporary files left by an interrupted run", n_tmp)
    report = PrepareReport(workers=workers, device=dev_name)
    skipped_rows: list[tuple[str, str]] = []
    warned = [0]

    files, unreadable = _walk(src, salt, skip=dst)  # DST may sit inside SRC
    by_token = {f.token: f.rel for f in files}
    by_token.update((tok, rel) for tok, rel, _ in unreadable)
    report.files = len(files)

    def name(token: str) -> str:
        return display_path(by_token[token]) if (show_paths and token in by_token) else f"file:{token}"

    def skip(token: str, reason: str):
        report.skipped[reason] += 1
        skipped_rows.append((name(token), reason))
        if reason.startswith(EXPECTED_SKIPS):
            return  # counted and listed, but not worth a warning each
        if warned[0] < max_warnings:
            log.warning("skipped %s: %s", name(token), reason)
        elif warned[0] == max_warnings:
            log.warning("more files skipped; see skipped.csv and the summary")
        warned[0] += 1

    for tok, _rel, reason in unreadable:
        skip(tok, reason)

    # Files of series already in the cache and unchanged since need no header read.
    records = _load_all_records(dst)
    known: dict[str, tuple[str, int, int]] = {}
    for key, rec in records.items():
        for tok, size_, mt in rec.get("files", []):
            known[tok] = (key, size_, mt)

    series_files: dict[str, list[_SrcFile]] = {}
    series_frames: Counter = Counter()
    to_scan: list[_SrcFile] = []
    nifti: list[_SrcFile] = []
    for f in files:
        kind = _classify(f.rel)
        if kind == "ignored":
            report.ignored[
                "DICOMDIR"
                if f.rel.lower().endswith("dicomdir")
                else (os.path.splitext(f.rel)[1].lower() or "no suffix")
            ] += 1
            continue
        if kind == "nifti":
            nifti.append(f)
            continue
        k = known.get(f.token)
        if k is not None and k[1] == f.size and k[2] == f.mtime_ns:
            uid = records[k[0]].get("series_uid") or ("key:" + k[0])
            series_files.setdefault(uid, []).append(f)
            series_frames[uid] += 1
        else:
            to_scan.append(f)

    pool = WorkerPool(workers) if workers > 1 else None
    try:
        if to_scan:
            bar = _Progress(progress, len(to_scan), "scan", "file")
            chunk = max(16, min(512, len(to_scan) // (8 * workers) + 1))
            parts = [to_scan[i : i + chunk] for i in range(0, len(to_scan), chunk)]
            by_rel = {f.rel: f for f in to_scan}
            results = (
                pool.map(_scan_chunk, [src] * len(parts), [[f.rel for f in p] for p in parts], [limits] * len(parts))
                if pool
                else (_scan_chunk(src, [f.rel for f in p], limits) for p in parts)
            )
            for res in results:
                for rel, uid, nfr, reason in res:
                    f = by_rel[rel]
                    if uid is None:
                        skip(f.token, reason)
                    else:
                        series_files.setdefault(uid, []).append(f)
                        series_frames[uid] += nfr
                bar.update(len(res))
            bar.close()

        jobs: list[_Job] = []
        sd = settings.as_dict()
        for uid, fl in series_files.items():
            key = stable_hash("dicom:" + uid, 20) if not uid.startswith("key:") else uid[4:]
            jobs.append(
                _Job(
                    key,
                    "dicom",
                    src,
                    dst,
                    sorted(fl, key=lambda f: f.rel),
                    sd,
                    salt,
                    dev_name,
                    _fingerprint(fl, sd, limits),
                    limits,
                    patient_from,
                    series_frames[uid],
                )
            )
        for f in nifti:
            key = stable_hash("nifti:" + f.token, 20)
            jobs.append(
                _Job(
                    key, "nifti", src, dst, [f], sd, salt, dev_name, _fingerprint([f], sd, limits), limits, patient_from
                )
            )
        jobs.sort(key=lambda j: j.key)
        report.series = len(jobs)

        done: dict[str, dict] = {}
        pending: list[_Job] = []
        for j in jobs:
            rec = records.get(j.key)
            if rec is not None and rec.get("fingerprint") == j.fingerprint:
                rec = _load_record(dst, j.key)  # re-checks the shard
            if rec is not None and rec.get("fingerprint") == j.fingerprint:
                done[j.key] = rec
            else:
                pending.append(j)
        report.series_cached = len(done)
        for rec in done.values():
            for tok, reason in rec.get("skipped", []):
                report.skipped[reason] += 1
                skipped_rows.append((name(tok), reason))

        # progress counts source frames; nifti volumes count once their slice count is known
        total = sum(j.n_frames for j in pending)
        bar = _Progress(progress, total, "prepare", "slice")
        t1 = time.perf_counter()

        def finish(rec: dict):
            if "fatal" in rec:
                raise UserError(
                    f"{rec['fatal']}: free some space and run the same command again; the {len(done)} series "
                    "already written are kept"
                )
            if "failed" in rec:
                report.series_failed += 1
                report.skipped[rec["failed"]] += rec["n_frames"]
                skipped_rows.append((f"series:{rec['key']}", rec["failed"]))
                log.warning("series %s: %s", rec["key"], rec["failed"])
            else:
                done[rec["key"]] = rec
                for tok, reason in rec.get("skipped", []):
                    skip(tok, reason)
                if rec["n_slices"] == 0:
                    report.series_empty += 1
                else:
                    report.series_written += 1
                    report.slices_written += rec["n_slices"]
                bar.update(rec["n_slices"] + len(rec.get("skipped", [])) if rec.get("kind") != "nifti" else 0)

        try:
            if pool is None:
                for j in pending:
                    finish(_run_job(j))
            else:
                pool.run(_run_job, pending, finish, running_marker, _worker_died)
        except BaseException as e:
            bar.close()
            if isinstance(e, KeyboardInterrupt):
                log.warning(
                    "interrupted: %d series written in this run are kept; run again to resume", report.series_written
                )
            raise
        bar.close()
        report.prepare_seconds = time.perf_counter() - t1
    finally:
        if pool is not None:
            pool.close()

    # a record whose series has no slice is "done" but not indexed
    report.stale_series = len(set(records) - {j.key for j in jobs})
    recs = [done[j.key] for j in jobs if j.key in done and done[j.key].get("n_slices", 0) > 0]
    report.slices = write_index(dst, recs)
    report.seconds = time.perf_counter() - t0
    sio.write_json_atomic(os.path.join(dst, "report.json"), report.to_dict())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "reason"])
    w.writerows(sorted(skipped_rows))
    sio.write_text_atomic(os.path.join(dst, "skipped.csv"), buf.getvalue())
    return report


# ------------------------------------------------------------------------------------------- index


def write_index(dst: str, recs: list[dict]) -> int:
    """index.npz and series.csv from series records (sorted by key); returns the slice count."""
    recs = sorted(recs, key=lambda r: r["key"])
    patients = sorted({r.get("patient") or "" for r in recs})
    pidx = {p: i for i, p in enumerate(patients)}
    n = [r["n_slices"] for r in recs]
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    N = int(offsets[-1])
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "version": np.array(VERSION),
        "slice.series": np.repeat(np.arange(len(recs), dtype=np.int32), n),
        "slice.index": np.concatenate([np.arange(k, dtype=np.int32) for k in n]) if recs else np.zeros(0, np.int32),
        "slice.z": np.array([z for r in recs for z in r["z"]], dtype=np.float32),
        "slice.instance": np.array([i for r in recs for i in r["instance"]], dtype=np.int32),
        "slice.patient": np.repeat(np.array([pidx[r.get("patient") or ""] for r in recs], dtype=np.int32), n),
        "series.offset": offsets[:-1],
        "series.n": np.array(n, dtype=np.int32),
        "series.shape": np.array([r["shape"][1:] for r in recs], dtype=np.int32).reshape(-1, 2),
        "series.spacing": np.array(
            [[np.nan if v is None else v for v in r["spacing"]] for r in recs], dtype=np.float32
        ).reshape(-1, 3),
        "series.patient_index": np.array([pidx[r.get("patient") or ""] for r in recs], dtype=np.int32),
        "patients": np.array(patients, dtype="U") if patients else np.zeros(0, dtype="U1"),
    }
    for k in SERIES_STR_FIELDS:
        vals = [str(r.get(k) or "") for r in recs]
        arrays["series." + k] = np.array(vals, dtype="U") if vals else np.zeros(0, dtype="U1")
    for k in SERIES_NUM_FIELDS:
        arrays["series." + k] = np.array([np.nan if r.get(k) is None else float(r[k]) for r in recs], dtype=np.float32)
    assert len(arrays["slice.z"]) == N and len(arrays["slice.instance"]) == N
    sio.write_npz_atomic(os.path.join(dst, "index.npz"), arrays)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [
        "key",
        "series_uid",
        "study_uid",
        "patient",
        "n_slices",
        "rows",
        "cols",
        "slice_spacing",
        "row_spacing",
        "col_spacing",
        "thickness",
        "kvp",
        "patient_age",
        "patient_sex",
        "manufacturer",
        "kernel",
        "modality",
        "kind",
    ]
    w.writerow(cols)
    for r in recs:
        sp = r["spacing"]
        w.writerow(
            [
                r["key"],
                r.get("series_uid", ""),
                r.get("study_uid", ""),
                r.get("patient", ""),
                r["n_slices"],
                r["shape"][1],
                r["shape"][2],
                _fmt(sp[0]),
                _fmt(sp[1]),
                _fmt(sp[2]),
                _fmt(r.get("thickness")),
                _fmt(r.get("kvp")),
                r.get("patient_age", ""),
                r.get("patient_sex", ""),
                r.get("manufacturer", ""),
                r.get("kernel", ""),
                r.get("modality", ""),
                r.get("kind", ""),
            ]
        )
    sio.write_text_atomic(os.path.join(dst, "series.csv"), buf.getvalue())
    return N


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}"
