"""Supervised pretraining: the "in-domain supervised" arm of the published comparisons, on the one trainer.

A linear classifier on the backbone's pooled features is trained with cross-entropy on the classes of a
labels file (``--labels``: slice, series or patient rows, read as everywhere in sparkct by
:func:`sparkct.data.label_slices`). The trainer keeps only the labelled slices, tells the method the
classes (:meth:`sparkct.models.base.Method.set_classes`: the head gets one output per class) and passes
``(images, targets)`` batches. Only the backbone is exported (``backbone.pt``), so a run initializes
``sparkct finetune --init RUN`` like any pretraining run. The labelled set must be another one than the
downstream task's patients: ``sparkct experiment`` refuses to run it on its own task.

The defaults are torchvision's ImageNet recipe for ResNets (SGD with momentum 0.9, lr 0.1 per 256 images,
weight decay 1e-4), with the trainer's cosine schedule and no warm-up; the images go through the
``ct`` CTAugment preset (mild crops, HU calibration, window jitter, some gamma, noise and blur), as the
SSL methods' views do. Without ``--data`` (the built-in synthetic CT) the built-in data's slice labels
(nodule present / absent) are used when no ``--labels`` is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparkct.data.augment import CTAugment
from sparkct.models.backbone import feature_dim
from sparkct.models.base import Method, MethodConfig
from sparkct.models.ssl import augment_kwargs

__all__ = ["SupervisedConfig", "Supervised"]


@dataclass
class SupervisedConfig(MethodConfig):
    augment: str = field(
        default="ct",
        metadata={"help": "CTAugment presets of the images, joined with '+' (see sparkct.models.ssl.AUGMENTS)"},
    )

    def validate(self) -> None:
        augment_kwargs(self.augment)


class Supervised(Method):
    """Supervised pretraining: a linear classifier on the backbone, cross-entropy over the classes of --labels."""

    name = "supervised"
    config_class = SupervisedConfig
    config: SupervisedConfig
    accepts_targets = True
    needs_labels = True
    #: torchvision's ImageNet recipe for ResNets (references/classification): SGD, momentum 0.9 (the
    #: trainer's SGD momentum), lr 0.1 per 256 images, weight decay 1e-4; cosine decay, no warm-up
    defaults = {
        "optimizer": "sgd",
        "base_lr": 0.1,
        "weight_decay": 1e-4,
        "weight_decay_end": None,
        "warmup_epochs": 0.0,
        "clip_grad": 0.0,
    }

    def __init__(self, backbone: nn.Module, config: SupervisedConfig | None = None):
        super().__init__(backbone, config)
        self.config.validate()
        self.classes: list = []
        self.head: nn.Linear | None = None  # made by set_classes: its width is the labels' class count
        self.last_features: Tensor | None = None  # the trainer's online probe reads them (no second forward)

    def set_classes(self, classes) -> None:
        self.classes = list(classes)
        self.head = nn.Linear(feature_dim(self.backbone), len(self.classes))
        # torchvision's classifier init would draw from the global RNG; a seeded draw keeps runs repeatable
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.01)
            self.head.bias.zero_()

    def transform(self, crop: int, windows):
        return CTAugment(crop, windows=windows, **augment_kwargs(self.config.augment))

    def _logits(self, x: Tensor) -> Tensor:
        if self.head is None:
            raise RuntimeError("Supervised: call set_classes(classes) first (the trainer does, from --labels)")
        f = self.backbone(x).flatten(1)
        self.last_features = f.detach()
        return self.head(f)

    def training_step(self, batch, step: int):
        x, y = batch
        logits = self._logits(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().detach()}

    def loss_reference(self, batch: int) -> float | None:
        # uniform predictions over the classes: chance
        return math.log(len(self.classes)) if len(self.classes) >= 2 else None

    @torch.no_grad()
    def preview(self, batch):
        x, y = batch[0][:8], batch[1][:8]
        pred = self.head(self.backbone(x).flatten(1)).argmax(1) if self.head is not None else y
        # the row label is short (the sheet leaves 150 px): one class index per image
        return {f"label {''.join(str(int(v)) for v in y)} pred {''.join(str(int(v)) for v in pred)}": x}
