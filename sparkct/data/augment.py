"""Batched CT augmentations on torch tensors, on any device.

:class:`CTAugment` takes a batch of HU slices (B, 1, H, W) (int16 from the cache, or float) and
returns windowed, augmented crops (B, C, size, size) in [0, 1]. Every random parameter is drawn on
the CPU from a ``torch.Generator`` (so a seed gives the same crops, flips, angles, gains on every
device), then the work runs as a few batched tensor operations on the input's device:

1. geometry, one ``grid_sample`` for the whole batch: random resized crop (area fraction ``scale``,
   aspect ``ratio``), horizontal / vertical flips, small rotations; outside the slice reads air;
2. CT physics on the single HU channel: Gaussian noise in HU (``noise``), Gaussian blur (``blur``,
   sigma in output pixels), a HU shift and scale (``hu_shift``, ``hu_scale``: calibration);
3. windows and linear intensity fused in one pass:
   ``clip((hu * hu_scale + hu_shift - lo_c) / width_c * contrast + brightness, 0, 1)`` per channel
   (contrast/brightness act before the clip, like jittering the window level and width);
4. gamma on the windowed values.

Each of rotation, noise, blur, intensity and gamma applies to a random subset of the batch with its
probability ``p_*``; only that subset is computed. :class:`MultiCrop` gives the global + local crops
of SwAV / DINO; :class:`CTResize` is the deterministic evaluation counterpart.

Noise on CPU comes from a fixed bank of Gaussian fields (seeded by ``noise_seed``), each noisy
sample adding a random window of one under a random flip/transpose: every pixel is still
N(0, sigma^2) and independent of its neighbours, at a fraction of the cost of a fresh ``randn`` per
pixel (which would be the CPU loader's bottleneck). On CUDA each noisy sample's field is drawn fresh
from its own drawn seed.

Rows of a larger batch. Every random parameter is one draw per sample, in a fixed order, so the
parameters of rows ``lo .. lo + B`` of a batch of ``total`` are those rows of the whole batch's draw:
``transform(hu, generator, rows=(lo, total))`` (what :class:`sparkct.data.SliceLoader` passes each
rank for its share of a global batch) augments a sample exactly as one process reading the whole
batch would, whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .windows import DEFAULT_WINDOWS, WindowSpec, resolve_windows


def _u(g: torch.Generator | None, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo


def _pair(v, name: str) -> tuple[float, float]:
    if isinstance(v, (int, float)):
        return (float(v), float(v))
    a, b = (float(x) for x in v)
    if a > b:
        raise ValueError(f"{name}: expected (low, high) with low <= high, got {v}")
    return a, b


def _prob(p, name):
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


@dataclass
class AugmentParams:
    """The random draw for one batch (CPU tensors); apply() moves what it needs to the device."""

    box: torch.Tensor  # (B, 4) int64 crop boxes (top, left, height, width) in input pixels
    angle: torch.Tensor  # (B,) float64 radians, 0 where not rotated
    flip_x: torch.Tensor  # (B,) bool
    flip_y: torch.Tensor  # (B,) bool
    hu_scale: torch.Tensor  # (B,)
    hu_shift: torch.Tensor  # (B,)
    contrast: torch.Tensor  # (B,)
    brightness: torch.Tensor  # (B,)
    gamma: torch.Tensor  # (B,), 1 where not applied
    noise_sigma: torch.Tensor  # (B,), 0 where not applied
    blur_sigma: torch.Tensor  # (B,), 0 where not applied
    in_hw: tuple
    # where each sample's noise comes from: CPU bank tile, window offsets as fractions, flip/transpose
    # code; CUDA: a generator seed
    noise_tile: torch.Tensor | None = None  # (B,) int64
    noise_offset: torch.Tensor | None = None  # (B, 2) float64 in [0, 1)
    noise_op: torch.Tensor | None = None  # (B,) int64 in [0, 8)
    noise_seed: torch.Tensor | None = None  # (B,) int64

    def take(self, lo: int, hi: int) -> AugmentParams:
        """The parameters of rows lo .. hi."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name)[lo:hi]
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def theta(self) -> torch.Tensor:
        """(B, 2, 3) affine_grid matrices (align_corners=False) of the crops, flips and rotations."""
        top, left, h, w = (self.box[:, i].double() for i in range(4))
        fx = torch.where(self.flip_x, -1.0, 1.0).double()
        fy = torch.where(self.flip_y, -1.0, 1.0).double()
        return crop_theta(self.in_hw, (w, h), (left + w / 2, top + h / 2), self.angle, fx, fy)


def crop_theta(in_hw, crop_wh, center_xy, angle, flip_x, flip_y) -> torch.Tensor:
    """(B, 2, 3) affine_grid matrices of crops: width/height (pixels), centre (pixels), angle
    (radians), flips (+-1); align_corners=False convention."""
    H, W = in_hw
    w, h = crop_wh
    cx, cy = center_xy
    c, s = torch.cos(angle), torch.sin(angle)
    th = torch.zeros(len(w), 2, 3, dtype=torch.float64)
    th[:, 0, 0] = c * w / 2 * flip_x / (W / 2)
    th[:, 0, 1] = -s * h / 2 * flip_y / (W / 2)
    th[:, 0, 2] = (cx - W / 2) / (W / 2)
    th[:, 1, 0] = s * w / 2 * flip_x / (H / 2)
    th[:, 1, 1] = c * h / 2 * flip_y / (H / 2)
    th[:, 1, 2] = (cy - H / 2) / (H / 2)
    return th


def affine_grid(theta: torch.Tensor, out_hw, dtype=torch.float32) -> torch.Tensor:
    """Equal to F.affine_grid(theta, (B, C, h, w), align_corners=False), built from one row term
    and one column term per coordinate (F.affine_grid's batched matmul is ~5x slower on CPU)."""
    h, w = out_hw
    dev = theta.device
    u = (torch.arange(w, device=dev, dtype=dtype) * 2 + 1) / w - 1
    v = (torch.arange(h, device=dev, dtype=dtype) * 2 + 1) / h - 1
    t = theta.to(dtype)
    grid = torch.empty(len(t), h, w, 2, device=dev, dtype=dtype)
    for k in range(2):
        rows = t[:, k, 1, None] * v[None] + t[:, k, 2, None]  # (B, h)
        cols = t[:, k, 0, None] * u[None]  # (B, w)
        torch.add(cols[:, None, :], rows[:, :, None], out=grid[..., k])
    return grid


def gaussian_kernels(sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """(n, 2r+1) normalized 1-D Gaussian kernels, one per sigma (sigma -> 0 gives the identity). Each
    kernel is cut at its own 3 sigma (zeros beyond), so a sample's blur does not depend on the widest
    sigma of its batch; `radius` only sets the common width (default: what the widest needs)."""
    sigma = sigma.to(torch.float32)
    own = torch.ceil(3.0 * sigma).clamp_min(1)
    if radius is None:
        radius = int(own.max()) if len(sigma) else 1
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2) * (x[None].abs() <= own[:, None])
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, C, H, W), sigma (B,) in pixels, reflect padding. A fixed
    `radius` (at least 3 x the largest sigma) makes a sample's result independent of its batch to the bit."""
    B, C, H, W = x.shape
    if B * C == 1:
        # a single-channel conv takes another kernel path than the grouped one, which rounds differently;
        # blurring a copy beside it keeps one sample's result the same whatever else is in its batch
        return gaussian_blur(x.expand(2, C, H, W), sigma.expand(2), radius)[:1]
    k = gaussian_kernels(sigma.to(x.device), radius).to(x.dtype)
    r0 = (k.shape[1] - 1) // 2
    r = min(r0, H - 1, W - 1)
    if r < 1:
        return x
    k = k[:, r0 - r : r0 + r + 1]
    k = k / k.sum(1, keepdim=True)
    kk = k.repeat_interleave(C, 0)  # (B*C, 2r+1)
    y = x.reshape(1, B * C, H, W)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, kk[:, None, :, None], groups=B * C)
    y = F.pad(y, (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, kk[:, None, None, :], groups=B * C)
    return y.reshape(B, C, H, W)


class _NoiseBank:
    """Gaussian fields drawn once (seeded) on the CPU; each sample adds a random window of one,
    under a random one of the 8 flips/transposes. Every pixel is N(0, 1) and independent of its
    neighbours; the fields are fixed per bank, so a seed fixes all noise."""

    def __init__(self, seed: int = 0, tiles: int = 8):
        self.seed, self.tiles = seed, tiles
        self.bank = None

    def field(self, S: int, dtype) -> torch.Tensor:
        if self.bank is None or self.bank.shape[-1] < S or self.bank.dtype != dtype:
            g = torch.Generator().manual_seed(self.seed)
            self.bank = torch.randn(self.tiles, S, S, generator=g, dtype=dtype)
        return self.bank

    def add(self, y: torch.Tensor, idx: torch.Tensor, sigma: torch.Tensor, p: AugmentParams):
        B, C, H, W = y.shape
        S = max(H, W) * 2
        bank = self.field(S, y.dtype)
        S = bank.shape[-1]
        n = len(idx)
        k = (p.noise_tile[idx] % self.tiles).tolist()
        off = p.noise_offset[idx]
        oy = (off[:, 0] * (S - H + 1)).floor().long().clamp(max=S - H).tolist()
        ox = (off[:, 1] * (S - W + 1)).floor().long().clamp(max=S - W).tolist()
        op = p.noise_op[idx].tolist()
        for t in range(n):
            tile = bank[k[t]]
            if op[t] & 4 and H == W:
                tile = tile.t()
            tile = tile[oy[t] : oy[t] + H, ox[t] : ox[t] + W]
            dims = [d for d, bit in ((0, 1), (1, 2)) if op[t] & bit]
            if dims:
                tile = tile.flip(dims)
            y[int(idx[t])].add_(tile, alpha=float(sigma[t]))


class CTAugment:
    """Batched augmentation of HU slices into windowed crops (see the module docstring).

    Defaults suit self-supervised pretraining; pass 0 / 1 / (1, 1) to switch a transform off.
    geometry: 'grid' resamples every sample through one grid_sample; 'crop' resizes the crop box of
    each unrotated sample with F.interpolate (same box, same bilinear weights; about 2x faster on
    CPU) and uses grid_sample for the rotated ones; 'auto' is 'crop' on CPU and 'grid' on CUDA.
    antialias: low-pass when a crop is shrunk (crop path only; slower).
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        *,
        windows: WindowSpec = DEFAULT_WINDOWS,
        scale=(0.35, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        rotate: float = 10.0,
        p_rotate: float = 0.2,
        hu_shift: float = 20.0,
        hu_scale=(0.97, 1.03),
        p_hu: float = 0.5,
        contrast=(0.8, 1.2),
        brightness=(-0.08, 0.08),
        p_intensity: float = 0.5,
        gamma=(0.7, 1.5),
        p_gamma: float = 0.2,
        noise=(0.0, 25.0),
        p_noise: float = 0.2,
        blur=(0.1, 1.5),
        p_blur: float = 0.1,
        pad_hu: float = -1024.0,
        geometry: str = "auto",
        antialias: bool = False,
        noise_seed: int = 0,
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.windows = resolve_windows(windows)
        self.channels = len(self.windows)
        self.scale = _pair(scale, "scale")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        self.ratio = _pair(ratio, "ratio")
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        self.hflip, self.vflip = _prob(hflip, "hflip"), _prob(vflip, "vflip")
        self.rotate, self.p_rotate = float(rotate), _prob(p_rotate, "p_rotate")
        self.hu_shift, self.hu_scale, self.p_hu = float(hu_shift), _pair(hu_scale, "hu_scale"), _prob(p_hu, "p_hu")
        self.contrast, self.brightness = _pair(contrast, "contrast"), _pair(brightness, "brightness")
        self.p_intensity = _prob(p_intensity, "p_intensity")
        self.gamma, self.p_gamma = _pair(gamma, "gamma"), _prob(p_gamma, "p_gamma")
        if self.gamma[0] <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.noise, self.p_noise = _pair(noise, "noise"), _prob(p_noise, "p_noise")
        if self.noise[0] < 0:
            raise ValueError(f"noise sigma must be >= 0, got {noise}")
        self.blur, self.p_blur = _pair(blur, "blur"), _prob(p_blur, "p_blur")
        if self.blur[0] < 0:
            raise ValueError(f"blur sigma must be >= 0, got {blur}")
        if geometry not in ("auto", "grid", "crop"):
            raise ValueError(f"geometry must be 'auto', 'grid' or 'crop', got {geometry!r}")
        self.geometry, self.antialias = geometry, bool(antialias)
        self.pad_hu = float(pad_hu)
        self._bank = _NoiseBank(noise_seed)

    def __repr__(self) -> str:
        keys = (
            "size",
            "windows",
            "scale",
            "ratio",
            "hflip",
            "vflip",
            "rotate",
            "p_rotate",
            "hu_shift",
            "hu_scale",
            "p_hu",
            "contrast",
            "brightness",
            "p_intensity",
            "gamma",
            "p_gamma",
            "noise",
            "p_noise",
            "blur",
            "p_blur",
            "geometry",
        )
        return "CTAugment(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"

    # -- random draw ---------------------------------------------------------------------------------
    def sample(self, batch: int, in_hw, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the parameters of a batch (CPU, float64), from `generator` alone."""
        g = generator
        B = batch
        H, W = (int(v) for v in in_hw)
        area = _u(g, B, *self.scale) * (H * W)
        r = torch.exp(_u(g, B, math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = torch.sqrt(area * r).round().clamp(1, W).long()
        h = torch.sqrt(area / r).round().clamp(1, H).long()
        left = (torch.rand(B, generator=g, dtype=torch.float64) * (W - w + 1)).floor().long().clamp(max=W - 1)
        top = (torch.rand(B, generator=g, dtype=torch.float64) * (H - h + 1)).floor().long().clamp(max=H - 1)
        box = torch.stack([top, left, h, w], 1)
        fx = torch.rand(B, generator=g) < self.hflip
        fy = torch.rand(B, generator=g) < self.vflip
        rot = torch.rand(B, generator=g) < self.p_rotate
        angle = torch.where(
            rot, _u(g, B, -self.rotate, self.rotate) * math.pi / 180, torch.zeros(B, dtype=torch.float64)
        )

        def maybe(p, lo, hi, off):
            on = torch.rand(B, generator=g) < p
            v = _u(g, B, lo, hi)
            return torch.where(on, v, torch.full_like(v, off))

        hu_on = torch.rand(B, generator=g) < self.p_hu
        hu_shift = torch.where(hu_on, _u(g, B, -self.hu_shift, self.hu_shift), torch.zeros(B, dtype=torch.float64))
        hu_scale = torch.where(hu_on, _u(g, B, *self.hu_scale), torch.ones(B, dtype=torch.float64))
        in_on = torch.rand(B, generator=g) < self.p_intensity
        contrast = torch.where(in_on, _u(g, B, *self.contrast), torch.ones(B, dtype=torch.float64))
        brightness = torch.where(in_on, _u(g, B, *self.brightness), torch.zeros(B, dtype=torch.float64))
        lg = (math.log(self.gamma[0]), math.log(self.gamma[1]))
        gamma = torch.exp(maybe(self.p_gamma, lg[0], lg[1], 0.0))
        noise = maybe(self.p_noise, *self.noise, 0.0)
        blur = maybe(self.p_blur, *self.blur, 0.0)
        return AugmentParams(
            box,
            angle,
            fx,
            fy,
            hu_scale,
            hu_shift,
            contrast,
            brightness,
            gamma,
            noise,
            blur,
            (H, W),
            noise_tile=torch.randint(0, self._bank.tiles, (B,), generator=g),
            noise_offset=torch.rand(B, 2, generator=g, dtype=torch.float64),
            noise_op=torch.randint(0, 8, (B,), generator=g),
            noise_seed=torch.randint(0, 2**62, (B,), generator=g),
        )

    # -- application ---------------------------------------------------------------------------------
    def _geometry(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """(B, 1, h, w) float32 crops of x in (HU - pad_hu), so that zero padding reads air."""
        B = x.shape[0]
        dev = x.device
        oh, ow = self.size
        mode = self.geometry if self.geometry != "auto" else ("crop" if dev.type == "cpu" else "grid")
        y = torch.empty(B, 1, oh, ow, device=dev, dtype=torch.float32)
        rotated = p.angle != 0
        grid_idx = torch.arange(B) if mode == "grid" else torch.nonzero(rotated).flatten()
        if mode == "crop":
            box = p.box.tolist()
            fx, fy, rot = p.flip_x.tolist(), p.flip_y.tolist(), rotated.tolist()

            def crop(b: int):
                t, l, h, w = box[b]
                src = x[b : b + 1, :, t : t + h, l : l + w].to(torch.float32) - self.pad_hu
                if (h, w) != (oh, ow):
                    src = F.interpolate(
                        src,
                        size=(oh, ow),
                        mode="bilinear",
                        align_corners=False,
                        antialias=self.antialias and (h > oh or w > ow),
                    )
                dims = [d for d, f in ((-1, fx[b]), (-2, fy[b])) if f]
                if dims:
                    src = src.flip(dims)
                y[b] = src[0]

            for b in range(B):
                if not rot[b]:
                    crop(b)
        if len(grid_idx):
            d = grid_idx.to(dev)
            src = (x[d] if len(grid_idx) < B else x).to(torch.float32) - self.pad_hu
            grid = affine_grid(p.theta()[grid_idx].to(dev), (oh, ow))
            r = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if len(grid_idx) == B:
                y = r
            else:
                y[d] = r
        return y

    def apply(self, hu: torch.Tensor, p: AugmentParams, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch with drawn parameters `p` (everything random is in `p`; `generator` is not
        used and kept for callers that pass it); returns (B, C, h, w) float32 in [0, 1]."""
        x = _as_batch(hu)
        dev = x.device
        B = x.shape[0]
        if tuple(x.shape[-2:]) != tuple(p.in_hw) or len(p.box) != B:
            raise ValueError(f"parameters drawn for {len(p.box)} slices of {p.in_hw}, got {tuple(x.shape)}")
        y = self._geometry(x, p)
        # noise and blur in HU, on the samples that draw them
        idx = torch.nonzero(p.noise_sigma > 0).flatten()
        if len(idx):
            if dev.type == "cpu":
                self._bank.add(y, idx, p.noise_sigma[idx], p)
            else:
                # one field per sample from its own seed: a sample's noise does not depend on which
                # other samples share its batch (or rank)
                gd = torch.Generator(device=dev)
                fields = []
                for seed in p.noise_seed[idx].tolist():
                    gd.manual_seed(seed)
                    fields.append(torch.randn(tuple(y.shape[1:]), generator=gd, device=dev, dtype=y.dtype))
                n = torch.stack(fields)
                y.index_add_(0, idx.to(dev), n * p.noise_sigma[idx].to(dev, y.dtype).view(-1, 1, 1, 1))
        idx = torch.nonzero(p.blur_sigma > 0).flatten()
        if len(idx):
            d = idx.to(dev)
            # the kernel width from the configured range, not from this batch's sigmas (see gaussian_blur)
            y[d] = gaussian_blur(y[d], p.blur_sigma[idx], max(1, math.ceil(3.0 * self.blur[1])))
        # windows, HU scale/shift and contrast/brightness: one affine map per (sample, channel)
        win = torch.tensor(self.windows, dtype=torch.float64)  # (C, 2)
        lo = win[:, 0] - win[:, 1] / 2
        a = p.hu_scale[:, None] * p.contrast[:, None] / win[None, :, 1]  # (B, C)
        b = ((self.pad_hu * p.hu_scale + p.hu_shift)[:, None] - lo[None]) * p.contrast[:, None] / win[
            None, :, 1
        ] + p.brightness[:, None]
        C = self.channels
        a = a.to(dev, torch.float32).view(B, C, 1, 1)
        b = b.to(dev, torch.float32).view(B, C, 1, 1)
        out = torch.empty(B, C, *self.size, device=dev, dtype=torch.float32)
        torch.mul(y.expand(B, C, *self.size), a, out=out).add_(b).clamp_(0.0, 1.0)
        # gamma, in place on the samples that draw it
        idx = torch.nonzero(p.gamma != 1.0).flatten()
        if len(idx):
            if dev.type == "cpu":
                for i, gm in zip(idx.tolist(), p.gamma[idx].tolist()):
                    out[i].pow_(gm)
            else:
                d = idx.to(dev)
                out[d] = out[d].pow(p.gamma[idx].to(dev, torch.float32).view(-1, 1, 1, 1))
        return out

    def __call__(
        self, hu: torch.Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Augment `hu`; rows=(lo, total): `hu` is rows lo .. lo + B of a batch of `total` (see the
        module docstring)."""
        x = _as_batch(hu)
        B = x.shape[0]
        lo, total = _rows(rows, B)
        params = self.sample(total, tuple(x.shape[-2:]), generator)
        if total != B:
            params = params.take(lo, lo + B)
        return self.apply(x, params)


def _rows(rows: tuple[int, int] | None, n: int) -> tuple[int, int]:
    if rows is None:
        return 0, n
    lo, total = (int(v) for v in rows)
    if not (0 <= lo and lo + n <= total):
        raise ValueError(f"rows {rows}: {n} rows from row {lo} do not fit in a batch of {total}")
    return lo, total


def _as_batch(hu: torch.Tensor) -> torch.Tensor:
    if not isinstance(hu, torch.Tensor):
        hu = torch.as_tensor(np.asarray(hu))
    if hu.dim() == 2:
        hu = hu[None, None]
    elif hu.dim() == 3:
        hu = hu[:, None]
    if hu.dim() != 4 or hu.shape[1] != 1:
        raise ValueError(f"expected HU slices (B, 1, H, W), (B, H, W) or (H, W), got {tuple(hu.shape)}")
    return hu


class MultiCrop:
    """Global and local crops of the same batch (SwAV / DINO multi-crop): returns a list of
    n_global tensors (B, C, global_size, global_size) then n_local (B, C, local_size, local_size).
    Other keyword arguments go to every :class:`CTAugment`."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_global: int = 2,
        n_local: int = 6,
        global_scale=(0.14, 1.0),
        local_scale=(0.05, 0.14),
        **kwargs,
    ):
        if n_global < 1 or n_local < 0:
            raise ValueError("need n_global >= 1 and n_local >= 0")
        self.global_aug = CTAugment(global_size, scale=global_scale, **kwargs)
        self.local_aug = CTAugment(local_size, scale=local_scale, **kwargs) if n_local else None
        self.n_global, self.n_local = n_global, n_local

    def __call__(
        self, hu: torch.Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        views = [self.global_aug(hu, generator, rows) for _ in range(self.n_global)]
        views += [self.local_aug(hu, generator, rows) for _ in range(self.n_local)]
        return views


class TwoViews(MultiCrop):
    """Two independently augmented views (SimCLR, MoCo)."""

    def __init__(self, size: int = 224, scale=(0.2, 1.0), **kwargs):
        super().__init__(global_size=size, n_global=2, n_local=0, global_scale=scale, **kwargs)


class CTResize:
    """Deterministic evaluation transform: the whole slice (or a centred square-ish crop holding
    `crop` of its area) resized to `size` and windowed; same conventions as :class:`CTAugment`."""

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        *,
        windows: WindowSpec = DEFAULT_WINDOWS,
        crop: float = 1.0,
        pad_hu: float = -1024.0,
        geometry: str = "auto",
        antialias: bool = True,
    ):
        if not 0 < crop <= 1:
            raise ValueError(f"crop must be in (0, 1], got {crop}")
        self.crop = float(crop)
        self.aug = CTAugment(
            size,
            windows=windows,
            scale=(crop, crop),
            ratio=(1.0, 1.0),
            hflip=0,
            vflip=0,
            rotate=0,
            p_rotate=0,
            p_hu=0,
            p_intensity=0,
            p_gamma=0,
            p_noise=0,
            p_blur=0,
            pad_hu=pad_hu,
            geometry=geometry,
            antialias=antialias,
        )
        self.channels = self.aug.channels
        self.size = self.aug.size

    def params(self, batch: int, in_hw) -> AugmentParams:
        H, W = in_hw
        s = math.sqrt(self.crop)
        h, w = max(1, round(H * s)), max(1, round(W * s))
        box = torch.tensor([[(H - h) // 2, (W - w) // 2, h, w]] * batch, dtype=torch.long).reshape(batch, 4)
        one = torch.ones(batch, dtype=torch.float64)
        zero = torch.zeros(batch, dtype=torch.float64)
        no = torch.zeros(batch, dtype=torch.bool)
        return AugmentParams(box, zero, no, no, one, zero, one, zero, one, zero, zero, (H, W))

    def __call__(
        self, hu: torch.Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        x = _as_batch(hu)
        return self.aug.apply(x, self.params(x.shape[0], tuple(x.shape[-2:])))
