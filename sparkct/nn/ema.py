"""The one EMA / momentum update and its schedule (MoCo's key encoder, BYOL's target).

``update_momentum(model, ema, m)``: ``ema <- m * ema + (1 - m) * model`` for every parameter
(lightly's rule). Buffers (BatchNorm running statistics) are not averaged: the EMA copy keeps its
own, updated by its own forward passes, as in MoCo's and BYOL's code. The update runs under
``no_grad`` on every rank with the same parameters (DDP keeps them equal), so the EMA copies stay
identical on every rank.

``cosine_schedule(step, total, start, end)``: ``start`` at step 0, rising (or falling) along half a
cosine to ``end`` at step ``total - 1`` and after it (lightly's ``cosine_schedule``). MoCo's fixed
0.999 is ``start == end``; BYOL's 0.99 -> 1.0 is ``cosine_schedule(step, total, 0.99, 1.0)``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["update_momentum", "cosine_schedule", "momentum_copy", "MomentumEncoder"]


@torch.no_grad()
def update_momentum(model: nn.Module, ema: nn.Module, m: float) -> None:
    """``ema.p <- m * ema.p + (1 - m) * model.p`` for every parameter pair (same order, same shapes)."""
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    src = [p.detach() for p in model.parameters()]
    dst = [p.detach() for p in ema.parameters()]
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst)):
        raise ValueError("update_momentum: model and ema have different parameters")
    if not dst:
        return
    torch._foreach_lerp_(dst, [s.to(d.dtype) for s, d in zip(src, dst)], 1.0 - m)


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """Value at `step` of a half-cosine from `start` (step 0) to `end` (step total - 1 and later)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if total <= 1 or step >= total - 1:
        return float(end)
    return float(end - (end - start) * (math.cos(math.pi * step / (total - 1)) + 1) / 2)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` that takes no gradients (the EMA / key / target encoder)."""
    ema = copy.deepcopy(module)
    ema.requires_grad_(False)
    return ema


class MomentumEncoder(nn.Module):
    """An EMA copy of `online` (a module, e.g. ``nn.Sequential(backbone, head)``) with its momentum
    schedule: ``update(step, total)`` applies ``update_momentum`` with
    ``cosine_schedule(step, total, start, end)`` and returns the momentum used. The online module is
    not registered here (it belongs to the method); only the copy is, so it is checkpointed."""

    def __init__(self, online: nn.Module, start: float = 0.999, end: float | None = None):
        super().__init__()
        for name, v in (("start", start), ("end", end if end is not None else start)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"momentum {name} must be in [0, 1], got {v}")
        self.start, self.end = float(start), float(end if end is not None else start)
        self.ema = momentum_copy(online)
        self._online = [online]  # a list, so nn.Module does not register (and checkpoint) it twice

    def momentum(self, step: int, total: int) -> float:
        return cosine_schedule(step, total, self.start, self.end)

    @torch.no_grad()
    def update(self, step: int, total: int) -> float:
        m = self.momentum(step, total)
        update_momentum(self._online[0], self.ema, m)
        return m

    def forward(self, *args, **kwargs):
        return self.ema(*args, **kwargs)
