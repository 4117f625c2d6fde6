"""BatchNorm with statistics over every rank's batch, on any device and backend (gloo on CPU too).

torch's ``nn.SyncBatchNorm`` runs only on GPUs; DDP on CPUs (tests, small clusters) would otherwise
normalize each rank's part of the batch on its own, and training would differ from one process with the
global batch. Here the per-channel sums go through ``torch.distributed.nn.functional.all_reduce``, which
carries gradients (its backward all-reduces them), so forward and backward both equal BatchNorm on the
concatenated batch. Two passes (mean, then centred squares) keep the variance as accurate as BatchNorm's.
On a packed SparK tensor (visible cells only) the statistics are those of the visible positions of the
global batch, as SparK's SyncBN gives.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce

from sparkct.distributed import is_distributed

# The differentiable all_reduce is what this needs (its backward all-reduces the gradients); torch marks
# it deprecated in favour of functional collectives whose autograd support is still partial.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")

__all__ = ["GlobalBatchNorm1d", "GlobalBatchNorm2d", "convert_sync_batchnorm"]


if TYPE_CHECKING:  # what the mixin sees of the nn.BatchNorm class after it in the MRO
    _MixinBase = nn.modules.batchnorm._BatchNorm
else:
    _MixinBase = object


class _GlobalBatchNorm(_MixinBase):
    """The forward of the global BatchNorms (mixed into nn.BatchNorm1d / nn.BatchNorm2d)."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed(self.process_group)):
            return super().forward(x)
        self._check_input_dim(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(acc)
        C = x.shape[1]
        dims = (0,) + tuple(range(2, x.dim()))
        shape = (1, C) + (1,) * (x.dim() - 2)
        n_local = torch.tensor([x.numel() // max(C, 1)], dtype=acc, device=x.device)
        s = torch.cat([xf.sum(dims), n_local])
        s = all_reduce(s, group=self.process_group)
        n = s[C]
        mean = s[:C] / n
        d = xf - mean.view(shape)
        var = all_reduce(d.square().sum(dims), group=self.process_group) / n
        if self.track_running_stats:
            count, run_mean, run_var = self.num_batches_tracked, self.running_mean, self.running_var
            assert count is not None and run_mean is not None and run_var is not None  # track_running_stats
            with torch.no_grad():
                count.add_(1)  # in place: the buffer
                m = self.momentum if self.momentum is not None else 1.0 / float(count)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                run_mean.mul_(1 - m).add_(mean.detach().to(run_mean.dtype), alpha=m)
                run_var.mul_(1 - m).add_(unbiased.to(run_var.dtype), alpha=m)
        y = d * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.to(acc).view(shape) + self.bias.to(acc).view(shape)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return y.to(x.dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span all ranks of `process_group` (default: the world)."""


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d (the projection heads' (N, C) or (N, C, L)) with statistics over all ranks."""


def convert_sync_batchnorm(module: nn.Module, process_group=None, *, cuda_native: bool | None = None) -> nn.Module:
    """Replace every BatchNorm1d / BatchNorm2d in `module` (the backbone's and the projection heads') by a
    synchronized one, sharing parameters and buffers: torch's nn.SyncBatchNorm on CUDA (its fused kernels),
    GlobalBatchNorm1d / GlobalBatchNorm2d elsewhere."""
    if cuda_native is None:
        p = next(module.parameters(), None)
        cuda_native = p is not None and p.is_cuda
    if cuda_native:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert(module, process_group)


def _convert(m: nn.Module, group) -> nn.Module:
    classes: dict[type[nn.Module], type[_GlobalBatchNorm]] = {
        nn.BatchNorm2d: GlobalBatchNorm2d,
        nn.BatchNorm1d: GlobalBatchNorm1d,
    }
    cls = classes.get(type(m))
    if cls is not None and isinstance(m, nn.modules.batchnorm._BatchNorm):  # (true when cls is; types m)
        new = cls(
            m.num_features,
            m.eps,
            m.momentum,
            m.affine,
            m.track_running_stats,
            device=m.running_mean.device if m.running_mean is not None else None,
        )
        new.process_group = group
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        if m.track_running_stats:
            new.running_mean, new.running_var, new.num_batches_tracked = (
                m.running_mean,
                m.running_var,
                m.num_batches_tracked,
            )
        new.train(m.training)
        return new
    for name, child in m.named_children():
        converted = _convert(child, group)
        if converted is not child:
            setattr(m, name, converted)
    return m
