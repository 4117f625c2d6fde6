"""A torchvision ResNet run on the visible cells of a SparK mask only.

    enc = SparseEncoder.from_dense(torchvision.models.resnet50())   # or sparsify(model)
    feats = enc(images, mask)        # mask (B, H/32, W/32) bool, True = visible
    # feats: dense (B, C_s, H/s, W/s) maps for s = 4, 8, 16, 32, zero at masked cells
    enc.to_dense()                   # the very same torchvision model

The encoder holds the model's own modules (shared, not copied), registered under the model's names
(conv1, bn1, ..., layer4), so its state_dict is the model's minus the classifier, optimizers see the
model's parameters, and BatchNorm running statistics update in the model. It computes exactly what
SparK's dense-masked encoder computes (`sparkct.models.spark.reference.spark_dense_masked_features`: every conv
and pool dense, then masked cells zeroed; BatchNorm over visible positions), but on packed tiles:

* 1x1 convs, BatchNorm (also nn.SyncBatchNorm: statistics over the visible positions of every rank),
  ReLU and residual adds run unchanged on the packed tensor (A, C, c, c);
* k x k convs run as halo + valid conv, or, where output cells are at most ``gemm_max_cell`` wide, as
  im2col over visible positions + one GEMM; the stem's 7x7/2 conv and the 3x3/2 max-pool (border -inf,
  masked cells 0) take halos from the 32x32 input cells.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck

from sparkct.ops.sparse import CellLayout, cell_layout, pack, sparse_conv2d, sparse_max_pool2d, unpack
from sparkct.profiling import ranged

__all__ = ["SparseEncoder", "sparsify"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _block_types():
    return BasicBlock, Bottleneck


def _square(v, what: str, name: str) -> int:
    if isinstance(v, str):
        raise ValueError(f"{name}: padding={v!r} is not supported by sparse layers; use an explicit integer")
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise ValueError(f"{name}: non-square {what} {tuple(v)} is not supported by sparse layers")
        v = v[0]
    return int(v)


def _check_module(m: nn.Module, name: str) -> None:
    """Raise on layers the packed execution does not reproduce exactly."""
    BasicBlock, Bottleneck = _block_types()
    if isinstance(m, nn.Conv2d):
        if type(m) is not nn.Conv2d:
            raise ValueError(f"{name}: {type(m).__name__} (a Conv2d subclass) may change forward(); not supported")
        if _square(m.dilation, "dilation", name) != 1:
            raise ValueError(f"{name}: dilated convs are not supported (dilation={m.dilation})")
        if m.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={m.padding_mode!r} is not supported (zeros only)")
        _square(m.kernel_size, "kernel", name)
        _square(m.stride, "stride", name)
        _square(m.padding, "padding", name)
    elif isinstance(m, nn.MaxPool2d):
        if m.ceil_mode or m.return_indices or _square(m.dilation, "dilation", name) != 1:
            raise ValueError(f"{name}: max-pool with ceil_mode / return_indices / dilation is not supported")
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise ValueError(f"{name}: {type(m).__name__} is not supported (BatchNorm2d / SyncBatchNorm)")
    elif isinstance(m, (nn.ReLU, nn.Identity)):
        pass
    elif isinstance(m, nn.Sequential):
        for i, sub in enumerate(m):
            _check_module(sub, f"{name}.{i}")
    elif isinstance(m, (BasicBlock, Bottleneck)):
        for sub_name, sub in m.named_children():
            _check_module(sub, f"{name}.{sub_name}")
    else:
        raise ValueError(
            f"{name}: {type(m).__name__} is not supported by the sparse encoder (its semantics on "
            "masked cells are not SparK's); supported: Conv2d, BatchNorm2d/SyncBatchNorm, ReLU, "
            "MaxPool2d, torchvision BasicBlock/Bottleneck, Sequential"
        )


class SparseEncoder(nn.Module):
    """The convolutional body of a torchvision ResNet (18/34/50/101/152, ResNeXt, wide ResNets) on
    packed visible cells. Build with :meth:`from_dense` (or :func:`sparsify`); :meth:`to_dense` returns
    the original model.

    Args:
        model: a ``torchvision.models.ResNet`` (no dilation); its modules are shared, not copied.
        gemm_max_cell: k x k convs whose output cells are at most this wide run as im2col + GEMM,
            wider ones as halo + conv (2 was the crossover measured on CPU).
        conv_method: "auto" (by cell size), or force "halo" / "gemm" for every k x k conv.
        memory_format: layout of the packed tiles. "channels_last" (default): NHWC tiles whatever the
            input's layout; CPU BatchNorm and oneDNN convs are several times faster on small NHWC
            tiles than on NCHW ones, and NHWC is cuDNN's fast layout for fp16/bf16. "contiguous":
            NCHW tiles; "preserve": the input's layout. Dense outputs come back in the tiles' layout.
    """

    feature_strides = (4, 8, 16, 32)
    downsample_ratio = 32
    # the model's stem (shared modules; conv1 is a ResNet's stem conv, its in_channels the input's)
    conv1: nn.Conv2d
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    _dense_model: nn.Module

    def __init__(
        self,
        model: nn.Module,
        *,
        gemm_max_cell: int = 2,
        conv_method: Literal["auto", "halo", "gemm"] = "auto",
        memory_format: Literal["channels_last", "contiguous", "preserve"] = "channels_last",
    ):
        super().__init__()
        missing = [n for n in ("conv1", "bn1", "relu", "maxpool", *_STAGES) if not hasattr(model, n)]
        if missing:
            raise ValueError(f"SparseEncoder expects a torchvision ResNet; {type(model).__name__} has no {missing}")
        for n in ("conv1", "bn1", "relu", "maxpool", *_STAGES):
            _check_module(getattr(model, n), n)
        if conv_method not in ("auto", "halo", "gemm"):
            raise ValueError(f"conv_method must be 'auto', 'halo' or 'gemm', got {conv_method!r}")
        if memory_format not in ("channels_last", "contiguous", "preserve"):
            raise ValueError(
                f"memory_format must be 'channels_last', 'contiguous' or 'preserve', got {memory_format!r}"
            )
        self.conv1 = cast(nn.Conv2d, model.conv1)
        self.bn1, self.relu, self.maxpool = (getattr(model, n) for n in ("bn1", "relu", "maxpool"))
        self.layer1, self.layer2, self.layer3, self.layer4 = (getattr(model, n) for n in _STAGES)
        self.gemm_max_cell = int(gemm_max_cell)
        self.conv_method = conv_method
        self.memory_format = memory_format
        object.__setattr__(self, "_dense_model", model)  # not a child: keys stay the model's, fc left out

    @classmethod
    def from_dense(cls, model: nn.Module, **kwargs) -> SparseEncoder:
        return cls(model, **kwargs)

    def to_dense(self) -> nn.Module:
        """The torchvision model this encoder was built from (same object, same parameters)."""
        return self._dense_model

    @property
    def feature_channels(self) -> list[int]:
        BasicBlock, _ = _block_types()
        out = []
        for n in _STAGES:
            last = getattr(self, n)[-1]
            out.append((last.bn2 if isinstance(last, BasicBlock) else last.bn3).num_features)
        return out

    def extra_repr(self) -> str:
        return (
            f"gemm_max_cell={self.gemm_max_cell}, conv_method={self.conv_method!r}, "
            f"memory_format={self.memory_format!r}"
        )

    # ---- running modules on packed tiles ----

    def _conv(self, m: nn.Conv2d, x: Tensor, layout: CellLayout) -> Tensor:
        return sparse_conv2d(
            x,
            layout,
            m.weight,
            m.bias,
            m.stride,
            m.padding,
            m.groups,
            method=self.conv_method,
            gemm_max_cell=self.gemm_max_cell,
        )

    def _run(self, m: nn.Module, x: Tensor, layout: CellLayout) -> Tensor:
        BasicBlock, Bottleneck = _block_types()
        if isinstance(m, nn.Conv2d):
            return self._conv(m, x, layout)
        if isinstance(m, nn.MaxPool2d):
            return sparse_max_pool2d(x, layout, m.kernel_size, m.stride, m.padding)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Identity)):
            return m(x)  # pointwise: the packed tensor as is; BN statistics = visible positions
        if isinstance(m, nn.Sequential):
            for sub in m:
                x = self._run(sub, x, layout)
            return x
        if isinstance(m, BasicBlock):
            identity = x if m.downsample is None else self._run(m.downsample, x, layout)
            out = m.relu(m.bn1(self._conv(m.conv1, x, layout)))
            out = m.bn2(self._conv(m.conv2, out, layout))
            out += identity
            return m.relu(out)
        if isinstance(m, Bottleneck):
            identity = x if m.downsample is None else self._run(m.downsample, x, layout)
            out = m.relu(m.bn1(self._conv(m.conv1, x, layout)))
            out = m.relu(m.bn2(self._conv(m.conv2, out, layout)))
            out = m.bn3(self._conv(m.conv3, out, layout))
            out += identity
            return m.relu(out)
        raise ValueError(f"unsupported module {type(m).__name__}")  # _check_module rejects these earlier

    def layout(self, x: Tensor, mask: Tensor | CellLayout) -> CellLayout:
        """Validate the input and build (or check) the cell tables of ``mask``."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        B, C, H, W = x.shape
        r = self.downsample_ratio
        if H % r or W % r or H == 0 or W == 0:
            raise ValueError(f"H and W must be positive multiples of {r} (one mask cell = {r}x{r} pixels), got {H}x{W}")
        if C != self.conv1.in_channels:
            raise ValueError(f"x has {C} channels but the model's conv1 expects {self.conv1.in_channels}")
        if isinstance(mask, CellLayout):
            layout = mask
            mask = layout.mask
        else:
            layout = None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                "mask must be a boolean tensor (True = visible cell) of shape "
                f"(B, H/{r}, W/{r}) = {(B, H // r, W // r)}, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if tuple(mask.shape) != (B, H // r, W // r):
            raise ValueError(
                f"mask must have shape (B, H/{r}, W/{r}) = {(B, H // r, W // r)} for input "
                f"{tuple(x.shape)}, got {tuple(mask.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        if layout is None:
            layout = cell_layout(mask)
        if layout.num_tiles == 0:
            raise ValueError(
                "every cell of the batch is masked: nothing to encode (SparK needs at least one visible cell per batch)"
            )
        return layout

    @ranged("sparkct.SparseEncoder")
    def forward(
        self, x: Tensor, mask: Tensor | CellLayout, *, packed: bool = False, stem: bool = False
    ) -> list[Tensor]:
        """Features of layer1..layer4 (strides 4, 8, 16, 32), preceded by the stride-2 stem output
        (after conv1/bn1/relu) if ``stem``. Dense (B, C, H/s, W/s) maps with zeros at masked cells, or
        with ``packed=True`` the packed tiles (A, C, 32/s, 32/s) in the order of ``cell_layout(mask)``
        (pass a prebuilt :class:`CellLayout` as ``mask`` to reuse it, e.g. to unpack with a mask token).
        """
        layout = self.layout(x, mask)
        cl = {"channels_last": True, "contiguous": False, "preserve": None}[self.memory_format]
        h = pack(x, layout, channels_last=cl)  # (A, C, 32, 32)
        h = self.relu(self.bn1(self._conv(self.conv1, h, layout)))
        feats = [h] if stem else []
        h = self._run(self.maxpool, h, layout)
        for n in _STAGES:
            h = self._run(getattr(self, n), h, layout)
            feats.append(h)
        if packed:
            return feats
        return [unpack(f, layout) for f in feats]


def sparsify(model: nn.Module, **kwargs) -> SparseEncoder:
    """Shorthand for :meth:`SparseEncoder.from_dense`."""
    return SparseEncoder.from_dense(model, **kwargs)
