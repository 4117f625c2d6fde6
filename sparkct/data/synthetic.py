"""``sparkct data synth DST``: procedurally generated chest CT written as real DICOM series.

Each synthetic patient has its own anatomy (body size and fat, lung shape and size, heart position
and size, aorta, trachea and bronchi, spine with vertebrae and discs, twelve rib pairs, sternum,
scapulae, liver/spleen domes, breasts for women, a pulmonary vessel tree branching from each hilum)
and each series its own acquisition (slice thickness, field of view, kVp, noise, kernel sharpness,
contrast in the blood pool, stored-value encoding). Findings are lung nodules of varied size (4-30 mm),
density (solid, part-solid, ground-glass, calcified) and shape (round, lobulated, spiculated) placed
in the lungs of about half of the patients. Vessels seen in cross-section are the confounder
(bright round dots like small nodules), and nothing about a finding moves global intensity
statistics much, so telling classes apart needs local shape.

Anatomy is defined in millimetres in patient coordinates (LPS: +x patient left, +y posterior,
+z superior) and rasterized per slice with anti-aliased edges; partial volume across the slice
thickness is modelled for vessels and nodules, and in-plane blur plus correlated noise mimic the
reconstruction kernel. HU: air -1000, lung about -850 (denser posteriorly), fat about -100,
muscle 40-60, blood 35-45 (150-300 with contrast), bone 150-350 (cancellous) to 700-1400 (cortical),
the table's shell 100-300.

Outputs under DST::

    dicom/case_XXXX/series_Y/<hash>.dcm   CT Image Storage, one file per slice (names not in slice order)
    dicom/case_XXXX/localizer/<hash>.dcm  a scout image (ImageType LOCALIZER; prepare skips it)
    labels.csv         one row per series: series_uid, label (1 = at least one nodule), details
    slice_labels.csv   one row per slice: series_uid, instance_number, z_mm, label (1 = a nodule's
                       cross-section of at least 3 mm in the slab; smaller caps are not drawn either)
    nodules.csv        one row per nodule a slice of the series shows (centre, diameter, type, HU),
                       also one whose centre lies outside the series' z range
    synth.json         the parameters of the run

Patient names and IDs are fake ("SYNTH^..."); prepare must hash them away. Everything is a
function of the seed.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from sparkct import io as sio
from sparkct.errors import UserError

from . import _util
from .dicom import CT_IMAGE_STORAGE
from .options import SYNTH_DEFAULTS

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root
NODULE_TYPES = ("solid", "part-solid", "ground-glass", "calcified")
MIN_SHOWN_RADIUS_MM = 1.5  # a nodule's cross-section in a slice is drawn and labelled from 3 mm across


# ------------------------------------------------------------------------------------------ canvas


class Canvas:
    """A slice in HU with painters working in patient millimetres on bounding boxes only."""

    def __init__(self, n: int, ps: float, cx: float = 0.0, cy: float = 0.0, fill: float = -1000.0):
        self.n, self.ps = n, ps
        self.x0 = cx - (n - 1) / 2 * ps  # x of column 0 (mm)
        self.y0 = cy - (n - 1) / 2 * ps  # y of row 0
        self.img = np.full((n, n), fill, dtype=np.float32)

    def box(self, cx, cy, rx, ry):
        """Slices of the pixels within (cx +- rx, cy +- ry) and their mm grids (or None if empty)."""
        ps = self.ps
        j0 = max(0, int(math.floor((cx - rx - self.x0) / ps)) - 1)
        j1 = min(self.n, int(math.ceil((cx + rx - self.x0) / ps)) + 2)
        i0 = max(0, int(math.floor((cy - ry - self.y0) / ps)) - 1)
        i1 = min(self.n, int(math.ceil((cy + ry - self.y0) / ps)) + 2)
        if j0 >= j1 or i0 >= i1:
            return None
        x = (self.x0 + ps * np.arange(j0, j1, dtype=np.float32))[None, :] - cx
        y = (self.y0 + ps * np.arange(i0, i1, dtype=np.float32))[:, None] - cy
        return (slice(i0, i1), slice(j0, j1)), x, y

    def blend(self, sl, alpha, value):
        """img = img * (1 - alpha) + value * alpha on the box (value scalar or array of its shape)."""
        region = self.img[sl]
        region += alpha * (np.asarray(value, dtype=np.float32) - region)

    def ellipse(self, cx, cy, rx, ry, value, angle: float = 0.0, opacity: float = 1.0):
        if rx <= 0 or ry <= 0:
            return None
        r = max(rx, ry)
        b = self.box(cx, cy, r, r) if angle else self.box(cx, cy, rx, ry)
        if b is None:
            return None
        sl, x, y = b
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            x, y = x * c + y * s, -x * s + y * c
        q = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
        # signed distance to the outline ~ (q - 1) * local radius; one pixel of soft edge
        d = (q - 1.0) * np.minimum(rx, ry) / self.ps
        alpha = np.clip(0.5 - d, 0.0, 1.0) * opacity
        self.blend(sl, alpha, value)
        return sl, alpha

    def polar(self, cx, cy, radius_fn, rmax, value, opacity: float = 1.0):
        """A star-shaped region r < radius_fn(theta); value may be a function (x, y) -> HU array."""
        b = self.box(cx, cy, rmax, rmax)
        if b is None:
            return None
        sl, x, y = b
        rho = np.sqrt(x * x + y * y)
        theta = np.arctan2(y, x)
        d = (rho - radius_fn(theta)) / self.ps
        alpha = np.clip(0.5 - d, 0.0, 1.0) * opacity
        v = value(x + cx, y + cy) if callable(value) else value
        self.blend(sl, alpha, v)
        return sl, alpha

    def disks(self, cx, cy, r, value, opacity):
        """Many small disks at once (vessel cross-sections); arrays of centres, radii, opacities."""
        if len(cx) == 0:
            return
        ps = self.ps
        R = int(math.ceil(float(np.max(r)) / ps)) + 1
        off = np.arange(-R, R + 1)
        ci = np.rint((cy - self.y0) / ps).astype(np.int64)
        cj = np.rint((cx - self.x0) / ps).astype(np.int64)
        ii = ci[:, None, None] + off[None, :, None]
        jj = cj[:, None, None] + off[None, None, :]
        dy = self.y0 + ii * ps - cy[:, None, None]
        dx = self.x0 + jj * ps - cx[:, None, None]
        d = (np.sqrt(dx * dx + dy * dy) - r[:, None, None]) / ps
        alpha = np.clip(0.5 - d, 0.0, 1.0) * opacity[:, None, None]
        ok = (alpha > 0.01) & (ii >= 0) & (ii < self.n) & (jj >= 0) & (jj < self.n)
        ii, jj = np.broadcast_arrays(ii, jj)
        ii, jj, alpha = ii[ok], jj[ok], alpha[ok].astype(np.float32)
        # overlapping disks: keep the strongest cover per pixel
        flat = ii * self.n + jj
        order = np.argsort(alpha, kind="stable")
        cover = np.zeros(self.n * self.n, dtype=np.float32)
        cover[flat[order]] = alpha[order]
        idx = np.nonzero(cover)[0]
        img = self.img.reshape(-1)
        img[idx] += cover[idx] * (np.float32(value) - img[idx])


# ---------------------------------------------------------------------------------------- patients


@dataclass
class Nodule:
    x: float
    y: float
    z: float
    diameter: float
    kind: str
    hu: float
    lobulation: tuple  # (amplitudes, phases) of boundary harmonics
    spicules: list = field(default_factory=list)  # [(angle, length)]

    def radius_at(self, dz: float) -> float:
        r = self.diameter / 2
        return math.sqrt(max(0.0, r * r - dz * dz))


@dataclass
class Patient:
    index: int
    sex: str
    age: int
    a: float  # body half-width (mm)
    b: float  # body half-depth
    fat: float  # subcutaneous fat thickness
    muscle: float
    height: float  # lung base (t=0) to apex (t=1), mm
    lung_w: float
    lung_d: float
    lung_harm: np.ndarray  # (2 lungs, K, 2) amplitudes/phases
    lung_hu: float
    heart_x: float
    heart_y: float
    heart_rx: float
    heart_ry: float
    heart_angle: float
    aorta_r: float
    spine_y: float
    vert_r: float
    level_h: float
    cortical_hu: float
    cancellous_hu: float
    rib_drop: float
    dome_right: float
    dome_left: float
    table_gap: float
    vessels: list  # per lung: (N, 4) arrays of sample points (x, y, z, r)
    nodules: list
    texture: np.ndarray  # coarse 3-D lung texture (nz, 9, 9)
    name: str
    pid: str
    birth: str


def _harmonics(rng, k: int, amp: float):
    return np.stack([rng.uniform(0, amp, k) / (np.arange(1, k + 1) ** 1.2), rng.uniform(0, 2 * np.pi, k)], -1)


def _lung_center(p: Patient, side: int, t: float):
    """Centre (x, y) of lung `side` (-1 right, +1 left) at height t."""
    return side * p.lung_w * (0.98 if side < 0 else 1.05), 0.03 * p.b - 0.04 * p.b * t


def _lung_scale(t: float) -> float:
    if t < -0.1 or t > 1.0:
        return 0.0
    if t > 0.35:
        return math.sqrt(max(0.0, 1.0 - ((t - 0.35) / 0.65) ** 2))
    return 1.0


def _lung_radius_fn(p: Patient, side: int, t: float):
    s = _lung_scale(t)
    rx = p.lung_w * 0.86 * s * (0.92 if side > 0 else 1.0)
    ry = p.lung_d * s
    h = p.lung_harm[0 if side < 0 else 1]
    k = np.arange(1, h.shape[0] + 1, dtype=np.float32)

    def fn(theta):
        base = 1.0 / np.sqrt((np.cos(theta) / rx) ** 2 + (np.sin(theta) / ry) ** 2)
        mod = 1.0 + np.sum(h[:, 0, None, None] * np.cos(k[:, None, None] * theta[None] + h[:, 1, None, None]), 0)
        # the medial side is flattened by the mediastinum
        medial = np.cos(theta) * (-side)
        base = base * (1.0 - 0.22 * np.clip(medial, 0, 1) ** 2)
        return base * mod

    return fn, max(rx, ry) * 1.5


def inside_lung(p: Patient, x: float, y: float, z: float, margin: float = 0.0) -> bool:
    t = z / p.height
    if _lung_scale(t) <= 0:
        return False
    for side in (-1, 1):
        cx, cy = _lung_center(p, side, t)
        fn, _ = _lung_radius_fn(p, side, t)
        th = np.array([[math.atan2(y - cy, x - cx)]], dtype=np.float32)
        if math.hypot(x - cx, y - cy) < float(fn(th)[0, 0]) - margin:
            # not inside the heart or the domes
            if _in_heart(p, x, y, t, margin) or _in_dome(p, x, y, t, margin):
                return False
            return True
    return False


def _heart_scale(t: float) -> float:
    return math.sqrt(max(0.0, 1.0 - ((t - 0.28) / 0.27) ** 2))


def _in_heart(p, x, y, t, margin=0.0) -> bool:
    s = _heart_scale(t)
    if s <= 0:
        return False
    return ((x - p.heart_x) / (p.heart_rx * s + margin)) ** 2 + ((y - p.heart_y) / (p.heart_ry * s + margin)) ** 2 < 1


def _dome(p: Patient, side: int, t: float):
    top = p.dome_right if side < 0 else p.dome_left
    tc = -0.35
    s = 1.0 - ((t - tc) / (top - tc)) ** 2 if t <= top else 0.0
    if s <= 0:
        return None
    cx, _ = _lung_center(p, side, 0.0)
    r = 0.95 * p.lung_w * math.sqrt(s)
    return cx, 0.1 * p.b, r * 1.05, r * 0.95 * p.lung_d / p.lung_w


def _in_dome(p, x, y, t, margin=0.0) -> bool:
    for side in (-1, 1):
        d = _dome(p, side, t)
        if d and ((x - d[0]) / (d[2] + margin)) ** 2 + ((y - d[1]) / (d[3] + margin)) ** 2 < 1:
            return True
    return False


def _lung_targets(rng, p: Patient, side: int, n: int) -> np.ndarray:
    """n points spread uniformly through one lung (rejection sampling)."""
    out = []
    tries = 0
    while len(out) < n and tries < 40 * n:
        tries += 1
        z = rng.uniform(0.02, 0.97) * p.height
        x = side * rng.uniform(0.0, 2.2) * p.lung_w
        y = rng.uniform(-1.1, 1.1) * p.lung_d
        if inside_lung(p, x, y, z, margin=2.0) and x * side > 0:
            out.append((x, y, z))
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def _vessel_tree(rng, p: Patient, side: int, n_targets: int = 384) -> np.ndarray:
    """Points (x, y, z, r) sampled along a space-filling pulmonary vessel tree of one lung.

    Each branch heads part-way to the centroid of the lung territory it supplies, then splits the
    territory in two along its longest axis; radii follow Murray's law (r^3 ~ territory size), from
    ~6 mm at the hilum to ~0.8 mm at the periphery."""
    hilum = np.array([side * (p.lung_w * 0.45 + 6), 0.02 * p.b, 0.55 * p.height])
    targets = _lung_targets(rng, p, side, n_targets)
    if len(targets) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    r0 = rng.uniform(5.0, 6.5)
    pts = []
    stack = [(hilum, targets, r0)]
    while stack:
        o, tg, r = stack.pop()
        c = tg.mean(0)
        if len(tg) == 1:
            end = c
        else:
            end = o + (c - o) * rng.uniform(0.35, 0.6)
        length = float(np.linalg.norm(end - o))
        n = max(2, int(length / max(0.4, 0.6 * r)) + 1)
        seg = o[None] + np.linspace(0, 1, n)[:, None] * (end - o)[None]
        # a gentle curve so that branches are not ruler-straight
        bend = rng.normal(size=3) * 0.08 * length
        seg += np.sin(np.linspace(0, np.pi, n))[:, None] * bend[None]
        pts.append(np.concatenate([seg, np.full((n, 1), r)], 1))
        if len(tg) == 1:
            continue
        d = tg - tg.mean(0)
        axis = np.linalg.svd(d, full_matrices=False)[2][0]
        proj = d @ axis
        order = np.argsort(proj)
        k = len(tg) // 2
        for part in (tg[order[:k]], tg[order[k:]]):
            stack.append((end, part, r * (len(part) / len(tg)) ** (1 / 3)))
    return np.concatenate(pts, 0).astype(np.float32)


def make_patient(
    seed: int, index: int, p_finding: float = 0.5, min_nodule_mm: float = 4.0, max_nodule_mm: float = 30.0
) -> Patient:
    rng = np.random.default_rng([seed, index, 7])
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(25, 88))
    a = rng.uniform(140, 175) * (1.0 if sex == "M" else 0.93)
    b = a * rng.uniform(0.62, 0.78)
    fat = rng.uniform(6, 32)
    muscle = rng.uniform(7, 16)
    height = rng.uniform(220, 290) * (1.0 if sex == "M" else 0.93)
    inner_w = a - fat - muscle
    lung_w = inner_w * rng.uniform(0.47, 0.55)
    lung_d = (b - fat - muscle) * rng.uniform(0.72, 0.86)
    p = Patient(
        index=index,
        sex=sex,
        age=age,
        a=a,
        b=b,
        fat=fat,
        muscle=muscle,
        height=height,
        lung_w=lung_w,
        lung_d=lung_d,
        lung_harm=np.stack([_harmonics(rng, 4, 0.1), _harmonics(rng, 4, 0.1)]).astype(np.float32),
        lung_hu=rng.uniform(-890, -820),
        heart_x=rng.uniform(0.08, 0.28) * a,
        heart_y=rng.uniform(-0.35, -0.15) * b,
        heart_rx=rng.uniform(0.33, 0.43) * inner_w,
        heart_ry=rng.uniform(0.42, 0.55) * (b - fat - muscle),
        heart_angle=rng.uniform(-0.6, -0.2),
        aorta_r=rng.uniform(11, 16) * (1 + (age - 50) / 300),
        spine_y=(b - fat - muscle) * rng.uniform(0.45, 0.6),
        vert_r=rng.uniform(15, 21),
        level_h=height / rng.uniform(9.5, 11.0),
        cortical_hu=rng.uniform(700, 1300) - 3 * (age - 40),
        cancellous_hu=max(110.0, rng.uniform(230, 330) - 2.2 * (age - 30)),
        rib_drop=rng.uniform(40, 75),
        dome_right=rng.uniform(0.14, 0.27),
        dome_left=0.0,
        table_gap=rng.uniform(5, 30),
        vessels=[],
        nodules=[],
        texture=rng.normal(size=(12, 9, 9)).astype(np.float32),
        name=f"SYNTH^CASE{index:04d}^{rng.choice(['ALPHA', 'BRAVO', 'CEDAR', 'DELTA', 'EMBER', 'FJORD'])}",
        pid=f"SYN{rng.integers(16**7, 16**8):08X}",
        birth="",
    )
    p.dome_left = p.dome_right - rng.uniform(0.02, 0.08)
    p.birth = f"{2024 - age:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    p.vessels = [_vessel_tree(rng, p, s) for s in (-1, 1)]
    if rng.random() < p_finding:
        for _ in range(int(rng.choice([1, 2, 2, 3, 3, 4, 5]))):
            nod = _make_nodule(rng, p, min_nodule_mm, max_nodule_mm)
            if nod is not None:
                p.nodules.append(nod)
    return p


def _make_nodule(rng, p: Patient, min_mm: float = 4.0, max_mm: float = 30.0) -> Nodule | None:
    kind = str(rng.choice(NODULE_TYPES, p=[0.55, 0.15, 0.2, 0.1]))
    d = float(np.exp(rng.uniform(np.log(min_mm), np.log(max_mm))))
    if kind == "calcified":
        d = min(d, max(10.0, min_mm))
    for _ in range(200):
        z = rng.uniform(0.12, 0.9) * p.height
        x = rng.uniform(-1.6, 1.6) * p.lung_w
        y = rng.uniform(-1.0, 1.0) * p.lung_d
        if inside_lung(p, x, y, z, margin=d * 0.3):
            break
    else:
        return None
    hu = {
        "solid": rng.uniform(10, 60),
        "part-solid": rng.uniform(-350, -150),
        "ground-glass": rng.uniform(-650, -400),
        "calcified": rng.uniform(250, 700),
    }[kind]
    lob = _harmonics(rng, 5, rng.uniform(0.0, 0.35) if kind != "calcified" else 0.05)
    spic = []
    if kind in ("solid", "part-solid") and rng.random() < 0.35:
        spic = [
            (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.3, 0.9) * d)) for _ in range(int(rng.integers(3, 8)))
        ]
    return Nodule(float(x), float(y), float(z), d, kind, float(hu), tuple(map(tuple, lob)), spic)


# ------------------------------------------------------------------------------------------ series


@dataclass
class Acquisition:
    size: int
    fov: float
    thickness: float
    spacing: float
    kvp: int
    noise: float  # HU standard deviation after the kernel blur
    blur: float  # kernel blur in mm
    contrast: bool
    blood_hu: float
    encoding: str  # "int16" | "int16-offset" | "uint16" | "uint16-slope"
    z_lo: float
    z_hi: float
    kernel: str


def make_acquisition(rng, p: Patient, size: int, thickness: float | None) -> Acquisition:
    th = float(thickness if thickness is not None else rng.choice([2.5, 3.0, 5.0], p=[0.4, 0.2, 0.4]))
    kvp = int(rng.choice([100, 120, 140], p=[0.25, 0.55, 0.2]))
    sharp = rng.random() < 0.5
    contrast = rng.random() < 0.4
    size_factor = (p.a / 160) ** 1.5
    noise = float(rng.uniform(8, 18) * size_factor * (120 / kvp) ** 1.2 * (1.6 if sharp else 1.0) * math.sqrt(2.5 / th))
    fov = float(min(500.0, 2 * p.a + rng.uniform(25, 70)))
    return Acquisition(
        size=size,
        fov=fov,
        thickness=th,
        spacing=th,
        kvp=kvp,
        noise=noise,
        blur=float(rng.uniform(0.5, 0.8) if sharp else rng.uniform(0.9, 1.4)),
        contrast=contrast,
        blood_hu=float(rng.uniform(150, 300) if contrast else rng.uniform(35, 48)),
        encoding=str(rng.choice(["int16", "int16-offset", "uint16", "uint16-slope"], p=[0.3, 0.2, 0.4, 0.1])),
        z_lo=float(-0.12 * p.height - rng.uniform(0, 20)),
        z_hi=float(1.04 * p.height + rng.uniform(0, 20)),
        kernel="LUNG" if sharp else "STANDARD",
    )


def render_slice(p: Patient, acq: Acquisition, z: float, rng) -> tuple[np.ndarray, list]:
    """One axial slice at height z (mm): HU float32 (size, size) and the nodules it shows."""
    ps = acq.fov / acq.size
    t = z / p.height
    cv = Canvas(acq.size, ps, 0.0, 0.0)
    # table: a curved shell below the body, with foam above it
    ty = p.b + p.table_gap
    cv.ellipse(0, ty + 420, 260, 420, 180.0)
    cv.ellipse(0, ty + 425, 255, 418, -950.0)
    cv.ellipse(0, ty + 405, 240, 400, -1000.0)

    # body outline: shoulders widen above the lungs, the abdomen below
    wa = p.a * (1.0 + 0.12 * max(0.0, t - 0.75) / 0.35 - 0.04 * max(0.0, -t))
    wb = p.b * (1.0 - 0.05 * max(0.0, t - 0.8))
    cv.ellipse(0, 0, wa, wb, rng.uniform(-110, -90))  # subcutaneous fat
    if p.sex == "F" and 0.25 < t < 0.75:
        bs = math.sin((t - 0.25) / 0.5 * math.pi)
        for side in (-1, 1):
            cv.ellipse(side * 0.45 * wa, -wb * 0.9, 0.3 * wa * bs + 1, 0.28 * wb * bs + 1, -95.0)
            cv.ellipse(side * 0.45 * wa, -wb * 0.93, 0.15 * wa * bs + 1, 0.12 * wb * bs + 1, 25.0)
    cv.ellipse(0, 0, wa - p.fat, wb - p.fat, 50.0)  # muscle
    ia, ib = wa - p.fat - p.muscle, wb - p.fat - p.muscle
    cv.ellipse(0, 0, ia, ib, -80.0)  # mediastinal / intra-thoracic fat

    # lungs
    for side in (-1, 1):
        if _lung_scale(t) <= 0:
            break
        cx, cy = _lung_center(p, side, t)
        fn, rmax = _lung_radius_fn(p, side, t)
        k = int(np.clip((t + 0.1) / 1.1 * (p.texture.shape[0] - 1), 0, p.texture.shape[0] - 1))
        tex = p.texture[k]

        def lung_value(x, y, tex=tex):
            grad = 45.0 * np.clip((y + p.b) / (2 * p.b), 0, 1)  # dependent lung is denser
            ty_ = np.clip((y / p.b + 1) / 2 * 8, 0, 8)
            tx_ = np.clip((x / p.a + 1) / 2 * 8, 0, 8)
            yy, xx = np.broadcast_arrays(ty_, tx_)
            texv = ndimage.map_coordinates(tex, [yy.ravel(), xx.ravel()], order=1).reshape(yy.shape)
            return p.lung_hu + grad + 18.0 * texv

        cv.polar(cx, cy, fn, rmax, lung_value)

    # diaphragm domes: liver (right), spleen/stomach (left)
    for side in (-1, 1):
        d = _dome(p, side, t)
        if d:
            cv.ellipse(d[0], d[1], d[2], d[3], 58.0 if side < 0 else 45.0)
            if side > 0 and t < 0.05 and d[2] > 30:
                cv.ellipse(d[0] + 0.2 * d[2], d[1] - 0.3 * d[3], 0.35 * d[2], 0.25 * d[3], -1000.0)

    # heart with epicardial fat, chambers, myocardium
    hs = _heart_scale(t)
    if hs > 0:
        cv.ellipse(p.heart_x, p.heart_y, p.heart_rx * hs + 5, p.heart_ry * hs + 5, -95.0, angle=p.heart_angle)
        cv.ellipse(p.heart_x, p.heart_y, p.heart_rx * hs, p.heart_ry * hs, 48.0, angle=p.heart_angle)
        cv.ellipse(
            p.heart_x - 0.25 * p.heart_rx * hs,
            p.heart_y,
            0.45 * p.heart_rx * hs,
            0.55 * p.heart_ry * hs,
            acq.blood_hu,
            angle=p.heart_angle,
        )
        cv.ellipse(
            p.heart_x + 0.35 * p.heart_rx * hs,
            p.heart_y + 0.1 * p.heart_ry * hs,
            0.3 * p.heart_rx * hs,
            0.45 * p.heart_ry * hs,
            acq.blood_hu,
            angle=p.heart_angle,
        )

    # great vessels, trachea and bronchi, oesophagus
    desc = (p.spine_y * 0.2 + 0.12 * p.a, p.spine_y - p.vert_r - p.aorta_r * 0.3)
    if t < 0.74:
        cv.ellipse(desc[0], desc[1], p.aorta_r * 0.9, p.aorta_r * 0.9, acq.blood_hu)
    if 0.5 < t < 0.76:
        cv.ellipse(-0.05 * p.a, p.heart_y - 0.1 * p.b, p.aorta_r, p.aorta_r, acq.blood_hu)
    if 0.74 <= t < 0.82:
        cv.ellipse((desc[0] - 0.05 * p.a) / 2, (desc[1] + p.heart_y) / 2, 0.3 * p.a, p.aorta_r, acq.blood_hu, angle=0.6)
    if 0.5 < t < 0.63:
        cv.ellipse(0.06 * p.a, p.heart_y + 0.05 * p.b, p.aorta_r * 1.1, p.aorta_r * 1.1, acq.blood_hu)
    tr_y = -0.1 * p.b
    if t >= 0.6:
        cv.ellipse(0, tr_y, 10.5, 9.5, 40.0)
        cv.ellipse(0, tr_y, 8.5, 7.5, -1000.0)
    elif t > 0.45:
        off = (0.6 - t) / 0.15 * 0.3 * p.lung_w + 6
        for side in (-1, 1):
            cv.ellipse(side * off, tr_y + 4, 6.5, 6.0, 40.0)
            cv.ellipse(side * off, tr_y + 4, 5.0, 4.5, -1000.0)
    if t > 0.2:
        cv.ellipse(-0.03 * p.a, p.spine_y - p.vert_r - 10, 7, 5, 35.0)

    # paraspinal muscles, and the scapulae in the posterior chest wall above mid-chest
    for side in (-1, 1):
        cv.ellipse(side * 0.19 * ia, p.spine_y + p.vert_r + 20, 0.16 * ia, 20.0, 52.0)
    if t > 0.55:
        for side in (-1, 1):
            a_ = 0.95  # angle on the wall, from the lateral axis towards posterior
            rx_, ry_ = ia + 0.75 * p.muscle, ib + 0.75 * p.muscle
            x, y = side * rx_ * math.cos(a_), ry_ * math.sin(a_)
            tang = math.atan2(ry_ * math.cos(a_), -side * rx_ * math.sin(a_))
            cv.ellipse(x, y, 0.28 * wa, 7.0, 50.0, angle=tang)
            cv.ellipse(x, y, 0.25 * wa, 2.5, p.cortical_hu * 0.8, angle=tang)

    # spine: vertebral body or disc, canal, posterior elements
    phase = (z % p.level_h) / p.level_h
    vy = p.spine_y
    if phase < 0.2:
        cv.ellipse(0, vy, p.vert_r, p.vert_r * 0.9, 85.0)  # disc
    else:
        cv.ellipse(0, vy, p.vert_r, p.vert_r * 0.9, p.cortical_hu)
        cv.ellipse(0, vy, p.vert_r - 2.2, p.vert_r * 0.9 - 2.2, p.cancellous_hu)
    cv.ellipse(0, vy + p.vert_r + 12, 11, 9, p.cortical_hu * 0.9)
    cv.ellipse(0, vy + p.vert_r + 11, 7.5, 6.5, 12.0)  # canal (CSF)
    cv.ellipse(0, vy + p.vert_r + 30, 5, 12, p.cortical_hu * 0.85)  # spinous process
    for side in (-1, 1):
        cv.ellipse(side * 22, vy + p.vert_r + 14, 12, 5, p.cortical_hu * 0.85, angle=side * 0.4)

    # ribs: rib i leaves its vertebra at z_i and runs round the chest wall, dropping rib_drop mm
    top = 1.02 * p.height
    for i in range(12):
        zi = top - (i + 0.5) * p.level_h * 1.0
        f = (zi - z) / p.rib_drop  # fraction of the way round where this rib crosses the slice
        if not -0.02 <= f <= 1.0:
            continue
        phi = 0.35 + f * 2.2  # angle from posterior midline
        for side in (-1, 1):
            ang = math.pi / 2 - side * phi  # 0 = patient left, pi/2 = posterior
            rx, ry = ia + 3, ib + 3
            x, y = rx * math.cos(ang), ry * math.sin(ang)
            cv.ellipse(x, y, 9.0, 5.0, p.cortical_hu, angle=ang + math.pi / 2)
            cv.ellipse(x, y, 6.5, 2.8, p.cancellous_hu * 0.9, angle=ang + math.pi / 2)
    if 0.25 < t < 0.85:
        cv.ellipse(0, -ib - 4, 14, 6, p.cortical_hu * 0.8)
        cv.ellipse(0, -ib - 4, 11, 3.5, p.cancellous_hu)

    # pulmonary vessels: spheres along the tree, partial volume over the slice thickness
    half = acq.thickness / 2
    for pts in p.vessels:
        dz = np.abs(pts[:, 2] - z)
        sel = dz < pts[:, 3] + half
        if not sel.any():
            continue
        q = pts[sel]
        dz = np.maximum(0.0, dz[sel] - half)
        r = np.sqrt(np.maximum(0.0, q[:, 3] ** 2 - dz**2))
        opac = np.clip((q[:, 3] * 2) / acq.thickness, 0.25, 1.0)
        keep = r > 0.3
        cv.disks(q[keep, 0], q[keep, 1], r[keep], acq.blood_hu * 0.6 + 20, opac[keep])

    shown = []
    for nod in p.nodules:
        dzn = max(0.0, abs(nod.z - z) - half)
        r = nod.radius_at(dzn)
        # a slice shows a nodule exactly when it is labelled with it (cross-section >= 3 mm), wherever
        # the centre lies: fainter caps drawn but not labelled were positives marked negative
        if r < MIN_SHOWN_RADIUS_MM:
            continue
        chord = min(acq.thickness, 2 * math.sqrt(max(0.0, (nod.diameter / 2) ** 2 - dzn**2)))
        opac = float(np.clip(chord / acq.thickness, 0.2, 1.0))
        amp = np.array(nod.lobulation, dtype=np.float32)
        k = np.arange(1, len(amp) + 1, dtype=np.float32)

        def rfn(theta, r=r, amp=amp, k=k):
            return r * (
                1 + np.sum(amp[:, 0, None, None] * np.cos(k[:, None, None] * theta[None] + amp[:, 1, None, None]), 0)
            )

        if nod.kind == "part-solid":
            cv.polar(nod.x, nod.y, rfn, r * 1.5, nod.hu, opacity=opac)
            cv.ellipse(nod.x, nod.y, r * 0.45, r * 0.45, rng.uniform(0, 50), opacity=opac)
        else:
            cv.polar(nod.x, nod.y, rfn, r * 1.5, nod.hu, opacity=opac)
        for ang, ln in nod.spicules:
            cv.ellipse(
                nod.x + math.cos(ang) * (r + ln / 2),
                nod.y + math.sin(ang) * (r + ln / 2),
                ln / 2,
                0.6,
                nod.hu,
                angle=ang,
                opacity=opac * 0.8,
            )
        shown.append((nod, 2 * r))

    # reconstruction: blur (kernel) on signal + white noise -> correlated noise of std acq.noise
    sigma = acq.blur / ps
    noise = rng.standard_normal(cv.img.shape, dtype=np.float32)
    gain = 2 * math.sqrt(math.pi) * max(sigma, 0.5)  # blur of unit white noise leaves 1/(2 sqrt(pi) sigma)
    cv.img += noise * np.float32(acq.noise * gain)
    out = ndimage.gaussian_filter(cv.img, sigma, truncate=3.0) if sigma > 0.25 else cv.img
    return out, shown


# ------------------------------------------------------------------------------------------- DICOM


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid  # noqa: PLC0415 (lazy: optional dependency)

    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=["sparkct-synth", *map(str, parts)]))


def _encode(hu: np.ndarray, enc: str):
    hu = np.clip(np.rint(hu), -1024, 3071)
    if enc == "int16":
        return hu.astype(np.int16), 1.0, 0.0, 1
    if enc == "int16-offset":
        return (hu + 1024).astype(np.int16), 1.0, -1024.0, 1
    if enc == "uint16":
        return (hu + 1024).astype(np.uint16), 1.0, -1024.0, 0
    return ((hu + 1024) * 2).astype(np.uint16), 0.5, -1024.0, 0  # slope 0.5


def _base_dataset(p: Patient, acq: Acquisition, study_uid: str, series_uid: str, series_no: int, seed: int):
    from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415 (lazy: optional dependency)
    from pydicom.uid import ExplicitVRLittleEndian  # noqa: PLC0415 (lazy: optional dependency)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.Manufacturer = "sparkct synth"
    ds.ManufacturerModelName = "phantom v1"
    ds.PatientName = p.name
    ds.PatientID = p.pid
    ds.PatientBirthDate = p.birth
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{acq.thickness:g}"
    ds.KVP = str(acq.kvp)
    ds.ConvolutionKernel = acq.kernel
    ds.PatientPosition = "HFS"
    if acq.contrast:
        ds.ContrastBolusAgent = "IODINE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_no
    ds.FrameOfReferenceUID = _uid(seed, p.index, "for", series_no)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = acq.size
    ds.Columns = acq.size
    ps = acq.fov / acq.size
    ds.PixelSpacing = [f"{ps:.6f}", f"{ps:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    return ds


def _write(ds, path: str):
    # atomic: an interrupted synth never leaves a truncated DICOM that a later prepare would skip
    with sio.atomic_path(path, ".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)


@dataclass
class SynthReport:
    patients: int = 0
    series: int = 0
    slices: int = 0
    positives: int = 0
    seconds: float = 0.0
    out: str = ""

    def summary(self) -> str:
        return (
            f"wrote {self.series} series ({self.slices} slices) of {self.patients} patients, "
            f"{self.positives} series with nodules, to {self.out} in {self.seconds:.1f} s "
            f"({self.slices / max(self.seconds, 1e-9):.0f} slices/s)"
        )


def _check_synth_args(dst, patients, size, thickness, series_per_patient, p_finding, slices) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(patients) or patients < 1:
        raise UserError(f"patients must be an integer >= 1, got {patients!r}")
    if not is_int(size) or not 32 <= size <= 2048:
        raise UserError(f"size must be an integer in [32, 2048], got {size!r}")
    if thickness is not None and not (isinstance(thickness, (int, float)) and 0.1 <= thickness <= 50):
        raise UserError(f"thickness must be in [0.1, 50] mm, got {thickness!r}")
    lo, hi = series_per_patient
    if not (is_int(lo) and is_int(hi) and 1 <= lo <= hi):
        raise UserError(f"series per patient must satisfy 1 <= min <= max, got {lo!r}, {hi!r}")
    if not (isinstance(p_finding, (int, float)) and 0 <= p_finding <= 1):
        raise UserError(f"p_finding must be in [0, 1], got {p_finding!r}")
    if slices is not None and (not is_int(slices) or slices < 1):
        raise UserError(f"slices must be an integer >= 1, got {slices!r}")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"DST {dst!r} exists and is not a folder")


_D = SYNTH_DEFAULTS


def synth(
    dst: str,
    *,
    patients: int = _D.patients,
    seed: int = _D.seed,
    size: int = _D.size,
    thickness: float | None = _D.thickness,
    series_per_patient: tuple[int, int] = (_D.min_series, _D.max_series),
    p_finding: float = _D.p_finding,
    localizer: bool = _D.localizer,
    progress: bool = False,
    slices: int | None = _D.slices,
    min_nodule_mm: float = 4.0,
    max_nodule_mm: float = 30.0,
) -> SynthReport:
    """Write `patients` synthetic chest CT patients (1-2 series each) under dst (see the module doc;
    the options' defaults: :class:`sparkct.data.options.SynthOptions`).

    size: rows = columns; thickness: slice thickness = spacing in mm (random per series when None);
    slices: a fixed number of slices per series (centred on the chest) instead of the full chest;
    min_nodule_mm, max_nodule_mm: the nodule diameters' range (log-uniform; above 30 mm a lesion is a mass)."""
    _check_synth_args(dst, patients, size, thickness, series_per_patient, p_finding, slices)
    if not (isinstance(min_nodule_mm, (int, float)) and 1.0 <= min_nodule_mm <= 30.0):
        raise UserError(f"min_nodule_mm must be in [1, 30] mm, got {min_nodule_mm!r}")
    if not (isinstance(max_nodule_mm, (int, float)) and min_nodule_mm <= max_nodule_mm <= 60.0):
        raise UserError(f"max_nodule_mm must be in [min_nodule_mm, 60] mm, got {max_nodule_mm!r}")
    t0 = time.perf_counter()
    rep = SynthReport(out=dst)
    series_rows, slice_rows, nodule_rows = [], [], []
    bar = None
    if progress:
        bar = tqdm(total=patients, desc="synth", unit="patient")
    for i in range(patients):
        p = make_patient(seed, i, p_finding, min_nodule_mm, max_nodule_mm)
        rng = np.random.default_rng([seed, i, 11])
        study_uid = _uid(seed, i, "study")
        n_series = int(rng.integers(series_per_patient[0], series_per_patient[1] + 1))
        case_dir = os.path.join(dst, "dicom", f"case_{i:04d}")
        for s in range(n_series):
            acq = make_acquisition(rng, p, size, thickness)
            series_uid = _uid(seed, i, "series", s)
            ds = _base_dataset(p, acq, study_uid, series_uid, s + 1, seed)
            zs = np.arange(acq.z_hi, acq.z_lo, -acq.spacing)
            if slices is not None:
                mid = 0.5 * p.height
                zs = mid + (np.arange(slices)[::-1] - (slices - 1) / 2) * acq.spacing
            sdir = os.path.join(case_dir, f"series_{s + 1}")
            os.makedirs(sdir, exist_ok=True)
            ps = acq.fov / acq.size
            pos_label = 0
            seen: dict[int, Nodule] = {}  # the nodules some slice shows, by identity
            proj = []
            srng = np.random.default_rng([seed, i, s, 13])
            for k, z in enumerate(zs):
                hu, shown = render_slice(p, acq, float(z), srng)
                proj.append(hu.mean(0))
                stored, slope, icpt, rep_ = _encode(hu, acq.encoding)
                ds.PixelRepresentation = rep_
                ds.RescaleSlope = f"{slope:g}"
                ds.RescaleIntercept = f"{icpt:g}"
                ds.RescaleType = "HU"
                sop = _uid(seed, i, s, k)
                ds.SOPInstanceUID = sop
                ds.file_meta.MediaStorageSOPInstanceUID = sop
                ds.InstanceNumber = k + 1
                ds.ImagePositionPatient = [f"{-(size - 1) / 2 * ps:.4f}", f"{-(size - 1) / 2 * ps:.4f}", f"{z:.4f}"]
                ds.SliceLocation = f"{z:.4f}"
                ds.PixelData = stored.tobytes()
                _write(ds, os.path.join(sdir, _util.stable_hash(sop, 12) + ".dcm"))
                lab = int(bool(shown))
                pos_label |= lab
                seen.update((id(n), n) for n, _ in shown)
                slice_rows.append(
                    [series_uid, k + 1, f"{z:.4f}", lab, len(shown), f"{max((d for _, d in shown), default=0.0):.2f}"]
                )
            rep.slices += len(zs)
            rep.series += 1
            # the series' nodules are those its slices show, so a positive series always has its nodules'
            # types, also one whose centre lies outside the slices' z range
            in_range = [n for n in p.nodules if id(n) in seen]
            rep.positives += pos_label
            series_rows.append(
                [
                    series_uid,
                    study_uid,
                    pos_label,
                    len(in_range),
                    f"{max((n.diameter for n in in_range), default=0.0):.2f}",
                    ";".join(sorted({n.kind for n in in_range})),
                    len(zs),
                    f"{acq.thickness:g}",
                    acq.kvp,
                    acq.kernel,
                    int(acq.contrast),
                ]
            )
            for n in in_range:
                nodule_rows.append(
                    [series_uid, f"{n.x:.2f}", f"{n.y:.2f}", f"{n.z:.2f}", f"{n.diameter:.2f}", n.kind, f"{n.hu:.0f}"]
                )
            if localizer and s == 0:
                _write_localizer(p, acq, np.array(proj), zs, study_uid, seed, case_dir)
        rep.patients += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    def table(header, rows):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()

    sio.write_text_atomic(
        os.path.join(dst, "labels.csv"),
        table(
            [
                "series_uid",
                "study_uid",
                "label",
                "n_nodules",
                "max_diameter_mm",
                "nodule_types",
                "n_slices",
                "thickness_mm",
                "kvp",
                "kernel",
                "contrast",
            ],
            series_rows,
        ),
    )
    sio.write_text_atomic(
        os.path.join(dst, "slice_labels.csv"),
        table(["series_uid", "instance_number", "z_mm", "label", "n_nodules", "max_diameter_mm"], slice_rows),
    )
    sio.write_text_atomic(
        os.path.join(dst, "nodules.csv"),
        table(["series_uid", "x_mm", "y_mm", "z_mm", "diameter_mm", "type", "hu"], nodule_rows),
    )
    rep.seconds = time.perf_counter() - t0
    sio.write_json_atomic(
        os.path.join(dst, "synth.json"),
        {
            "generator": "sparkct synth",
            "seed": seed,
            "patients": patients,
            "size": size,
            "thickness": thickness,
            "series_per_patient": list(series_per_patient),
            "p_finding": p_finding,
            "slices": slices,
            "min_nodule_mm": min_nodule_mm,
            "max_nodule_mm": max_nodule_mm,
            "series": rep.series,
            "total_slices": rep.slices,
            "positive_series": rep.positives,
        },
    )
    return rep


def _write_localizer(p: Patient, acq: Acquisition, proj: np.ndarray, zs, study_uid: str, seed: int, case_dir: str):
    """A coronal scout (mean projection) as its own series; ImageType LOCALIZER."""
    ds = _base_dataset(p, acq, study_uid, _uid(seed, p.index, "localizer"), 100, seed)
    img = np.clip(np.rint(proj), -1024, 3071).astype(np.int16)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.Rows, ds.Columns = img.shape
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ps = acq.fov / acq.size
    ds.PixelSpacing = [f"{acq.spacing:.6f}", f"{ps:.6f}"]
    ds.ImagePositionPatient = [f"{-(acq.size - 1) / 2 * ps:.4f}", "0", f"{zs[0]:.4f}"]
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    sop = _uid(seed, p.index, "localizer", 0)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = 1
    ds.PixelData = img.tobytes()
    d = os.path.join(case_dir, "localizer")
    os.makedirs(d, exist_ok=True)
    _write(ds, os.path.join(d, _util.stable_hash(sop, 12) + ".dcm"))
