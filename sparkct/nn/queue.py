"""The one FIFO feature queue (SwAV's feature queue; any method that keeps past embeddings).

MoCo's queue of keys is the memory bank of :class:`sparkct.nn.InfoNCELoss` (``memory_bank_size=(K,
D)``), which the fused loss reads directly; it is not duplicated here.

:class:`FeatureQueue` holds the last ``size`` rows pushed, as a ring buffer (``push`` costs the rows
pushed, not the queue's length). ``features()`` returns them oldest first; until the queue has been
filled once it returns only the rows pushed so far, and ``full`` says whether it has been filled.
The buffers are persistent, so a resumed run continues with the same queue.
"""

from __future__ import annotations

import torch
from torch import nn

from sparkct.distributed import all_gather_rows

__all__ = ["FeatureQueue"]


class FeatureQueue(nn.Module):
    """FIFO queue of `size` rows of dimension `dim`.

    Args:
        size: rows kept (> 0).
        dim: row width.
        gather_distributed: push every rank's rows (rank order), so every rank holds the same queue;
            False (SwAV's choice) keeps a per-rank queue of the rank's own rows.
    """

    queue: torch.Tensor  # buffers (registered in __init__)
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int, dim: int, gather_distributed: bool = False):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim, self.gather_distributed = int(size), int(dim), bool(gather_distributed)
        self.register_buffer("queue", torch.zeros(self.size, self.dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows held (<= size)

    @property
    def full(self) -> bool:
        return int(self.count) >= self.size

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Append rows (N, dim) (detached); the oldest rows beyond `size` are dropped."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"FeatureQueue: expected rows (N, {self.dim}), got {tuple(rows.shape)}")
        if self.gather_distributed:
            rows = all_gather_rows(rows.detach())
        rows = rows.detach().to(self.queue)
        n = rows.shape[0]
        if n >= self.size:  # only the newest `size` rows survive
            rows, n = rows[n - self.size :], self.size
        p = int(self.ptr)
        first = min(n, self.size - p)
        self.queue[p : p + first] = rows[:first]
        if first < n:
            self.queue[: n - first] = rows[first:]
        self.ptr.fill_((p + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))

    def features(self) -> torch.Tensor:
        """The rows held, oldest first (a copy)."""
        c, p = int(self.count), int(self.ptr)
        if c < self.size:
            return self.queue[:c].clone()
        return torch.cat([self.queue[p:], self.queue[:p]], 0)

    @torch.no_grad()
    def clear(self) -> None:
        self.queue.zero_()
        self.ptr.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, gather_distributed={self.gather_distributed}"
