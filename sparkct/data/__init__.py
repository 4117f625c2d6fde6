"""CT data: DICOM/NIfTI -> Hounsfield units, the prepared slice cache, datasets, CT augmentations,
a synthetic chest-CT generator, and the choice among them for a run (resolve_data).

Names load on first use: ``import sparkct.data`` imports neither torch nor pydicom, so the prepare
workers start fast, and nothing here needs sparkct's compiled extension.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # dicom / nifti reading
    "CTVolume": "dicom",
    "read_series": "dicom",
    "iter_series": "dicom",
    "read_header": "dicom",
    "plan_series": "dicom",
    "SkipFile": "dicom",
    "PixelLimits": "dicom",
    "read_nifti": "nifti",
    # the cache: preparing it, reading it
    "prepare": "preparing",
    "PrepareReport": "preparing",
    "CacheSettingsError": "preparing",
    "SliceCache": "cache",
    # resampling
    "resample_slices": "resample",
    # windows
    "WINDOWS": "windows",
    "DEFAULT_WINDOWS": "windows",
    "apply_windows": "windows",
    "Windows": "windows",
    "resolve_windows": "windows",
    # augmentation
    "CTAugment": "augment",
    "MultiCrop": "augment",
    "TwoViews": "augment",
    "CTResize": "augment",
    # datasets
    "CTSliceDataset": "datasets",
    "CTLabelledDataset": "datasets",
    "patient_split": "datasets",
    "patient_subset": "datasets",
    "SliceLoader": "datasets",
    "collate_batch": "datasets",
    "tune_malloc": "datasets",
    "RunBatchSampler": "datasets",
    "takes_generator": "datasets",
    "takes_rows": "datasets",
    "SlicePairs": "datasets",
    # labels on the training slices (the hybrid objective, the online probe)
    "label_slices": "labels",
    # images
    "ImageFolderSlices": "images",
    # synthetic data
    "synth": "synthetic",
    # a run's data: a prepared cache, a folder prepared on first use, or the synthetic CT
    "resolve_data": "source",
}

__all__ = sorted(_EXPORTS)


# No submodule shares a name with an export: once imported, a submodule becomes an attribute of
# this package and would shadow the lazily exported function of the same name.


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sparkct.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparkct.data.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
