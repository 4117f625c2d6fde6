"""DINO (Caron et al. 2021) on CT: self-distillation with no labels. A student (backbone + DINO head:
MLP 3 layers, hidden 2048, GELU, bottleneck 256, L2-normalized, weight-normalized last layer over 65,536
prototypes with its norms fixed) predicts the output of a teacher, the EMA of the student (momentum 0.996
-> 1 along DINO's cosine), over multi-crop views: 2 global crops (the trainer's crop size, area 0.4 - 1)
and 8 local crops (96/224 of it, area 0.05 - 0.4); the teacher sees only the global crops, and every
student crop predicts each teacher crop but its own. The teacher's scores are centred (a running mean,
momentum 0.9, over the global batch) and sharpened (temperature 0.04 -> 0.07 over the first 30 epochs;
student 0.1). The last layer gets no update during the first epoch. The loss is computed by
:func:`sparkct.nn.dino.prototype_cross_entropy` alone.

Published optimization (``main_dino.py``'s defaults, the ViT recipe): AdamW, lr 5e-4 x batch / 256 after
10 warm-up epochs, weight decay 0.04 -> 0.4 on a cosine, each parameter's gradient clipped to norm 3.0
(per parameter tensor, as DINO's ``clip_gradients``). DINO's ResNet-50 recipe is ``--optimizer sgd
--base-lr 0.03 --weight-decay 1e-4 --weight-decay-end 1e-4 --global-scale 0.14 1 --local-scale 0.05 0.14``.

Augmentations: CTAugment's (``--augment``) with DINO's asymmetric blur (always on global crop 1, 0.1 on
global crop 2, 0.5 on the local crops); DINO's colour jitter is CT's window jitter, and solarization,
which has no CT counterpart, is left out.

The DINOv2 ingredients (Oquab et al. 2023), off by default:

- ``--ibot-weight`` > 0 (ViT backbones only): iBOT's masked-token loss. Half the student's global crops
  (DINOv2's 0.5) get 10 - 50 % of their patch tokens replaced by a learnable mask token (random patches;
  DINOv2 masks blocks); the student's masked patch features predict, through the DINO head (or
  ``--ibot-separate-head``), the teacher's features at the same patches of the unmasked crop, centred
  by their own running centre (or Sinkhorn-Knopp).
- ``--koleo-weight`` > 0: the KoLeo regularizer on the student's backbone CLS features of each global crop
  (DINOv2: 0.1), over each rank's batch, as DINOv2 (so under DDP it is per rank).
- ``--centering sinkhorn``: Sinkhorn-Knopp (3 iterations) over the teacher's scores of the global batch
  in place of the running centre.

Under DDP: the centre's batch mean and the Sinkhorn sums are all-reduced, so both are those of one
process on the global batch; the EMA runs on every rank from the same DDP-averaged weights; BatchNorm is
synchronized by the trainer (DINO converts student and teacher to SyncBatchNorm).

Monitors in metrics.csv: ``teacher_entropy`` (mean entropy of the teacher's distributions) and
``kl_teacher_student`` (mean KL(teacher || student) over the loss's pairs: the loss minus the teacher's
entropy), DINO's two collapse signals (uniform collapse: entropy -> ln K; one-prototype collapse: entropy
-> 0 with KL -> 0), beside ``collapse`` (:func:`sparkct.models.base.collapse_indicator` of the student's
bottleneck features of global crop 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from sparkct.distributed import rank, row_counts
from sparkct.errors import UserError
from sparkct.models.backbone import feature_dim as backbone_feature_dim
from sparkct.models.base import collapse_indicator
from sparkct.models.ssl import SSLConfig, SSLMethod, Views
from sparkct.nn import (
    DINOHead,
    center_update,
    ibot_patch_loss,
    koleo_loss,
    prototype_cross_entropy,
    sinkhorn_bias,
    teacher_momentum,
    teacher_temperature,
)
from sparkct.nn.ema import momentum_copy, update_momentum

__all__ = ["DINO", "DINOConfig", "is_vit"]

CENTERINGS = ("centre", "sinkhorn")


def is_vit(backbone: nn.Module) -> bool:
    """A timm VisionTransformer (its patch embedding, blocks and positional embedding are used for iBOT)."""
    return all(hasattr(backbone, a) for a in ("patch_embed", "blocks", "_pos_embed", "norm", "forward_head"))


@dataclass
class DINOConfig(SSLConfig):
    prototypes: int = field(default=65536, metadata={"help": "prototypes K of the last layer (DINO: 65,536)"})
    proj_hidden_dim: int = field(
        default=2048, metadata={"help": "DINO head hidden width (DINO: 2048 for every backbone)"}
    )
    proj_dim: int = field(default=256, metadata={"help": "DINO head bottleneck width (DINO: 256)"})
    head_layers: int = field(default=3, metadata={"help": "DINO head MLP layers (DINO: 3)"})
    head_bn: bool = field(default=False, metadata={"help": "BatchNorm in the DINO head's MLP (DINO: false)"})
    norm_last_layer: bool = field(
        default=True,
        metadata={"help": "fix the last layer's weight norms at 1 (DINO: true; false for ViT-S in DINO's best runs)"},
    )
    momentum: float = field(default=0.996, metadata={"help": "teacher EMA momentum at the start (DINO: 0.996)"})
    momentum_end: float = field(default=1.0, metadata={"help": "teacher EMA momentum at the end (cosine; DINO: 1)"})
    teacher_temp: float = field(default=0.07, metadata={"help": "teacher temperature after the warm-up (DINO: 0.07)"})
    warmup_teacher_temp: float = field(default=0.04, metadata={"help": "teacher temperature at the start (DINO: 0.04)"})
    warmup_teacher_temp_epochs: int = field(
        default=30, metadata={"help": "epochs of the teacher temperature's linear warm-up (DINO: 30)"}
    )
    student_temp: float = field(default=0.1, metadata={"help": "student temperature (DINO: 0.1)"})
    center_momentum: float = field(default=0.9, metadata={"help": "momentum of the teacher's centre (DINO: 0.9)"})
    freeze_last_layer: int = field(
        default=1, metadata={"help": "epochs at the start during which the last layer is not updated (DINO: 1)"}
    )
    n_local: int = field(default=8, metadata={"help": "local crops (DINO: 8)"})
    local_crop: int = field(
        default=0, metadata={"help": "local crop size in pixels (0: 96/224 of the crop size, as DINO's 224 + 96)"}
    )
    global_scale: tuple[float, float] = field(
        default=(0.4, 1.0),
        metadata={"help": "global crops' area range (DINO: 0.4 1; its ResNet-50 recipe 0.14 1)"},
    )
    local_scale: tuple[float, float] = field(
        default=(0.05, 0.4),
        metadata={"help": "local crops' area range (DINO: 0.05 0.4; its ResNet-50 recipe 0.05 0.14)"},
    )
    centering: str = field(
        default="centre",
        metadata={
            "help": "teacher centering: centre (DINO's running mean) or sinkhorn (DINOv2's Sinkhorn-Knopp, "
            "3 iterations, over the global batch)"
        },
    )
    sinkhorn_iterations: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations (DINOv2: 3)"})
    ibot_weight: float = field(
        default=0.0,
        metadata={"help": "weight of DINOv2's iBOT masked-token loss (ViT only; DINOv2: 1; 0: off, as DINO)"},
    )
    ibot_separate_head: bool = field(
        default=False, metadata={"help": "iBOT through its own head (DINOv2's default: false, the DINO head)"}
    )
    mask_probability: float = field(
        default=0.5, metadata={"help": "iBOT: fraction of the global crops that are masked (DINOv2: 0.5)"}
    )
    mask_ratio: tuple[float, float] = field(
        default=(0.1, 0.5), metadata={"help": "iBOT: range of the masked fraction of a crop's patches (DINOv2)"}
    )
    koleo_weight: float = field(
        default=0.0, metadata={"help": "weight of DINOv2's KoLeo regularizer on the CLS features (DINOv2: 0.1; 0: off)"}
    )
    augment: str = field(
        default="strong",
        metadata={"help": "CTAugment presets of the crops, joined with '+' (see sparkct.models.ssl.AUGMENTS)"},
    )

    def validate(self) -> None:
        super().validate()
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            self.validate_temperature(getattr(self, name), name.replace("_", " "))
        self.validate_momentum(self.momentum, self.momentum_end, self.center_momentum)
        for name in ("prototypes", "head_layers", "sinkhorn_iterations", "proj_hidden_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name.replace('_', ' ')} must be a positive integer, got {v!r}")
        for name in ("warmup_teacher_temp_epochs", "freeze_last_layer", "n_local", "local_crop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{name.replace('_', ' ')} must be an integer >= 0, got {v!r}")
        for name in ("head_bn", "norm_last_layer", "ibot_separate_head"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name.replace('_', ' ')} must be true or false, got {getattr(self, name)!r}")
        if self.centering not in CENTERINGS:
            raise UserError(f"centering must be one of {', '.join(CENTERINGS)}, got {self.centering!r}")
        for name in ("ibot_weight", "koleo_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise UserError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {v!r}")
        if not 0 < float(self.mask_probability) <= 1:
            raise UserError(f"mask probability must be in (0, 1], got {self.mask_probability!r}")
        for name, low in (("global_scale", 0.0), ("local_scale", 0.0), ("mask_ratio", -1e-12)):
            lo, hi = (float(v) for v in getattr(self, name))
            if not low < lo <= hi <= 1:
                raise UserError(f"{name.replace('_', ' ')} must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
        if self.chunk:
            raise UserError("DINO does not support --chunk (gradient caching) yet")
        if self.hybrid_weight:
            raise UserError("DINO does not support --hybrid-weight yet")


class _Student(nn.Module):
    """The student's parts the teacher copies (the EMA pairs their parameters in this order)."""

    backbone: nn.Module
    head: DINOHead
    patch_head: DINOHead | None

    def __init__(self, backbone: nn.Module, head: DINOHead, patch_head: DINOHead | None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.patch_head = patch_head


class DINO(SSLMethod):
    """DINO (Caron et al. 2021): a student matches its EMA teacher's centred, sharpened distributions over
    65,536 prototypes across multi-crop views (2 global + 8 local), with main_dino.py's defaults (AdamW
    5e-4, weight decay 0.04 -> 0.4, each parameter's gradient clipped at 3, the last layer frozen for 1
    epoch, teacher temperature 0.04 -> 0.07 over 30 epochs). Departures: CT augmentations (window jitter
    for colour jitter, DINO's asymmetric blur, no solarization); the lr ends at 0.1 % of its peak (DINO:
    1e-6); no stochastic depth. DINOv2's iBOT loss (--ibot-weight, ViT only; random patches, not
    blocks), KoLeo (--koleo-weight; per rank under DDP) and Sinkhorn-Knopp (--centering sinkhorn) are
    off by default.

    See the module docstring."""

    name = "dino"
    config_class = DINOConfig
    config: DINOConfig
    epoch: Tensor  # buffer: epochs done
    center: Tensor
    patch_center: Tensor | None
    unfreeze_step: Tensor
    steps_done: Tensor
    teacher: _Student
    dino_head: DINOHead
    patch_head: DINOHead | None
    mask_token: nn.Parameter | None
    #: DINO's main_dino.py defaults (its ViT recipe): AdamW, lr 5e-4 x batch / 256, 10 warm-up epochs,
    #: weight decay 0.04 -> 0.4 (cosine), gradients clipped at 3.0 per parameter tensor
    defaults = {
        **SSLMethod.defaults,
        "optimizer": "adamw",
        "base_lr": 5e-4,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "warmup_epochs": 10.0,
        "betas": (0.9, 0.999),
        "clip_grad": 3.0,
    }
    #: DINO's utils.clip_gradients clips each parameter's gradient norm, not the global norm
    clip_per_parameter = True
    joint_head = True  # DINO's MultiCropWrapper: the backbone per resolution, the head once over all crops
    n_global = 2

    def __init__(self, backbone: nn.Module, config: DINOConfig | None = None, *, feature_dim: int | None = None):
        vit = is_vit(backbone)
        if feature_dim is None:
            feature_dim = int(cast(Any, backbone).num_features) if vit else backbone_feature_dim(backbone)
        super().__init__(backbone, config, feature_dim=feature_dim)
        c = self.config
        self.vit = vit
        if c.ibot_weight > 0 and not vit:
            raise UserError(
                "DINO's iBOT loss (--ibot-weight) masks patch tokens and needs a ViT backbone (--arch vit_*), "
                f"not {type(backbone).__name__}"
            )
        self.ibot = c.ibot_weight > 0

        def head() -> DINOHead:
            return DINOHead(
                self.feature_dim,
                c.prototypes,
                c.proj_hidden_dim,
                c.proj_dim,
                c.head_layers,
                c.head_bn,
                c.norm_last_layer,
            )

        self.dino_head = head()
        self.patch_head = head() if self.ibot and c.ibot_separate_head else None
        self.mask_token = nn.Parameter(torch.zeros(1, self.feature_dim)) if self.ibot else None
        self.student = [_Student(self.backbone, self.dino_head, self.patch_head)]  # a list: not registered twice
        self.teacher = cast(_Student, momentum_copy(self.student[0]))
        self.register_buffer("center", torch.zeros(c.prototypes))
        self.register_buffer("patch_center", torch.zeros(c.prototypes) if self.ibot else None)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("unfreeze_step", torch.full((), -1, dtype=torch.long))  # for plot_marks
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    # --- data ---------------------------------------------------------------------------------------
    def views_transform(self, crop: int, windows) -> Views:
        c = self.config
        local = c.local_crop or max(8, round(crop * 96 / 224))
        spec = c.augment
        g1 = self.augment(crop, windows, spec, scale=tuple(c.global_scale), p_blur=1.0)
        g2 = self.augment(crop, windows, spec, scale=tuple(c.global_scale), p_blur=0.1)
        lo = self.augment(local, windows, spec, scale=tuple(c.local_scale), p_blur=0.5)
        return Views([g1, g2] + [lo] * c.n_local)

    def check_run(self, batch: int) -> None:
        if self.config.head_bn and batch < 2:
            raise UserError(f"DINO with --head-bn needs at least 2 images in a batch, got --batch {batch}")
        if self.config.koleo_weight > 0 and batch < 2:
            raise UserError(f"DINO's KoLeo term needs at least 2 images in a batch, got --batch {batch}")

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()

    # --- schedules ----------------------------------------------------------------------------------
    def teacher_temp(self) -> float:
        c = self.config
        return teacher_temperature(int(self.epoch), c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)

    def teacher_bias(self, t: Tensor, w_t: Tensor, temp: float, center: Tensor) -> Tensor:
        """The teacher's bias (K,): ``-center / temp`` or the Sinkhorn-Knopp log scaling over rows t."""
        if self.config.centering == "sinkhorn":
            return sinkhorn_bias(t, w_t, temp, self.config.sinkhorn_iterations)
        return -center / temp

    # --- ViT tokens (iBOT) --------------------------------------------------------------------------
    def tokens(self, vit: Any, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(pooled CLS features (B, D), patch tokens (B, P, D)) of a timm ViT, the patch tokens where `mask`
        (B, P) is true replaced by the mask token before the positional embedding (as iBOT / DINOv2)."""
        t = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size, else (B, P, C)
        if mask is not None:
            assert self.mask_token is not None
            m = mask.view(t.shape[:-1]).unsqueeze(-1)
            t = torch.where(m, self.mask_token.to(t.dtype).view(*([1] * (t.dim() - 1)), -1), t)
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        t = vit.blocks(t)
        t = vit.norm(t)
        return vit.forward_head(t), t[:, vit.num_prefix_tokens :]

    def masks(self, step: int, n: int, patches: int, device) -> Tensor:
        """(2 n, patches) bool: iBOT's masks of this rank's n rows of the 2 global crops. Drawn for the
        global batch from (seed, step) alone (the same after a resume and on any number of ranks): a
        fraction `mask_probability` of the global crops is masked, with ratios spread over `mask_ratio`
        (DINOv2's collate: stratified uniform), at random patches."""
        c = self.config
        counts = row_counts(n, device)
        total = 2 * sum(counts)
        g = self.step_generator(step, stream=3)
        n_masked = int(total * c.mask_probability)
        lo, hi = (float(v) for v in c.mask_ratio)
        edges = torch.linspace(lo, hi, n_masked + 1, dtype=torch.float64)
        u = torch.rand(n_masked, generator=g, dtype=torch.float64)
        ratios = edges[:-1] + (edges[1:] - edges[:-1]) * u
        masks = torch.zeros(total, patches, dtype=torch.bool)
        for i in range(n_masked):
            k = int(patches * float(ratios[i]))
            masks[i, torch.randperm(patches, generator=g)[:k]] = True
        masks = masks[torch.randperm(total, generator=g)].view(2, sum(counts), patches)
        a = sum(counts[: rank()])
        return masks[:, a : a + n].reshape(2 * n, patches).to(device)

    # --- the step -----------------------------------------------------------------------------------
    def training_step(self, batch: Any, step: int, backward=None) -> tuple[Tensor, dict[str, Any]]:
        c = self.config
        views, targets = self.split_batch(batch)
        if len(views) != 2 + c.n_local:
            raise ValueError(f"DINO expects 2 + {c.n_local} crops, got {len(views)}")
        B = views[0].shape[0]
        teacher = self.teacher
        temp = self.teacher_temp()
        groups = self._groups(views)  # the global crops in one backbone call, the local crops in another
        masks = None
        if self.ibot:
            with torch.no_grad():
                grid = cast(Any, self.backbone).patch_embed(groups[0][0][:1])
            masks = self.masks(step, B, math.prod(grid.shape[1:-1]), views[0].device)
        # the teacher: the global crops, without autograd
        with torch.no_grad():
            tx = groups[0][0]
            if self.ibot:
                t_cls, t_patch = self.tokens(teacher.backbone, tx, None)
            else:
                t_cls = teacher.backbone(tx).flatten(1)
            t_z = teacher.head(t_cls)  # (2B, D)
            w_t = teacher.head.weight()
        # the student: every crop; the head once over all their features
        feats, s_patch = [], None
        for i, (x, _n) in enumerate(groups):
            if i == 0 and self.ibot:
                f, s_patch = self.tokens(self.backbone, x, masks)
            else:
                f = self.features(x)
            feats.append(f)
        cls = torch.cat(feats)
        z = self.dino_head(cls)
        zs = z.view(len(views), B, -1)
        tz = t_z.view(2, B, -1)
        bias = self.teacher_bias(t_z, w_t, temp, self.center)
        w_s = self.dino_head.weight()
        dino, stats = prototype_cross_entropy(
            zs, tz, w_s, w_t, bias, c.student_temp, temp, skip_same=True, return_stats=True
        )
        loss = dino
        logs: dict[str, Any] = {"dino": dino.detach(), "teacher_temp": temp}
        if self.ibot:
            assert masks is not None and s_patch is not None
            ph, tph = self.dino_head, teacher.head
            if self.patch_head is not None and teacher.patch_head is not None:
                ph, tph = self.patch_head, teacher.patch_head
            assert self.patch_center is not None
            flat = masks.view(-1)
            image = torch.arange(2 * B, device=flat.device).repeat_interleave(masks.shape[1])[flat]
            s_p = ph(s_patch.reshape(-1, s_patch.shape[-1])[flat])
            with torch.no_grad():
                t_p = tph(t_patch.reshape(-1, t_patch.shape[-1])[flat])
                w_tp = tph.weight()
            pbias = self.teacher_bias(t_p, w_tp, temp, self.patch_center)
            ibot = ibot_patch_loss(s_p, t_p, image, 2 * B, ph.weight(), w_tp, pbias, c.student_temp, temp)
            loss = loss + c.ibot_weight * ibot
            logs["ibot"] = ibot.detach()
            if c.centering == "centre":
                center_update(self.patch_center, t_p, w_tp, c.center_momentum)
        if c.koleo_weight > 0:
            koleo = koleo_loss(cls[:B]) + koleo_loss(cls[B : 2 * B])
            loss = loss + c.koleo_weight * koleo
            logs["koleo"] = koleo.detach()
        with torch.no_grad():
            logs["teacher_entropy"] = stats["teacher_entropy"]
            logs["kl_teacher_student"] = stats["kl"]
            if c.centering == "centre":
                center_update(self.center, t_z, w_t, c.center_momentum)  # after the loss, as DINO
            if B >= 2:
                logs["collapse"] = collapse_indicator(zs[0].detach())
        self.last_features = cls[:B].detach()
        self.last_targets = targets
        return loss, logs

    # --- per-step hooks -----------------------------------------------------------------------------
    def on_before_optimizer_step(self, step: int) -> None:
        if int(self.epoch) < self.config.freeze_last_layer:
            for head in (self.dino_head, self.patch_head):
                if head is not None:
                    for p in head.last_layer.parameters():
                        p.grad = None  # DINO's cancel_gradients_last_layer: no update, no weight decay

    def momentum(self, step: int, total: int) -> float:
        return teacher_momentum(step, total, self.config.momentum, self.config.momentum_end)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        update_momentum(self.student[0], self.teacher, self.momentum(step, total_steps))
        self.steps_done.fill_(step + 1)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        self.epoch.fill_(epoch + 1)
        if epoch + 1 == self.config.freeze_last_layer:
            self.unfreeze_step.copy_(self.steps_done)
        return {}

    # --- what a person looks at ---------------------------------------------------------------------
    def loss_reference(self, batch: int) -> float | None:
        """ln(prototypes): a student predicting the uniform distribution against a uniform teacher."""
        return math.log(self.config.prototypes)

    def plot_marks(self) -> list[tuple[int, str]]:
        s = int(self.unfreeze_step)
        return [(s, "last layer unfrozen")] if s > 0 else []

    def _embedding_modules(self) -> list[nn.Module]:
        return [self.backbone, self.dino_head]
