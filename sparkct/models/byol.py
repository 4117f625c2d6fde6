"""BYOL (Grill et al. 2020) on CT: an online network (backbone, projector 2048-4096-256, predictor
256-4096-256, hidden widths scaled by the backbone's feature dim) predicts the projections of a target
network, the EMA of the online backbone + projector with a cosine momentum 0.99 -> 1.0; symmetric
negative cosine similarity (:class:`sparkct.nn.BYOLLoss`). BYOL's asymmetric augmentation keeps
its CT form: blur always on view 1, rarely (0.1) on view 2.

Each view goes through the online network alone, as in BYOL's code (BatchNorm statistics per view;
``--joint-views true`` batches both views, BatchNorm over 2N). The target runs without autograd on
each view; only the online network is chunked under
``--chunk`` (the loss is per sample, so chunking changes nothing but BatchNorm's batches). The EMA
runs on every rank from the same parameters, so targets stay identical under DDP; BatchNorm is per
device unless the trainer converts it to SyncBN (BYOL's choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparkct.errors import UserError
from sparkct.models.ssl import SSLConfig, SSLMethod, Views
from sparkct.nn import BYOLLoss, BYOLPredictionHead, BYOLProjectionHead, MomentumEncoder
from sparkct.nn.gradcache import chunked

__all__ = ["BYOL", "BYOLConfig"]


@dataclass
class BYOLConfig(SSLConfig):
    momentum: float = field(default=0.99, metadata={"help": "target EMA momentum at the start (BYOL: 0.99)"})
    momentum_end: float = field(default=1.0, metadata={"help": "target EMA momentum at the end (cosine; BYOL: 1)"})
    proj_dim: int = field(default=256, metadata={"help": "projection / prediction width"})
    joint_views: bool = field(
        default=False,
        metadata={
            "help": "run both views through the online network in one batch (BatchNorm over 2N images); "
            "false: each view alone, as BYOL's code"
        },
    )

    def validate(self) -> None:
        super().validate()
        self.validate_momentum(self.momentum, self.momentum_end)
        if not isinstance(self.joint_views, bool):
            raise UserError(f"joint views must be true or false, got {self.joint_views!r}")


class BYOL(SSLMethod):
    """BYOL (Grill et al. 2020): an online network predicts its EMA target's projections; no negatives.

    Target momentum 0.99 -> 1.0 on a cosine schedule; each view passes the online network alone, as
    BYOL's code (``--joint-views true``: both in one batch)."""

    name = "byol"
    config_class = BYOLConfig
    config: BYOLConfig
    # BYOL: LARS, lr 0.2 x batch / 256, weight decay 1.5e-6 (warm-up shortened from 10 epochs for short runs)
    defaults = {**SSLMethod.defaults, "optimizer": "lars", "base_lr": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 1.0}

    def __init__(self, backbone: nn.Module, config: BYOLConfig | None = None, *, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim=feature_dim)
        c = self.config
        h = c.proj_hidden_dim or None
        self.joint_views = c.joint_views
        self.projector = BYOLProjectionHead(self.feature_dim, h, c.proj_dim)
        self.predictor = BYOLPredictionHead(c.proj_dim, h, c.proj_dim, feature_dim=self.feature_dim)
        self.target = MomentumEncoder(nn.Sequential(self.backbone, self.projector), c.momentum, c.momentum_end)
        self.criterion = BYOLLoss()

    def check_run(self, batch: int) -> None:
        if batch < 2:  # the projector's BatchNorm1d cannot normalize over one image
            raise UserError(f"BYOL needs at least 2 images in a batch (BatchNorm in its heads), got --batch {batch}")

    def views_transform(self, crop: int, windows) -> Views:
        spec = self.config.augment
        return Views([self.augment(crop, windows, spec, p_blur=1.0), self.augment(crop, windows, spec, p_blur=0.1)])

    def head(self, f: Tensor) -> Tensor:
        return self.predictor(self.projector(f))

    @torch.no_grad()
    def prepare(self, views, step):
        if len(views) != 2:
            raise ValueError(f"BYOL takes 2 views, got {len(views)}")
        return [chunked(self.target, v, self.config.chunk) for v in views]

    def objective(self, outs, targets, step):
        p0, p1 = outs
        z0, z1 = targets
        return self.criterion(p0, p1, z0, z1), {}

    def after_step(self, step: int, total_steps: int) -> None:
        self.target.update(step, total_steps)
