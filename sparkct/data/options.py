"""The options of :func:`sparkct.data.prepare` (``sparkct data prepare``) and :func:`sparkct.data.synth`
(``sparkct data synth``): each with its default and help, written once. The functions take their defaults
from :data:`PREPARE_DEFAULTS` / :data:`SYNTH_DEFAULTS`, and the commands' flags are generated from
:class:`PrepareOptions` / :class:`SynthOptions` (:func:`sparkct.cliargs.add_dataclass_args`).

No numpy or pydicom here: the ``sparkct`` parser reads this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkct.cliargs import option

__all__ = [
    "DEVICES",
    "MAX_FILE_PIXELS",
    "MAX_SLICE_PIXELS",
    "PATIENT_FROM",
    "PREPARE_DEFAULTS",
    "SYNTH_DEFAULTS",
    "PrepareOptions",
    "SynthOptions",
]

#: default pixel limits (:class:`sparkct.data.dicom.PixelLimits`): Rows x Columns of one frame, and
#: Rows x Columns x frames of one file (decoded at once: 2**29 is 1 GiB of 16-bit pixels)
MAX_SLICE_PIXELS = 4096 * 4096
MAX_FILE_PIXELS = 2**29
#: where resampling runs; what a NIfTI file's patient is
DEVICES = ("cpu", "cuda", "auto")
PATIENT_FROM = ("file", "dir")


@dataclass(frozen=True)
class PrepareOptions:
    """How ``sparkct data prepare`` runs. spacing, size, clip_min, clip_max, order and antialias shape the
    slices: they are the cache's settings (:class:`sparkct.data.preparing.PrepareSettings`, stored in its
    manifest), and a cache prepared with other settings is refused (``reset`` starts it over)."""

    workers: int = option("worker processes", default=1, flags=("-j", "--jobs"), metavar="JOBS")
    spacing: float | None = option(
        "resample to this in-plane spacing in mm (unset: keep the source grid)", default=None
    )
    size: int | None = option("output rows = cols: with --spacing a centre crop/pad, alone a resize", default=None)
    clip_min: int = option("HU floor (padding and outside the FOV become this)", default=-1024)
    clip_max: int = option("HU ceiling", default=32767)
    order: int = option("spline order when resampling (0-5; 1 = linear)", default=1)
    antialias: bool = option("no low-pass before shrinking", default=True, negate=True)  # --no-antialias
    device: str = option("where resampling runs (cuda needs cupy)", default="cpu", choices=list(DEVICES))
    max_slice_pixels: int = option(
        "skip images whose Rows x Columns is larger (checked before decoding)", default=MAX_SLICE_PIXELS
    )
    max_file_pixels: int = option(
        "skip files whose Rows x Columns x frames is larger (a file is decoded at once)", default=MAX_FILE_PIXELS
    )
    reset: bool = option("delete DST's cache and start over", default=False, action="store_true")
    show_paths: bool = option(
        "name skipped files by their path in skipped.csv and the log, not by a salted token",
        default=False,
        action="store_true",
    )
    patient_from: str = option(
        "NIfTI: one patient per file, or per parent folder", default="file", choices=list(PATIENT_FROM)
    )


#: the defaults, as an instance (``prepare(spacing=PREPARE_DEFAULTS.spacing, ...)``)
PREPARE_DEFAULTS = PrepareOptions()


@dataclass(frozen=True)
class SynthOptions:
    """How ``sparkct data synth`` writes synthetic chest CT (:func:`sparkct.data.synth`; its
    ``series_per_patient`` is ``(min_series, max_series)``)."""

    patients: int = option("number of patients", default=8)
    seed: int = option("everything is a function of the seed", default=0)
    size: int = option("rows = columns of each slice (32-2048)", default=256)
    thickness: float | None = option(
        "slice thickness = spacing in mm (unset: random per series, 2.5-5 mm)", default=None
    )
    slices: int | None = option("slices per series (unset: the whole chest)", default=None)
    min_series: int = option("fewest series per patient", default=1)
    max_series: int = option("most series per patient", default=2)
    p_finding: float = option("fraction of patients with nodules", default=0.5)
    localizer: bool = option("leave out the scout image of each study", default=True, negate=True)  # --no-localizer


#: the defaults, as an instance
SYNTH_DEFAULTS = SynthOptions()
