"""SwAV (Caron et al. 2020) on CT: multi-crop views (2 global at the trainer's crop size + 6 local at
96/224 of it, :class:`sparkct.data.MultiCrop`-style), projector 2048-2048-128 with BN, L2-normalized
features scored against L2-normalized prototypes (3,000 as in SwAV; ``--prototypes 500`` as in the
published CT comparison), codes by Sinkhorn-Knopp (fp32, 3 iterations, epsilon 0.05) over the global
batch under DDP, swapped prediction at temperature 0.1.

- The prototypes are renormalized before every step and receive no update for the first
  ``freeze_prototypes`` steps (their gradients are dropped before the optimizer step, as SwAV does
  for its first epoch: 313 iterations at batch 4,096).
- Optional feature queue (``--queue-size``, SwAV: 3,840 at batch 256) from epoch ``--queue-start-epoch``:
  the normalized features of the global crops of past batches join the Sinkhorn equipartition
  (scored with the current prototypes), which small batches need (B << K). It is used once full.
  Under DDP every rank holds the same queue of the global batches' features (SwAV keeps a per-rank
  share of queue_length / world) and scores only its own share of it for the Sinkhorn, whose sums run
  over the ranks: the codes are those of one process with the global batch and the whole queue, for
  any world size, and a checkpoint's queue does not depend on the world size.
- BatchNorm: the crops of one resolution go through the backbone together, and the projection head
  runs once over the features of all crops (both as SwAV's code; ``--joint-head false`` runs the head
  per resolution). Under ``--chunk`` the head, like the backbone, sees one chunk at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparkct.distributed import rank, world_size
from sparkct.errors import UserError
from sparkct.models.ssl import SSLConfig, SSLMethod, Views
from sparkct.nn import FeatureQueue, SwAVLoss, SwAVProjectionHead, SwAVPrototypes

__all__ = ["SwAV", "SwAVConfig"]


@dataclass
class SwAVConfig(SSLConfig):
    prototypes: int = field(
        default=3000, metadata={"help": "number of prototypes (3000 as in SwAV; 500 in the published CT comparison)"}
    )
    temperature: float = field(default=0.1, metadata={"help": "swapped prediction softmax temperature"})
    sinkhorn_iterations: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations"})
    epsilon: float = field(default=0.05, metadata={"help": "Sinkhorn-Knopp entropy regularization"})
    n_global: int = field(default=2, metadata={"help": "global crops (at the trainer's crop size)"})
    n_local: int = field(default=6, metadata={"help": "local crops"})
    local_crop: int = field(
        default=0, metadata={"help": "local crop size in pixels (0: 96/224 of the crop size, as SwAV's 224 + 96)"}
    )
    global_scale: tuple[float, float] = field(
        default=(0.14, 1.0), metadata={"help": "global crops' area range as a fraction of the slice (SwAV: 0.14 1)"}
    )
    local_scale: tuple[float, float] = field(
        default=(0.05, 0.14), metadata={"help": "local crops' area range (SwAV: 0.05 0.14)"}
    )
    freeze_prototypes: int = field(
        default=313,
        metadata={"help": "steps at the start during which the prototypes are not updated (SwAV: its first epoch)"},
    )
    queue_size: int = field(
        default=0, metadata={"help": "feature queue length per global crop (0: no queue; SwAV: 3840 at batch 256)"}
    )
    queue_start_epoch: int = field(default=15, metadata={"help": "epoch from which the queue is used"})
    joint_head: bool = field(
        default=True,
        metadata={
            "help": "run the projection head once over all crops, so its BatchNorm sees global and local crops "
            "together (SwAV's code); false: once per resolution, as the backbone"
        },
    )

    def validate(self) -> None:
        super().validate()
        self.validate_temperature(self.temperature)
        self.validate_temperature(self.epsilon, "epsilon")
        for name in ("prototypes", "sinkhorn_iterations", "n_global"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name.replace('_', ' ')} must be a positive integer, got {v!r}")
        for name in ("n_local", "local_crop", "freeze_prototypes", "queue_size", "queue_start_epoch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{name.replace('_', ' ')} must be an integer >= 0, got {v!r}")
        if not isinstance(self.joint_head, bool):
            raise UserError(f"joint head must be true or false, got {self.joint_head!r}")
        if self.n_global + self.n_local < 2:
            raise UserError("SwAV needs at least 2 crops (n_global + n_local)")
        for name in ("global_scale", "local_scale"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0 < lo <= hi <= 1:
                raise UserError(f"{name.replace('_', ' ')} must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")


class SwAV(SSLMethod):
    """SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp codes over learned prototypes.

    Multi-crop views (2 global + 6 local), 3,000 prototypes, temperature 0.1; the projection head runs
    once over all crops, as SwAV's code (``--joint-head false``: per resolution)."""

    name = "swav"
    config_class = SwAVConfig
    config: SwAVConfig
    epoch: Tensor  # buffer: epochs done
    # SwAV: LARS, lr 4.8 at batch 4096 (0.3 x batch / 256), weight decay 1e-6
    defaults = {**SSLMethod.defaults, "optimizer": "lars", "base_lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 1.0}

    def __init__(self, backbone: nn.Module, config: SwAVConfig | None = None, *, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim=feature_dim)
        c = self.config
        self.n_global = c.n_global
        self.joint_head = c.joint_head
        self.projector = SwAVProjectionHead(self.feature_dim, c.proj_hidden_dim or None, c.proj_dim)
        self.prototypes = SwAVPrototypes(c.proj_dim, c.prototypes)
        self.criterion = SwAVLoss(c.temperature, c.sinkhorn_iterations, c.epsilon, sinkhorn_gather_distributed=True)
        self.queue = (
            nn.ModuleList([FeatureQueue(c.queue_size, c.proj_dim, gather_distributed=True) for _ in range(c.n_global)])
            if c.queue_size
            else None
        )
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))  # epochs done, for the queue start

    def views_transform(self, crop: int, windows) -> Views:
        c = self.config
        local = c.local_crop or max(8, round(crop * 96 / 224))
        g = self.augment(crop, windows, c.augment, scale=tuple(c.global_scale))
        lo = self.augment(local, windows, c.augment, scale=tuple(c.local_scale))
        return Views([g] * c.n_global + [lo] * c.n_local)

    def head(self, f: Tensor) -> Tensor:
        z = F.normalize(self.projector(f), dim=1)
        return torch.cat([self.prototypes(z), z], 1)  # scores and features side by side (one tensor)

    def collapse_embedding(self, out: Tensor) -> Tensor:
        return out[:, self.config.prototypes :]

    @torch.no_grad()
    def check_run(self, batch: int) -> None:
        if self.queue is not None and batch > self.config.queue_size:
            raise UserError(
                f"SwAV's queue ({self.config.queue_size}) is smaller than the global batch ({batch}): "
                "raise --queue-size or lower --batch"
            )

    def prepare(self, views, step):
        c = self.config
        if len(views) != c.n_global + c.n_local:
            raise ValueError(f"SwAV expects {c.n_global} + {c.n_local} crops, got {len(views)}")
        if self.queue is not None and views[0].shape[0] * world_size() > c.queue_size:
            raise UserError(
                f"SwAV's queue ({c.queue_size}) is smaller than the global batch "
                f"({views[0].shape[0] * world_size()}): raise --queue-size"
            )
        self.prototypes.normalize()

    def loss_reference(self, batch: int) -> float | None:
        """ln(prototypes): codes predicted from equal scores on every prototype. None with the hybrid
        objective (its supervised term is added)."""
        return None if self.config.hybrid_weight > 0 else math.log(self.config.prototypes)

    def objective(self, outs, state, step):
        c = self.config
        K = c.prototypes
        scores = [o[:, :K] for o in outs]
        feats = [o[:, K:].detach() for o in outs[: c.n_global]]
        queue = None
        use_queue = self.queue is not None and int(self.epoch) >= c.queue_start_epoch
        if use_queue and all(q.full for q in self.queue):
            w = self.prototypes.weight.detach()
            # this rank's share of the queue rows: the Sinkhorn sums over ranks count every row once
            queue = [torch.tensor_split(q.features(), world_size())[rank()].to(w.dtype) @ w.t() for q in self.queue]
        loss = self.criterion(scores[: c.n_global], scores[c.n_global :], queue)
        if use_queue:
            for q, z in zip(self.queue, feats):
                q.push(z)
        return loss, {"queue_used": float(queue is not None)} if self.queue is not None else {}

    def on_before_optimizer_step(self, step: int) -> None:
        if step < self.config.freeze_prototypes:
            for p in self.prototypes.parameters():
                p.grad = None  # SwAV's "cancel gradients for the prototypes": no update, no weight decay

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        self.epoch.fill_(epoch + 1)
        return {}
