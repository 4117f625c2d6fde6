"""The trainer's config (its fields become ``sparkct pretrain``'s flags through :mod:`sparkct.cliargs`).

Nothing here imports torch: ``sparkct pretrain -h`` and ``--list`` stay fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from sparkct.cliargs import flag, option
from sparkct.errors import UserError

__all__ = ["AMP_CHOICES", "TrainConfig", "config_to_dict"]

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """What every pretraining run shares. ``None`` = the method's default (``Method.defaults``)."""

    data: str | None = option(
        "a prepared slice cache, or a DICOM/NIfTI folder (prepared into OUT/data on first use); "
        "default: the built-in synthetic chest CT, synthesized and prepared into OUT/data",
        default=None,
    )
    out: str = option("run folder: checkpoints, metrics, previews, backbone export", default="runs/pretrain")
    arch: str = option(
        "backbone: torchvision resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d/64x4d, wide_resnet50_2/101_2; "
        "timm ViTs vit_tiny, vit_small, vit_base (16-px patches), "
        "vit_tiny_p8, vit_small_p8, vit_base_p8 (8-px patches, for small crops); a ViT keeps the method's own "
        "(ResNet) optimizer and heads, where MoCo v3 / DINO train ViTs with AdamW (docs/pretraining.md, Backbones); "
        "spark, denoise and inpaint need a ResNet",
        default="resnet18",
    )
    weights: str | None = option(
        "initialize the backbone from this state_dict file (e.g. ImageNet weights)", default=None
    )
    windows: str = option(
        "HU windows as input channels (presets lung, mediastinum, abdomen, bone, brain or C/W)",
        default="lung,mediastinum,bone",
    )
    crop: int = option("training crop size in pixels", default=128)
    epochs: int = option("passes over the data", default=20)
    max_steps: int | None = option("stop after this many optimizer steps (overrides epochs)", default=None)
    batch: int = option("global batch size (all ranks, all accumulation steps together)", default=32)
    accum: int = option("gradient accumulation steps per optimizer step", default=1)
    optimizer: str | None = option("lamb, lars, adamw, adam or sgd", default=None)
    base_lr: float | None = option("learning rate per 256 images (lr = base_lr x batch / 256)", default=None)
    lr: float | None = option("absolute peak learning rate (overrides base_lr)", default=None)
    weight_decay: float | None = option("weight decay at the start (cosine schedule)", default=None)
    weight_decay_end: float | None = option("weight decay at the end", default=None)
    warmup_epochs: float | None = option("linear learning-rate warm-up, in epochs", default=None)
    clip_grad: float | None = option(
        "clip the global gradient norm at this value (0: off; default: the method's, SparK 5 as published, DINO 3 "
        "on each parameter's gradient as published, others off)",
        default=None,
    )
    amp: str = option(
        "mixed precision: auto (bf16 on CUDA, off on CPU), none, bf16, fp16 (with loss scaling)", default="auto"
    )
    channels_last: bool = option("channels-last memory format for the model and inputs", default=True)
    device: str = option("cpu, cuda, cuda:N or auto", default="auto")
    seed: int = option("seed of weights, data order, augmentations and masks", default=0)
    workers: int | None = option("loader threads (default: 0 on CPU, 2 on CUDA)", default=None)
    ckpt_every: int = option("write last.ckpt every N optimizer steps (and at the end)", default=50)
    keep: int = option("keep the last K step checkpoints", default=2)
    log_every: int = option("log metrics every N optimizer steps", default=5)
    preview_every: int = option("write a preview PNG every N optimizer steps (0: only at the end)", default=50)
    labels: str | None = option(
        "a labels CSV over the data (slice, series or patient rows, column 'label'): enables the "
        "online linear probe, kNN accuracy and the hybrid objective; supervised pretraining trains on it",
        default=None,
    )
    knn_every: int = option(
        "with --labels: kNN accuracy on held-out labelled patients every N epochs (0: off)", default=1
    )
    tensorboard: bool = option("also log to TensorBoard (OUT/tb)", default=True)
    progress: bool = option(
        "show a progress bar on a terminal (where stderr is a file or pipe, progress is a line every 30 s; "
        "SPARKCT_PROGRESS_SECONDS sets it)",
        default=True,
    )
    synth_patients: int = option("built-in data: synthetic patients", default=8)
    synth_size: int = option("built-in data: synthetic slice size", default=160)
    synth_slices: int = option("built-in data: slices per synthetic series", default=24)

    def validate(self) -> None:
        from sparkct.models.backbone import check_arch  # noqa: PLC0415 (lazy: the parser imports no torch)

        check_arch(self.arch)
        if self.crop < 32 or self.crop % 32:
            raise UserError(f"--crop must be a positive multiple of 32 (SparK's cell grid), got {self.crop}")
        for name in (
            "epochs",
            "batch",
            "accum",
            "ckpt_every",
            "keep",
            "log_every",
            "synth_patients",
            "synth_size",
            "synth_slices",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.knn_every < 0:
            raise UserError(f"--knn-every must be >= 0, got {self.knn_every}")
        if self.labels is not None and not os.path.isfile(self.labels):
            raise UserError(f"--labels {self.labels}: no such file")
        if self.preview_every < 0:
            raise UserError(f"--preview-every must be >= 0, got {self.preview_every}")
        if self.batch % self.accum:
            raise UserError(f"--batch {self.batch} is not divisible by --accum {self.accum}")
        for name in ("base_lr", "lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise UserError(f"{flag(name)} must be finite and > 0, got {v}")
        for name in ("weight_decay", "weight_decay_end", "warmup_epochs"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise UserError(f"{flag(name)} must be finite and >= 0, got {v}")
        if self.clip_grad is not None and not (self.clip_grad >= 0 and math.isfinite(self.clip_grad)):
            raise UserError(f"--clip-grad must be finite and >= 0, got {self.clip_grad}")
        if self.amp not in AMP_CHOICES:
            raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if not 0 <= self.seed <= 2**32 - 1:  # numpy's seeds; a bad one would fail after --out is made
            raise UserError(f"--seed must be between 0 and 2**32-1, got {self.seed}")
        above = os.path.abspath(self.out)  # the run folder, or the nearest folder above it that exists
        while not os.path.exists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise UserError(f"--out {self.out}: {above} is a file; name a folder for the run")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        from sparkct.data.windows import resolve_windows  # noqa: PLC0415 (lazy: the parser imports no numpy)

        try:
            resolve_windows(self.windows)
        except (ValueError, KeyError) as e:
            raise UserError(f"--windows {self.windows!r}: {e}") from None


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists: what a JSON round trip gives
