"""In-plane resampling of CT slices: one code path on numpy/scipy (CPU) and cupy/cupyx (GPU).

``xp``/``ndi`` are either (numpy, scipy.ndimage) or (cupy, cupyx.scipy.ndimage); the same calls run
on both, so CPU and GPU results agree to float32 rounding.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.ndimage


@functools.cache
def gpu_available() -> bool:
    """cupy importable and a CUDA device usable."""
    try:
        import cupy  # noqa: PLC0415 (lazy: optional dependency)

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def backend(device: str = "auto"):
    """(xp, ndi, name) for device 'cpu', 'cuda' or 'auto' (cuda where cupy and a GPU are there)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" or (device == "auto" and gpu_available()):
        if not gpu_available():
            raise RuntimeError("device='cuda' needs cupy (pip install sparkct[cupy]) and a CUDA GPU")
        import cupy  # noqa: PLC0415 (lazy: optional dependency)
        import cupyx.scipy.ndimage as ndi  # noqa: PLC0415 (lazy: optional dependency)

        return cupy, ndi, "cuda"
    return np, scipy.ndimage, "cpu"


def output_geometry(
    in_shape: tuple[int, int],
    in_spacing: tuple[float, float] | None,
    spacing: float | tuple[float, float] | None,
    size: int | tuple[int, int] | None,
):
    """Output (rows, cols), output spacing and step (input pixels per output pixel) per axis.

    - spacing only: the whole field of view at the new spacing;
    - size only: the whole field of view resized to `size`;
    - both: resampled to `spacing`, then centre-cropped / padded to `size`;
    - neither: unchanged.
    """
    h, w = in_shape
    if isinstance(size, int):
        size = (size, size)
    if spacing is not None and not isinstance(spacing, (tuple, list)):
        spacing = (float(spacing), float(spacing))
    if spacing is not None:
        if in_spacing is None or not all(math.isfinite(s) and s > 0 for s in in_spacing):
            raise ValueError("resampling to a spacing needs the slices' PixelSpacing")
        if not all(s > 0 for s in spacing):
            raise ValueError(f"spacing must be > 0 mm, got {spacing}")
        step = (spacing[0] / in_spacing[0], spacing[1] / in_spacing[1])
        if size is None:
            size = (max(1, round(h / step[0])), max(1, round(w / step[1])))
        out_spacing = tuple(float(s) for s in spacing)
    elif size is not None:
        step = (h / size[0], w / size[1])
        out_spacing = (in_spacing[0] * step[0], in_spacing[1] * step[1]) if in_spacing else None
    else:
        return (h, w), in_spacing, (1.0, 1.0)
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return (int(size[0]), int(size[1])), out_spacing, step


def resample_slices(
    hu,
    in_spacing,
    *,
    spacing=None,
    size=None,
    order: int = 1,
    cval: float = -1024.0,
    antialias: bool = True,
    device: str = "auto",
):
    """Resample a (n, H, W) stack in-plane (see :func:`output_geometry`); returns (array, spacing).

    The output grid is centred on the input grid (pixel centres, as DICOM positions them). Points
    outside the input read `cval` (air). When downsampling, a Gaussian prefilter of sigma
    (step - 1) / 2 input pixels per axis suppresses aliasing (as skimage's resize does). The array
    comes back on the device it was computed on: numpy for 'cpu', cupy for 'cuda'; a numpy input on
    'cuda' is moved there and the result returned as numpy."""
    xp, ndi, name = backend(device)
    arr_in = hu
    was_numpy = isinstance(hu, np.ndarray)
    if hu.ndim != 3:
        raise ValueError(f"expected (slices, rows, cols), got shape {tuple(hu.shape)}")
    (oh, ow), out_spacing, (sy, sx) = output_geometry(hu.shape[1:], in_spacing, spacing, size)
    if (oh, ow) == tuple(hu.shape[1:]) and sy == 1.0 and sx == 1.0:
        return hu, out_spacing
    a = xp.asarray(arr_in, dtype=xp.float32)
    if antialias and (sy > 1 or sx > 1):
        sig = (0.0, max(0.0, (sy - 1) / 2), max(0.0, (sx - 1) / 2))
        a = ndi.gaussian_filter(a, sig, mode="nearest", truncate=3.0)
    h, w = hu.shape[1:]
    # out (i, j) -> in ((i - (oh-1)/2) * sy + (h-1)/2, ...): centres of the grids coincide.
    offset = (0.0, (h - 1) / 2 - (oh - 1) / 2 * sy, (w - 1) / 2 - (ow - 1) / 2 * sx)
    out = ndi.affine_transform(
        a,
        xp.asarray([1.0, sy, sx]),
        offset=offset,
        output_shape=(hu.shape[0], oh, ow),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=order > 1,
    )
    if name == "cuda" and was_numpy:
        out = out.get()
    return out, out_spacing
