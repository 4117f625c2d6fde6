"""A small method for the trainer's tests: regress each image's mean intensity per channel from the
backbone's pooled features (the loss falls within a few steps), with switches for the failure cases."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from sparkct.models.base import Method, MethodConfig


@dataclass
class TinyConfig(MethodConfig):
    nan_at: int = field(default=-1, metadata={"help": "make the loss NaN at this step"})
    double: bool = field(default=False, metadata={"help": "compute in float64 (exact comparisons)"})


class Tiny(Method):
    """Tiny test method."""

    name = "tiny"
    config_class = TinyConfig
    defaults = {"optimizer": "adamw", "base_lr": 0.03, "weight_decay": 0.0, "warmup_epochs": 0.0, "betas": (0.9, 0.999)}

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        from sparkct.models.backbone import feature_dim

        self.head = nn.Linear(feature_dim(backbone), backbone.conv1.in_channels)
        if self.config.double:
            self.double()

    def transform(self, crop, windows):
        from sparkct.data import CTResize

        return CTResize(crop, windows=windows)

    def training_step(self, batch, step):
        if self.config.double:
            batch = batch.double()
        target = batch.mean((2, 3))
        # step-keyed randomness drawn for the global batch, this rank's rows taken (as the protocol asks)
        from sparkct.distributed import rank, world_size

        n = batch.shape[0]
        noise = torch.rand(n * world_size(), 1, generator=self.step_generator(step))[rank() * n : (rank() + 1) * n]
        noise = noise.to(batch)
        pred = self.head(self.backbone(batch * (0.9 + 0.1 * noise[:, :, None, None])))
        loss = (pred - target).square().mean()
        if step == self.config.nan_at:
            loss = loss * float("nan")
        return loss, {"target_mean": target.mean().detach()}

    def after_step(self, step, total_steps):
        if step + 1 == int(os.environ.get("TINY_DIE_AT", "-1")):  # SIGKILL after this optimizer step
            os.kill(os.getpid(), signal.SIGKILL)
        # TINY_SIGNAL_AT=STEP:NAME[:RANK]: signal NAME (SIGINT, SIGTERM) during step STEP (1-based), in
        # every rank or only RANK; a Ctrl-C or `kill` that lands while the step runs
        at = os.environ.get("TINY_SIGNAL_AT")
        if at:
            n, name, *who = at.split(":")
            from sparkct.distributed import rank

            if step + 1 == int(n) and (not who or int(who[0]) == rank()):
                os.kill(os.getpid(), getattr(signal, name))

    @torch.no_grad()
    def preview(self, batch):
        return {"input": batch[:4], "inverted": 1 - batch[:4]}
