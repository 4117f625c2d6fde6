"""MoCo v2 (Chen et al. 2020) on CT: a query encoder (backbone + MLP 2048-2048-128, no BN) and a key
encoder, its EMA (momentum 0.999, or a cosine schedule to 1.0 with ``--momentum-end 1``), a queue of
65,536 keys (the memory bank of the fused :class:`sparkct.nn.InfoNCELoss`), temperature 0.2.

``--symmetric`` (as MoCo v3 and common MoCo v2 reimplementations): both views serve as queries, each
predicting the key of the other view against the queue as it was before the step, and the two losses
are averaged; each view goes through the query encoder on its own (BatchNorm per view, as the keys'),
and the queue still takes one key per image per step (the second view's).

Under DDP the key encoder must not normalize a query's key with statistics of the query's own
device batch (a query could then cheat by matching its key's BN statistics). The trainer synchronizes
every BatchNorm over the ranks (SyncBN; MoCo's alternative), so the keys are those of one process on
the global batch, and :func:`shuffled_forward` skips the shuffle. A key encoder with per-device BN
(MoCo used outside the trainer) gets **shuffled BN** (MoCo's own choice): the key images of the global
batch are gathered, permuted by a permutation every rank draws alike (``step_generator``), each rank
embeds its share, and the keys go back to their rows, so per-device statistics come from a random
subset of the global batch. The queue takes every rank's keys (``gather_distributed``), so it is the
same on every rank, and it is checkpointed. The key encoder's EMA runs on every rank from the same
(DDP-synchronized) parameters, so it stays identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparkct.distributed import all_gather_rows, is_distributed, rank, row_counts, world_size
from sparkct.errors import UserError
from sparkct.models.ssl import SSLConfig, SSLMethod
from sparkct.nn import InfoNCELoss, MoCoProjectionHead, MomentumEncoder
from sparkct.nn.gradcache import chunked
from sparkct.nn.sync_batchnorm import _GlobalBatchNorm

__all__ = ["MoCo", "MoCoConfig", "shuffled_forward"]


@dataclass
class MoCoConfig(SSLConfig):
    temperature: float = field(default=0.2, metadata={"help": "InfoNCE temperature (0.2 in MoCo v2)"})
    queue_size: int = field(
        default=65536, metadata={"help": "keys in the queue of negatives (65,536 in MoCo); at least the global batch"}
    )
    momentum: float = field(default=0.999, metadata={"help": "key encoder EMA momentum at the start"})
    momentum_end: float = field(
        default=0.999,
        metadata={
            "help": "momentum at the end, reached along a cosine (equal to --momentum: constant; 1.0: cosine to 1)"
        },
    )
    augment: str = field(
        default="moco",
        metadata={"help": "CTAugment presets of both views, joined with '+' (see sparkct.models.ssl.AUGMENTS)"},
    )
    symmetric: bool = field(
        default=False,
        metadata={
            "help": "symmetric loss (as MoCo v3): both views are queries for the other view's key, losses averaged"
        },
    )

    def validate(self) -> None:
        super().validate()
        self.validate_temperature(self.temperature, minimum=InfoNCELoss.MIN_TEMPERATURE)
        self.validate_momentum(self.momentum, self.momentum_end)
        if not isinstance(self.symmetric, bool):
            raise UserError(f"symmetric must be true or false, got {self.symmetric!r}")
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise UserError(f"queue size must be a positive integer, got {self.queue_size!r}")


def _per_device_bn(module: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (nn.SyncBatchNorm, _GlobalBatchNorm))
        for m in module.modules()
    )


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, x: Tensor, generator: torch.Generator) -> Tensor:
    """encoder(x) with shuffled BN across ranks (see the module docstring); encoder(x) in one process or
    when the encoder's BatchNorms are synchronized (a shuffle would change nothing but cost two
    all-gathers)."""
    if not is_distributed() or not _per_device_bn(encoder):
        return encoder(x)
    counts = row_counts(x.shape[0], x.device)
    everything = all_gather_rows(x, counts)
    perm = torch.randperm(everything.shape[0], generator=generator).to(x.device)
    r = rank()
    lo, hi = sum(counts[:r]), sum(counts[: r + 1])
    mine = encoder(everything[perm[lo:hi]])
    keys = all_gather_rows(mine, counts)  # keys of the permuted rows, in rank order
    out = torch.empty_like(keys)
    out[perm] = keys
    return out[lo:hi]


class MoCo(SSLMethod):
    """MoCo v2 (Chen et al. 2020): queries against the keys of an EMA encoder and a queue of negatives.

    Key encoder momentum 0.999, a queue of 65,536 keys, temperature 0.2."""

    name = "moco"
    config_class = MoCoConfig
    config: MoCoConfig
    # MoCo v2: SGD (momentum 0.9), lr 0.03 x batch / 256, weight decay 1e-4, cosine schedule
    defaults = {**SSLMethod.defaults, "optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0}

    def __init__(self, backbone: nn.Module, config: MoCoConfig | None = None, *, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim=feature_dim)
        c = self.config
        self.projector = MoCoProjectionHead(self.feature_dim, c.proj_hidden_dim or None, c.proj_dim)
        self.key_encoder = MomentumEncoder(nn.Sequential(self.backbone, self.projector), c.momentum, c.momentum_end)
        self.criterion = InfoNCELoss(
            c.temperature, memory_bank_size=(c.queue_size, c.proj_dim), gather_distributed=True, persistent_bank=True
        )  # checkpointed queue
        self.joint_views = not c.symmetric

    def grad_views(self, views):
        # queries; the keys come from the key encoder without autograd
        return views if self.config.symmetric else views[:1]

    @torch.no_grad()
    def check_run(self, batch: int) -> None:
        if batch > self.config.queue_size:
            raise UserError(
                f"MoCo's queue ({self.config.queue_size} keys) is smaller than the global batch "
                f"({batch}): raise --queue-size or lower --batch"
            )

    def prepare(self, views, step):
        if len(views) != 2:
            raise ValueError(f"MoCo takes 2 views, got {len(views)}")
        n = views[1].shape[0] * world_size()
        if n > self.config.queue_size:
            raise UserError(
                f"MoCo's queue ({self.config.queue_size} keys) is smaller than the global batch ({n}): "
                "raise --queue-size or lower the batch size"
            )
        enc = self.key_encoder

        def keys(view, stream):
            g = self.step_generator(step, stream=stream)
            return chunked(lambda x: shuffled_forward(enc, x, g), view, self.config.chunk)

        return (keys(views[0], 2), keys(views[1], 1)) if self.config.symmetric else keys(views[1], 1)

    def loss_reference(self, batch: int) -> float | None:
        """ln(K + 1): a query against its key and the K queued keys, all equally similar (the queue
        starts full of random keys). None with the hybrid objective (its supervised term is added)."""
        return None if self.config.hybrid_weight > 0 else math.log(self.config.queue_size + 1)

    def objective(self, outs, keys, step):
        if not self.config.symmetric:
            q = outs[0]
            return self.criterion(q, keys.to(q.dtype)), {}
        (q0, q1), (k0, k1) = outs, keys
        # both against the queue before this step; then the second view's keys join it
        loss = (
            self.criterion(q0, k1.to(q0.dtype), enqueue=False) + self.criterion(q1, k0.to(q1.dtype), enqueue=False)
        ) / 2
        if q0.requires_grad:
            self.criterion.enqueue(k1)
        return loss, {}

    def after_step(self, step: int, total_steps: int) -> None:
        self.key_encoder.update(step, total_steps)
