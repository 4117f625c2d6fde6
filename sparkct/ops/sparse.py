"""Sparse masked convolution for SparK on packed cell tiles: the Python face of the ``sparse_*`` ops.

SparK hides most cells of a coarse grid (one cell = 32x32 input pixels) and its encoder must behave
as if the masked cells were zero after every layer. Instead of running dense layers and multiplying by
the mask, sparkct keeps only the A visible cells of the batch as a dense tensor of tiles
``(A, C, c, c)`` with ``c = 32 / stride`` at each scale, plus tables built once per batch:

* :func:`cell_layout` (op ``sparse_cell_tables``): ``cells`` (A, 3) = (b, i, j) of each tile,
  ``nbr`` (A, 8) = tile index of the 8 neighbours (``MASKED`` = -1 / ``OUTSIDE`` = -2), ``cell_map``
  (B, GH, GW) = tile index or -1. The cell grid is the same at every scale, so one layout serves all.
* :func:`pack` / :func:`unpack`: dense (B, C, H, W) <-> packed, with zeros or a per-channel fill (a
  mask token) at masked cells.
* :func:`halo`: (A, C, c, c) -> (A, C, c+2p, c+2p), the ring read from neighbour tiles, masked
  neighbours filled with ``masked_fill`` and the image border with ``border_fill`` (0 for a conv,
  -inf for a max-pool). Its backward is a gather over the neighbour relation (no atomics).
* :func:`im2col`: the columns of a k x k conv over the visible positions (A*co*co, C*k*k), reading
  neighbours through the table; its adjoint (col2im) is again a gather.
* :func:`sparse_conv2d` / :func:`sparse_max_pool2d`: a layer on packed tiles. Pointwise layers
  (1x1 conv, BatchNorm, ReLU, add) need nothing: they run on the packed tensor as is, and BatchNorm
  over the packed tensor *is* BatchNorm over the visible positions.

Layouts: kernels write NCHW unless their input is channels-last (then NHWC); any strides are accepted.
Dtypes: float32/64, float16, bfloat16 (sums accumulate in float32 for the 16-bit types).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from sparkct._ext import check_device
from sparkct.profiling import ranged

MASKED = -1
OUTSIDE = -2

_ops = torch.ops.sparkct
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

__all__ = [
    "CellLayout",
    "MASKED",
    "OUTSIDE",
    "cell_layout",
    "pack",
    "unpack",
    "halo",
    "im2col",
    "sparse_conv2d",
    "sparse_max_pool2d",
    "conv_method",
    "simple_kernels",
]


# ---- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellLayout:
    """Tables of one batch's cell mask. Build with :func:`cell_layout`; valid at every scale."""

    mask: Tensor  # (B, GH, GW) bool, True = visible
    cells: Tensor  # (A, 3) int32: (b, i, j) of tile t, row-major order
    nbr: Tensor  # (A, 8) int32: neighbour tiles (slots row-major around the cell), -1 / -2
    cell_map: Tensor  # (B, GH, GW) int32: tile index or -1

    @property
    def num_tiles(self) -> int:
        return self.cells.shape[0]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return (self.mask.shape[1], self.mask.shape[2])

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def visible_fraction(self) -> float:
        return self.num_tiles / max(1, self.mask.numel())

    def cell_size(self, x: Tensor) -> int:
        """Cell size of a dense map x (B, C, H, W) on this grid (raises if it does not fit)."""
        _check_dense(x, self, "x")
        return x.shape[-2] // self.grid[0]

    def to(self, device) -> CellLayout:
        return CellLayout(*(t.to(device) for t in (self.mask, self.cells, self.nbr, self.cell_map)))


def _check_mask(mask) -> None:
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor of dtype bool (True = visible), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a boolean tensor (True = visible cell), got dtype {mask.dtype}; "
            "convert with mask.bool() if it holds 0/1 values"
        )
    if mask.dim() != 3:
        raise ValueError(f"mask must have shape (B, H/32, W/32) (one entry per cell), got {tuple(mask.shape)}")


@ranged("sparkct.cell_layout")
def cell_layout(mask: Tensor) -> CellLayout:
    """Tables of a boolean cell mask (B, GH, GW), True = visible (SparK's convention)."""
    _check_mask(mask)
    check_device("cell_layout", mask)
    cells, nbr, cell_map = _ops.sparse_cell_tables(mask)
    return CellLayout(mask, cells, nbr, cell_map)


def _check_float(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _check_dense(x: Tensor, layout: CellLayout, name: str) -> None:
    _check_float(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) map, got shape {tuple(x.shape)}")
    B, _, H, W = x.shape
    gh, gw = layout.grid
    if B != layout.batch_size:
        raise ValueError(f"{name} has batch size {B} but the mask has {layout.batch_size}")
    if H % gh or W % gw or H // gh != W // gw or H == 0:
        raise ValueError(
            f"{name} of size {H}x{W} is not a whole number of square cells of the "
            f"{gh}x{gw} mask grid (H and W must be the same multiple of the grid)"
        )


def _check_packed(x: Tensor, layout: CellLayout, name: str) -> None:
    _check_float(x, name)
    if x.dim() != 4 or x.shape[2] != x.shape[3] or x.shape[2] == 0:
        raise ValueError(f"{name} must be packed tiles (A, C, c, c), got shape {tuple(x.shape)}")
    if x.shape[0] != layout.num_tiles:
        raise ValueError(f"{name} has {x.shape[0]} tiles but the layout has {layout.num_tiles} visible cells")


def _is_channels_last(x: Tensor) -> bool:
    """Mirror of is_channels_last in csrc/sparse_host.h: the layout the kernels write."""
    return x.dim() == 4 and suggest_memory_format(x) == torch.channels_last


def _empty4(shape, like: Tensor, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def simple_kernels(enable: bool) -> bool:
    """Run the simple per-element kernels (the fast kernels' oracle) instead of the fast ones, on CPU
    and CUDA. Returns the previous setting. For tests; process-wide."""
    return _ops.sparse_simple_kernels(bool(enable))


# ---- fake (meta) kernels ----------------------------------------------------------------------


@torch.library.register_fake("sparkct::sparse_cell_tables")
def _(mask):
    ctx = torch.library.get_ctx()
    A = ctx.new_dynamic_size()
    return (
        mask.new_empty((A, 3), dtype=torch.int32),
        mask.new_empty((A, 8), dtype=torch.int32),
        mask.new_empty(mask.shape, dtype=torch.int32),
    )


def _layout_of(x: Tensor, channels_last: bool | None) -> bool:
    return _is_channels_last(x) if channels_last is None else bool(channels_last)


@torch.library.register_fake("sparkct::sparse_pack")
def _(x, cells, cell_map, channels_last=None):
    c = x.shape[2] // cell_map.shape[1]
    return _empty4((cells.shape[0], x.shape[1], c, c), x, _layout_of(x, channels_last))


@torch.library.register_fake("sparkct::sparse_unpack")
def _(packed, cells, cell_map, fill, channels_last=None):
    c = packed.shape[2]
    B, gh, gw = cell_map.shape
    return _empty4((B, packed.shape[1], gh * c, gw * c), packed, _layout_of(packed, channels_last))


@torch.library.register_fake("sparkct::sparse_unpack_backward")
def _(grad, cells, cell_map, fill_grad, channels_last=None):
    c = grad.shape[2] // cell_map.shape[1]
    gp = _empty4((cells.shape[0], grad.shape[1], c, c), grad, _layout_of(grad, channels_last))
    return gp, grad.new_empty((grad.shape[1] if fill_grad else 0,))


@torch.library.register_fake("sparkct::sparse_halo")
def _(x, nbr, pad, masked_fill, border_fill):
    P = x.shape[2] + 2 * pad
    return _empty4((x.shape[0], x.shape[1], P, P), x, _is_channels_last(x))


@torch.library.register_fake("sparkct::sparse_halo_backward")
def _(grad, nbr, pad):
    c = grad.shape[2] - 2 * pad
    return _empty4((grad.shape[0], grad.shape[1], c, c), grad, _is_channels_last(grad))


@torch.library.register_fake("sparkct::sparse_im2col")
def _(x, nbr, kernel, stride, pad):
    co = x.shape[2] // stride
    return x.new_empty((x.shape[0] * co * co, x.shape[1] * kernel * kernel))


@torch.library.register_fake("sparkct::sparse_im2col_backward")
def _(grad_cols, nbr, channels, cell, kernel, stride, pad, channels_last):
    return _empty4((nbr.shape[0], channels, cell, cell), grad_cols, channels_last)


# ---- autograd ---------------------------------------------------------------------------------
# Every op here is linear in its tensor input; each backward is another op of the family, and the
# backward ops have the forward ops as their backward, so double (and any higher order) backward is
# supported: pack <-> unpack, unpack_backward -> unpack (with fill), halo <-> halo_backward, im2col
# <-> im2col_backward. The layers (_HaloConv, _GemmConv, _HaloMaxPool) compute their backward from
# these ops and differentiable aten ops, so their backward is recorded under create_graph=True too
# (tests/ops/test_sparse_conv.py: gradgradcheck of every op and layer in float64, and fp32 double
# backward of each layer against float64).


def _pack_setup(ctx, inputs, output):
    x, cells, cell_map = inputs[:3]
    ctx.save_for_backward(cells, cell_map)
    ctx.x_cl = _is_channels_last(x)


@ranged("sparkct.pack.backward")
def _pack_backward(ctx, grad):
    cells, cell_map = ctx.saved_tensors
    return _ops.sparse_unpack(grad, cells, cell_map, None, ctx.x_cl), None, None, None


torch.library.register_autograd("sparkct::sparse_pack", _pack_backward, setup_context=_pack_setup)


def _unpack_setup(ctx, inputs, output):
    packed, cells, cell_map, fill = inputs[:4]
    ctx.save_for_backward(cells, cell_map)
    ctx.has_fill = fill is not None
    ctx.fill_shape = None if fill is None else fill.shape
    ctx.packed_cl = _is_channels_last(packed)


@ranged("sparkct.unpack.backward")
def _unpack_backward(ctx, grad):
    cells, cell_map = ctx.saved_tensors
    need_fill = ctx.has_fill and ctx.needs_input_grad[3]
    gp, gf = _ops.sparse_unpack_backward(grad, cells, cell_map, need_fill, ctx.packed_cl)
    return gp, None, None, (gf.reshape(ctx.fill_shape) if need_fill else None), None


torch.library.register_autograd("sparkct::sparse_unpack", _unpack_backward, setup_context=_unpack_setup)


def _unpack_bw_setup(ctx, inputs, output):
    grad, cells, cell_map, fill_grad = inputs[:4]
    ctx.save_for_backward(cells, cell_map)
    ctx.fill_grad = fill_grad
    ctx.grad_cl = _is_channels_last(grad)


@ranged("sparkct.unpack.double_backward")
def _unpack_bw_backward(ctx, g_packed, g_fill):
    cells, cell_map = ctx.saved_tensors
    fill = g_fill if (ctx.fill_grad and g_fill is not None) else None
    if g_packed is None:
        return None, None, None, None, None
    return _ops.sparse_unpack(g_packed, cells, cell_map, fill, ctx.grad_cl), None, None, None, None


torch.library.register_autograd("sparkct::sparse_unpack_backward", _unpack_bw_backward, setup_context=_unpack_bw_setup)


def _halo_setup(ctx, inputs, output):
    _, nbr, pad, _, _ = inputs
    ctx.save_for_backward(nbr)
    ctx.pad = pad


@ranged("sparkct.halo.backward")
def _halo_backward(ctx, grad):
    (nbr,) = ctx.saved_tensors
    return _ops.sparse_halo_backward(grad, nbr, ctx.pad), None, None, None, None


torch.library.register_autograd("sparkct::sparse_halo", _halo_backward, setup_context=_halo_setup)


def _halo_bw_setup(ctx, inputs, output):
    _, nbr, pad = inputs
    ctx.save_for_backward(nbr)
    ctx.pad = pad


@ranged("sparkct.halo.double_backward")
def _halo_bw_backward(ctx, grad):
    (nbr,) = ctx.saved_tensors
    return _ops.sparse_halo(grad, nbr, ctx.pad, 0.0, 0.0), None, None


torch.library.register_autograd("sparkct::sparse_halo_backward", _halo_bw_backward, setup_context=_halo_bw_setup)


def _im2col_setup(ctx, inputs, output):
    x, nbr, kernel, stride, pad = inputs
    ctx.save_for_backward(nbr)
    ctx.conf = (x.shape[1], x.shape[2], kernel, stride, pad, _is_channels_last(x))


@ranged("sparkct.im2col.backward")
def _im2col_backward(ctx, grad):
    (nbr,) = ctx.saved_tensors
    return _ops.sparse_im2col_backward(grad, nbr, *ctx.conf), None, None, None, None


torch.library.register_autograd("sparkct::sparse_im2col", _im2col_backward, setup_context=_im2col_setup)


def _im2col_bw_setup(ctx, inputs, output):
    _, nbr, channels, cell, kernel, stride, pad, channels_last = inputs
    ctx.save_for_backward(nbr)
    ctx.conf = (kernel, stride, pad)


@ranged("sparkct.im2col.double_backward")
def _im2col_bw_backward(ctx, grad):
    (nbr,) = ctx.saved_tensors
    return (_ops.sparse_im2col(grad, nbr, *ctx.conf),) + (None,) * 7


torch.library.register_autograd("sparkct::sparse_im2col_backward", _im2col_bw_backward, setup_context=_im2col_bw_setup)


# ---- functions --------------------------------------------------------------------------------


@ranged("sparkct.pack")
def pack(x: Tensor, layout: CellLayout, channels_last: bool | None = None) -> Tensor:
    """Dense map (B, C, H, W) -> packed visible tiles (A, C, c, c), c = H / GH. ``channels_last``
    picks the tiles' memory layout (None: the same as x's)."""
    _check_dense(x, layout, "x")
    check_device("pack", x, layout.cells)
    return _ops.sparse_pack(x, layout.cells, layout.cell_map, channels_last)


@ranged("sparkct.unpack")
def unpack(packed: Tensor, layout: CellLayout, fill: Tensor | None = None, channels_last: bool | None = None) -> Tensor:
    """Packed tiles (A, C, c, c) -> dense (B, C, GH*c, GW*c); masked cells hold ``fill`` (C,) (e.g. a
    learnable mask token; its gradient is the per-channel sum over masked positions) or zeros.
    ``channels_last`` picks the dense map's memory layout (None: the same as the tiles')."""
    _check_packed(packed, layout, "packed")
    if fill is not None:
        _check_float(fill, "fill")
        if fill.numel() != packed.shape[1]:
            raise ValueError(f"fill must have one value per channel ({packed.shape[1]}), got shape {tuple(fill.shape)}")
        if fill.dtype != packed.dtype:
            raise ValueError(f"fill dtype {fill.dtype} differs from packed dtype {packed.dtype}")
    check_device("unpack", packed, layout.cells, fill)
    return _ops.sparse_unpack(packed, layout.cells, layout.cell_map, fill, channels_last)


@ranged("sparkct.halo")
def halo(packed: Tensor, layout: CellLayout, pad: int, masked_fill: float = 0.0, border_fill: float = 0.0) -> Tensor:
    """(A, C, c, c) -> (A, C, c+2*pad, c+2*pad): each tile with a ring of width ``pad`` (<= c) read from
    its neighbour tiles; ``masked_fill`` where the neighbour cell is masked, ``border_fill`` beyond the
    image border."""
    _check_packed(packed, layout, "packed")
    pad = int(pad)
    if not 0 <= pad <= packed.shape[2]:
        raise ValueError(f"halo width {pad} must be in [0, cell size {packed.shape[2]}]")
    check_device("halo", packed, layout.nbr)
    return _ops.sparse_halo(packed, layout.nbr, pad, float(masked_fill), float(border_fill))


def _check_geometry(c: int, kernel: int, stride: int, pad: int, what: str) -> None:
    if kernel < 1 or kernel > 15:
        raise ValueError(f"{what}: kernel size {kernel} must be in [1, 15]")
    if stride < 1 or c % stride:
        raise ValueError(f"{what}: stride {stride} must divide the cell size {c}")
    if not (0 <= pad <= c and kernel - 1 - pad <= c):
        raise ValueError(
            f"{what}: a {kernel}x{kernel} kernel with padding {pad} reaches beyond the neighbouring "
            f"cells of a {c}x{c} cell"
        )
    if (c + 2 * pad - kernel) // stride + 1 != c // stride:
        raise ValueError(
            f"{what}: kernel {kernel}, stride {stride}, padding {pad} does not map a {c}x{c} cell onto "
            f"{c // stride}x{c // stride} outputs (the dense layer would not keep cells aligned)"
        )


@ranged("sparkct.im2col")
def im2col(packed: Tensor, layout: CellLayout, kernel: int, stride: int = 1, pad: int = 0) -> Tensor:
    """Columns (A*co*co, C*k*k) of a k x k conv (stride, zero padding ``pad``) over the visible positions,
    co = c / stride; entries from masked cells or beyond the border are 0. Column order (C, ky, kx)
    matches ``weight.reshape(C_out, -1)``."""
    _check_packed(packed, layout, "packed")
    _check_geometry(packed.shape[2], int(kernel), int(stride), int(pad), "im2col")
    check_device("im2col", packed, layout.nbr)
    return _ops.sparse_im2col(packed, layout.nbr, int(kernel), int(stride), int(pad))


# ---- layers -----------------------------------------------------------------------------------


def _pair(v, name: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name} must be square for sparse layers, got {tuple(v)}")
        v = v[0]
    return int(v)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a conv runs in: the autocast dtype where autocast is on (as F.conv2d would), else x's."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class _HaloConv(torch.autograd.Function):
    """k x k conv = halo + valid conv. Only the packed input is saved: the halo is rebuilt in backward,
    so it costs memory only while one layer runs (saving it would undo most of the memory gain).
    Under autocast the conv runs in the autocast dtype and gradients return in the inputs' dtypes."""

    @staticmethod
    @ranged("sparkct.sparse_conv2d[halo]")
    def forward(ctx, x, weight, bias, nbr, stride, pad, groups):
        dt = _compute_dtype(x)
        h = _ops.sparse_halo(x.to(dt), nbr, pad, 0.0, 0.0)
        y = F.conv2d(h, weight.to(dt), _cast(bias, dt), stride, 0, 1, groups)
        ctx.save_for_backward(x, weight, nbr)
        ctx.conf = (
            stride,
            pad,
            groups,
            None if bias is None else list(bias.shape),
            dt,
            None if bias is None else bias.dtype,
        )
        return y

    @staticmethod
    @ranged("sparkct.sparse_conv2d[halo].backward")
    def backward(ctx, gy):
        x, weight, nbr = ctx.saved_tensors
        stride, pad, groups, bias_shape, dt, bias_dtype = ctx.conf
        nx, nw, nb = ctx.needs_input_grad[:3]
        h = _ops.sparse_halo(x.to(dt), nbr, pad, 0.0, 0.0)
        gh, gw, gb = torch.ops.aten.convolution_backward(
            gy.to(dt),
            h,
            weight.to(dt),
            bias_shape,
            [stride, stride],
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            groups,
            [nx, nw, nb and bias_shape is not None],
        )
        gx = _ops.sparse_halo_backward(gh, nbr, pad).to(x.dtype) if nx else None
        return gx, _cast(gw, weight.dtype), _cast(gb, bias_dtype), None, None, None, None


def _onednn_linear_ok() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_ok()


def _matmul_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a (M, K) @ b (N, K)^T (+ bias). On CPU fp32 through oneDNN's inner product: on the AMD EPYC
    development machine MKL's sgemm (ATen's mm) runs its AVX2 path at ~106 GFLOP/s per core while
    oneDNN's JIT kernels reach ~220, which decides whether the gather-GEMM path beats dense at all."""
    # mkldnn._linear_pointwise has no autograd kernel: only where nothing is recorded (the forward,
    # a first-order backward), never under create_graph, where it would silently cut the graph.
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, bias))
    if _ONEDNN_LINEAR and not recording and a.device.type == "cpu" and a.dtype == torch.float32 == b.dtype:
        return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.contiguous(), bias, "none", [], "")
    return a @ b.t() if bias is None else torch.addmm(bias, a, b.t())


class _GemmConv(torch.autograd.Function):
    """k x k conv = im2col over visible positions + one GEMM. The columns are rebuilt in backward
    rather than saved (they are k*k times the input)."""

    @staticmethod
    @ranged("sparkct.sparse_conv2d[gemm]")
    def forward(ctx, x, weight, bias, nbr, stride, pad):
        A, C, ci, _ = x.shape
        cout, k = weight.shape[0], weight.shape[-1]
        co = ci // stride
        dt = _compute_dtype(x)
        cols = _ops.sparse_im2col(x.to(dt), nbr, k, stride, pad)
        y = _matmul_nt(cols, weight.reshape(cout, -1).to(dt), _cast(bias, dt))
        y = y.view(A, co, co, cout).permute(0, 3, 1, 2)  # channels-last strides
        cl = _is_channels_last(x)
        if not cl:
            y = y.contiguous()
        ctx.save_for_backward(x, weight, nbr)
        ctx.conf = (stride, pad, cl, None if bias is None else bias.dtype, dt)
        return y

    @staticmethod
    @ranged("sparkct.sparse_conv2d[gemm].backward")
    def backward(ctx, gy):
        x, weight, nbr = ctx.saved_tensors
        stride, pad, cl, bias_dtype, dt = ctx.conf
        nx, nw, nb = ctx.needs_input_grad[:3]
        A, C, ci, _ = x.shape
        cout, k = weight.shape[0], weight.shape[-1]
        gy2 = gy.to(dt).permute(0, 2, 3, 1).reshape(-1, cout)
        gx = gw = gb = None
        if nw:
            cols_t = _ops.sparse_im2col(x.to(dt), nbr, k, stride, pad).t().contiguous()
            gw = _matmul_nt(gy2.t().contiguous(), cols_t).view(weight.shape).to(weight.dtype)
            del cols_t
        if nx:
            gcols = _matmul_nt(gy2, weight.reshape(cout, -1).to(dt).t().contiguous())
            gx = _ops.sparse_im2col_backward(gcols, nbr, C, ci, k, stride, pad, cl).to(x.dtype)
        if nb and bias_dtype is not None:
            gb = gy2.sum(0, dtype=torch.float32 if dt in (torch.float16, torch.bfloat16) else dt).to(bias_dtype)
        return gx, gw, gb, None, None, None


class _HaloMaxPool(torch.autograd.Function):
    """Max-pool = halo (0 at masked neighbours, -inf at the border) + valid max-pool; halo rebuilt in
    backward, only the argmax indices are kept."""

    @staticmethod
    @ranged("sparkct.sparse_max_pool2d[halo]")
    def forward(ctx, x, nbr, kernel, stride, pad):
        h = _ops.sparse_halo(x, nbr, pad, 0.0, -math.inf)
        y, idx = torch.ops.aten.max_pool2d_with_indices(h, [kernel, kernel], [stride, stride], [0, 0], [1, 1], False)
        ctx.save_for_backward(x, nbr, idx)
        ctx.conf = (kernel, stride, pad)
        return y

    @staticmethod
    @ranged("sparkct.sparse_max_pool2d[halo].backward")
    def backward(ctx, gy):
        x, nbr, idx = ctx.saved_tensors
        kernel, stride, pad = ctx.conf
        h = _ops.sparse_halo(x, nbr, pad, 0.0, -math.inf)
        gh = torch.ops.aten.max_pool2d_with_indices_backward(
            gy, h, [kernel, kernel], [stride, stride], [0, 0], [1, 1], False, idx
        )
        return _ops.sparse_halo_backward(gh, nbr, pad), None, None, None, None


def conv_method(out_cell: int, groups: int = 1, gemm_max_cell: int = 2) -> Literal["halo", "gemm"]:
    """The execution chosen for a k x k conv whose output cells are out_cell wide: a GEMM over
    visible positions where tiles are tiny (a halo would multiply the data up to 9x), else halo tiles.
    The crossover (gemm_max_cell = 2) was measured on CPU (benchmarks/bench_sparse_encoder.py)."""
    return "gemm" if (out_cell <= gemm_max_cell and groups == 1) else "halo"


@ranged("sparkct.sparse_conv2d")
def sparse_conv2d(
    x: Tensor,
    layout: CellLayout,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    groups: int = 1,
    method: Literal["auto", "halo", "gemm"] = "auto",
    gemm_max_cell: int = 2,
) -> Tensor:
    """A conv on packed tiles (A, C, c, c) -> (A, C_out, c/stride, c/stride), equal to SparK's dense
    conv followed by zeroing masked cells, with zero padding at the image border. Square kernels,
    dilation 1; 1x1 kernels with no padding run as a plain conv on the packed tensor."""
    _check_packed(x, layout, "x")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (C_out, C_in/groups, k, k), got shape {tuple(weight.shape)}")
    k = weight.shape[-1]
    c = x.shape[2]
    _check_geometry(c, k, stride, padding, "sparse_conv2d")
    check_device("sparse_conv2d", x, weight, bias, layout.nbr)
    if k == 1 and padding == 0:
        return F.conv2d(x, weight, bias, stride, 0, 1, groups)
    if method == "auto":
        method = conv_method(c // stride, groups, gemm_max_cell)
    if method == "gemm":
        if groups != 1:
            raise ValueError("sparse_conv2d: the gemm method supports groups=1 only")
        return _GemmConv.apply(x, weight, bias, layout.nbr, stride, padding)
    if method != "halo":
        raise ValueError(f"sparse_conv2d: method must be 'auto', 'halo' or 'gemm', got {method!r}")
    return _HaloConv.apply(x, weight, bias, layout.nbr, stride, padding, groups)


@ranged("sparkct.sparse_max_pool2d")
def sparse_max_pool2d(x: Tensor, layout: CellLayout, kernel_size, stride=None, padding=0) -> Tensor:
    """Max-pool on packed tiles, equal to SparK's dense max-pool (masked cells read as 0, the border as
    -inf) followed by zeroing masked cells."""
    _check_packed(x, layout, "x")
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None else _pair(stride, "stride")
    p = _pair(padding, "padding")
    _check_geometry(x.shape[2], k, s, p, "sparse_max_pool2d")
    check_device("sparse_max_pool2d", x, layout.nbr)
    return _HaloMaxPool.apply(x, layout.nbr, k, s, p)
