"""NIfTI CT volumes (nibabel) -> :class:`~sparkct.data.dicom.CTVolume` in the DICOM display layout.

NIfTI CT sets store HU (after the header's scl_slope/scl_inter, which nibabel applies). The volume is
reoriented to the closest canonical (RAS+) axes, then laid out as axial DICOM slices are displayed:
slices inferior -> superior, rows anterior -> posterior, columns patient right -> left (LPS).
"""

from __future__ import annotations

import os

import numpy as np

from .dicom import DEFAULT_LIMITS, CTVolume, PixelLimits, SkipFile

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def _nibabel():
    try:
        import nibabel  # noqa: PLC0415 (lazy: optional dependency)
    except ImportError as e:
        raise ImportError("reading NIfTI needs nibabel: pip install 'sparkct[dicom]'") from e
    return nibabel


def read_nifti(path: str, *, meta: dict | None = None, limits: PixelLimits | None = DEFAULT_LIMITS) -> CTVolume:
    """Read a 3-D NIfTI CT volume as float32 HU slices (see the module docstring). A volume over
    `limits` (checked on the header, before the data is read) raises ValueError."""
    nib = _nibabel()
    try:
        img = nib.load(path)
    except Exception as e:
        raise ValueError(f"not a readable NIfTI file ({type(e).__name__})") from None
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise ValueError(f"expected a 3-D NIfTI volume, got shape {img.shape}")
    if limits is not None:
        try:
            limits.check(*(int(v) for v in img.shape))
        except SkipFile as e:
            raise ValueError(e.reason) from None
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=-1024.0, posinf=32767.0, neginf=-1024.0)
    dx, dy, dz = (float(z) for z in img.header.get_zooms()[:3])
    # (X, Y, Z) in RAS -> (Z, Y, X) with rows anterior->posterior and columns right->left.
    hu = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    nx, ny, nz = data.shape
    aff = img.affine
    lps = np.diag([-1.0, -1.0, 1.0])
    positions = np.stack([lps @ (aff @ np.array([nx - 1, ny - 1, k, 1.0]))[:3] for k in range(nz)])
    m = {
        "series_uid": "",
        "study_uid": "",
        "modality": "CT",
        "kvp": None,
        "patient_age": "",
        "age_years": None,
        "patient_sex": "",
        "source_format": "nifti",
        "sorted_by": "position",
        "thickness": dz,
    }
    m.update(meta or {})
    return CTVolume(
        hu=hu,
        spacing=(dz, dy, dx),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        positions=positions,
        z=positions[:, 2].astype(np.float64),
        instance_numbers=np.arange(1, nz + 1),
        meta=m,
    )


def nifti_stem(path: str) -> str:
    base = os.path.basename(path)
    for s in NIFTI_SUFFIXES:
        if base.lower().endswith(s):
            return base[: -len(s)]
    return base
