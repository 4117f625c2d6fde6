"""SimCLR (Chen et al. 2020) on CT: two strongly augmented views, projector 2048-2048-128 with BN
(hidden width scaled by the backbone's feature dim, see :mod:`sparkct.nn.heads`), NT-Xent through
the fused :class:`sparkct.nn.InfoNCELoss`. Both views go through the backbone in one call (BatchNorm
over the 2N images, as SimCLR's code does); under DDP every rank's embeddings are negatives
(``gather_distributed``) and BatchNorm is per device unless the trainer converts it to SyncBN
(SimCLR's global BN). SimCLR trains with LARS at large batches (the trainer's ``--optimizer lars``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from sparkct.distributed import world_size
from sparkct.errors import UserError
from sparkct.models.ssl import SSLConfig, SSLMethod
from sparkct.nn import InfoNCELoss, SimCLRProjectionHead

__all__ = ["SimCLR", "SimCLRConfig"]


@dataclass
class SimCLRConfig(SSLConfig):
    temperature: float = field(
        default=0.1,
        metadata={"help": "NT-Xent temperature (0.1 for large batches as in SimCLR; 0.2-0.5 suit small ones)"},
    )

    def validate(self) -> None:
        super().validate()
        self.validate_temperature(self.temperature, minimum=InfoNCELoss.MIN_TEMPERATURE)


class SimCLR(SSLMethod):
    """SimCLR (Chen et al. 2020): NT-Xent between two augmented views of each slice.

    The negatives are the other views of the global batch, through the fused InfoNCE loss; LARS at lr
    0.3 x batch / 256."""

    name = "simclr"
    config_class = SimCLRConfig
    config: SimCLRConfig
    # SimCLR: LARS, lr 0.3 x batch / 256, weight decay 1e-6 (warm-up shortened from 10 epochs for short runs)
    defaults = {**SSLMethod.defaults, "optimizer": "lars", "base_lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 1.0}

    def __init__(self, backbone: nn.Module, config: SimCLRConfig | None = None, *, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim=feature_dim)
        c = self.config
        self.projector = SimCLRProjectionHead(self.feature_dim, c.proj_hidden_dim or None, c.proj_dim)
        self.criterion = InfoNCELoss(c.temperature, gather_distributed=True)

    def check_run(self, batch: int) -> None:
        if batch < 2:
            raise UserError(
                f"SimCLR needs at least 2 images in a batch (the other images are the negatives), got --batch {batch}"
            )

    def loss_reference(self, batch: int) -> float | None:
        """ln(2N - 1): each of the 2N embeddings against its positive and 2N - 2 negatives, all equally
        similar. None with the hybrid objective (its supervised term is added)."""
        return None if self.config.hybrid_weight > 0 else math.log(max(2 * batch - 1, 1))

    def objective(self, outs, state, step):
        if len(outs) != 2:
            raise ValueError(f"SimCLR takes 2 views, got {len(outs)}")
        z0, z1 = outs
        if z0.shape[0] * world_size() < 2:
            raise UserError(
                f"SimCLR needs at least 2 images in a batch (the other images are the negatives), got {z0.shape[0]}"
            )
        return self.criterion(z0, z1), {}
