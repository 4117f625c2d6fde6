"""The fast CUDA kernels of the packed cell-tile layout (csrc/cuda/sparse.cu) re-expressed on the
CPU, for CI machines that have no GPU.

The simple CUDA kernels call the index functions of csrc/sparse.h that the CPU kernels call too, so
the CPU tests already run their arithmetic. The fast kernels decompose their flat thread index
themselves: channels-last pack / unpack / halo / halo backward over pixel *vectors* of Cv vectors
of kE channels (16/8/4/2 bytes), and the block-per-row im2col / block-per-position col2im with
their shared-memory offset tables. Here every such kernel body runs for every thread index of its
grid (vectorized over the index with torch) on the raw flat storage, with the vector width the
host code would pick, and the result is compared with sparkct.ops.reference:

* coverage: each output vector / row / position is produced by exactly one thread index of the
  grid-stride loop (at the grid the host code launches), and every read lands inside its buffer;
* values: forward and backward against the reference, on masks with fully masked and fully
  visible samples, every cell size of a ResNet (32 .. 1), halo widths up to the cell size, kernel
  geometries of the encoder (3x3 s1/s2, 1x1 s2, 7x7 s2 p3, max-pool 3x3 s2 p1), channel counts
  giving every vector width, and fp32 / fp16 / bf16 / fp64 storage;
* the launch geometry: block counts within CUDA's limits, the shared-memory tables within
  kMaxKernel^2, col2im's thread count a multiple of the warp in [32, 256].

What this cannot see: races and the hardware. The kernels are race-free by construction (pure
gathers: each thread writes only its own outputs); the `cuda` tests in test_sparse_kernels.py and
compute-sanitizer check the rest on a GPU. If a mirrored line of the kernel changes,
`test_mirror_matches_source` fails: update the mirror here together with the kernel.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sparkct.models.masking import cell_mask
from sparkct.ops import reference as R

CU = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "sparse.cu"
HOST = Path(__file__).resolve().parents[2] / "csrc" / "sparse_host.h"

K_THREADS = 256
K_MAX_KERNEL = 15
K_MASKED, K_OUTSIDE = -1, -2
SM_COUNT = 132  # H100 SXM; blocks_for caps the grid at 32 blocks per SM

# Lines of sparse.cu whose arithmetic is mirrored below (whitespace-normalized).
MIRRORED = [
    "constexpr int kThreads = 256;",
    "return std::max<int64_t>(1, std::min(ceil_div(n, threads), cap));",
    "for (int u : {16, 8, 4, 2}) {",
    # pack_cl_kernel
    "const int64_t q = e % Cv, xx = (e / Cv) % c, y = (e / (Cv * c)) % c, t = e / (Cv * c * c);",
    "const int64_t b = cells[3 * t], Y = cells[3 * t + 1] * c + y, X = cells[3 * t + 2] * c + xx;",
    "out[e] = x[((b * H + Y) * W + X) * Cv + q];",
    # unpack_cl_kernel
    "const int64_t q = e % Cv, X = (e / Cv) % W, Y = (e / (Cv * W)) % H, b = e / (Cv * W * H);",
    "const int64_t t = cm[(b * (H / c) + Y / c) * (W / c) + X / c];",
    "out[e] = in[((t * c + Y % c) * c + X % c) * Cv + q];",
    "out[e] = fill ? fill[q] : V{};",
    # halo_cl_kernel
    "const int64_t q = e % Cv, px = (e / Cv) % P, py = (e / (Cv * P)) % P, t = e / (Cv * P * P);",
    "const int64_t u = halo_source(nbr + 8 * t, t, py, px, c, p, &y, &xx);",
    "out[e] = x[((u * c + y) * c + xx) * Cv + q];",
    "out[e] = u == kOutside ? bfill : mfill;",
    # halo_backward_cl_kernel
    "const int64_t q = e % Cv, x = (e / Cv) % c, y = (e / (Cv * c)) % c, t = e / (Cv * c * c);",
    "if (y < back_lo(dy, c, p) || y >= back_hi(dy, c, p) || x < back_lo(dx, c, p) || x >= back_hi(dx, c, p))",
    "const V v = g[((m * P + y + back_shift(dy, c, p)) * P + x + back_shift(dx, c, p)) * Cv + q];",
    # im2col_rows_kernel
    "const int64_t t = r / (co * co), oy = (r / co) % co, ox = r % co;",
    "const int64_t u = halo_source(nbr + 8 * t, t, s * oy + kk / k, s * ox + kk % k, ci, p, &y, &xx);",
    "off[kk] = (u >= 0 && u < A) ? xg.at(u, 0, y, xx) : -1;",
    "o[col] = off[kk] >= 0 ? x[off[kk] + ch * xg.stride[1]] : T(0);",
    "const int64_t blocks = std::min<int64_t>(R, 65535);",
    # col2im_positions_kernel
    "const int64_t t = pos / (ci * ci), y = (pos / ci) % ci, x = pos % ci;",
    "if (col2im_target(y, kk / k, ci, s, p, &dy, &oy) && col2im_target(x, kk % k, ci, s, p, &dx, &ox)) {",
    "if (u >= 0 && u < A) v = ((u * co + oy) * co + ox) * C * K + kk;",
    "if (src[kk] >= 0) acc += static_cast<acc_t>(g[src[kk] + ch * K]);",
    "const int64_t N = A * ci * ci;",
    "const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(C, 32) * 32)));",
    # unpack_backward_cuda, the fill gradient (ATen on the device)
    "const Tensor masked = cell_map.lt(0).view({B, 1, gh, 1, gw, 1});",
    "const Tensor g6 = grad.view({B, C, gh, c, gw, c});",
    "const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;",
    "gfill.copy_(at::sum(at::where(masked, g6, 0), {0, 2, 3, 4, 5}, false, acc));",
]


def _norm(s: str) -> str:
    return " ".join(s.split())


def test_mirror_matches_source():
    src = _norm(CU.read_text())
    missing = [line for line in MIRRORED if _norm(line) not in src]
    assert not missing, f"sparse.cu changed; update this emulation for: {missing}"
    assert f"kMaxKernel = {K_MAX_KERNEL};" in _norm(HOST.read_text())


# ---- csrc/sparse.h, vectorized over thread indices ----------------------------------------------


def floor_div(a, b):
    return torch.div(a, b, rounding_mode="floor")


def nbr_slot(dy, dx):
    d = (dy + 1) * 3 + (dx + 1)
    return torch.where(d < 4, d, d - 1)


def offset_tile(nbr, t, dy, dx):
    """nbr (A, 8); t, dy, dx index tensors. Rows t are valid tile indices (callers guarantee)."""
    slot = nbr_slot(dy, dx).clamp(0, 7)
    return torch.where((dy == 0) & (dx == 0), t, nbr[t, slot].long())


def split_coord(v, c):
    d = floor_div(v, c)
    return d, v - d * c


def halo_source(nbr, t, py, px, c, p):
    dy, y = split_coord(py - p, c)
    dx, x = split_coord(px - p, c)
    assert dy.numel() == 0 or (int(dy.abs().max()) <= 1 and int(dx.abs().max()) <= 1), "beyond a neighbour"
    return offset_tile(nbr, t, dy, dx), y, x


def back_lo(d, c, p):
    return c - p if d > 0 else 0


def back_hi(d, c, p):
    return p if d < 0 else c


def back_shift(d, c, p):
    return p - d * c


def col2im_target(y, k, ci, s, p):
    num = y + p - k
    dd = floor_div(num, ci)
    rem = num - dd * ci
    return rem % s == 0, dd, rem // s


# ---- host-side choices --------------------------------------------------------------------------


def vector_bytes(row_bytes: int, ptrs=(0,)) -> int:
    for u in (16, 8, 4, 2):
        if row_bytes % u == 0 and all(p % u == 0 for p in ptrs):
            return u
    return 0


def blocks_for(n: int, threads: int = K_THREADS) -> int:
    return max(1, min(-(-n // threads), SM_COUNT * 32))


def grid_stride_indices(n: int, blocks: int, threads: int = K_THREADS) -> torch.Tensor:
    """Every index a SPARKCT_GRID_STRIDE loop visits, one entry per visit."""
    first = torch.arange(blocks * threads)
    steps = -(-n // (blocks * threads))
    idx = (first[None, :] + blocks * threads * torch.arange(steps)[:, None]).reshape(-1)
    return idx[idx < n]


def assert_once(idx: torch.Tensor, n: int):
    counts = torch.bincount(idx, minlength=n)
    assert counts.numel() == n and bool((counts == 1).all()), "an output is written 0 or 2+ times"


def as_vectors(t: torch.Tensor, C: int, u: int) -> tuple[torch.Tensor, int, int]:
    """The flat channels-last storage of t as rows of kE = u / elsize channels: (numel / kE, kE)."""
    es = t.element_size()
    assert u >= es and u % es == 0 and (C * es) % u == 0
    kE = u // es
    flat = t.permute(0, 2, 3, 1).contiguous().reshape(-1)
    return flat.view(-1, kE), C * es // u, kE


def from_vectors(v: torch.Tensor, shape) -> torch.Tensor:
    A, C, h, w = shape
    return v.reshape(A, h, w, C).permute(0, 3, 1, 2)


def check_in(i: torch.Tensor, n: int, what: str):
    if i.numel():
        assert int(i.min()) >= 0 and int(i.max()) < n, f"{what}: read outside the buffer"


# ---- the kernels --------------------------------------------------------------------------------


def pack_cl(x, cells, c, u):
    B, C, H, W = x.shape
    A = cells.shape[0]
    xv, Cv, kE = as_vectors(x, C, u)
    n = A * c * c * Cv
    e = grid_stride_indices(n, blocks_for(n))
    assert_once(e, n)
    q, xx, y, t = e % Cv, (e // Cv) % c, (e // (Cv * c)) % c, e // (Cv * c * c)
    cl = cells.long()
    b, Y, X = cl[t, 0], cl[t, 1] * c + y, cl[t, 2] * c + xx
    ok = (b >= 0) & (b < B) & (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
    src = ((b * H + Y) * W + X) * Cv + q
    check_in(src[ok], xv.shape[0], "pack")
    out = xv.new_zeros(n, kE)
    out[e[ok]] = xv[src[ok]]
    return from_vectors(out, (A, C, c, c))


def unpack_cl(packed, cell_map, fill, u):
    A, C, c, _ = packed.shape
    B, gh, gw = cell_map.shape
    H, W = gh * c, gw * c
    iv, Cv, kE = as_vectors(packed, C, u)
    n = B * H * W * Cv
    e = grid_stride_indices(n, blocks_for(n))
    assert_once(e, n)
    q, X, Y, b = e % Cv, (e // Cv) % W, (e // (Cv * W)) % H, e // (Cv * W * H)
    cmi = (b * (H // c) + Y // c) * (W // c) + X // c
    check_in(cmi, cell_map.numel(), "unpack cell_map")
    t = cell_map.reshape(-1).long()[cmi]
    ok = (t >= 0) & (t < A)
    src = ((t * c + Y % c) * c + X % c) * Cv + q
    check_in(src[ok], iv.shape[0], "unpack")
    out = iv.new_zeros(n, kE)
    out[e[ok]] = iv[src[ok]]
    if fill is not None:
        out[e[~ok]] = fill.reshape(Cv, kE)[q[~ok]]
    return from_vectors(out, (B, C, H, W))


def halo_cl(x, nbr, p, mfill, bfill, u):
    A, C, c, _ = x.shape
    P = c + 2 * p
    xv, Cv, kE = as_vectors(x, C, u)
    n = A * P * P * Cv
    e = grid_stride_indices(n, blocks_for(n))
    assert_once(e, n)
    q, px, py, t = e % Cv, (e // Cv) % P, (e // (Cv * P)) % P, e // (Cv * P * P)
    src_t, y, xx = halo_source(nbr, t, py, px, c, p)
    ok = (src_t >= 0) & (src_t < A)
    src = ((src_t * c + y) * c + xx) * Cv + q
    check_in(src[ok], xv.shape[0], "halo")
    out = (
        torch.where(
            (src_t == K_OUTSIDE)[:, None], torch.tensor(bfill, dtype=x.dtype), torch.tensor(mfill, dtype=x.dtype)
        )
        .expand(n, kE)
        .clone()
    )
    out[e[ok]] = xv[src[ok]]
    return from_vectors(out, (A, C, P, P))


def halo_backward_cl(g, nbr, p, u):
    A, C, P, _ = g.shape
    c = P - 2 * p
    gv, Cv, kE = as_vectors(g, C, u)
    n = A * c * c * Cv
    e = grid_stride_indices(n, blocks_for(n))
    assert_once(e, n)
    q, x, y, t = e % Cv, (e // Cv) % c, (e // (Cv * c)) % c, e // (Cv * c * c)
    acc_t = torch.float64 if g.dtype == torch.float64 else torch.float32
    acc = torch.zeros(n, kE, dtype=acc_t)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inside = (
                (y >= back_lo(dy, c, p)) & (y < back_hi(dy, c, p)) & (x >= back_lo(dx, c, p)) & (x < back_hi(dx, c, p))
            )
            m = offset_tile(nbr, t, torch.full_like(t, dy), torch.full_like(t, dx))
            ok = inside & (m >= 0) & (m < A)
            src = ((m * P + y + back_shift(dy, c, p)) * P + x + back_shift(dx, c, p)) * Cv + q
            check_in(src[ok], gv.shape[0], "halo backward")
            acc[e[ok]] += gv[src[ok]].to(acc_t)  # e is a permutation: no duplicate targets
    return from_vectors(acc.to(g.dtype), (A, C, c, c))


def im2col_rows(x, nbr, k, s, p):
    """x in any layout (the kernel reads through the strides: off + ch * stride[1])."""
    A, C, ci, _ = x.shape
    co, K = ci // s, k * k
    R_ = A * co * co
    assert K <= K_MAX_KERNEL**2
    blocks = min(R_, 65535)
    assert 1 <= blocks <= 2**31 - 1
    r = grid_stride_indices(R_, blocks, threads=1)  # the loop over rows runs per block
    assert_once(r, R_)
    t, oy, ox = r // (co * co), (r // co) % co, r % co
    kk = torch.arange(K)
    T, KK = t[:, None].expand(-1, K), kk[None, :].expand(len(r), -1)
    u, y, xx = halo_source(nbr, T, s * oy[:, None] + KK // k, s * ox[:, None] + KK % k, ci, p)
    st = x.stride()
    off = torch.where((u >= 0) & (u < A), u * st[0] + y * st[2] + xx * st[3], torch.full_like(u, -1))
    base = x.storage_offset()  # the kernel's x pointer is data_ptr(), storage offset included
    storage = x.as_strided((x.untyped_storage().nbytes() // x.element_size() - base,), (1,), base)
    col = torch.arange(C * K)
    ckk, ch = col % K, col // K
    src = off[:, ckk] + ch[None, :] * st[1]  # (R, C*K)
    valid = off[:, ckk] >= 0
    check_in(src[valid], storage.numel(), "im2col")
    out = torch.zeros(R_, C * K, dtype=x.dtype)
    out[r] = torch.where(valid, storage[src.clamp(min=0)], torch.zeros((), dtype=x.dtype))
    return out


def col2im_positions(g, nbr, C, ci, k, s, p):
    A = nbr.shape[0]
    co, K = ci // s, k * k
    N = A * ci * ci
    blocks = min(N, 65535)
    threads = min(K_THREADS, max(32, -(-C // 32) * 32))
    assert threads % 32 == 0 and 32 <= threads <= K_THREADS
    pos = grid_stride_indices(N, blocks, threads=1)
    assert_once(pos, N)
    t, y, x = pos // (ci * ci), (pos // ci) % ci, pos % ci
    kk = torch.arange(K)
    oky, dy, oy = col2im_target(y[:, None], kk[None, :] // k, ci, s, p)
    okx, dx, ox = col2im_target(x[:, None], kk[None, :] % k, ci, s, p)
    ok = oky & okx
    T = t[:, None].expand(-1, K)
    u = offset_tile(nbr, T, torch.where(ok, dy, 0), torch.where(ok, dx, 0))
    ok = ok & (u >= 0) & (u < A)
    src = torch.where(ok, ((u * co + oy) * co + ox) * C * K + kk[None, :], torch.full_like(u, -1))
    gf = g.reshape(-1)
    acc_t = torch.float64 if g.dtype == torch.float64 else torch.float32
    idx = src[:, None, :] + torch.arange(C)[None, :, None] * K  # (N, C, K)
    valid = (src >= 0)[:, None, :].expand_as(idx)
    check_in(idx[valid], gf.numel(), "col2im")
    vals = torch.where(valid, gf[idx.clamp(min=0)].to(acc_t), torch.zeros((), dtype=acc_t))
    out = torch.zeros(N, C, dtype=acc_t)
    out[pos] = vals.sum(2)  # summed over kk in order, like the kernel
    return out.to(g.dtype).reshape(A, ci, ci, C).permute(0, 3, 1, 2)


def unpack_fill_grad(grad, cell_map):
    """unpack_backward_cuda's fill gradient: the same ATen calls, on the CPU."""
    B, C, H, W = grad.shape
    gh, gw = cell_map.shape[1:]
    c = H // gh
    masked = cell_map.lt(0).view(B, 1, gh, 1, gw, 1)
    g6 = grad.view(B, C, gh, c, gw, c)
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return torch.where(masked, g6, 0).sum((0, 2, 3, 4, 5), dtype=acc).to(grad.dtype)


def unpack_fill_grad_before_issue_13(grad, cell_map):
    """The expression it replaced: sum(grad * masked), where inf * 0 = NaN."""
    c = grad.shape[2] // cell_map.shape[1]
    masked = cell_map.lt(0).repeat_interleave(c, 1).repeat_interleave(c, 2).unsqueeze(1)
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad * masked.to(grad.dtype)).sum((0, 2, 3), dtype=acc).to(grad.dtype)


# ---- cases --------------------------------------------------------------------------------------


def make_mask(B, gh, gw, ratio, seed):
    mask = cell_mask(B, (gh, gw), ratio, generator=torch.Generator().manual_seed(seed))
    if B >= 3:
        mask[0] = False
        mask[1] = True
    return mask


def tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CHANNELS = [3, 4, 8, 12, 64]  # vector widths 16 / 8 / 4 / 2 bytes across the dtypes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("c", [1, 2, 8, 32])
def test_pack_unpack_cl(dtype, C, c):
    mask = make_mask(3, 3, 2, 0.5, seed=C + c)
    B, gh, gw = mask.shape
    cells, nbr, cell_map = R.sparse_cell_tables(mask)
    x = torch.randn(B, C, gh * c, gw * c, dtype=torch.float64).to(dtype)
    u = vector_bytes(C * x.element_size())
    assert u >= x.element_size(), "a vector narrower than an element would be chosen"
    packed = pack_cl(x, cells, c, u)
    assert torch.equal(packed, R.sparse_pack(x, mask))
    fill = torch.randn(C, dtype=torch.float64).to(dtype)
    for f in (None, fill):
        assert torch.equal(unpack_cl(packed, cell_map, f, u), R.sparse_unpack(packed, mask, f))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("c,pad", [(1, 1), (2, 1), (4, 1), (8, 1), (8, 3), (8, 8), (32, 3), (4, 0)])
def test_halo_and_backward_cl(dtype, C, c, pad):
    mask = make_mask(3, 3, 4, 0.5, seed=7 * c + pad)
    cells, nbr, cell_map = R.sparse_cell_tables(mask)
    A = cells.shape[0]
    x = torch.randn(A, C, c, c, dtype=torch.float64)
    u = vector_bytes(C * torch.empty((), dtype=dtype).element_size())
    got = halo_cl(x.to(dtype), nbr, pad, -1.5, 0.25, u)
    want = R.sparse_halo(x.to(dtype), mask, pad, -1.5, 0.25)
    assert torch.equal(got, want)
    # backward = the adjoint of the reference halo (autograd in fp64), checked in the storage dtype
    g = torch.randn(A, C, c + 2 * pad, c + 2 * pad, dtype=torch.float64).to(dtype)
    xr = x.clone().requires_grad_(True)
    R.sparse_halo(xr, mask, pad, -1.5, 0.25).backward(g.double())
    got = halo_backward_cl(g, nbr, pad, u)
    torch.testing.assert_close(got.double(), xr.grad, rtol=tol(dtype), atol=tol(dtype) * 4)


# (cell size, kernel, stride, pad) of every conv / pool of a torchvision ResNet, 1x1 tiles, a 5x5
# and a 7x7 with 2x2 tiles (the halo as wide as the tile); "same" padding, as the encoder uses
GEOMETRIES = [
    (8, 7, 2, 3),
    (4, 3, 1, 1),
    (4, 3, 2, 1),
    (2, 1, 2, 0),
    (1, 3, 1, 1),
    (2, 3, 2, 1),
    (1, 1, 1, 0),
    (4, 5, 1, 2),
    (2, 5, 1, 2),
    (16, 15, 2, 7),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("c,k,s,p", GEOMETRIES)
@pytest.mark.parametrize("cl", [False, True])
def test_im2col_rows_and_col2im_positions(dtype, c, k, s, p, cl):
    mask = make_mask(3, 2, 3, 0.5, seed=c * 31 + k * 7 + s + p)
    cells, nbr, cell_map = R.sparse_cell_tables(mask)
    A, C = cells.shape[0], 5
    x = torch.randn(A, C, c, c, dtype=torch.float64)
    xs = x.to(dtype)
    xs = xs.contiguous(memory_format=torch.channels_last) if cl else xs.contiguous()
    got = im2col_rows(xs, nbr, k, s, p)
    assert torch.equal(got, R.sparse_im2col(xs, mask, k, s, p))
    co = c // s
    g = torch.randn(A * co * co, C * k * k, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    R.sparse_im2col(xr, mask, k, s, p).backward(g)
    got = col2im_positions(g.to(dtype), nbr, C, c, k, s, p)
    torch.testing.assert_close(got.double(), xr.grad, rtol=tol(dtype), atol=tol(dtype) * 8)


def test_strided_im2col_view():
    """im2col reads through the strides: a channel slice of a wider tensor (non-contiguous)."""
    mask = make_mask(3, 2, 2, 0.4, seed=3)
    cells, nbr, _ = R.sparse_cell_tables(mask)
    A = cells.shape[0]
    wide = torch.randn(A, 9, 4, 4)
    x = wide[:, 2:7]
    assert not x.is_contiguous()
    assert torch.equal(im2col_rows(x, nbr, 3, 1, 1), R.sparse_im2col(x.contiguous(), mask, 3, 1, 1))


def test_vector_width_choice():
    """vector_bytes never picks a vector narrower than an element for element-aligned pointers
    (every tensor's data pointer is), and Cv * kE == C whenever it picks one."""
    for es in (2, 4, 8):
        for C in range(1, 130):
            for misalign in (0, es, 2 * es, 3 * es):
                u = vector_bytes(C * es, (4096, 4096 + misalign * 5))
                assert u >= es and (C * es) % u == 0 and u % es == 0, (es, C, misalign, u)


def test_launch_geometry_at_training_sizes():
    """resnet50, batch 128, 224 x 224, mask ratio 0.6 (~1,000 visible cells of 49 each of 128
    samples): every grid fits, every index fits int64 arithmetic used by the kernels."""
    A = int(128 * 49 * 0.4)
    for c, C in ((8, 64), (8, 256), (4, 512), (2, 1024), (1, 2048)):
        P = c + 2
        for n in (A * c * c * C, 128 * 49 * c * c * C, A * P * P * C):
            b = blocks_for(n)
            assert 1 <= b <= SM_COUNT * 32 and b * K_THREADS * (-(-n // (b * K_THREADS))) >= n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("c", [1, 2, 8])
def test_unpack_fill_grad(dtype, cl, c):
    """The fill gradient = the CPU op and the reference (autograd through the where), in both layouts,
    also with non-finite gradients at visible positions (fp16 overflow under AMP), which the former
    sum(grad * masked) turned into NaN (issue 13)."""
    mask = make_mask(3, 3, 4, 0.5, seed=c)
    mask[2, 0, 0], mask[2, 0, 1] = True, False
    B, gh, gw = mask.shape
    cells, nbr, cell_map = R.sparse_cell_tables(mask)
    C = 5
    packed = torch.randn(cells.shape[0], C, c, c, dtype=torch.float64)
    fill = torch.randn(C, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, C, gh * c, gw * c, dtype=torch.float64)
    g[2, 1, 0, 0] = math.inf  # cell (2, 0, 0): visible
    g[2, 3, 0, c - 1] = -math.inf
    g[1, 4, 0, 0] = math.nan  # sample 1: all visible
    gs = g.to(dtype)
    gs = gs.contiguous(memory_format=torch.channels_last) if cl else gs.contiguous()
    (want,) = torch.autograd.grad(R.sparse_unpack(packed, mask, fill), fill, gs.double())
    assert torch.isfinite(want).all()
    got = unpack_fill_grad(gs, cell_map)
    close = {"rtol": tol(dtype) * 10, "atol": tol(dtype) * 10 * want.abs().max().item()}  # sums of ~100 terms
    torch.testing.assert_close(got.double(), want, **close)
    _, cpu = torch.ops.sparkct.sparse_unpack_backward(gs, cells, cell_map, True)
    torch.testing.assert_close(got.double(), cpu.double(), **close)
    before = unpack_fill_grad_before_issue_13(gs, cell_map)
    assert torch.isnan(before[[1, 3, 4]]).all() and torch.isfinite(before[[0, 2]]).all()
    finite = torch.isfinite(gs).all((0, 2, 3))
    torch.testing.assert_close(before[finite].double(), got[finite].double(), **close)
