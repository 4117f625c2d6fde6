"""The fast CUDA prototype cross-entropy kernels (csrc/cuda/prototype_ce.cu) re-expressed on the CPU,
for machines without a GPU: the tile width rule, crop-major row indexing, the per-lane partial sums
of the warp-per-row epilogues and their state merges (csrc/prototype_ce.h's state_merge, mirrored),
the backward coefficients rounded to the input dtype for the half-precision GEMMs with fp32 output,
all against sparkct.ops.reference. What this cannot see: races and the hardware (the `cuda` cases
of tests/ops/test_prototype_ce.py, compute-sanitizer). If the kernel's constants change,
test_mirror_matches_source fails: update the mirror with the kernel."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from sparkct.ops import reference as ref

CU = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "prototype_ce.cu"
K_TILE_ELEMS, K_THREADS, LANES = 1 << 24, 256, 32


def tile_cols(rows: int, K: int) -> int:
    kt = K_TILE_ELEMS // max(rows, 1)
    kt = max(128, min(8192, kt // 128 * 128))
    return min(kt, K)


def test_mirror_matches_source():
    src = CU.read_text()
    assert "constexpr int64_t kTileElems = int64_t(1) << 24;" in src
    assert "constexpr int kThreads = 256;" in src
    assert re.search(r"std::max<int64_t>\(128, std::min<int64_t>\(8192, kt / 128 \* 128\)\)", src)
    assert "for (int64_t k = lane; k < kl; k += 32)" in src


def test_tile_width_and_grids_at_the_benchmark_size():
    rows = (10 + 2) * 1024
    kt = tile_cols(rows, 65536)
    assert kt == 1280 and rows * kt <= K_TILE_ELEMS
    assert math.ceil(10 * 1024 * kt / K_THREADS) < 2**31 - 1  # bwd_student_coef's grid.x
    assert tile_cols(5, 40) == 40 and tile_cols(10**9, 65536) == 128


def merge(st, part):
    """state_merge over rows (m, s, a, h) as the header writes it (finite inputs)."""
    m, s, a, h = st
    pm, ps, pa, ph = part
    skip = pm == -math.inf
    take = (m == -math.inf) & ~skip
    up = (pm > m) & ~skip & ~take
    f_up = torch.exp(torch.where(up, m - pm, torch.zeros_like(m)))
    f_dn = torch.exp(torch.where(~up & ~skip & ~take, pm - m, torch.zeros_like(m)))
    new = []
    for x, px in ((s, ps), (a, pa), (h, ph)):
        y = torch.where(up, x * f_up + px, x + px * f_dn)
        y = torch.where(take, px, torch.where(skip, x, y))
        new.append(y)
    return (torch.where(take | up, pm, m), *new)


def lane_sum(x):
    """A warp's sum over a row: 32 lanes each summing columns k = lane mod 32, then the butterfly."""
    n = x.shape[1]
    pad = (-n) % LANES
    x = torch.nn.functional.pad(x, (0, pad))
    return x.view(x.shape[0], -1, LANES).sum(1).sum(1)


def emulate(st, te, ws, wt, bias, ts, tt, skip, acc):
    """Forward and backward (loss, d student, d w_student) the way the fast CUDA path computes them."""
    S, B, D = st.shape
    T = te.shape[0]
    K = ws.shape[0]
    x_dtype = st.dtype
    rs, rt = S * B, T * B
    kt = tile_cols(rs + rt, K)
    srows = st.reshape(rs, D)
    trows = te.reshape(rt, D)
    b_acc = torch.zeros(K, dtype=acc) if bias is None else bias.to(acc)
    inf = torch.full((rs,), -math.inf, dtype=acc)
    sst = (inf, torch.zeros(rs, dtype=acc), torch.zeros(rs, dtype=acc), torch.zeros(rs, dtype=acc))
    inft = torch.full((rt,), -math.inf, dtype=acc)
    tst = (inft, torch.zeros(rt, dtype=acc), torch.zeros(rt, dtype=acc), torch.zeros(rt, dtype=acc))
    pair = torch.tensor([[not (skip and i == j) for j in range(S)] for i in range(T)], dtype=acc)  # (T, S)
    tiles = [(k0, min(kt, K - k0)) for k0 in range(0, K, kt)]
    for k0, kl in tiles:  # forward
        Ls = (srows.to(acc) @ ws[k0 : k0 + kl].to(acc).t()) / ts  # fp32-out GEMM, then student_logit
        Lt = (trows.to(acc) @ wt[k0 : k0 + kl].to(acc).t()) / tt + b_acc[k0 : k0 + kl]
        m = Ls.amax(1)
        sst = merge(sst, (m, lane_sum(torch.exp(Ls - m[:, None])), torch.zeros_like(m), torch.zeros_like(m)))
        C = torch.einsum("ts,sbk->tbk", pair, Ls.view(S, B, kl)).reshape(rt, kl)  # paired students' logits
        m = Lt.amax(1)
        e = torch.exp(Lt - m[:, None])
        tst = merge(tst, (m, lane_sum(e), lane_sum(e * C), lane_sum(e * Lt)))
    lse_s = sst[0] + torch.log(sst[1])
    lse_t = tst[0] + torch.log(tst[1])
    cj = torch.tensor([T - (1 if skip and j < T else 0) for j in range(S)], dtype=torch.float64)
    npairs = S * T - (min(S, T) if skip else 0)
    loss = ((lse_s.double().view(S, B) * cj[:, None]).sum() - (tst[2] / tst[1]).double().sum()) / (npairs * B)
    scale = 1.0 / (npairs * B * ts)
    G_st = torch.zeros(rs, D, dtype=acc)
    G_w = torch.zeros(K, D, dtype=acc)
    for k0, kl in tiles:  # backward
        Ls = (srows.to(acc) @ ws[k0 : k0 + kl].to(acc).t()) / ts
        Lt = (trows.to(acc) @ wt[k0 : k0 + kl].to(acc).t()) / tt + b_acc[k0 : k0 + kl]
        Pt = torch.exp(Lt - lse_t[:, None]).view(T, B, kl)
        Ps = torch.exp(Ls - lse_s[:, None]).view(S, B, kl)
        pt_sum = Pt.sum(0)
        W = torch.empty(S, B, kl, dtype=acc)
        for j in range(S):
            drop = skip and j < T
            W[j] = cj[j].to(acc) * Ps[j] - (pt_sum - Pt[j] if drop else pt_sum)
        W = (scale * W).reshape(rs, kl).to(x_dtype)  # written in the input dtype for the tensor cores
        G_st += W.to(acc) @ ws[k0 : k0 + kl].to(acc)
        G_w[k0 : k0 + kl] = W.to(acc).t() @ srows.to(acc)
    return loss, G_st.view(S, B, D), G_w


def make(S, T, B, D, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.nn.functional.normalize
    base = torch.randn(1, B, D, generator=g, dtype=torch.float64)
    st = n(base + torch.randn(S, B, D, generator=g, dtype=torch.float64), dim=-1)
    te = n(base + torch.randn(T, B, D, generator=g, dtype=torch.float64), dim=-1)
    ws = n(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)
    wt = n(ws + 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)
    bias = 0.3 * torch.randn(K, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (st, te, ws, wt, bias)]


def reference(st, te, ws, wt, bias, ts, tt, skip):
    st = st.double().requires_grad_(True)
    ws = ws.double().requires_grad_(True)
    loss = ref.prototype_cross_entropy(st, te.double(), ws, wt.double(), bias.double(), ts, tt, skip)
    return (loss.detach(), *torch.autograd.grad(loss, [st, ws]))


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("shape", [(10, 2, 3, 16, 3000), (2, 3, 4, 8, 129), (4, 2, 2, 8, 1)])
def test_fp64_emulation_matches_reference(shape, skip):
    xs = make(*shape, torch.float64)
    got = emulate(*xs, 0.1, 0.04, skip, torch.float64)
    want = reference(*xs, 0.1, 0.04, skip)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_reduced_precision_emulation(dtype, tol):
    xs = make(10, 2, 4, 32, 2000, dtype)
    got = emulate(*xs, 0.1, 0.04, True, torch.float32)
    want = reference(*xs, 0.1, 0.04, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 1e-2)
