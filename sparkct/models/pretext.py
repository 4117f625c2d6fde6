"""Pretext tasks of the chest-CT pretraining literature, each a method on the one trainer.

* ``rotation``: predict which of 0/90/180/270 degrees a slice was turned by (4-way);
* ``flip``: predict whether a slice was mirrored left-right (2-way; CT anatomy is not symmetric: heart,
  aortic arch, liver dome);
* ``denoise``: reconstruct the windowed slice from a copy with added Gaussian noise;
* ``inpaint``: reconstruct a random box that was blanked out (loss on the box only);
* ``nextslice``: given two slices A and B, is B the next slice after A in the same series? Pairs come
  from the cache's series index through the loader (``Method.pairs`` -> ``sparkct.data.SlicePairs``):
  half positives (k, k+1), half negatives: a slice of the same series at least ``--gap`` slices away
  (by default 75 %) or a slice of another series (25 %, ``--p-other``).

Next-slice negatives, the choice: the chest-CT study this follows (Tariq et al., J. Med. Imaging 2024,
15 M slices; five pretext tasks) names the task (next slice prediction), but its abstract, the part
read for this, does not say how negatives are drawn; this is our choice. Negatives from other series
alone are solved by telling
patients and scanners apart (body size, noise, kernel): that teaches exactly the shortcuts the study's
bias probes look for. Same-series negatives keep patient and acquisition fixed, so only anatomy along
the body axis separates them; a gap of 3 slices (not 2) keeps them from being near-duplicates of the
positive in thin-slice series, where slice k+2 differs from k+1 by noise alone. A quarter from other
series keeps the task from ignoring patient identity completely and covers series too short for the
gap. A and B get the same crop and intensity augmentation (one draw per pair), so the difference
between them is anatomy, not augmentation. Order is not asked (k-1 is never drawn as a negative with
gap >= 2): the head sees (f_A, f_B, |f_A - f_B|), a two-layer MLP, since a linear map of (f_A, f_B)
alone cannot compare the two.

The classification tasks put a linear head on the pooled backbone features; the reconstruction tasks
put SparK's light decoder (``sparkct.models.spark.decoder.LightDecoder``) on the backbone's four stages
(1x1 projections into the decoder's blocks). Per-sample randomness (the rotation, the flip, the noise,
the box) is drawn for the global batch from ``step_generator`` and each rank takes its rows, so resume
and DDP draw what one uninterrupted process draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparkct.data.augment import CTAugment
from sparkct.data.datasets import SlicePairs
from sparkct.distributed import rank, world_size
from sparkct.errors import UserError
from sparkct.models.backbone import feature_dim, is_vit
from sparkct.models.base import Method, MethodConfig
from sparkct.models.spark.decoder import LightDecoder

__all__ = ["PretextConfig", "NextSliceConfig", "Rotation", "Flip", "Denoise", "Inpaint", "NextSlice"]


@dataclass
class PretextConfig(MethodConfig):
    decoder_width: int = field(
        default=256,
        metadata={"help": "denoise/inpaint: width of the light decoder (SparK's halving rule; multiple of 32)"},
    )
    noise: float = field(default=0.15, metadata={"help": "denoise: noise std in windowed units ([0, 1] range)"})
    box: tuple[float, float] = field(
        default=(0.15, 0.4), metadata={"help": "inpaint: box side as a fraction of the crop, low,high"}
    )
    crop_scale: tuple[float, float] = field(
        default=(0.5, 1.0), metadata={"help": "random resized crop scale range, low,high"}
    )

    def validate(self) -> None:
        if not isinstance(self.decoder_width, int) or self.decoder_width < 32 or self.decoder_width % 32:
            raise UserError(f"--decoder-width must be a positive multiple of 32, got {self.decoder_width}")
        if not 0 < self.noise < 10:
            raise UserError(f"--noise must be in (0, 10), got {self.noise}")
        lo, hi = self.box
        if not 0 < lo <= hi < 1:
            raise UserError(f"--box must satisfy 0 < low <= high < 1, got {self.box}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"--crop-scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")


class _Pretext(Method):
    # NextSlice's config is not a PretextConfig (other fields): both have crop_scale, all transform() reads
    config_class: type[PretextConfig] | type[NextSliceConfig] = PretextConfig
    config: PretextConfig | NextSliceConfig
    defaults = {
        "optimizer": "adamw",
        "base_lr": 1e-3,
        "weight_decay": 0.05,
        "weight_decay_end": None,
        "warmup_epochs": 1.0,
        "betas": (0.9, 0.999),
    }
    #: geometric augmentation that would give the task's answer away is switched off
    hflip: float = 0.5

    def transform(self, crop: int, windows):
        c = self.config
        return CTAugment(
            crop,
            windows=windows,
            scale=tuple(c.crop_scale),
            hflip=self.hflip,
            rotate=0.0,
            p_rotate=0.0,
            p_noise=0.0,
            p_blur=0.0,
        )

    def _draw(self, step: int, n: int, fn) -> Tensor:
        """fn(generator, global_n) -> tensor with the global batch first; this rank's rows."""
        g = self.step_generator(step)
        full = fn(g, n * world_size())
        return full[rank() * n : (rank() + 1) * n]


class _Classification(_Pretext):
    config: PretextConfig
    n_classes = 2

    def __init__(self, backbone: nn.Module, config: PretextConfig | None = None):
        super().__init__(backbone, config)
        self.head = nn.Linear(feature_dim(backbone), self.n_classes)

    def corrupt(self, x: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def _labels(self, x: Tensor, step: int) -> Tensor:
        return self._draw(step, x.shape[0], lambda g, n: torch.randint(self.n_classes, (n,), generator=g)).to(x.device)

    def training_step(self, batch: Tensor, step: int):
        y = self._labels(batch, step)
        logits = self.head(self.backbone(self.corrupt(batch, y)))
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().detach()}

    def loss_reference(self, batch: int) -> float | None:
        return math.log(self.n_classes)  # uniform over the equally likely labels: chance

    @torch.no_grad()
    def preview(self, batch: Tensor):
        x = batch[:8]
        y = torch.arange(x.shape[0], device=x.device) % self.n_classes
        return {"input": x, f"task ({self.name})": self.corrupt(x, y)}


class Rotation(_Classification):
    """Rotation prediction: which of 0/90/180/270 degrees a slice was turned by."""

    name = "rotation"
    n_classes = 4
    hflip = 0.5

    def corrupt(self, x: Tensor, labels: Tensor) -> Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise UserError(f"rotation needs square crops, got {tuple(x.shape[-2:])}")
        out = x.clone()
        for k in range(1, 4):
            idx = (labels == k).nonzero().flatten()
            if len(idx):
                out[idx] = torch.rot90(x[idx], k, dims=(2, 3))
        return out


class Flip(_Classification):
    """Flip prediction: whether a slice was mirrored left-right."""

    name = "flip"
    n_classes = 2
    hflip = 0.0  # a random flip in the augmentation would make the label meaningless

    def corrupt(self, x: Tensor, labels: Tensor) -> Tensor:
        return torch.where(labels.view(-1, 1, 1, 1).bool(), x.flip(-1), x)


class _Reconstruction(_Pretext):
    config: PretextConfig

    def __init__(self, backbone: nn.Module, config: PretextConfig | None = None):
        if is_vit(backbone):
            raise UserError(self.resnet_only)
        super().__init__(backbone, config)
        chans = cast(nn.Conv2d, backbone.conv1).in_channels
        self.decoder = LightDecoder(out_chans=chans, width=self.config.decoder_width)
        stage_ch = [_out_channels(getattr(backbone, n)) for n in ("layer4", "layer3", "layer2", "layer1")]
        self.proj = nn.ModuleList([nn.Conv2d(c, w, 1) for c, w in zip(stage_ch, self.decoder.in_widths)])

    def stages(self, x: Tensor) -> list[Tensor]:
        b: Any = self.backbone  # a torchvision ResNet (untyped): its modules by name
        h = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        feats = []
        for n in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(b, n)(h)
            feats.append(h)
        return feats[::-1]

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder([p(f) for p, f in zip(self.proj, self.stages(x))])

    def corrupt(self, x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(corrupted input, weight map of where the loss counts)."""
        raise NotImplementedError

    def training_step(self, batch: Tensor, step: int):
        xin, where = self.corrupt(batch, step)
        out = self.reconstruct(xin).float()
        err = (out - batch.float()).square() * where
        loss = err.sum() / (where.sum() * batch.shape[1]).clamp_min(1)
        return loss, {}

    @torch.no_grad()
    def preview(self, batch: Tensor):
        x = batch[:8]
        xin, _ = self.corrupt(x, 0)
        return {"input": x, f"corrupted ({self.name})": xin, "reconstruction": self.reconstruct(xin).clamp(0, 1)}


_ON_STAGES = (
    " puts SparK's light decoder on a ResNet's four feature stages (strides 4-32), which a ViT backbone "
    "does not have; use a ResNet --arch, or rotation / flip / nextslice with the ViT"
)


def _out_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return cast(nn.BatchNorm2d, last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


class Denoise(_Reconstruction):
    """Denoising: reconstruct the slice from a copy with Gaussian noise added."""

    name = "denoise"
    resnet_only = "denoise" + _ON_STAGES

    def corrupt(self, x: Tensor, step: int):
        noise = self._draw(step, x.shape[0], lambda g, n: torch.randn((n,) + tuple(x.shape[1:]), generator=g))
        return x + self.config.noise * noise.to(x), torch.ones_like(x[:, :1])


class Inpaint(_Reconstruction):
    """Masked-region prediction: reconstruct a random box that was blanked out (loss on the box)."""

    name = "inpaint"
    resnet_only = "inpaint" + _ON_STAGES

    def corrupt(self, x: Tensor, step: int):
        B, _, H, W = x.shape
        lo, hi = self.config.box
        r = self._draw(step, B, lambda g, n: torch.rand(n, 4, generator=g, dtype=torch.float64))
        hh = (lo + (hi - lo) * r[:, 0]) * H
        ww = (lo + (hi - lo) * r[:, 1]) * W
        top = (r[:, 2] * (H - hh)).floor()
        left = (r[:, 3] * (W - ww)).floor()
        ys = torch.arange(H, dtype=torch.float64).view(1, H, 1)
        xs = torch.arange(W, dtype=torch.float64).view(1, 1, W)
        box = (
            (
                (ys >= top.view(-1, 1, 1))
                & (ys < (top + hh).view(-1, 1, 1))
                & (xs >= left.view(-1, 1, 1))
                & (xs < (left + ww).view(-1, 1, 1))
            )
            .unsqueeze(1)
            .to(x)
        )
        return x * (1 - box), box


@dataclass
class NextSliceConfig(MethodConfig):
    gap: int = field(
        default=3, metadata={"help": "non-neighbour pairs of a series are at least this many slices apart (>= 2)"}
    )
    p_other: float = field(
        default=0.25, metadata={"help": "share of non-neighbour pairs whose B comes from another series"}
    )
    hidden: int = field(default=512, metadata={"help": "width of the pair head's hidden layer"})
    crop_scale: tuple[float, float] = field(
        default=(0.5, 1.0), metadata={"help": "random resized crop scale range, low,high (one crop per pair)"}
    )

    def validate(self) -> None:
        if not isinstance(self.gap, int) or self.gap < 2:
            raise UserError(f"--gap must be an integer >= 2, got {self.gap}")
        if not 0 <= self.p_other <= 1:
            raise UserError(f"--p-other must be in [0, 1], got {self.p_other}")
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise UserError(f"--hidden must be a positive integer, got {self.hidden}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"--crop-scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")


class PairAugment:
    """The batch transform of slice pairs: HU (B, 2, H, W) -> (xa, xb), both slices of a pair through the
    same crop, flip and intensity draw."""

    def __init__(self, aug):
        self.aug = aug

    def __call__(self, hu: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if hu.dim() != 4 or hu.shape[1] != 2:
            raise ValueError(f"expected slice pairs (B, 2, H, W), got {tuple(hu.shape)}")
        p = self.aug.sample(hu.shape[0], tuple(hu.shape[-2:]), generator)
        return self.aug.apply(hu[:, :1], p, generator), self.aug.apply(hu[:, 1:], p, generator)


class NextSlice(_Pretext):
    """Next-slice prediction: is slice B the next slice after slice A in the same series?"""

    name = "nextslice"
    config_class = NextSliceConfig
    config: NextSliceConfig

    def __init__(self, backbone: nn.Module, config: NextSliceConfig | None = None):
        super().__init__(backbone, config)
        d = feature_dim(backbone)
        self.head = nn.Sequential(
            nn.Linear(3 * d, self.config.hidden), nn.ReLU(inplace=True), nn.Linear(self.config.hidden, 2)
        )

    def pairs(self, dataset):
        return SlicePairs(dataset, gap=self.config.gap, p_other=self.config.p_other)

    def transform(self, crop: int, windows):
        return PairAugment(
            CTAugment(
                crop,
                windows=windows,
                scale=tuple(self.config.crop_scale),
                hflip=0.5,
                rotate=0.0,
                p_rotate=0.0,
                p_noise=0.0,
                p_blur=0.0,
            )
        )

    def logits(self, xa: Tensor, xb: Tensor) -> Tensor:
        fa, fb = self.backbone(torch.cat([xa, xb])).chunk(2)
        return self.head(torch.cat([fa, fb, (fa - fb).abs()], 1))

    def training_step(self, batch, step: int):
        xa, xb, y = batch
        logits = self.logits(xa, xb)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().detach(), "next_share": y.float().mean()}

    def loss_reference(self, batch: int) -> float | None:
        return math.log(2)  # uniform predictions of next / not next

    @torch.no_grad()
    def preview(self, batch):
        xa, xb, y = (t[:8] for t in batch)
        pred = self.logits(xa, xb).argmax(1)
        # the row labels are short (the sheet leaves 150 px): one digit per pair, 1 = next
        return {f"A (pred {''.join(str(int(v)) for v in pred)})": xa, f"B (next {''.join(str(int(v)) for v in y)})": xb}
