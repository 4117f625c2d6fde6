"""Plain-PyTorch definitions of every sparkct op: the oracle the kernels are tested against, and a
fallback users can call anywhere PyTorch runs."""
from __future__ import annotations


# ---- fused InfoNCE ----------------------------------------------------------------------------

def info_nce(z0, z1, temperature: float = 0.5, bank=None, *, cols=None, col_offset: int = 0):
    """InfoNCE the naive way: normalize, form every logit, cross-entropy (sparkct.ops.info_nce's
    semantics; computed in the inputs' dtype).

    No bank: anchors [z0; z1] (2N); anchor r's positive is its other view, its own column is
    excluded. `cols` (M, D) replaces the columns by gathered embeddings in which the anchors sit at
    rows [col_offset, col_offset + 2N) (the distributed case; cols=None means cols = [z0; z1]).
    Bank (K, D): anchors z0, positive z1 row-wise, negatives the (normalized) bank rows.
    """
    import torch
    import torch.nn.functional as F

    if bank is not None:
        q = F.normalize(z0, dim=1)
        pos = (q * F.normalize(z1, dim=1)).sum(1, keepdim=True)
        logits = torch.cat([pos, q @ F.normalize(bank, dim=1).t()], 1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    n = z0.shape[0]
    rows = F.normalize(torch.cat([z0, z1], 0), dim=1)
    c = rows if cols is None else F.normalize(cols, dim=1)
    logits = rows @ c.t() / temperature
    r = torch.arange(2 * n, device=rows.device)
    logits = logits.index_put((r, r + col_offset), torch.tensor(float("-inf"), dtype=logits.dtype,
                                                                 device=logits.device))
    labels = col_offset + torch.where(r < n, r + n, r - n)
    return F.cross_entropy(logits, labels)



# ---- sparse masked convolution (packed cell tiles) and SparK's dense-masked oracle -------------
# Everything here is derived from the boolean cell mask alone (dense canvases, F.pad, F.unfold), so
# it shares no index arithmetic with the kernels. Masks are (B, GH, GW) bool, True = visible.

def sparse_cell_tables(mask):
    """(cells (A, 3), nbr (A, 8), cell_map (B, GH, GW)), int32; nbr slots row-major around the cell
    (NW, N, NE, W, E, SW, S, SE), -1 = masked neighbour, -2 = beyond the border."""
    import torch
    import torch.nn.functional as F

    B, gh, gw = mask.shape
    flat = mask.reshape(-1)
    cell_map = torch.where(flat, torch.cumsum(flat.long(), 0) - 1, torch.full_like(flat, -1, dtype=torch.long))
    cell_map = cell_map.view(B, gh, gw)
    cells = mask.nonzero()
    padded = F.pad(cell_map, (1, 1, 1, 1), value=-2)
    b, i, j = cells.unbind(1)
    nbr = [padded[b, i + 1 + dy, j + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return cells.int(), torch.stack(nbr, 1).int(), cell_map.int()


def _cell_size(x_hw: int, grid: int) -> int:
    assert x_hw % grid == 0, (x_hw, grid)
    return x_hw // grid


def sparse_pack(x, mask):
    """Dense (B, C, H, W) -> visible tiles (A, C, c, c) in row-major cell order."""
    B, C, H, W = x.shape
    gh, gw = mask.shape[1:]
    c = _cell_size(H, gh)
    tiles = x.reshape(B, C, gh, c, gw, c).permute(0, 2, 4, 1, 3, 5)  # B, gh, gw, C, c, c
    return tiles[mask]


def sparse_unpack(packed, mask, fill=None):
    """Tiles (A, C, c, c) -> dense (B, C, GH*c, GW*c); masked cells hold fill (C,) or 0."""
    import torch

    A, C, c, _ = packed.shape
    B, gh, gw = mask.shape
    base = packed.new_zeros(B, gh, gw, C, c, c)
    if fill is not None:
        base = base + fill.reshape(1, 1, 1, C, 1, 1).to(packed.dtype)
    m = mask.reshape(B, gh, gw, 1, 1, 1)
    scattered = torch.zeros_like(base).index_put((mask.nonzero(as_tuple=True)), packed)
    tiles = torch.where(m, scattered, base)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * c, gw * c)


def sparse_halo(packed, mask, pad, masked_fill=0.0, border_fill=0.0):
    """Each tile with a ring of width pad read from the dense canvas: masked cells hold masked_fill,
    the outside of the image border_fill."""
    import torch
    import torch.nn.functional as F

    A, C, c, _ = packed.shape
    fill = torch.full((C,), float(masked_fill), dtype=packed.dtype, device=packed.device)
    dense = sparse_unpack(packed, mask, fill)
    padded = F.pad(dense, (pad, pad, pad, pad), value=float(border_fill))
    b, i, j = mask.nonzero().unbind(1)
    r = torch.arange(c + 2 * pad, device=packed.device)
    rows = (i * c)[:, None] + r  # in padded coordinates the window of cell i starts at i*c
    cols = (j * c)[:, None] + r
    win = padded.permute(0, 2, 3, 1)[b[:, None, None], rows[:, :, None], cols[:, None, :]]  # A, P, P, C
    return win.permute(0, 3, 1, 2).contiguous()


def sparse_im2col(packed, mask, kernel, stride=1, pad=0):
    """Columns (A*co*co, C*k*k) of the dense zero-padded conv over the masked canvas, at the output
    positions of visible cells (row order tile, oy, ox; column order C, ky, kx)."""
    import torch
    import torch.nn.functional as F

    A, C, c, _ = packed.shape
    B, gh, gw = mask.shape
    co = c // stride
    dense = sparse_unpack(packed, mask)
    cols = F.unfold(dense, kernel, padding=pad, stride=stride)  # B, C*k*k, Ho*Wo
    Ho, Wo = gh * co, gw * co
    cols = cols.view(B, C * kernel * kernel, gh, co, gw, co).permute(0, 2, 4, 3, 5, 1)  # B gh gw co co CK
    return cols[mask].reshape(A * co * co, C * kernel * kernel)


def sparse_conv2d(packed, mask, weight, bias=None, stride=1, padding=0, groups=1):
    """SparK's semantics on packed tiles: dense conv of the masked canvas, then the visible cells."""
    import torch.nn.functional as F

    y = F.conv2d(sparse_unpack(packed, mask), weight, bias, stride, padding, 1, groups)
    return sparse_pack(y, mask)


def sparse_max_pool2d(packed, mask, kernel_size, stride=None, padding=0):
    import torch.nn.functional as F

    y = F.max_pool2d(sparse_unpack(packed, mask), kernel_size, stride, padding)
    return sparse_pack(y, mask)


class SparKMasker:
    """SparK's helper (its encoder.py `_get_active_ex_or_ii`): the cell mask expanded to a feature
    map's resolution, recomputed at every layer as SparK does."""

    def __init__(self, mask):
        self.mask = mask  # (B, GH, GW) bool

    def active_ex(self, H, W):
        gh, gw = self.mask.shape[1:]
        return self.mask.repeat_interleave(H // gh, 1).repeat_interleave(W // gw, 2).unsqueeze(1)

    def active_ii(self, H, W):
        return self.active_ex(H, W).squeeze(1).nonzero(as_tuple=True)


def spark_conv(module, x, masker):
    """SparK's SparseConv2d / SparseMaxPooling: the dense layer, then zero the masked cells (in place)."""
    y = module(x)
    y *= masker.active_ex(y.shape[2], y.shape[3])
    return y


def spark_bn(bn, x, masker):
    """SparK's SparseBatchNorm2d: normalize the visible positions only (statistics and running-stat
    update over them, as its BatchNorm1d on the (N_visible, C) rows), zeros elsewhere. Returns the
    (B, C, H, W) view of a channels-last buffer, as SparK's permute does."""
    import torch

    ii = masker.active_ii(x.shape[2], x.shape[3])
    bhwc = x.permute(0, 2, 3, 1)
    nc = bhwc[ii]
    nc = bn(nc[:, :, None, None])[:, :, 0, 0]  # BatchNorm2d on (N, C, 1, 1) == BatchNorm1d on (N, C)
    out = torch.zeros_like(bhwc)
    out[ii] = nc
    return out.permute(0, 3, 1, 2)


def _spark_module(m, x, masker):
    import torch.nn as nn
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return spark_conv(m, x, masker)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return spark_bn(m, x, masker)
    if isinstance(m, (nn.ReLU, nn.Identity)):
        return m(x)
    if isinstance(m, nn.Sequential):
        for sub in m:
            x = _spark_module(sub, x, masker)
        return x
    if isinstance(m, BasicBlock):
        identity = x if m.downsample is None else _spark_module(m.downsample, x, masker)
        out = m.relu(_spark_module(m.bn1, _spark_module(m.conv1, x, masker), masker))
        out = _spark_module(m.bn2, _spark_module(m.conv2, out, masker), masker)
        out += identity
        return m.relu(out)
    if isinstance(m, Bottleneck):
        identity = x if m.downsample is None else _spark_module(m.downsample, x, masker)
        out = m.relu(_spark_module(m.bn1, _spark_module(m.conv1, x, masker), masker))
        out = m.relu(_spark_module(m.bn2, _spark_module(m.conv2, out, masker), masker))
        out = _spark_module(m.bn3, _spark_module(m.conv3, out, masker), masker)
        out += identity
        return m.relu(out)
    raise TypeError(f"SparK dense-masked reference: unsupported module {type(m).__name__}")


def spark_dense_masked_features(model, x, mask, stem=False):
    """SparK's encoder forward on a torchvision ResNet ("dense conv, then mask"): the input is masked,
    every conv / pool runs densely and its output's masked cells are zeroed, BatchNorm normalizes the
    visible positions only. Returns the dense feature maps of layer1..layer4 (strides 4, 8, 16, 32),
    preceded by the stride-2 stem output if stem=True. Uses (and trains) the model's own modules."""
    masker = SparKMasker(mask)
    x = x * masker.active_ex(x.shape[2], x.shape[3])
    x = _spark_module(model.conv1, x, masker)
    x = model.relu(_spark_module(model.bn1, x, masker))
    feats = [x] if stem else []
    x = _spark_module(model.maxpool, x, masker)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = _spark_module(getattr(model, name), x, masker)
        feats.append(x)
    return feats
