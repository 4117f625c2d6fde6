"""Rank and world size, and the one all-gather with gradient (used by the losses and the trainer).

Every helper here is a no-op (rank 0 of 1) when torch.distributed is not initialized, so single-process
code calls them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "row_counts",
    "all_gather_rows",
    "gather_with_grad",
    "barrier",
]


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (writes checkpoints, logs, reports)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def row_counts(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's row count (ranks may differ: the last batch of an epoch often does)."""
    if not is_distributed(group):
        return [int(n)]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    return torch.cat(counts).tolist()  # one device-to-host copy, not one per rank


def all_gather_rows(x: torch.Tensor, counts: list[int] | None = None, group=None) -> torch.Tensor:
    """Every rank's x concatenated along dim 0, rank r contributing counts[r] rows (no gradient)."""
    if not is_distributed(group):
        return x
    if counts is None:
        counts = row_counts(x.shape[0], x.device, group)
    big = max(counts)
    local = x.contiguous()
    if local.shape[0] < big:  # collectives want one shape on every rank (NCCL does): pad, then trim
        local = torch.cat([local, local.new_zeros((big - local.shape[0],) + tuple(local.shape[1:]))], 0)
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], 0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradients of every rank's copy and returns
    this rank's rows (each rank's loss depends on every rank's rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group):
        r = dist.get_rank(group)
        ctx.group, ctx.lo, ctx.hi = group, sum(counts[:r]), sum(counts[: r + 1])
        return all_gather_rows(x, counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank holds the same gathered shape, so one all-reduce sums every rank's gradient.
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.lo : ctx.hi], None, None


def gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """(every rank's rows concatenated, the offset of this rank's rows in it); the gradient of the
    result flows back to every rank's x (summed over the ranks that used it). Single process: (x, 0)."""
    if not is_distributed(group):
        return x, 0
    counts = row_counts(x.shape[0], x.device, group)
    return _GatherWithGrad.apply(x, counts, group), sum(counts[: dist.get_rank(group)])
