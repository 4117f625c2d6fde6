"""The prepared slice cache: ``sparkct data prepare SRC DST`` and its reader :class:`SliceCache`.

Layout of DST::

    cache.json                 format, version, settings, salt (patient pseudonyms are salted hashes)
    shards/<kk>/<key>.npy      one series: int16 HU slices (n, H, W), sorted along the slice normal
    series/<kk>/<key>.json     the series record, written after its shard: its presence marks the
                               series done (metadata, slice positions, source fingerprint)
    index.npz                  one row per slice (+ per-series and per-patient tables), see SliceCache
    series.csv                 one row per series, for people
    report.json, skipped.csv   what the last run did, skipped and why

Every file is written to a temporary name, fsynced and renamed, so an interrupted run leaves no
half-written shard; the next run skips series whose record matches the source files (path, size,
mtime) and the settings, and rewrites the index. Re-running on an unchanged source writes nothing
but the (identical) index.

Privacy: no patient name, ID, birth date or source path is stored in the cache (source files are
identified by salted hashes of their relative paths). skipped.csv and the log name skipped files by
the same token unless ``show_paths=True`` (``--show-paths``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from sparkct import io as sio

from . import _util
from ._util import log, salted_hash, stable_hash

FORMAT = "sparkct-ct-slice-cache"
VERSION = 1
CHUNK = 16  # slices resampled together

# Test hook: when set, the process exits (os._exit, no clean-up, like a kill) after writing this
# many slices into shards, leaving a half-written temporary shard behind.
_TEST_EXIT_AFTER_SLICES: int | None = None
_slices_written_in_process = 0


def _tick(n: int) -> None:
    global _slices_written_in_process
    if _TEST_EXIT_AFTER_SLICES is not None:
        _slices_written_in_process += n
        if _slices_written_in_process >= _TEST_EXIT_AFTER_SLICES:
            os._exit(137)

# Files never read as images (labels, notes, archives of metadata) are counted as "ignored".
IGNORED_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".md", ".xml", ".html", ".pdf", ".log", ".yaml",
                    ".yml", ".py", ".ini", ".cfg", ".xlsx", ".xls", ".npz", ".npy", ".pkl", ".zip",
                    ".gz", ".tar", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mhd", ".raw")


# Skips that are normal in a CT export (scouts, other modalities, reports): counted, not warned about.
EXPECTED_SKIPS = ("localizer", "not CT", "DICOMDIR", "no pixel data", "not grayscale")


class CacheSettingsError(ValueError):
    """DST was prepared with other settings."""


class SimulatedCrash(RuntimeError):
    """Raised by the test hook ``_crash_after`` to simulate a run dying mid-way."""


@dataclass(frozen=True)
class PrepareSettings:
    spacing: float | None = None  # target in-plane spacing (mm); None keeps the source spacing
    size: int | None = None  # output rows = cols; with spacing: centre crop/pad, alone: resize
    clip_min: int = -1024  # HU below (padding, outside the field of view) are set to this
    clip_max: int = 32767
    order: int = 1  # interpolation order when resampling
    antialias: bool = True

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
    skipped: Counter = field(default_factory=Counter)  # reason -> files (or frames)
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
            lines.append(f"ignored    {sum(self.ignored.values())} (not images): "
                         + ", ".join(f"{r} {n}" for r, n in sorted(self.ignored.items())))
        if self.stale_series:
            lines.append(f"stale      {self.stale_series} cached series no longer in SRC (not indexed)")
        lines.append(f"time       {self.seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the walk

@dataclass
class _SrcFile:
    rel: str
    size: int
    mtime_ns: int
    token: str  # salted hash of rel: how the cache refers to source files


def _walk(src: str, salt: str, skip: str | None = None) -> list[_SrcFile]:
    """Regular files under src (hidden ones and the folder `skip` left out; symlinked folders
    followed once)."""
    out: list[_SrcFile] = []
    stack = [src]
    seen: set = set()
    skip_real = os.path.realpath(skip) if skip else None
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen or os.path.realpath(d) == skip_real:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list a folder (%s)", type(e).__name__)
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
            except OSError:
                continue
        stack.extend(reversed(subdirs))
    out.sort(key=lambda f: f.rel)
    return out


def _classify(rel: str) -> str:
    low = rel.lower()
    if low.endswith((".nii", ".nii.gz")):
        return "nifti"
    if os.path.basename(low) == "dicomdir":
        return "ignored"
    if low.endswith(IGNORED_SUFFIXES):
        return "ignored"
    return "dicom"


def _scan_chunk(src: str, rels: list[str]) -> list[tuple]:
    """Worker: (rel, series_uid, n_frames, None) or (rel, None, 0, reason) per file."""
    from .dicom import SkipFile, scan_file

    out = []
    for rel in rels:
        try:
            uid, n_frames = scan_file(os.path.join(src, rel))
            out.append((rel, uid, n_frames, None))
        except SkipFile as e:
            out.append((rel, None, 0, e.reason))
        except Exception as e:  # never let one file end the run
            out.append((rel, None, 0, f"unexpected error ({type(e).__name__})"))
    return out


# ------------------------------------------------------------------------------------ series worker

def _shard_rel(key: str) -> str:
    return f"shards/{key[:2]}/{key}.npy"


def _record_rel(key: str) -> str:
    return f"series/{key[:2]}/{key}.json"


def _fingerprint(files: Sequence[_SrcFile], settings: dict) -> str:
    h = stable_hash(json.dumps([sorted((f.token, f.size, f.mtime_ns) for f in files), settings],
                               sort_keys=True), 32)
    return h


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
    patient_from: str = "file"
    n_frames: int = 0  # frames found by the scan (for the progress bar)
    kill_once: str | None = None  # test hook: a marker path; the worker dies once if it is absent


def _write_shard(dst: str, key: str, n: int, shape: tuple[int, int], fill) -> int:
    """Create the shard of `n` slices through `fill(memmap) -> rows written`, atomically; a shard with
    fewer rows than planned (frames that failed to decode) is rewritten at its real length."""
    path = os.path.join(dst, _shard_rel(key))
    with sio.atomic_path(path, ".npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n, *shape))
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
    from .dicom import PixelReader, SkipFile, plan_series, read_header
    from .resample import output_geometry, resample_slices

    skipped: list[tuple[str, str]] = []
    headers, datasets, native = [], {}, {}
    for f in job.files:
        p = os.path.join(job.src, f.rel)
        try:
            # series metadata comes from the first readable header; the rest only give geometry
            h, ds = read_header(p, job.salt, keep_dataset=True, with_meta=not headers)
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
    reader = PixelReader(datasets, native)
    kept: list[int] = []
    lo, hi = st.clip_min, st.clip_max

    def fill(mm) -> int:
        k = 0
        if not st.resamples:
            for i, f in enumerate(plan.frames):
                try:
                    reader.hu_int16(f, lo, hi, out=mm[k])
                except SkipFile as e:
                    skipped.append((tok[f.path], e.reason))
                    continue
                kept.append(i)
                k += 1
                _tick(1)
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
            out, _ = resample_slices(arr, plan.pixel_spacing, spacing=st.spacing, size=st.size,
                                     order=st.order, cval=float(lo), antialias=st.antialias,
                                     device=job.device)
            out = np.clip(np.rint(out), lo, hi).astype(np.int16)
            mm[k:k + len(idx)] = out
            k += len(idx)
            kept.extend(idx)
            _tick(len(idx))
        return k

    n = _write_shard(job.dst, job.key, len(plan.frames), (oh, ow), fill)
    if n == 0:
        os.unlink(os.path.join(job.dst, _shard_rel(job.key)))
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
    sio.write_json_atomic(os.path.join(job.dst, _record_rel(job.key)), rec)
    return rec


def meta_fields(meta: dict) -> dict:
    keys = ("series_uid", "study_uid", "frame_of_reference_uid", "patient", "modality", "sop_class_uid",
            "transfer_syntax", "kvp", "patient_age", "age_years", "patient_sex", "manufacturer", "model",
            "kernel", "body_part", "contrast")
    return {k: meta.get(k) for k in keys if k in meta}


def _base_record(job: _Job) -> dict:
    return {"format": FORMAT, "version": VERSION, "key": job.key, "kind": job.kind,
            "fingerprint": job.fingerprint, "files": [[f.token, f.size, f.mtime_ns] for f in job.files]}


def _finish_empty(job: _Job, rec: dict, skipped, meta) -> dict:
    rec.update(meta_fields(meta), n_slices=0, shape=[0, 0, 0], skipped=skipped)
    sio.write_json_atomic(os.path.join(job.dst, _record_rel(job.key)), rec)
    return rec


def _process_nifti(job: _Job, st: PrepareSettings) -> dict:
    from .nifti import nifti_stem, read_nifti
    from .resample import resample_slices

    f = job.files[0]
    rec = _base_record(job)
    try:
        vol = read_nifti(os.path.join(job.src, f.rel))
    except (ValueError, OSError, EOFError) as e:
        reason = str(e) if isinstance(e, ValueError) else f"unreadable file ({type(e).__name__})"
        return _finish_empty(job, rec, [(f.token, reason)], {})
    rel_id = os.path.dirname(f.rel) if job.patient_from == "dir" else os.path.join(
        os.path.dirname(f.rel), nifti_stem(f.rel))
    meta = dict(vol.meta, series_uid="nifti-" + job.key, patient=salted_hash(job.salt, "file:" + rel_id),
                transfer_syntax="nifti")
    hu = np.maximum(vol.hu, st.clip_min)
    ps = (vol.spacing[1], vol.spacing[2])
    out, out_spacing = resample_slices(hu, ps, spacing=st.spacing, size=st.size, order=st.order,
                                       cval=float(st.clip_min), antialias=st.antialias, device=job.device)
    out = np.asarray(out)
    n, oh, ow = out.shape

    def fill(mm):
        mm[:] = np.clip(np.rint(out), st.clip_min, st.clip_max).astype(np.int16)
        return n

    _write_shard(job.dst, job.key, n, (oh, ow), fill)
    rec.update(meta_fields(meta), n_slices=n, shape=[n, oh, ow],
               spacing=[vol.spacing[0], out_spacing[0], out_spacing[1]],
               source_shape=list(vol.hu.shape), source_pixel_spacing=list(ps), thickness=vol.spacing[0],
               orientation=list(vol.orientation), sorted_by="position", z=vol.z.tolist(),
               instance=vol.instance_numbers.tolist(), positions=vol.positions.tolist(), skipped=[])
    sio.write_json_atomic(os.path.join(job.dst, _record_rel(job.key)), rec)
    return rec


def _running_marker(job: _Job) -> str:
    return os.path.join(job.dst, ".running", job.key)


def _run_job(job: _Job) -> dict:
    """Worker entry: never raises; an unexpected error becomes a failed-series result. A marker
    file exists while the job runs, so that after a worker dies the jobs it was running are known."""
    st = PrepareSettings(**job.settings)
    marker = _running_marker(job)
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    except OSError:
        pass
    if job.kill_once and (job.kill_once == "always" or not os.path.exists(job.kill_once)):
        if job.kill_once != "always":
            open(job.kill_once, "w").close()
        os._exit(137)  # like the OOM killer: no clean-up, no result
    try:
        if job.kind == "nifti":
            return _process_nifti(job, st)
        return _process_dicom(job, st)
    except Exception as e:
        log.debug("series %s failed", job.key, exc_info=True)
        return {"key": job.key, "failed": f"series failed ({type(e).__name__})",
                "n_frames": len(job.files)}
    finally:
        try:
            os.unlink(marker)
        except OSError:
            pass


def _mp_context():
    """Workers come from a fork server that has imported this module once: safe with threads and
    CUDA in the parent (unlike fork), and later runs in the same process start workers quickly
    (unlike spawn, which re-imports numpy/scipy/pydicom in every worker)."""
    import multiprocessing as mp
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["sparkct.data.cache", "sparkct.data.dicom", "sparkct.data.resample",
                                    "pydicom", "pydicom.pixels", "pydicom.encaps", "scipy.ndimage"])
        return ctx
    return mp.get_context("spawn")


def _worker_init():
    logging.basicConfig(level=logging.WARNING)
    # Keep BLAS/OpenMP in each worker to one thread: the workers are the parallelism.
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(v, "1")


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
            raise CacheSettingsError(f"{dst} is cache version {man.get('version')}, this sparkct writes "
                                     f"{VERSION}: prepare into a new folder or pass --reset")
        if man.get("settings") != settings.as_dict():
            raise CacheSettingsError(
                f"{dst} was prepared with settings {man.get('settings')}, this run asks for "
                f"{settings.as_dict()}: use another DST, the same settings, or --reset to start over")
        if salt is not None and salt != man["salt"]:
            raise CacheSettingsError(f"{dst} was prepared with another salt; pass the same salt or --reset")
        return man
    from sparkct import __version__
    man = {"format": FORMAT, "version": VERSION, "settings": settings.as_dict(),
           "salt": salt or _util.new_salt(), "created_by": f"sparkct {__version__}",
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    sio.write_json_atomic(man_path, man)
    return man


def _load_record(dst: str, key: str) -> dict | None:
    p = os.path.join(dst, _record_rel(key))
    try:
        with open(p) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if rec.get("version") != VERSION:
        return None
    if rec.get("n_slices", 0) > 0:
        sp = os.path.join(dst, _shard_rel(key))
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
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                            file=sys.stderr)

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def prepare(src: str, dst: str, *, spacing: float | None = None, size: int | None = None,
            clip_min: int = -1024, clip_max: int = 32767, order: int = 1, antialias: bool = True,
            workers: int = 1, device: str = "cpu", progress: bool = True, reset: bool = False,
            salt: str | None = None, show_paths: bool = False, patient_from: str = "file",
            max_warnings: int = 20, _crash_after: int | None = None,
            _kill_worker_once: str | None = None) -> PrepareReport:
    """Prepare the slice cache of every CT series under `src` into `dst` (see the module docstring).

    workers: parallel processes (header scan and series). device: where resampling runs ('cpu',
    'cuda' with cupy, 'auto'). patient_from: for NIfTI files, whether a 'file' or its parent 'dir'
    is one patient. Test hooks: _crash_after raises SimulatedCrash after that many series are
    written; _kill_worker_once (a marker path, or "always") makes the worker of the first series
    die once (every time); with workers > 1 only.
    """
    t0 = time.perf_counter()
    if not os.path.isdir(src):
        raise FileNotFoundError(f"SRC {src!r} is not a folder")
    if os.path.abspath(dst) == os.path.abspath(src):
        raise ValueError("DST must differ from SRC")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if patient_from not in ("file", "dir"):
        raise ValueError("patient_from must be 'file' or 'dir'")
    from .resample import backend
    dev_name = backend(device)[2]
    settings = PrepareSettings(spacing=None if spacing is None else float(spacing),
                               size=None if size is None else int(size), clip_min=int(clip_min),
                               clip_max=int(clip_max), order=int(order), antialias=bool(antialias))
    if settings.clip_min >= settings.clip_max or settings.clip_min < -32768 or settings.clip_max > 32767:
        raise ValueError(f"need -32768 <= clip_min < clip_max <= 32767, got {clip_min}, {clip_max}")
    man = _init_dst(dst, settings, salt, reset)
    salt = man["salt"]
    shutil.rmtree(os.path.join(dst, ".running"), ignore_errors=True)
    n_tmp = sio.clean_stale_temps(dst)
    if n_tmp:
        log.info("removed %d temporary files left by an interrupted run", n_tmp)
    report = PrepareReport(workers=workers, device=dev_name)
    skipped_rows: list[tuple[str, str]] = []
    warned = [0]

    files = _walk(src, salt, skip=dst)  # DST may sit inside SRC
    by_token = {f.token: f for f in files}
    report.files = len(files)

    def name(token: str) -> str:
        return by_token[token].rel if (show_paths and token in by_token) else f"file:{token}"

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
            report.ignored["DICOMDIR" if f.rel.lower().endswith("dicomdir") else
                           (os.path.splitext(f.rel)[1].lower() or "no suffix")] += 1
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

    pool = _new_pool(workers) if workers > 1 else None
    try:
        if to_scan:
            bar = _Progress(progress, len(to_scan), "scan", "file")
            chunk = max(16, min(512, len(to_scan) // (8 * workers) + 1))
            parts = [to_scan[i:i + chunk] for i in range(0, len(to_scan), chunk)]
            by_rel = {f.rel: f for f in to_scan}
            results = (pool.map(_scan_chunk, [src] * len(parts), [[f.rel for f in p] for p in parts])
                       if pool else (_scan_chunk(src, [f.rel for f in p]) for p in parts))
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
            jobs.append(_Job(key, "dicom", src, dst, sorted(fl, key=lambda f: f.rel), sd, salt, device,
                             _fingerprint(fl, sd), patient_from, series_frames[uid]))
        for f in nifti:
            key = stable_hash("nifti:" + f.token, 20)
            jobs.append(_Job(key, "nifti", src, dst, [f], sd, salt, device, _fingerprint([f], sd), patient_from))
        jobs.sort(key=lambda j: j.key)
        report.series = len(jobs)
        if _kill_worker_once and jobs and workers > 1:
            jobs[0].kill_once = _kill_worker_once

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
        written = 0

        def finish(rec: dict):
            nonlocal written
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
            written += 1
            if _crash_after is not None and written >= _crash_after:
                raise SimulatedCrash(f"simulated crash after {written} series")

        try:
            if pool is None:
                for j in pending:
                    finish(_run_job(j))
            else:
                pool = _run_pool(pool, pending, workers, finish)
        except BaseException as e:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                pool = None
            if isinstance(e, KeyboardInterrupt):
                log.warning("interrupted: %d series written in this run are kept; run again to resume",
                            report.series_written)
            raise
        bar.close()
        report.prepare_seconds = time.perf_counter() - t1
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

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


def _run_pool(pool, jobs: list, workers: int, finish):
    """Run jobs on the pool, calling finish(result) as they complete. A worker that dies (killed,
    out of memory) breaks the pool and takes every job then running with it, so the culprit is not
    known: each job that was running is retried alone in a one-worker pool (a job that kills its
    worker there is reported failed; an innocent one just completes), and the jobs that had not
    started go to a fresh pool. Returns the live pool."""
    import concurrent.futures as cf
    from concurrent.futures.process import BrokenProcessPool

    todo = list(jobs)
    while todo:
        futs = {pool.submit(_run_job, j): j for j in todo}
        todo = []
        broken = False
        for fut in cf.as_completed(futs):
            try:
                rec = fut.result()
            except BrokenProcessPool:
                broken = True
                continue
            finish(rec)
        if not broken:
            break
        unfinished = [j for f, j in futs.items() if f.exception() is not None]
        log.warning("a worker process died (killed or out of memory); %d series go to new workers",
                    len(unfinished))
        pool.shutdown(wait=True, cancel_futures=True)
        suspects = []
        for j in unfinished:
            if os.path.exists(_running_marker(j)):  # it was running when the pool broke
                os.unlink(_running_marker(j))
                suspects.append(j)
            else:
                todo.append(j)
        for j in suspects:
            solo = _new_pool(1)
            try:
                finish(solo.submit(_run_job, j).result())
            except BrokenProcessPool:
                try:
                    os.unlink(_running_marker(j))
                except OSError:
                    pass
                finish({"key": j.key, "failed": "worker process died (killed or out of memory)",
                        "n_frames": len(j.files)})
            finally:
                solo.shutdown(wait=True, cancel_futures=True)
        pool = _new_pool(workers)
    return pool


def _new_pool(workers: int):
    import concurrent.futures as cf
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_worker_init)


# ------------------------------------------------------------------------------------------- index

SERIES_STR_FIELDS = ("key", "series_uid", "study_uid", "patient", "modality", "kind", "patient_sex",
                     "patient_age", "manufacturer", "model", "kernel", "body_part", "transfer_syntax",
                     "sorted_by")
SERIES_NUM_FIELDS = ("kvp", "age_years", "thickness")


def write_index(dst: str, recs: list[dict]) -> int:
    """index.npz and series.csv from series records (sorted by key); returns the slice count."""
    recs = sorted(recs, key=lambda r: r["key"])
    patients = sorted({r.get("patient") or "" for r in recs})
    pidx = {p: i for i, p in enumerate(patients)}
    n = [r["n_slices"] for r in recs]
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    N = int(offsets[-1])
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT), "version": np.array(VERSION),
        "slice.series": np.repeat(np.arange(len(recs), dtype=np.int32), n),
        "slice.index": np.concatenate([np.arange(k, dtype=np.int32) for k in n]) if recs else np.zeros(0, np.int32),
        "slice.z": np.array([z for r in recs for z in r["z"]], dtype=np.float32),
        "slice.instance": np.array([i for r in recs for i in r["instance"]], dtype=np.int32),
        "slice.patient": np.repeat(np.array([pidx[r.get("patient") or ""] for r in recs], dtype=np.int32), n),
        "series.offset": offsets[:-1],
        "series.n": np.array(n, dtype=np.int32),
        "series.shape": np.array([r["shape"][1:] for r in recs], dtype=np.int32).reshape(-1, 2),
        "series.spacing": np.array([[np.nan if v is None else v for v in r["spacing"]] for r in recs],
                                   dtype=np.float32).reshape(-1, 3),
        "series.patient_index": np.array([pidx[r.get("patient") or ""] for r in recs], dtype=np.int32),
        "patients": np.array(patients, dtype="U") if patients else np.zeros(0, dtype="U1"),
    }
    for k in SERIES_STR_FIELDS:
        vals = [str(r.get(k) or "") for r in recs]
        arrays["series." + k] = np.array(vals, dtype="U") if vals else np.zeros(0, dtype="U1")
    for k in SERIES_NUM_FIELDS:
        arrays["series." + k] = np.array([np.nan if r.get(k) is None else float(r[k]) for r in recs],
                                         dtype=np.float32)
    assert len(arrays["slice.z"]) == N and len(arrays["slice.instance"]) == N
    sio.write_npz_atomic(os.path.join(dst, "index.npz"), arrays)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["key", "series_uid", "study_uid", "patient", "n_slices", "rows", "cols", "slice_spacing",
            "row_spacing", "col_spacing", "thickness", "kvp", "patient_age", "patient_sex", "manufacturer",
            "kernel", "modality", "kind"]
    w.writerow(cols)
    for r in recs:
        sp = r["spacing"]
        w.writerow([r["key"], r.get("series_uid", ""), r.get("study_uid", ""), r.get("patient", ""),
                    r["n_slices"], r["shape"][1], r["shape"][2], _fmt(sp[0]), _fmt(sp[1]), _fmt(sp[2]),
                    _fmt(r.get("thickness")), _fmt(r.get("kvp")), r.get("patient_age", ""),
                    r.get("patient_sex", ""), r.get("manufacturer", ""), r.get("kernel", ""),
                    r.get("modality", ""), r.get("kind", "")])
    sio.write_text_atomic(os.path.join(dst, "series.csv"), buf.getvalue())
    return N


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}"


# ------------------------------------------------------------------------------------------ reader

class SliceCache:
    """Read access to a prepared cache: ``len(cache)`` slices, ``cache[i]`` an int16 (H, W) HU slice,
    ``cache.read(indices)`` a batch (B, H, W), shards memory-mapped lazily (an LRU of open maps).

    Tables (numpy arrays, one row per slice): ``slice_series``, ``slice_index`` (row in its shard),
    ``slice_z`` (mm along the normal), ``slice_instance``, ``slice_patient`` (index into
    ``patients``, the salted patient hashes). Per series: ``series[name]`` for the fields of
    SERIES_STR_FIELDS / SERIES_NUM_FIELDS plus 'offset', 'n', 'shape', 'spacing'."""

    def __init__(self, root: str, max_open: int = 1024):
        self.root = root
        path = os.path.join(root, "index.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{root!r} has no index.npz: not a prepared cache, or prepare did not "
                                    f"finish (run `sparkct data prepare` again to resume)")
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT or int(z["version"]) != VERSION:
                raise ValueError(f"{root!r}: unsupported cache format/version")
            data = {k: z[k] for k in z.files}
        with open(os.path.join(root, "cache.json")) as f:
            self.manifest = json.load(f)
        self.slice_series = data["slice.series"]
        self.slice_index = data["slice.index"]
        self.slice_z = data["slice.z"]
        self.slice_instance = data["slice.instance"]
        self.slice_patient = data["slice.patient"]
        self.patients = data["patients"]
        self.series = {k[len("series."):]: v for k, v in data.items() if k.startswith("series.")}
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._max_open = max_open
        shapes = self.series["shape"]
        self.uniform_shape = tuple(int(v) for v in shapes[0]) if len(shapes) and (shapes == shapes[0]).all() else None

    def __len__(self) -> int:
        return len(self.slice_series)

    @property
    def n_series(self) -> int:
        return len(self.series["key"])

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        d = dict(self.__dict__)
        d["_maps"] = OrderedDict()
        return d

    def shard(self, s: int) -> np.ndarray:
        m = self._maps.get(s)
        if m is None:
            m = np.load(os.path.join(self.root, _shard_rel(str(self.series["key"][s]))), mmap_mode="r")
            self._maps[s] = m
            if len(self._maps) > self._max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(s)
        return m

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range for a cache of {len(self)} slices")
        return np.array(self.shard(int(self.slice_series[i]))[self.slice_index[i]])

    def read(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Slices `indices` as one (B, H, W) int16 array (all slices must share a shape). Reads are
        grouped by shard, in shard order, so runs of adjacent slices become one memcpy."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"slice indices out of range [0, {len(self)})")
        ser = self.slice_series[idx]
        shapes = self.series["shape"][ser]
        if len(idx) and not (shapes == shapes[0]).all():
            raise ValueError("slices of different sizes in one batch: prepare with --size, or read one by one")
        h, w = (int(v) for v in shapes[0]) if len(idx) else (0, 0)
        if out is None:
            out = np.empty((len(idx), h, w), dtype=np.int16)
        order = np.lexsort((self.slice_index[idx], ser))
        pos = 0
        while pos < len(order):
            s = ser[order[pos]]
            end = pos
            while end < len(order) and ser[order[end]] == s:
                end += 1
            rows = order[pos:end]
            local = self.slice_index[idx[rows]]
            m = self.shard(int(s))
            if len(local) > 1 and (np.diff(local) == 1).all():
                out[rows] = m[local[0]:local[-1] + 1]
            else:
                out[rows] = m[local]
            pos = end
        return out

    def series_of(self, i: int) -> dict:
        s = int(self.slice_series[i])
        return {k: (v[s].tolist() if hasattr(v[s], "tolist") else v[s]) for k, v in self.series.items()}

    def record(self, s: int) -> dict:
        """The full JSON record of series `s` (positions, per-series skip reasons, ...)."""
        with open(os.path.join(self.root, _record_rel(str(self.series["key"][s])))) as f:
            return json.load(f)
