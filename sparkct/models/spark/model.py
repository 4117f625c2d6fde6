"""SparK pretraining (Tian et al., ICLR 2023) of a torchvision ResNet on CT slices.

One step, as SparK's pretrain/spark.py:

1. mask: random cells of the 32x32-pixel grid hidden (``mask_ratio``), drawn for the global batch from
   the step's generator (:meth:`SparK.draw_mask`);
2. encode the visible cells: ``sparkct.nn.SparseEncoder`` on packed tiles (``encoder="sparse"``) or
   SparK's own dense-masked encoder (``encoder="dense-masked"``; same mathematics, the baseline);
3. densify each of the 4 scales (deepest first): BatchNorm over the visible positions, masked cells
   filled with a learnable mask token, a projection to the decoder's width (1x1 at stride 32, 3x3
   elsewhere);
4. decode with the light decoder to the input's channels (the HU windows);
5. loss: mean squared error on the masked cells only, against the input normalized per 32x32 cell
   and channel (mean, unbiased variance + 1e-6, as SparK's ``patchify`` normalization; SparK pools
   the RGB channels of a cell into one mean/variance, here each HU window gets its own).

Speed without changing the mathematics: the sparse path never builds a dense masked map before
densify (BatchNorm runs on the packed tiles, ``unpack`` writes features and mask tokens in one pass),
tiles and dense maps stay channels-last from the encoder to the reconstruction, the decoder adds the
skip features in place, and the loss is computed in float32 from strided views (no patchify copies).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn as nn
from torch import Tensor

from sparkct import distributed as dist_utils
from sparkct.data.augment import CTAugment
from sparkct.data.windows import resolve_windows
from sparkct.errors import UserError
from sparkct.models.backbone import is_vit
from sparkct.models.base import Method, MethodConfig
from sparkct.models.masking import CELL, cell_mask, check_mask_grid, check_mask_ratio
from sparkct.profiling import ranged

from .decoder import LightDecoder
from .reference import SparKMasker, spark_bn, spark_dense_masked_features

__all__ = ["SparKConfig", "SparK", "cell_normalize", "masked_cell_loss", "ENCODERS"]

ENCODERS = ("sparse", "dense-masked")


def _crop_scale(v) -> tuple[float, float]:
    if isinstance(v, str):
        v = [s for s in v.replace(",", " ").split() if s]
    try:
        lo, hi = (float(s) for s in v)
    except (TypeError, ValueError):
        raise UserError(f"crop scale must be two numbers (low, high), got {v!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise UserError(
            f"crop scale must satisfy 0 < low <= high <= 1 (fractions of the slice's area), got ({lo}, {hi})"
        )
    return lo, hi


@dataclass
class SparKConfig(MethodConfig):
    mask_ratio: float = field(
        default=0.6, metadata={"help": "fraction of the 32x32-pixel cells hidden from the encoder, in [0, 1)"}
    )
    encoder: str = field(
        default="sparse",
        metadata={
            "help": "'sparse': the packed-tile encoder (fast); 'dense-masked': SparK's own dense conv then mask "
            "(same mathematics; the baseline)"
        },
    )
    decoder_width: int = field(
        default=768,
        metadata={
            "help": "channels of the light decoder's first block, halving over its 5 blocks (768 as published); "
            "a multiple of 32"
        },
    )
    crop_scale: tuple[float, float] = field(
        default=(0.67, 1.0),
        metadata={"help": "random resized crop: range of the crop's area as a fraction of the slice (SparK: 0.67 1)"},
    )
    hflip: float = field(default=0.5, metadata={"help": "probability of a horizontal flip"})

    def validate(self) -> None:
        try:
            check_mask_ratio(self.mask_ratio)
        except UserError:
            raise
        except (TypeError, ValueError):
            raise UserError(f"mask ratio must be a number in [0, 1), got {self.mask_ratio!r}") from None
        if self.encoder not in ENCODERS:
            raise UserError(f"unknown SparK encoder {self.encoder!r}; choose one of: {', '.join(ENCODERS)}")
        w = self.decoder_width
        if isinstance(w, bool) or not isinstance(w, int) or w < 32 or w % 32:
            raise UserError(f"decoder width must be a positive multiple of 32 (it halves over 5 blocks), got {w!r}")
        self.crop_scale = _crop_scale(self.crop_scale)
        try:
            p = float(self.hflip)
        except (TypeError, ValueError):
            p = math.nan
        if not 0.0 <= p <= 1.0:
            raise UserError(f"hflip is a probability in [0, 1], got {self.hflip!r}")


# ---- targets and loss ----------------------------------------------------------------------------


def _wide(x: Tensor) -> Tensor:
    """x in float32, or float64 if it is float64 (the loss never runs in a 16-bit type)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _cells(x: Tensor, cell: int) -> Tensor:
    """(B, C, H, W) -> (B, C, GH, cell, GW, cell): a view (splitting a dimension never copies, so any
    memory layout works)."""
    B, C, H, W = x.shape
    if H % cell or W % cell:
        raise ValueError(f"image size {H}x{W} is not a multiple of the {cell}-pixel cell")
    return x.view(B, C, H // cell, cell, W // cell, cell)


@torch.no_grad()
def cell_normalize(target: Tensor, cell: int = CELL, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """SparK's per-cell target normalization, per channel: (normalized, mean, std), float32 (float64 for
    float64 targets) as
    (B, C, GH, cell, GW, cell) / (B, C, GH, 1, GW, 1); std = sqrt(unbiased variance + eps)."""
    t = _wide(_cells(target, cell))
    var, mean = torch.var_mean(t, dim=(3, 5), keepdim=True)  # unbiased, as SparK's inp.var()
    std = (var + eps).sqrt_()
    return (t - mean) / std, mean, std


@ranged("loss/spark_masked_mse")
def masked_cell_loss(rec: Tensor, target: Tensor, mask: Tensor, cell: int = CELL, eps: float = 1e-6) -> Tensor:
    """Mean over masked cells (``mask`` False) of the mean squared error between `rec` and the per-cell,
    per-channel normalized `target`; in float32 (or float64) whatever `rec`'s dtype. Visible cells do not count."""
    if rec.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(rec.shape)} and target {tuple(target.shape)} differ in shape")
    norm, _, _ = cell_normalize(target, cell, eps)
    hidden = ~mask  # (B, GH, GW)
    with torch.autocast(rec.device.type, enabled=False):
        err = (_wide(_cells(rec, cell)) - norm).square().mean(dim=(1, 3, 5))  # (B, GH, GW)
        return (err * hidden).sum() / (hidden.sum() + 1e-8)


# ---- the method ----------------------------------------------------------------------------------


class SparK(Method):
    """SparK on a torchvision ResNet backbone (``fc`` = Identity, ``in_chans`` = number of HU windows).

    Submodules: ``backbone`` (exported), ``densify_norms`` / ``densify_projs`` / ``mask_tokens`` (deepest
    scale first, as SparK's checkpoints), ``decoder`` (:class:`LightDecoder`). The sparse encoder is
    built around the backbone's own modules at every call (it holds no state), so converting the
    backbone's BatchNorms to SyncBatchNorm or moving it just works.
    """

    name = "spark"
    config_class = SparKConfig
    config: SparKConfig
    # SparK's published recipe: LAMB, base lr 2e-4 per 256 images, weight decay 0.04 -> 0.2 (cosine),
    # the global gradient norm clipped at 5
    defaults = {
        "optimizer": "lamb",
        "base_lr": 2e-4,
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "warmup_epochs": 1.0,
        "betas": (0.9, 0.95),
        "clip_grad": 5.0,
    }

    resnet_only = (
        "SparK is a sparse-CNN method (masked image modelling with sparse convolutions on a ResNet's "
        "stages) and does not run on a ViT backbone; its ViT counterpart, MAE, is not in sparkct: "
        "use a ResNet --arch, or another method with the ViT"
    )

    def __init__(self, backbone: nn.Module, config: SparKConfig | None = None):
        if is_vit(backbone):
            raise UserError(self.resnet_only)
        super().__init__(backbone, config)
        self.config.validate()
        from sparkct.nn import SparseEncoder  # noqa: PLC0415 (lazy: `pretrain spark -h` loads no extension)

        enc = SparseEncoder(backbone)  # validates the backbone (a torchvision ResNet) and gives the widths
        self.in_chans = cast(nn.Conv2d, backbone.conv1).in_channels
        widths = list(reversed(enc.feature_channels))  # deepest first
        self.decoder = LightDecoder(self.in_chans, self.config.decoder_width, up_sample_ratio=CELL)
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        for i, (e, d) in enumerate(zip(widths, self.decoder.in_widths)):
            tok = nn.Parameter(torch.zeros(1, e, 1, 1))
            nn.init.trunc_normal_(tok, mean=0.0, std=0.02, a=-0.02, b=0.02)  # as SparK (cut at one std)
            self.mask_tokens.append(tok)
            self.densify_norms.append(nn.BatchNorm2d(e))
            if i == 0 and e == d:
                self.densify_projs.append(nn.Identity())
            else:
                k = 1 if i == 0 else 3
                self.densify_projs.append(nn.Conv2d(e, d, kernel_size=k, stride=1, padding=k // 2, bias=True))

    # --- data ---------------------------------------------------------------------------------------
    def check_input(self, crop: int, windows) -> None:
        """The crop is a multiple of the mask cell, the windows match the backbone's channels, and the mask
        ratio hides at least one cell of the crop's (crop / 32)^2 grid and leaves one visible."""
        if isinstance(crop, bool) or not isinstance(crop, int) or crop < CELL or crop % CELL:
            raise UserError(
                f"crop size must be a positive multiple of {CELL} (one mask cell = {CELL}x{CELL} pixels), got {crop!r}"
            )
        try:
            n = len(resolve_windows(windows))
        except ValueError as e:
            raise UserError(str(e)) from None
        if n != self.in_chans:
            raise UserError(f"{n} HU window(s) given but the backbone takes {self.in_chans} input channel(s)")
        check_mask_grid((crop // CELL) ** 2, self.config.mask_ratio, crop=crop)

    def transform(self, crop: int, windows) -> Callable:
        """SparK's augmentation on HU slices: random resized crop (area ``crop_scale``, aspect 3/4..4/3)
        and horizontal flips, windows as channels in [0, 1]; no intensity augmentation (the windowed HU
        are the targets). The crop and windows are checked once, by the trainer's set-up (check_input)."""
        return CTAugment(
            crop,
            windows=windows,
            scale=self.config.crop_scale,
            hflip=float(self.config.hflip),
            vflip=0.0,
            rotate=0.0,
            p_rotate=0.0,
            p_hu=0.0,
            p_intensity=0.0,
            p_gamma=0.0,
            p_noise=0.0,
            p_blur=0.0,
        )

    # --- masks --------------------------------------------------------------------------------------
    def draw_mask(self, batch: int, grid: tuple[int, int], step: int, device) -> Tensor:
        """(batch, GH, GW) bool, True = visible: this rank's rows of the masks drawn for the global batch
        from ``step_generator(step)`` (which also tells accumulation micro-batches apart), so a resumed or
        a DDP run hides what one uninterrupted process hides. The loader gives every rank an equal,
        contiguous share of each global batch, in rank order."""
        r, world = dist_utils.rank(), dist_utils.world_size()
        m = cell_mask(batch * world, grid, self.config.mask_ratio, generator=self.step_generator(step))
        return m[r * batch : (r + 1) * batch].to(device, non_blocking=True)

    # --- the model ----------------------------------------------------------------------------------
    def sparse_encoder(self):
        """The packed-tile encoder over the backbone's current modules (cheap to build: no state)."""
        from sparkct.nn import SparseEncoder  # noqa: PLC0415 (lazy: `pretrain spark -h` loads no extension)

        return SparseEncoder(self.backbone)

    def encode(self, x: Tensor, mask: Tensor) -> tuple[list[Tensor], object]:
        """(features of strides 4..32, the mask's tables for :meth:`densify`). Sparse: packed tiles
        (A, C, c, c), channels-last, and the ``CellLayout``; dense-masked: dense maps with zeros at masked
        cells and SparK's masker."""
        if self.config.encoder == "sparse":
            from sparkct.ops.sparse import cell_layout  # noqa: PLC0415 (lazy: `pretrain spark -h` loads no extension)

            layout = cell_layout(mask)
            return self.sparse_encoder()(x, layout, packed=True), layout
        return spark_dense_masked_features(self.backbone, x, mask), SparKMasker(mask)

    def densify(self, feats: list[Tensor], tables) -> list[Tensor]:
        """The decoder's inputs, deepest first: BN over the visible positions, mask tokens at masked
        cells, the projection to the decoder's width."""
        out = []
        if self.config.encoder == "sparse":
            from sparkct.ops.sparse import unpack  # noqa: PLC0415 (lazy: `pretrain spark -h` loads no extension)

            for i, f in enumerate(reversed(feats)):
                f = self.densify_norms[i](f)  # BN over packed tiles = BN over the visible positions
                tok = self.mask_tokens[i].to(f.dtype)  # autocast: tiles may be bf16, the token is fp32
                out.append(self.densify_projs[i](unpack(f, tables, fill=tok)))
            return out
        for i, f in enumerate(reversed(feats)):
            f = spark_bn(self.densify_norms[i], f, tables)
            active = tables.active_ex(f.shape[2], f.shape[3])
            out.append(self.densify_projs[i](torch.where(active, f, self.mask_tokens[i].to(f.dtype))))
        return out

    def reconstruct(self, x: Tensor, mask: Tensor) -> Tensor:
        """The decoder's output (B, C, H, W): the per-cell normalized image it predicts."""
        self._check_input(x, mask)
        return self.decoder(self.densify(*self.encode(x, mask)))

    def reconstruction_loss(self, x: Tensor, mask: Tensor) -> Tensor:
        """The loss of reconstructing the masked cells of x (targets = x itself, the windowed HU)."""
        return masked_cell_loss(self.reconstruct(x, mask), x, mask)

    def _check_input(self, x: Tensor, mask: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"SparK expects a float batch (B, C, H, W), got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"batch has {x.shape[1]} channel(s) but the model reconstructs {self.in_chans}")
        if x.shape[2] % CELL or x.shape[3] % CELL:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of {CELL}")

    # --- the step -----------------------------------------------------------------------------------
    def training_step(self, batch: Tensor, step: int) -> tuple[Tensor, dict]:
        x = batch
        # step_generator already tells accumulation micro-batches apart (the trainer sets self.micro)
        mask = self.draw_mask(x.shape[0], (x.shape[2] // CELL, x.shape[3] // CELL), step, x.device)
        return self.reconstruction_loss(x, mask), {}

    def no_weight_decay(self) -> set[str]:
        return {f"mask_tokens.{i}" for i in range(len(self.mask_tokens))}

    # --- what a person looks at ---------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, batch: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """input / masked input / reconstruction (the input where visible, the prediction de-normalized
        with each masked cell's own mean and std where masked, as SparK's visualization), (B, C, H, W) in
        [0, 1]. Runs in training mode (the statistics the loss sees) and restores every BatchNorm's
        running statistics afterwards, so a preview never changes the model. The mask is the same at
        every preview (a fixed stream of the seed) unless given."""
        x = batch
        B, _, H, W = x.shape
        if mask is None:
            g = self.step_generator(0, stream=7)
            mask = cell_mask(B, (H // CELL, W // CELL), self.config.mask_ratio, generator=g, device=x.device)
        bufs = {k: v.clone() for k, v in self.named_buffers()}
        try:
            rec = self.reconstruct(x, mask)
        finally:
            for k, v in self.named_buffers():
                v.copy_(bufs[k])
        _, mean, std = cell_normalize(x)
        rec = (_cells(rec, CELL).float() * std + mean).reshape(B, -1, H, W)
        visible = mask.repeat_interleave(CELL, 1).repeat_interleave(CELL, 2).unsqueeze(1)
        xf = _wide(x)
        return {
            "input": xf.clamp(0, 1),
            "masked": (xf * visible).clamp(0, 1),
            "reconstruction": torch.where(visible, xf, rec).clamp(0, 1),
        }
