"""Plain-PyTorch definitions of every sparkct op: the oracle the kernels are tested against, and a
fallback users can call anywhere PyTorch runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---- fused InfoNCE ----------------------------------------------------------------------------


def info_nce(z0, z1, temperature: float = 0.5, bank=None, *, cols=None, col_offset: int = 0):
    """InfoNCE the naive way: normalize, form every logit, cross-entropy (sparkct.ops.info_nce's
    semantics; computed in the inputs' dtype).

    No bank: anchors [z0; z1] (2N); anchor r's positive is its other view, its own column is
    excluded. `cols` (M, D) replaces the columns by gathered embeddings in which the anchors sit at
    rows [col_offset, col_offset + 2N) (the distributed case; cols=None means cols = [z0; z1]).
    Bank (K, D): anchors z0, positive z1 row-wise, negatives the (normalized) bank rows.
    """
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
    logits = logits.index_put(
        (r, r + col_offset), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    )
    labels = col_offset + torch.where(r < n, r + n, r - n)
    return F.cross_entropy(logits, labels)


# ---- sparse masked convolution (packed cell tiles); SparK's model-level oracle: sparkct.models.spark.reference
# Everything here is derived from the boolean cell mask alone (dense canvases, F.pad, F.unfold), so
# it shares no index arithmetic with the kernels. Masks are (B, GH, GW) bool, True = visible.


def sparse_cell_tables(mask):
    """(cells (A, 3), nbr (A, 8), cell_map (B, GH, GW)), int32; nbr slots row-major around the cell
    (NW, N, NE, W, E, SW, S, SE), -1 = masked neighbour, -2 = beyond the border."""
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
    A, C, c, _ = packed.shape
    B, gh, gw = mask.shape
    co = c // stride
    dense = sparse_unpack(packed, mask)
    cols = F.unfold(dense, kernel, padding=pad, stride=stride)  # B, C*k*k, Ho*Wo
    cols = cols.view(B, C * kernel * kernel, gh, co, gw, co).permute(0, 2, 4, 3, 5, 1)  # B gh gw co co CK
    return cols[mask].reshape(A * co * co, C * kernel * kernel)


def sparse_conv2d(packed, mask, weight, bias=None, stride=1, padding=0, groups=1):
    """SparK's semantics on packed tiles: dense conv of the masked canvas, then the visible cells."""
    y = F.conv2d(sparse_unpack(packed, mask), weight, bias, stride, padding, 1, groups)
    return sparse_pack(y, mask)


def sparse_max_pool2d(packed, mask, kernel_size, stride=None, padding=0):
    y = F.max_pool2d(sparse_unpack(packed, mask), kernel_size, stride, padding)
    return sparse_pack(y, mask)


# ---- fused prototype cross-entropy (DINO's loss) ------------------------------------------------------


def prototype_cross_entropy(
    student,
    teacher,
    w_student,
    w_teacher,
    teacher_bias=None,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    skip_same: bool = True,
    *,
    return_stats: bool = False,
):
    """DINO's loss the plain way (sparkct.ops.prototype_cross_entropy's semantics, computed in the
    inputs' dtype): every (S, B, K) and (T, B, K) logit formed, then, for every pair of teacher crop i
    and student crop j (i == j skipped when `skip_same`), the batch mean of
    -sum_k p_t[i,b,k] log_softmax(student[j,b] @ w_student.T / student_temp)_k, averaged over the pairs.
    p_t = softmax(teacher @ w_teacher.T / teacher_temp + teacher_bias). The teacher side is detached.
    With return_stats: (loss, {"teacher_entropy": mean entropy of p_t, "kl": mean KL(p_t || p_s) over
    the pairs}), both detached."""
    lsm = F.log_softmax(student @ w_student.t() / student_temp, dim=-1)  # (S, B, K)
    lt = teacher.detach() @ w_teacher.detach().t() / teacher_temp
    if teacher_bias is not None:
        lt = lt + teacher_bias.detach()
    pt = F.softmax(lt, dim=-1)  # (T, B, K)
    total, kl, n = lsm.new_zeros(()), lsm.new_zeros(()), 0
    for i in range(pt.shape[0]):
        for j in range(lsm.shape[0]):
            if skip_same and i == j:
                continue
            total = total - torch.sum(pt[i] * lsm[j], dim=-1).mean()
            if return_stats:
                kl = kl + torch.sum(pt[i] * (F.log_softmax(lt[i], dim=-1) - lsm[j].detach()), dim=-1).mean()
            n += 1
    loss = total / n
    if not return_stats:
        return loss
    entropy = -torch.sum(pt * F.log_softmax(lt, dim=-1), dim=-1).mean()
    return loss, {"teacher_entropy": entropy.detach(), "kl": (kl / n).detach()}


def sinkhorn_knopp_teacher(
    teacher_logits, teacher_temp: float, n_iterations: int = 3, world_size: int = 1, all_reduce=None
):
    """DINOv2's Sinkhorn-Knopp teacher assignment (dinov2/loss/dino_clstoken_loss.py, written from its
    description): Q = exp(logits / temp)^T (K x B), scaled to sum 1, then `n_iterations` times rows to
    1/K and columns to 1/B; returns B * Q^T (N, K), each row a distribution. Materializes N x K and does
    not stabilize the exponent, as the original. `all_reduce` (in-place sum over ranks) and
    `world_size` stand in for torch.distributed."""
    Q = torch.exp(teacher_logits.float() / teacher_temp).t()
    B = Q.shape[1] * world_size
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    if all_reduce is not None:
        all_reduce(sum_Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        rows = torch.sum(Q, dim=1, keepdim=True)
        if all_reduce is not None:
            all_reduce(rows)
        Q /= rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()
