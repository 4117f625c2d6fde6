"""Optimizers and schedules: the one place a method's parameters meet an optimizer.

* ``build_optimizer``: LAMB (SparK's default, betas 0.9/0.95) and LARS from timm.optim, AdamW / Adam / SGD
  from torch.optim; two parameter groups, no weight decay on biases, every 1-D parameter (norms) and the
  names a method lists (mask tokens, prototypes ...). LARS also skips its trust ratio on those
  (``trust_clip``/exclusion as timm does it for groups with weight_decay 0).
* ``lr_at`` / ``wd_at``: linear warm-up then half-cycle cosine for the learning rate (from
  ``warmup_start`` x peak to ``final_lr`` x peak, the floors SparK's author uses), cosine weight decay
  from ``wd`` to ``wd_end``. ``apply_schedule`` writes them into the groups, times each group's
  ``lr_scale`` (fine-tuning freezes/ramps the backbone through it).
* ``scaled_lr``: lr = base_lr x global batch / 256.
* ``clip_per_parameter_``: each parameter's gradient scaled to norm <= max_norm on its own (DINO's
  ``utils.clip_gradients``: factor ``max_norm / (norm + 1e-6)`` where below 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparkct.errors import UserError

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "param_groups",
    "lr_at",
    "wd_at",
    "apply_schedule",
    "scaled_lr",
    "clip_per_parameter_",
]

OPTIMIZERS = ("lamb", "lars", "adamw", "adam", "sgd")


def param_groups(module: nn.Module, weight_decay: float, no_decay: set[str] | frozenset = frozenset()) -> list[dict]:
    decay: list[nn.Parameter] = []
    skip: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (skip if p.ndim <= 1 or name.endswith(".bias") or name in no_decay else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "decay": True, "lr_scale": 1.0})
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0, "decay": False, "lr_scale": 1.0})
    return groups


def build_optimizer(
    module: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    *,
    betas=(0.9, 0.95),
    momentum: float = 0.9,
    no_decay=frozenset(),
    groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """`name` in OPTIMIZERS; `groups` overrides the default two groups (each may carry an ``lr_scale``)."""
    name = str(name).lower()
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"learning rate must be finite and > 0, got {lr}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise UserError(f"weight decay must be finite and >= 0, got {weight_decay}")
    if groups is None:
        groups = param_groups(module, weight_decay, set(no_decay))
    if not groups:
        raise UserError("the model has no trainable parameters")
    betas = tuple(float(b) for b in betas)
    if name == "lamb":
        from timm.optim import Lamb  # noqa: PLC0415 (lazy: optional here, only lamb/lars need timm)

        # max_grad_norm=None: the trainer clips (or not) itself; timm would clip at 1.0 silently
        return Lamb(groups, lr=lr, betas=betas, weight_decay=weight_decay, max_grad_norm=None)
    if name == "lars":
        from timm.optim import Lars  # noqa: PLC0415 (lazy: optional here, only lamb/lars need timm)

        return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    return float(base_lr) * global_batch / 256.0


def lr_at(
    step: int, total: int, warmup: int, peak: float, *, warmup_start: float = 0.005, final_lr: float = 0.001
) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warm-up over `warmup` steps
    from warmup_start x peak to peak, then half-cycle cosine down to final_lr x peak at the last step."""
    if warmup > 0 and step < warmup:
        return peak * (warmup_start + (1.0 - warmup_start) * step / warmup)
    span = max(1, total - 1 - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return peak * (final_lr + (1.0 - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t)))


def wd_at(step: int, total: int, wd: float, wd_end: float) -> float:
    """Weight decay of step `step`: half-cycle cosine from wd (step 0) to wd_end (last step)."""
    t = min(1.0, max(0.0, step / max(1, total - 1)))
    return wd_end + (wd - wd_end) * 0.5 * (1.0 + math.cos(math.pi * t))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if g.get("decay", True):
            g["weight_decay"] = wd


@torch.no_grad()
def clip_per_parameter_(parameters, max_norm: float) -> float:
    """Clip each parameter's gradient to norm `max_norm` on its own (DINO's ``clip_gradients``); returns
    the global gradient norm before clipping (what the trainer logs as grad_norm)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]
    for g, n in zip(grads, norms):
        coef = max_norm / (n + 1e-6)
        if coef < 1:
            g.mul_(coef)
    return float(torch.linalg.vector_norm(torch.stack([n.double() for n in norms]), 2.0))
