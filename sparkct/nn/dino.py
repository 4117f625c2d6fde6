"""DINO's parts (Caron et al. 2021) and the DINOv2 options (Oquab et al. 2023): the projection head, the
one loss function over prototype scores, teacher centering / Sinkhorn-Knopp, iBOT's patch loss, KoLeo,
and the published schedules.

:func:`prototype_cross_entropy` is the one place the DINO loss is computed, on the fused C++/CUDA op
:func:`sparkct.ops.prototype_cross_entropy` (the plain form is :func:`sparkct.ops.reference.prototype_cross_entropy`)::

    prototype_cross_entropy(student (S, B, D), teacher (T, B, D), w_student (K, D), w_teacher (K, D),
                            teacher_bias (K,) or None, student_temp, teacher_temp, skip_same=True)

= the mean over the valid pairs (teacher crop i, student crop j; i != j when `skip_same`, the crop
index being shared by the first min(S, T) crops) of ``mean_b -sum_k p_t[i, b, k] log_softmax(s[j, b] @
w_student.T / student_temp)_k`` with ``p_t[i, b] = softmax(t[i, b] @ w_teacher.T / teacher_temp +
teacher_bias)`` (no gradient through the teacher side). DINO's centering is ``teacher_bias = -center /
teacher_temp``; Sinkhorn-Knopp's codes are ``softmax(scores / teacher_temp + log r)`` with r the
per-prototype scaling the iterations accumulate (:func:`sinkhorn_bias`), since the last iteration
normalizes each sample. Logits are computed in float32 (or float64 for float64 inputs), outside autocast.

:class:`DINOHead` is DINO's ``DINOHead``: an MLP (3 layers, hidden 2048, GELU, optional BatchNorm) to a
256-d bottleneck, L2-normalized, then a weight-normalized bias-free linear layer over K prototypes whose
norms g start at 1 and stay fixed with ``norm_last_layer`` (DINO's default); ``forward`` returns the
normalized bottleneck features and :meth:`DINOHead.weight` the last layer's ``g * v / ||v||`` (K, D).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparkct.distributed import is_distributed
from sparkct.ops.prototype_ce import prototype_cross_entropy as fused_prototype_cross_entropy
from sparkct.ops.prototype_ce import prototype_sinkhorn
from sparkct.profiling import ranged

__all__ = [
    "prototype_cross_entropy",
    "DINOHead",
    "center_update",
    "sinkhorn_bias",
    "ibot_patch_loss",
    "koleo_loss",
    "teacher_temperature",
    "teacher_momentum",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def prototype_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    w_student: torch.Tensor,
    w_teacher: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    student_temp: float,
    teacher_temp: float,
    skip_same: bool = True,
    *,
    return_stats: bool = False,
):
    """DINO's multi-crop cross-entropy (see the module docstring); a scalar, or (scalar, {"teacher_entropy",
    "kl"}) with `return_stats`. It runs on the fused op (:func:`sparkct.ops.prototype_cross_entropy`: the
    (crops x B) x K logits are never formed) in float32, or float64 for float64 inputs, outside autocast,
    so that bf16/fp16 training still scores prototypes in float32 as DINO's fp32 loss does."""
    dt = _compute_dtype(student, w_student)
    bias = None if teacher_bias is None else teacher_bias.detach().to(dt)
    with torch.autocast(student.device.type, enabled=False):
        return fused_prototype_cross_entropy(
            student.to(dt),
            teacher.detach().to(dt),
            w_student.to(dt),
            w_teacher.detach().to(dt),
            bias,
            student_temp,
            teacher_temp,
            skip_same,
            return_stats=return_stats,
        )


class _WeightNormLinear(nn.Module):
    """The parameters of ``nn.utils.weight_norm(nn.Linear(D, K, bias=False))``: direction v (K, D) and
    norms g (K, 1), under the same names (DINO's checkpoints call them weight_v, weight_g)."""

    def __init__(self, v: torch.Tensor, g: torch.Tensor, train_g: bool):
        super().__init__()
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(g, requires_grad=train_g)


class DINOHead(nn.Module):
    """DINO's projection head (``vision_transformer.DINOHead``): see the module docstring."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():  # DINO's _init_weights: truncated normal (std 0.02), zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm(Linear(bottleneck, K, bias=False)) with weight_g filled with 1: v keeps Linear's init
        v = nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach()
        self.last_layer = _WeightNormLinear(v.clone(), torch.ones(out_dim, 1), not norm_last_layer)
        self.out_dim, self.bottleneck_dim = int(out_dim), int(bottleneck_dim)

    def weight(self) -> torch.Tensor:
        """The last layer's weights (K, D): ``g * v / ||v||`` (rows of norm g; g = 1 when frozen)."""
        v, g = self.last_layer.weight_v, self.last_layer.weight_g
        return v * (g / v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalized bottleneck features (N, D) of backbone features x (N, in_dim)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """DINOHead's output in DINO's code: the prototype scores (N, K)."""
        return self(x) @ self.weight().t()


@torch.no_grad()
def center_update(
    center: torch.Tensor, teacher: torch.Tensor, w_teacher: torch.Tensor, momentum: float, gather: bool = True
) -> None:
    """DINO's ``update_center`` in place: ``center <- m * center + (1 - m) * mean(teacher scores)`` over the
    global batch. The mean of the scores ``t @ w.T`` is ``mean(t) @ w.T`` (one (D,) sum all-reduced, not
    (K,)); `teacher` is (N, D) or (T, B, D), `center` (K,)."""
    t = teacher.detach().reshape(-1, teacher.shape[-1])
    dt = _compute_dtype(t, center)
    total = torch.cat([t.to(dt).sum(0), t.new_tensor([float(t.shape[0])], dtype=dt)])
    if gather and is_distributed():
        dist.all_reduce(total)
    if float(total[-1]) == 0:  # no rows anywhere (iBOT with no masked patch): the centre stays
        return
    mean = total[:-1] / total[-1]
    with torch.autocast(center.device.type, enabled=False):
        batch_center = w_teacher.detach().to(dt) @ mean
    center.mul_(momentum).add_(batch_center.to(center.dtype), alpha=1.0 - momentum)


@torch.no_grad()
def sinkhorn_bias(
    teacher: torch.Tensor, w_teacher: torch.Tensor, teacher_temp: float, iterations: int = 3, gather: bool = True
) -> torch.Tensor:
    """The log per-prototype scaling (K,) of DINOv2's ``sinkhorn_knopp_teacher`` over the teacher's rows
    (N, D) (or (T, B, D): all crops together, as DINOv2) of the global batch: its codes equal
    ``softmax(t @ w.T / teacher_temp + bias)``. On the tiled op :func:`sparkct.ops.prototype_sinkhorn`
    (the N x K assignment is never formed), float32 at least, its sums over the samples all-reduced; a rank
    with no rows (iBOT: no masked patch there) takes part with zeros, and no rows anywhere gives zeros."""
    if iterations < 1:
        raise ValueError(f"sinkhorn_bias: iterations must be >= 1, got {iterations}")
    t = teacher.detach().reshape(-1, teacher.shape[-1])
    dt = _compute_dtype(t, w_teacher)
    reduce = dist.all_reduce if gather and is_distributed() else None
    with torch.autocast(t.device.type, enabled=False):
        return prototype_sinkhorn(t.to(dt), w_teacher.detach().to(dt), teacher_temp, iterations, all_reduce=reduce)


@ranged("loss/ibot_patch_loss")
def ibot_patch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    image: torch.Tensor,
    n_images: int,
    w_student: torch.Tensor,
    w_teacher: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """iBOT's masked-patch loss as DINOv2's ``iBOTPatchLoss.forward_masked``: the student's masked patch
    features (M, D) predict the teacher's (unmasked crop's) features at the same patches (M, D);
    ``image`` (M,) long says which of the `n_images` images each patch is in. Each patch's cross-entropy
    is weighted by 1 / (masked patches of its image), summed, and divided by `n_images` (every image of
    the global crops, masked or not)."""
    if student.shape != teacher.shape or student.dim() != 2 or image.shape != (student.shape[0],):
        raise ValueError(
            f"ibot_patch_loss: expected student, teacher (M, D) and image (M,), got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}, {tuple(image.shape)}"
        )
    dt = _compute_dtype(student, w_student)
    if student.shape[0] == 0:
        return (student.sum() + w_student.sum()).to(dt) * 0.0
    counts = torch.bincount(image, minlength=n_images).clamp(min=1).to(dt)
    weight = 1.0 / counts[image]
    with torch.autocast(student.device.type, enabled=False):
        with torch.no_grad():
            t = teacher.detach().to(dt) @ w_teacher.detach().to(dt).t() / teacher_temp
            if teacher_bias is not None:
                t = t + teacher_bias.detach().to(dt)
            p = torch.softmax(t, dim=-1)
        logp = torch.log_softmax(student.to(dt) @ w_student.to(dt).t() / student_temp, dim=-1)
        return -((p * logp).sum(-1) * weight).sum() / n_images


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's ``KoLeoLoss``: ``-mean_i log(||z_i - z_nn(i)|| + eps)`` over the L2-normalized rows z of
    x (N, D), nn(i) the row of largest dot product with z_i other than itself (float32 at least)."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss: expected (N >= 2, D), got {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        z = F.normalize(x.to(_compute_dtype(x)), eps=eps, p=2, dim=-1)
        with torch.no_grad():
            dots = z @ z.t()
            dots.fill_diagonal_(-1.0)
            nn_index = dots.argmax(1)
        d = F.pairwise_distance(z, z[nn_index], p=2, eps=eps)
        return -torch.log(d + eps).mean()


def teacher_temperature(epoch: int, start: float, end: float, warmup_epochs: int) -> float:
    """DINO's teacher temperature of `epoch` (0-based): ``linspace(start, end, warmup_epochs)[epoch]``
    during the warm-up, `end` after it."""
    if epoch < warmup_epochs:
        return float(np.linspace(start, end, warmup_epochs)[epoch])
    return float(end)


def teacher_momentum(step: int, total: int, start: float, end: float = 1.0) -> float:
    """DINO's EMA momentum of iteration `step` of `total` (``utils.cosine_scheduler(start, end, ...)``):
    ``end + (start - end) * (1 + cos(pi * step / total)) / 2``."""
    if total < 1:
        return float(end)
    step = min(max(int(step), 0), total - 1)
    return float(end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total)))
