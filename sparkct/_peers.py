"""Peer libraries as oracles and baselines (tests, benchmarks): spconv's submanifold convolution.

spconv 2.3.8's CPU build computes SubMConv2d wrongly: its 2-D CPU rule book keeps only the centre
tap (a 3x3 kernel with only an off-centre weight gives all-zero output), while SubMConv3d on the
same CPU build is correct. A 2-D submanifold conv is exactly a 3-D one on a grid of depth 1 with a
(1, k, k) kernel, so where the 2-D path fails its own check, the 3-D path stands in for it: still
spconv's submanifold convolution, on the same active pixels and weights. On the CPU spconv also
builds its rule book wrongly when torch runs more than one intra-op thread (seen with 2 threads on
the development machines: errors of the order of the outputs), so CPU calls run single-threaded.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F


def _spconv():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import spconv.pytorch as spconv  # noqa: PLC0415 (lazy: optional dependency)
    return spconv


@contextlib.contextmanager
def _cpu_single_thread(device):
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def spconv_2d_is_correct(device: str) -> bool:
    """Does spconv's SubMConv2d agree with a dense conv kept at the active pixels on `device`?"""
    spconv = _spconv()
    g = torch.Generator().manual_seed(0)
    H, W, C, O = 6, 7, 3, 2
    x = torch.randn(1, C, H, W, generator=g)
    act = torch.rand(1, H, W, generator=g) < 0.7
    x = x * act[:, None]
    idx = act.nonzero().int()
    feats = x.permute(0, 2, 3, 1)[act].contiguous()
    conv = spconv.SubMConv2d(C, O, 3, padding=1, bias=False)
    w = torch.randn(O, C, 3, 3, generator=g)
    with torch.no_grad():
        conv.weight.copy_(w.permute(0, 2, 3, 1))
    conv = conv.to(device)
    with torch.no_grad(), _cpu_single_thread(device):
        out = conv(spconv.SparseConvTensor(feats.to(device), idx.to(device), [H, W], 1)).dense().cpu()
    ref = F.conv2d(x, w, padding=1) * act[:, None]
    return bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-4))


class SpconvSubMConv:
    """spconv's submanifold k x k convolution on given active pixels of a 2-D batch.

    weight: (O, C, k, k) in torch's layout (copied into spconv's (O, [1,] k, k, C) layout).
    idx: (N, 3) int32 (b, y, x) of the active pixels; shape: (H, W); feats: (N, C).
    ``self.kind`` says which spconv module runs: "SubMConv2d", or "SubMConv3d (depth 1)" where
    this spconv build's 2-D path is wrong (see the module docstring).
    """

    def __init__(self, weight: torch.Tensor, idx: torch.Tensor, shape, batch: int):
        spconv = _spconv()
        O, C, k, _ = weight.shape
        dev = weight.device
        self.use_3d = not spconv_2d_is_correct(dev.type)
        if self.use_3d:
            conv = spconv.SubMConv3d(C, O, (1, k, k), padding=(0, k // 2, k // 2), bias=False)
            w = weight.permute(0, 2, 3, 1).unsqueeze(1)  # (O, 1, k, k, C)
            self.idx = torch.cat([idx[:, :1], torch.zeros_like(idx[:, :1]), idx[:, 1:]], 1).int().contiguous()
            self.shape = [1, int(shape[0]), int(shape[1])]
            self.kind = "SubMConv3d (depth 1)"
        else:
            conv = spconv.SubMConv2d(C, O, k, padding=k // 2, bias=False)
            w = weight.permute(0, 2, 3, 1)  # (O, k, k, C)
            self.idx = idx.int().contiguous()
            self.shape = [int(shape[0]), int(shape[1])]
            self.kind = "SubMConv2d"
        conv = conv.to(device=dev, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
        self.conv = conv
        self.batch = batch
        self._spconv = spconv

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C) features of the active pixels -> (N, O) outputs, in the order of `idx`."""
        st = self._spconv.SparseConvTensor(feats, self.idx, self.shape, self.batch)
        with _cpu_single_thread(feats.device):
            out = self.conv(st)
        # submanifold: the output sites are the input sites; spconv keeps their order
        assert torch.equal(out.indices, self.idx), "spconv reordered the active sites"
        return out.features
