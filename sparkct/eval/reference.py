"""A reference without training: how far a classic nodule detector gets on the task.

Each slice is scored by its strongest blob response inside the lungs: the scale-normalised
Laplacian of Gaussian ``-sigma^2 LoG_sigma`` (bright blobs respond positively; a disc of radius r
responds most at sigma = r / sqrt 2), its largest value over a few sigmas matched to nodule diameters
(``diameters_mm`` at the slice's pixel size), taken over a lung mask. It works on the slice the
models see: the whole slice resized to the crop by the evaluation transform (:class:`CTResize`), in
HU rather than windowed. The lung mask is the air-density region (below ``threshold`` HU) that does
not reach the slice's border (the air around the body does), its holes filled (nodules and vessels
are denser than the threshold), eroded by ``erode`` pixels so the chest wall's edge does not count.

Its AUC on the validation and test splits, with the patient bootstrap of the methods' CIs, says how
hard the task is for a detector of bright round spots (vessels in cross-section are its confounder):
a fine-tuned model should beat it to show that it learned more than that.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sparkct.data.augment import CTResize
from sparkct.errors import UserError
from sparkct.eval.finetune import pool_units
from sparkct.eval.metrics import bootstrap_ci

__all__ = ["NAME", "blob_scores", "blob_sigmas", "blob_reference", "lung_mask"]

NAME = "blob detector (no training)"

#: a window that maps HU [-1024, 3072] linearly onto [0, 1]: CTResize's output read back as HU
_HU_WINDOW = (1024.0, 4096.0)
#: nodule diameters when none are given: lung nodules as CT screening reports them
DIAMETERS_MM = (4.0, 30.0)
#: the field of view assumed where the cache records no pixel spacing
FALLBACK_FOV_MM = 350.0
_MIN_SIGMA = 0.75  # pixels: below, the Laplacian answers single-pixel noise


def lung_mask(hu: np.ndarray, *, threshold: float = -400.0, erode: int = 1) -> np.ndarray:
    """The lungs of a 2-D HU slice (see the module docstring), as a boolean mask."""
    air = hu < threshold
    lab, _ = ndimage.label(air)
    outside = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    inner = air & ~np.isin(lab, outside[outside > 0])
    lungs = ndimage.binary_fill_holes(inner)
    if erode > 0:
        lungs = ndimage.binary_erosion(lungs, iterations=erode)
    return lungs


def blob_sigmas(pixel_mm: float, diameters_mm=DIAMETERS_MM, n: int = 4) -> np.ndarray:
    """Sigmas in pixels of size `pixel_mm` for discs of `diameters_mm` (low, high): r / sqrt 2, `n`
    spaced geometrically; none below 0.75 px."""
    lo, hi = (d / 2 / np.sqrt(2) / pixel_mm for d in diameters_mm)
    return np.unique(np.maximum(np.geomspace(lo, hi, n), _MIN_SIGMA).round(3))


def _crop_pixel_mm(dataset, crop: int) -> tuple[float, bool]:
    """(the median pixel size in mm of the dataset's slices resized to `crop`, whether the cache
    recorded it; else FALLBACK_FOV_MM across the slice)."""
    c = dataset.cache
    s = np.asarray(dataset.series)
    shape = np.asarray(c.series["shape"], dtype=np.float64)[s]
    spacing = np.asarray(c.series["spacing"], dtype=np.float64)[s] if "spacing" in c.series else None
    known = spacing is not None and spacing.shape[1] >= 3 and np.isfinite(spacing[:, 1:]).all()
    if known:
        mm = spacing[:, 1:] * shape / crop  # a resize of the whole slice: pixel size x its side / crop
    else:
        mm = np.full_like(shape, FALLBACK_FOV_MM / crop)
    return float(np.median(mm)), bool(known)


def _laplace_2d(x: np.ndarray, sigma: float) -> np.ndarray:
    """The in-plane Laplacian of Gaussian of a stack (B, H, W); scipy's gaussian_laplace would add a
    second difference across the stack."""
    s = (0.0, sigma, sigma)
    return ndimage.gaussian_filter(x, s, order=(0, 2, 0)) + ndimage.gaussian_filter(x, s, order=(0, 0, 2))


def blob_scores(
    dataset, *, crop: int, sigmas, threshold: float = -400.0, erode: int = 1, batch: int = 256
) -> np.ndarray:
    """(N,) the strongest scale-normalised LoG response inside the lungs of each slice of `dataset`
    resized to `crop` (see the module docstring); a slice without lung gets the lowest score of all."""
    resize = CTResize(crop, windows=[_HU_WINDOW])
    lo = _HU_WINDOW[0] - _HU_WINDOW[1] / 2
    sig = [float(v) for v in sigmas]
    out = np.full(len(dataset), np.nan)
    for start in range(0, len(dataset), batch):
        items = np.arange(start, min(start + batch, len(dataset)))
        hu = resize(dataset.hu(items))[:, 0].numpy().astype(np.float64) * _HU_WINDOW[1] + lo
        resp = np.max([-(s**2) * _laplace_2d(hu, s) for s in sig], 0)
        for k, i in enumerate(items):
            m = lung_mask(hu[k], threshold=threshold, erode=erode)
            if m.any():
                out[i] = resp[k][m].max()
    if np.isnan(out).all():
        return np.zeros(len(dataset))
    return np.where(np.isnan(out), np.nanmin(out), out)


def blob_reference(
    task,
    *,
    crop: int,
    diameters_mm=DIAMETERS_MM,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """The blob detector's AUC with its patient-bootstrap CI on the task's validation and test splits
    (pooled into the methods' evaluation units), and its settings. Needs a two-class task on a CT cache."""
    if task.kind != "cache" or task.n_classes != 2:
        raise UserError(
            f"the blob detector reference needs two classes of CT (HU), got {task.n_classes} classes of "
            f"{task.kind} data"
        )
    pixel_mm, known = _crop_pixel_mm(task.test, crop)
    sigmas = blob_sigmas(pixel_mm, diameters_mm)
    out = {
        "name": NAME,
        "input": f"the slice resized to the crop ({crop} px) in HU",
        "pixel_mm": round(pixel_mm, 3),
        "pixel_size": (
            "median of the cache's pixel spacing" if known else f"assumed: {FALLBACK_FOV_MM:g} mm field of view"
        ),
        "diameters_mm": [float(d) for d in diameters_mm],
        "sigmas_px": [float(s) for s in sigmas],
    }
    for split in ("val", "test"):
        ds = getattr(task, split)
        scores = blob_scores(ds, crop=crop, sigmas=sigmas)
        unit, s, y, pats = pool_units(ds, scores, np.asarray(ds.targets), level=task.level)
        a = bootstrap_ci(
            y, s, groups=pats, n_resamples=n_resamples, seed=seed, confidence=confidence, metrics=("auc",)
        )["auc"]
        out[split] = {
            "auc": {k: a[k] for k in ("value", "low", "high")},
            "unit": unit,
            "n_units": int(len(y)),
            "n_patients": int(len(np.unique(pats))),
        }
    return out
