"""Shared by the contrastive method tests: a tiny backbone, synthetic HU slices, a plain training
loop (the trainer-level tests are the trainer's), and the chunked-vs-unchunked gradient check."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 16


def tiny_backbone(norm: str = "batch") -> nn.Module:
    """A 2-conv net with a pooled 16-d output (what a ResNet with fc = Identity gives, smaller)."""

    def n(c):
        return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(2, c)

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1),
        n(8),
        nn.ReLU(),
        nn.Conv2d(8, FEATURES, 3, 2, 1),
        n(FEATURES),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def synthetic_hu(n: int = 16, size: int = 48, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) int16 HU: smooth random blobs between air and bone, different per slice."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, 6, 6, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x * 400 - 200).clamp(-1024, 1500).to(torch.int16)


def train(method, steps: int = 30, lr: float = 3e-3, crop: int = 32, hu=None, seed: int = 0):
    """A plain loop: (losses, collapse indicators) per step. Use the 'light' augmentation: with the
    strong presets a 2-conv net on smooth blobs barely learns in 30 steps."""
    hu = synthetic_hu() if hu is None else hu
    tf = method.transform(crop, "lung")
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses, collapse = [], []
    for step in range(steps):
        views = tf(hu, torch.Generator().manual_seed(seed * 1000 + step))
        opt.zero_grad(set_to_none=True)
        loss, logs = method.training_step(views, step)
        if not method.manual_backward:
            loss.backward()
        method.on_before_optimizer_step(step)
        opt.step()
        method.after_step(step, steps)
        losses.append(float(loss.detach()))
        collapse.append(float(logs["collapse"]))
    return losses, collapse


def grads_chunked_vs_unchunked(make, views, chunk: int, step: int = 0):
    """Parameter gradients of one step of `make(chunk)` methods (float64, eval mode: no batch
    statistics), unchunked and chunked, after the same start."""
    base = make(0).double().eval()
    other = copy.deepcopy(base)
    other.config.chunk = chunk
    other.manual_backward = True
    if isinstance(views, tuple):  # (views, targets)
        views = ([v.double() for v in views[0]], views[1])
    else:
        views = [v.double() for v in views]
    loss0, _ = base.training_step(views, step)
    loss0.backward()
    loss1, _ = other.training_step(views, step)
    g0 = {k: p.grad for k, p in base.named_parameters() if p.grad is not None}
    g1 = {k: p.grad for k, p in other.named_parameters() if p.grad is not None}
    return float(loss0.detach()), float(loss1), g0, g1
