"""SwAV's loss: Sinkhorn-Knopp equipartition codes and the swapped prediction (Caron et al. 2020).

:func:`sinkhorn` turns scores (N, K) (cosines of features and prototypes) into soft codes Q (N, K):
``Q = exp(scores / epsilon)`` normalized so that, over the global batch of B rows, every prototype
gets the same total mass B / K and every row (sample) sums to 1, alternating per-prototype and
per-sample normalization (`iterations` rounds, ending on the per-sample one: each sample's code sums
to 1 exactly, and the prototype totals approach B / K). Always computed in float32 (under autocast the
scores may be fp16 / bf16, whose
exponent range ``exp(1 / 0.05)`` would overflow); the global maximum is subtracted first (a constant
factor that the first normalization removes). With ``gather_distributed`` and torch.distributed
initialized, the prototype totals are all-reduced, so the codes are those of the global batch
(SwAV's ``distributed_sinkhorn``) without gathering the scores themselves.

:class:`SwAVLoss` is lightly's ``SwaVLoss`` (same arguments, same value): for each high-resolution
crop i, codes q_i (no gradient, optionally with queue rows appended for the equipartition, then
dropped) are predicted by every other crop v: ``-mean_n sum_k q_i[n, k] log softmax(s_v[n] / T)_k``,
averaged over the (n_crops - 1) predicting crops and over the high-resolution crops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparkct.distributed import is_distributed
from sparkct.profiling import ranged

__all__ = ["sinkhorn", "SwAVLoss"]


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False
) -> torch.Tensor:
    """Soft codes (N, K) float32 of scores (N, K); see the module docstring."""
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"sinkhorn: expected non-empty scores (N, K), got {tuple(scores.shape)}")
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be >= 1, got {iterations}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    distributed = gather_distributed and is_distributed()
    s = scores.detach().float()
    top = s.max()
    if distributed:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    Q = torch.exp((s - top) / epsilon).t()  # (K, N)
    K = Q.shape[0]
    total = torch.stack([Q.sum(), Q.new_tensor(float(Q.shape[1]))])  # (mass, rows) in one all-reduce
    if distributed:
        dist.all_reduce(total)
    Q /= total[0]
    B = total[1]
    for _ in range(iterations):
        per_prototype = Q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(per_prototype)
        Q /= per_prototype * K  # every prototype: mass 1 / K
        Q /= Q.sum(dim=0, keepdim=True) * B  # every row: mass 1 / B
    return (Q * B).t()


class SwAVLoss(nn.Module):
    """Swapped prediction over multi-crop scores (lightly's ``SwaVLoss``, float32 inside).

    Args:
        temperature: of the predicting softmax (0.1 in SwAV).
        sinkhorn_iterations, sinkhorn_epsilon: of :func:`sinkhorn` (3, 0.05 in SwAV).
        sinkhorn_gather_distributed: codes over the global batch under DDP.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"SwAVLoss: temperature must be > 0, got {temperature}")
        if sinkhorn_gather_distributed and not dist.is_available():
            raise ValueError("SwAVLoss: sinkhorn_gather_distributed needs torch.distributed")
        self.temperature = float(temperature)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.sinkhorn_gather_distributed = bool(sinkhorn_gather_distributed)

    def codes(self, scores: torch.Tensor, queue_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of `scores` (N, K), with `queue_scores` (M, K) joining the equipartition."""
        s = scores.detach()
        if queue_scores is not None and len(queue_scores):
            s = torch.cat([s, queue_scores.detach().to(s.dtype)], 0)
        q = sinkhorn(s, self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed)
        return q[: scores.shape[0]]

    def subloss(self, scores: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of codes q against softmax(scores / T), mean over rows."""
        return -(q * F.log_softmax(scores.float() / self.temperature, dim=1)).sum(1).mean()

    @ranged("loss/SwAVLoss")
    def forward(
        self,
        high_resolution: list[torch.Tensor],
        low_resolution: list[torch.Tensor] | None = None,
        queue: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        low_resolution = list(low_resolution or [])
        n_high = len(high_resolution)
        n_crops = n_high + len(low_resolution)
        if n_high < 1 or n_crops < 2:
            raise ValueError(
                f"SwAVLoss needs >= 1 high-resolution crop and >= 2 crops in all, got {n_high} and {n_crops}"
            )
        if queue is not None and len(queue) != n_high:
            raise ValueError(f"SwAVLoss: one queue score tensor per high-resolution crop ({n_high}), got {len(queue)}")
        loss = high_resolution[0].new_zeros((), dtype=torch.float32)
        for i in range(n_high):
            q = self.codes(high_resolution[i], queue[i] if queue is not None else None)
            sub: torch.Tensor | int = sum(self.subloss(high_resolution[v], q) for v in range(n_high) if v != i)
            sub = sub + sum(self.subloss(z, q) for z in low_resolution)
            loss = loss + sub / (n_crops - 1)
        return loss / n_high
