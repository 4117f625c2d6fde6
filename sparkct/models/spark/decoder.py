"""SparK's light decoder (its pretrain/decoder.py), reconstructing CT windows instead of RGB.

Five U-Net blocks, each a 2x up-sampling (ConvTranspose2d k4 s2 p1) then conv3x3-BN-ReLU6-conv3x3-BN,
take the stride-32 features to full resolution; the width starts at ``width`` (768 as published) and
halves at every block (768, 384, 192, 96, 48 -> 24); a final 1x1 conv maps to ``out_chans`` (the
number of HU windows). The densified encoder features of strides 32, 16, 8, 4 are added before
blocks 0..3 (``forward(to_dec)`` with the deepest first, each already projected to the block's width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch.nn as nn
from torch import Tensor

__all__ = ["UNetBlock", "LightDecoder", "decoder_channels"]


def decoder_channels(width: int, blocks: int = 5) -> list[int]:
    """The published halving rule: [width, width/2, ..., width/2**blocks]."""
    return [width // 2**i for i in range(blocks + 1)]


class UNetBlock(nn.Sequential):
    """2x up-sampling, then conv3x3-BN-ReLU6-conv3x3-BN (cin -> cout). A Sequential, so its forward is
    the plain chain and the state_dict keys are ``up_sample.*`` / ``conv.*`` as in SparK's checkpoints."""

    def __init__(self, cin: int, cout: int, norm=nn.BatchNorm2d):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, stride=1, padding=1, bias=False),
            norm(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False),
            norm(cout),
        )


class LightDecoder(nn.Module):
    """SparK's light decoder.

    Args:
        out_chans: channels reconstructed (the input's: one per HU window, 1..3).
        width: channels of the first block (768 as published); must be divisible by 2**blocks.
        up_sample_ratio: total up-sampling (the encoder's stride, 32): log2 of it blocks.
        norm: the normalization layer class (BatchNorm2d; the trainer converts to SyncBatchNorm under
            DDP, as SparK's ``sbn``).
    """

    def __init__(self, out_chans: int = 3, width: int = 768, up_sample_ratio: int = 32, norm=nn.BatchNorm2d):
        super().__init__()
        n = round(math.log2(up_sample_ratio)) if up_sample_ratio > 0 else -1
        if n < 1 or 2**n != up_sample_ratio:
            raise ValueError(f"up_sample_ratio must be a power of two >= 2, got {up_sample_ratio}")
        if not isinstance(width, int) or width < 2**n or width % 2**n:
            raise ValueError(f"decoder width must be a positive multiple of {2**n} (it halves {n} times), got {width}")
        if not isinstance(out_chans, int) or out_chans < 1:
            raise ValueError(f"out_chans must be a positive integer, got {out_chans!r}")
        self.width, self.out_chans = width, out_chans
        chans = decoder_channels(width, n)
        self.dec = nn.ModuleList([UNetBlock(cin, cout, norm) for cin, cout in zip(chans[:-1], chans[1:])])
        self.proj = nn.Conv2d(chans[-1], out_chans, kernel_size=1, stride=1, bias=True)
        self.initialize()

    @property
    def in_widths(self) -> list[int]:
        """Input channels of each block (what the densify projections must produce)."""
        return [cast(UNetBlock, blk).up_sample.in_channels for blk in self.dec]

    def initialize(self) -> None:
        """SparK's init: convs trunc-normal std 0.02 (bias 0), transposed convs Kaiming fan-out (bias 0),
        norms weight 1 bias 0. (In SparK's if-chain ``nn.Conv2d`` is tested first; ConvTranspose2d is not a
        Conv2d, so it falls through to Kaiming.)"""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"width={self.width}, out_chans={self.out_chans}"

    def forward(self, to_dec: Sequence[Tensor | None]) -> Tensor:
        """``to_dec``: densified features, deepest first (strides 32, 16, 8, 4; None skips one), each
        with the width of the block it enters. Returns (B, out_chans, 32 * h, 32 * w)."""
        x = None
        for i, blk in enumerate(self.dec):
            t = to_dec[i] if i < len(to_dec) else None
            if t is not None:
                # x is a fresh BN output nobody saved for backward: add in place (SparK: x = x + t)
                x = t if x is None else x.add_(t)
            if x is None:
                raise ValueError("the decoder needs the deepest feature map (to_dec[0])")
            x = blk(x)
        return self.proj(x)
