"""HU windows as image channels.

A window (center, width) maps HU to [0, 1]: ``clip((hu - (center - width / 2)) / width, 0, 1)``.
Several windows stack as channels, so a 3-channel network sees lung, soft tissue and bone at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# (center, width) in HU
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOWS = ("lung", "mediastinum", "bone")

WindowSpec = str | tuple | Sequence


def resolve_windows(windows: WindowSpec | None) -> list[tuple[float, float]]:
    """Window names and/or (center, width) pairs -> list of (center, width).

    Accepts a preset name ('lung'), a (center, width) pair or its string 'C/W' ('40/400', the form
    :func:`window_names` writes), a list of these, or a comma-separated string of names and C/W
    ('lung,mediastinum,bone', 'lung,40/400')."""
    if windows is None:
        return []
    if isinstance(windows, str):
        windows = [w.strip() for w in windows.split(",") if w.strip()]
    elif (
        isinstance(windows, (tuple, list))
        and len(windows) == 2
        and all(isinstance(v, (int, float, np.number)) for v in windows)
    ):
        windows = [tuple(windows)]
    out = []
    for w in windows:
        if isinstance(w, str) and "/" in w:
            w = _center_width(w)
        if isinstance(w, str):
            if w not in WINDOWS:
                raise ValueError(f"unknown window {w!r}; presets: {', '.join(WINDOWS)}, or C/W (e.g. 40/400)")
            out.append(WINDOWS[w])
        else:
            try:
                c, wd = (float(v) for v in w)
            except (TypeError, ValueError):
                raise ValueError(f"a window is a preset name or a (center, width) pair, got {w!r}") from None
            if not wd > 0:
                raise ValueError(f"window width must be > 0, got {wd}")
            out.append((c, wd))
    if not out:
        raise ValueError("no window given")
    return out


def _center_width(s: str) -> tuple[float, float]:
    # 'C/W' -> (C, W): the command-line form of a (center, width) pair; the width is checked by the caller
    parts = s.strip().split("/")
    try:
        c, wd = (float(v) for v in parts)
    except ValueError:
        raise ValueError(f"a window is a preset name or C/W in HU (e.g. 40/400), got {s!r}") from None
    if not (np.isfinite(c) and np.isfinite(wd)):
        raise ValueError(f"a window's C/W must be finite numbers, got {s!r}")
    return c, wd


def window_coefficients(windows: WindowSpec):
    """(scale, offset) per channel such that window = clip(hu * scale + offset, 0, 1)."""
    ws = resolve_windows(windows)
    scale = np.array([1.0 / w for _, w in ws], dtype=np.float64)
    offset = np.array([-(c - w / 2) / w for c, w in ws], dtype=np.float64)
    return scale, offset


def apply_windows(hu, windows: WindowSpec = DEFAULT_WINDOWS, out=None):
    """Window HU into channels.

    By rank: (H, W) -> (C, H, W); (B, H, W) and (B, 1, H, W) -> (B, C, H, W). torch tensors or numpy
    arrays (same rules); integer inputs (the int16 cache) are converted to float32; a tensor result is
    on hu's device."""
    scale, offset = window_coefficients(windows)
    if isinstance(hu, np.ndarray):
        x = hu.astype(np.float32, copy=False)
        x = x[None] if x.ndim == 2 else x[:, None] if x.ndim == 3 else x
        if x.shape[-3] != 1:
            raise ValueError(f"expected (H, W), (B, H, W) or (B, 1, H, W) HU, got {hu.shape}")
        s = scale.astype(np.float32).reshape(-1, 1, 1)
        o = offset.astype(np.float32).reshape(-1, 1, 1)
        return np.clip(x * s + o, 0.0, 1.0)
    import torch  # noqa: PLC0415 (lazy: numpy callers such as sparkct data show import no torch)

    x = hu if hu.is_floating_point() else hu.float()
    x = x[None] if x.dim() == 2 else x[:, None] if x.dim() == 3 else x
    if x.dim() != 4 and x.dim() != 3 or x.shape[-3] != 1:
        raise ValueError(f"expected (H, W), (B, H, W) or (B, 1, H, W) HU, got {tuple(hu.shape)}")
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    o = torch.as_tensor(offset, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    out = torch.addcmul(o, x, s, out=out) if out is not None else torch.addcmul(o, x, s)
    return out.clamp_(0.0, 1.0)


class Windows:
    """Callable form of :func:`apply_windows` for a fixed set of windows (``.channels`` of them)."""

    def __init__(self, windows: WindowSpec = DEFAULT_WINDOWS):
        self.windows = resolve_windows(windows)
        self.channels = len(self.windows)

    def __call__(self, hu):
        return apply_windows(hu, self.windows)

    def __repr__(self) -> str:
        return f"Windows({self.windows})"


def window_names(windows: Iterable) -> list[str]:
    names = {v: k for k, v in WINDOWS.items()}
    return [names.get(tuple(w), f"{w[0]:g}/{w[1]:g}") for w in resolve_windows(list(windows))]
