"""The options of :func:`sparkct.data.prepare` (``sparkct data prepare``): each with its default and help,
written once. :func:`~sparkct.data.prepare` takes its defaults from :data:`PREPARE_DEFAULTS`, and the
command's flags are generated from :class:`PrepareOptions` (:func:`sparkct.cliargs.add_dataclass_args`).

No numpy or pydicom here: the ``sparkct`` parser reads this module.
"""
from __future__ import annotations

from dataclasses import dataclass

from sparkct.cliargs import option

__all__ = ["PrepareOptions", "PREPARE_DEFAULTS", "MAX_SLICE_PIXELS", "MAX_FILE_PIXELS",
           "DEVICES", "PATIENT_FROM"]

#: default pixel limits (:class:`sparkct.data.dicom.PixelLimits`): Rows x Columns of one frame, and
#: Rows x Columns x frames of one file (decoded at once: 2**29 is 1 GiB of 16-bit pixels)
MAX_SLICE_PIXELS = 4096 * 4096
MAX_FILE_PIXELS = 2 ** 29
#: where resampling runs; what a NIfTI file's patient is
DEVICES = ("cpu", "cuda", "auto")
PATIENT_FROM = ("file", "dir")


@dataclass(frozen=True)
class PrepareOptions:
    """How ``sparkct data prepare`` runs. spacing, size, clip_min, clip_max, order and antialias shape the
    slices: they are the cache's settings (:class:`sparkct.data.preparing.PrepareSettings`, stored in its
    manifest), and a cache prepared with other settings is refused (``reset`` starts it over)."""

    workers: int = option(1, "worker processes", flags=("-j", "--jobs"), metavar="JOBS")
    spacing: float | None = option(None, "resample to this in-plane spacing in mm (unset: keep the source grid)")
    size: int | None = option(None, "output rows = cols: with --spacing a centre crop/pad, alone a resize")
    clip_min: int = option(-1024, "HU floor (padding and outside the FOV become this)")
    clip_max: int = option(32767, "HU ceiling")
    order: int = option(1, "spline order when resampling (0-5; 1 = linear)")
    antialias: bool = option(True, "no low-pass before shrinking", negate=True)  # --no-antialias
    device: str = option("cpu", "where resampling runs (cuda needs cupy)", choices=list(DEVICES))
    max_slice_pixels: int = option(MAX_SLICE_PIXELS,
                                   "skip images whose Rows x Columns is larger (checked before decoding)")
    max_file_pixels: int = option(MAX_FILE_PIXELS,
                                  "skip files whose Rows x Columns x frames is larger (a file is decoded at once)")
    reset: bool = option(False, "delete DST's cache and start over", action="store_true")
    show_paths: bool = option(False, "name skipped files by their path in skipped.csv and the log, not by a "
                                     "salted token", action="store_true")
    patient_from: str = option("file", "NIfTI: one patient per file, or per parent folder", choices=list(PATIENT_FROM))


#: the defaults, as an instance (``prepare(spacing=PREPARE_DEFAULTS.spacing, ...)``)
PREPARE_DEFAULTS = PrepareOptions()
