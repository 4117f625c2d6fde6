"""Robustness of a fine-tuned classifier: its test AUC under fixed perturbations of the test slices.

:data:`PERTURBATIONS` is the one table of what is tested: a kind and a level each.

- ``hu_shift``: HU + d (a miscalibrated scanner, another contrast phase);
- ``hu_scale``: HU x s about water (0 HU): a calibration gain;
- ``noise``: Gaussian noise of sigma HU per pixel of the model's input (CTAugment's noise op, so sigma
  means what the training augmentation's ``noise`` means); a slice's noise field is the same at every
  sigma (common random numbers), so the levels differ only in strength;
- ``rotate``: rotation about the slice's centre by a fixed angle (degrees);
- ``zoom``: scaling about the centre: s > 1 enlarges (the centre 1/s of the slice fills the input),
  s < 1 shrinks it inside air.

All act on the HU slice before windowing: rotation and scaling resample the slice at its own
resolution (bilinear, air outside), then the evaluation transform (:class:`sparkct.data.CTResize`:
the antialiased resize to the crop and the windows) runs with the HU shift, scale and noise of the
perturbation in its parameters. A perturbation at its identity level is therefore the clean
evaluation to the bit. Nothing is random per call: a perturbed slice depends only on the slice (its
index in the cache), the perturbation and :data:`NOISE_SEED`, so every method, seed and batch size
sees the same perturbed test set (on one kind of device: noise on the CPU comes from CTAugment's fixed
noise bank, on CUDA from per-slice generator seeds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sparkct.data.augment import CTResize, affine_grid, crop_theta

__all__ = ["Kind", "KINDS", "PERTURBATIONS", "NOISE_SEED", "Perturbation", "evaluate_robustness", "robustness_summary"]


class Kind(NamedTuple):
    label: str  # for reports
    unit: str  # of its level
    identity: float  # the level that changes nothing
    fmt: str  # one perturbation's label, from its level


KINDS = {
    "hu_shift": Kind("HU shift", "HU", 0.0, "HU shift {:+g} HU"),
    "hu_scale": Kind("HU scale", "factor", 1.0, "HU x {:g}"),
    "noise": Kind("Gaussian noise", "sigma, HU", 0.0, "noise sigma {:g} HU"),
    "rotate": Kind("rotation", "degrees", 0.0, "rotation {:g}°"),
    "zoom": Kind("scaling", "factor", 1.0, "scaling x {:g}"),
}

#: the noise fields' seed: fixed, so every run is tested on the same noisy slices
NOISE_SEED = 20261207


@dataclass(frozen=True)
class Perturbation:
    kind: str
    level: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; kinds: {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        """A key for results and predictions.npz, e.g. ``hu_shift_50``, ``zoom_0.85``."""
        return f"{self.kind}_{self.level:g}"

    @property
    def label(self) -> str:
        """For tables, e.g. ``HU shift +50 HU``, ``scaling x 0.85``."""
        return KINDS[self.kind].fmt.format(self.level)

    @property
    def identity(self) -> bool:
        return self.level == KINDS[self.kind].identity

    def describe(self) -> dict:
        """Its definition for result.json, all a report needs to label and plot it."""
        k = KINDS[self.kind]
        return {
            "name": self.name,
            "kind": self.kind,
            "level": self.level,
            "label": self.label,
            "kind_label": k.label,
            "unit": k.unit,
            "identity_level": k.identity,
        }

    def __call__(self, hu: torch.Tensor, ids: np.ndarray, transform: CTResize) -> torch.Tensor:
        """The perturbed, evaluation-transformed batch of HU slices `hu` (B, 1, H, W) whose cache slice
        indices are `ids` (they seed the noise)."""
        x = hu
        B, _, H, W = x.shape
        if self.kind in ("rotate", "zoom") and not self.identity:
            x = self._resample(x, transform.aug.pad_hu)
        p = transform.params(B, (H, W))
        full = torch.full((B,), float(self.level), dtype=torch.float64)
        if self.kind == "hu_shift":
            p = dataclasses.replace(p, hu_shift=full)
        elif self.kind == "hu_scale":
            p = dataclasses.replace(p, hu_scale=full)
        elif self.kind == "noise" and not self.identity:
            p = dataclasses.replace(p, noise_sigma=full, **_noise_draw(ids))
        return transform.aug.apply(x, p)

    def _resample(self, hu: torch.Tensor, pad_hu: float) -> torch.Tensor:
        B, _, H, W = hu.shape
        angle = math.radians(self.level) if self.kind == "rotate" else 0.0
        side = 1.0 / self.level if self.kind == "zoom" else 1.0
        one = torch.ones(B, dtype=torch.float64)
        theta = crop_theta((H, W), (one * W * side, one * H * side), (one * W / 2, one * H / 2), one * angle, one, one)
        grid = affine_grid(theta.to(hu.device), (H, W))
        # in HU - pad_hu, so that the zero padding outside the slice reads air
        y = F.grid_sample(hu.float() - pad_hu, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return y + pad_hu


def _noise_draw(ids: np.ndarray) -> dict:
    """CTAugment's per-sample noise parameters, each slice's drawn from (NOISE_SEED, its index) alone."""
    rs = [np.random.default_rng([NOISE_SEED, int(i)]) for i in np.asarray(ids).reshape(-1)]
    return {
        "noise_tile": torch.tensor([int(r.integers(1 << 30)) for r in rs], dtype=torch.int64),
        "noise_offset": torch.tensor(np.array([r.random(2) for r in rs]).reshape(-1, 2), dtype=torch.float64),
        "noise_op": torch.tensor([int(r.integers(8)) for r in rs], dtype=torch.int64),
        "noise_seed": torch.tensor([int(r.integers(1 << 62)) for r in rs], dtype=torch.int64),
    }


def _table(spec) -> tuple[Perturbation, ...]:
    return tuple(Perturbation(k, float(v)) for k, levels in spec for v in levels)


#: what the robustness test applies, mild then strong per kind (the fine-tuning augmentation draws HU
#: shifts within 20 HU, gains within 3 %, noise up to 15 HU, rotations within 10 degrees and no scaling)
PERTURBATIONS = _table(
    (
        ("hu_shift", (50, 100)),
        ("hu_scale", (0.9, 1.1)),
        ("noise", (20, 40)),
        ("rotate", (10, 20)),
        ("zoom", (0.85, 1.15)),
    )
)


def evaluate_robustness(model, dataset, *, perturbations=PERTURBATIONS, **evaluate_kw) -> dict[str, dict]:
    """:func:`sparkct.eval.finetune.evaluate` of `model` on `dataset` under each perturbation: name ->
    its result (metrics with bootstrap CIs, the units' probabilities, labels and patients)."""
    from sparkct.eval.finetune import evaluate  # noqa: PLC0415 (finetune imports this module)

    return {p.name: evaluate(model, dataset, perturbation=p, **evaluate_kw) for p in perturbations}


def robustness_summary(results: dict[str, dict], perturbations=PERTURBATIONS) -> dict:
    """What result.json keeps of :func:`evaluate_robustness`'s results: per perturbation, in the table's
    order, its definition, the test AUC with its CI and the number of units."""
    out = []
    for p in perturbations:
        r = results[p.name]
        a = r["metrics"]["auc"]
        out.append(
            {
                **p.describe(),
                "auc": {k: a[k] for k in ("value", "low", "high")},
                "n_units": r["n_units"],
                "n_patients": r["n_patients"],
            }
        )
    return {"noise_seed": NOISE_SEED, "perturbations": out}
