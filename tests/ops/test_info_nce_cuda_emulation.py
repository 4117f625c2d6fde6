"""The fast CUDA InfoNCE kernels (csrc/cuda/info_nce.cu) re-expressed on the CPU, for CI machines
that have no GPU.

Three kinds of check, each mirroring the .cu line for line where it matters:

* shared-memory geometry: the byte layout of ``Smem<P>`` for the three GEMM policies, every WMMA
  fragment pointer (32-byte alignment, legal ldm, extent inside its buffer and inside the part of
  the tile that was written), the FMA policy's thread ownership (every S / O element owned exactly
  once) and its inner-loop bank behaviour;
* index coverage: the grids, ``split_range`` / ``pick_splits``, ragged tile edges in rows, columns
  and D; every partial LSE, positive logit and gradient-slice element written exactly once; every
  (row, column) pair visited exactly once; grid dimensions inside CUDA's limits at the benchmark
  sizes;
* numerics: forward and backward with the kernels' loop structure (row blocks, column splits,
  64 x 64 tiles, BK-wide D chunks, the per-lane online LSE and its butterfly merge, the split merge,
  the W coefficients, the second GEMM on normalized rows, the bank positive, the normalization's
  Jacobian), with each policy's operand rounding (fp16/bf16 W and X tiles; TF32 fragments), against
  ``sparkct.ops.reference`` in float64.

What this cannot see: races, WMMA's internal fragment layout, and the hardware itself. Those need a
GPU run (tests/ops/test_info_nce.py's `cuda` cases, compute-sanitizer memcheck/racecheck).
If the kernel's constants or ownership maps change, `test_mirror_matches_source` fails: update the
mirror here together with the kernel.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparkct.ops import reference as ref

CU = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "info_nce.cu"


pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the kernel's constants and policies (mirrored; checked against the source below) ------------

K_THREADS, K_BM, K_BN, K_DC = 128, 64, 64, 128
K_LDS = K_BN + 4
K_W_SCALE = 8192.0  # TC16Layout::kWScale: W in [-2, 2] is stored times 2^13 in fp16 / bf16
WARPS = K_THREADS // 32


@dataclass(frozen=True)
class Policy:
    name: str
    eb: int  # bytes of a shared-memory operand element (S)
    BK: int
    LDK: int
    LDW: int
    LDX: int
    separate_w: bool
    ks: int | None  # WMMA k step (None: the FMA policy)


TC16 = Policy("TC16", 2, 32, 32 + 8, K_BN + 8, K_DC + 8, True, 16)
TF32 = Policy("TF32", 4, 16, 16 + 4, K_LDS, K_DC + 4, False, 8)
FMA = Policy("FMA", 4, 16, 16 + 1, K_LDS, K_DC + 4, False, None)
POLICIES = (TC16, TF32, FMA)


def align128(x: int) -> int:
    return (x + 127) // 128 * 128


def smem_layout(p: Policy) -> dict[str, int]:
    """Byte offsets of Smem<P> (the host sizes dynamic shared memory from FwdBytes / GradBytes)."""
    L = {"As": 0}
    L["Bs"] = L["As"] + align128(K_BM * p.LDK * p.eb)
    L["Ss"] = L["Bs"] + align128(K_BN * p.LDK * p.eb)
    L["Ws"] = L["Ss"] + align128(K_BM * K_LDS * 4)
    L["Xs"] = L["Ws"] + (align128(K_BM * p.LDW * p.eb) if p.separate_w else 0)
    L["Stage"] = L["Xs"] + align128(K_BN * p.LDX * p.eb)
    L["OwnArr"] = L["Stage"] + align128(WARPS * 256 * 4)
    L["OtherArr"] = L["OwnArr"] + align128(2 * K_BM * 4)
    L["GradBytes"] = L["OtherArr"] + align128(2 * K_BN * 4)
    L["FwdOwn"] = L["Ws"]
    L["FwdOther"] = L["FwdOwn"] + align128(3 * K_BM * 4)
    L["FwdBytes"] = L["FwdOther"] + align128(K_BN * 4)
    return L


# FMA ownership (MmaFMA): S rows 4 ty + i, cols tx + 8 j (ty = t / 8, tx = t % 8); O rows ty + 8 i,
# cols o_col(tx, j) (ty = t / 16, tx = t % 16).
def fma_s_owner(t: int, i: int, j: int) -> tuple[int, int]:
    return 4 * (t // 8) + i, t % 8 + 8 * j


def fma_o_col(tx: int, j: int) -> int:
    return 4 * tx + 64 * (j // 4) + j % 4


def fma_o_owner(t: int, i: int, j: int) -> tuple[int, int]:
    return t // 16 + 8 * i, fma_o_col(t % 16, j)


def test_mirror_matches_source():
    if not CU.exists():
        pytest.skip("csrc/cuda/info_nce.cu is not next to the tests (installed package)")
    src = CU.read_text()

    def const(name):
        m = re.search(rf"constexpr int {name} = ([^;]+);", src)
        assert m, name
        return eval(m.group(1), {}, {"kBN": K_BN, "kBM": K_BM, "kDC": K_DC})

    assert (const("kThreads"), const("kBM"), const("kBN"), const("kDC"), const("kLDS")) == (
        K_THREADS,
        K_BM,
        K_BN,
        K_DC,
        K_LDS,
    )

    def layout(anchor):
        block = src[src.index(anchor) :]
        line = re.search(r"static constexpr int (BK = [^;]+);", block).group(1)
        env = {"kBN": K_BN, "kDC": K_DC, "kLDS": K_LDS}
        for part in line.split(","):
            k, v = (s.strip() for s in part.split("="))
            env[k] = eval(v, {}, env)
        sep = re.search(r"kSeparateW = (true|false)", block).group(1) == "true"
        return env["BK"], env["LDK"], env["LDW"], env["LDX"], sep

    for anchor, p in (("struct TC16Layout", TC16), ("struct TF32Layout", TF32), ("struct MmaFMA", FMA)):
        assert layout(anchor) == (p.BK, p.LDK, p.LDW, p.LDX, p.separate_w), p.name
    assert "static constexpr int kStep = 16;" in src and "static constexpr int kStep = 8;" in src
    # the W tile's scale (mirrored in emu_grad_pass): TC16 scales, TF32 does not
    tc16, tf32 = src[src.index("struct TC16Layout") :], src[src.index("struct TF32Layout") :]
    assert re.search(r"kWScale = ([0-9.]+)f;", tc16).group(1) == f"{K_W_SCALE:.1f}"
    assert re.search(r"kWScale = ([0-9.]+)f;", tf32).group(1) == "1.0"
    for snippet in (
        "Ws[a * P::LDW + b] = from_f<S>(w * P::kWScale);",
        "G.row(ag, sp)[k] = stage[e] * (1.0f / L::kWScale);",
    ):
        assert snippet in src, snippet
    # the FMA ownership maps mirrored above
    for snippet in (
        "As[(ty * 4 + i) * LDK + k]",
        "Bs[(tx + 8 * j) * LDK + k]",
        "Ss[(ty * 4 + i) * kLDS + tx + 8 * j]",
        "Ws[(ty + 8 * i) * LDW + k]",
        "Xs[k * LDX + o_col(tx, j)]",
        "return 4 * tx + 64 * (j / 4) + j % 4;",
        "const int64_t ag = a0 + ty + 8 * i;",
        "const int64_t k = c0 + o_col(tx, j);",
    ):
        assert snippet in src, snippet


# ---- shared memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", POLICIES, ids=lambda p: p.name)
def test_smem_budget_and_regions(p):
    L = smem_layout(p)
    for k in ("Bs", "Ss", "Ws", "Xs", "Stage", "OwnArr", "OtherArr", "FwdOwn", "FwdOther"):
        assert L[k] % 128 == 0, k
    # forward under the 48 KB default; backward above it, set by prepare_smem, within sm_80's
    # opt-in limit (163 KB) and far from sm_90's (227 KB)
    assert L["FwdBytes"] <= 48 * 1024
    assert 48 * 1024 < L["GradBytes"] <= 163 * 1024
    # every writer stays inside its region
    assert ((K_BM - 1) * p.LDK + p.BK) * p.eb <= L["Bs"] - L["As"]
    assert ((K_BN - 1) * p.LDK + p.BK) * p.eb <= L["Ss"] - L["Bs"]
    assert ((K_BM - 1) * K_LDS + K_BN) * 4 <= L["Ws"] - L["Ss"]
    if p.separate_w:
        assert ((K_BM - 1) * p.LDW + K_BN) * p.eb <= L["Xs"] - L["Ws"]
    else:
        assert p.LDW == K_LDS  # W overwrites S in place, same leading dimension
    assert ((K_BN - 1) * p.LDX + K_DC) * p.eb <= L["Stage"] - L["Xs"]
    assert 3 * K_BM * 4 <= L["FwdOther"] - L["FwdOwn"] and K_BN * 4 <= L["FwdBytes"] - L["FwdOther"]
    # the forward's region (As, Bs, Ss, FwdOwn, FwdOther) does not reach past FwdBytes
    assert L["FwdOwn"] >= L["Ss"] + K_BM * K_LDS * 4


def _frag_checks(base, region_end, ptr_elems, ldm, eb, rows, cols, written_rows, written_cols, row_major=True):
    """One fragment access: pointer alignment, ldm legality, extent inside the region and inside
    the written part of the tile (rows x cols of a row-major buffer starting at ptr)."""
    assert (base + ptr_elems * eb) % 32 == 0, "fragment pointer not 256-bit aligned"
    assert (ldm * eb) % 16 == 0, "ldm must be a multiple of 8 (16-bit) or 4 (32-bit) elements"
    r0, c0 = divmod(ptr_elems, ldm)
    assert r0 + rows <= written_rows and c0 + cols <= written_cols
    last = base + (ptr_elems + (rows - 1) * ldm + cols) * eb
    assert last <= region_end


@pytest.mark.parametrize("p", (TC16, TF32), ids=lambda p: p.name)
def test_wmma_fragment_pointers(p):
    L = smem_layout(p)
    ks = p.ks
    for warp in range(WARPS):
        wm, wn = warp >> 1, warp & 1
        for kk in range(0, p.BK, ks):
            for i in range(2):  # s_step A: As rows 32 wm + 16 i, k kk.., row-major 16 x ks
                _frag_checks(L["As"], L["Bs"], (wm * 32 + i * 16) * p.LDK + kk, p.LDK, p.eb, 16, ks, K_BM, p.BK)
            for j in range(2):  # s_step B: col-major K x N, (k, n) at Bs[n][k]: 16 Bs rows x ks
                _frag_checks(L["Bs"], L["Ss"], (wn * 32 + j * 16) * p.LDK + kk, p.LDK, p.eb, 16, ks, K_BN, p.BK)
        for i in range(2):  # s_store: fp32 accumulators, row-major, ldm kLDS
            for j in range(2):
                _frag_checks(
                    L["Ss"],
                    L["Ss"] + K_BM * K_LDS * 4,
                    (wm * 32 + i * 16) * K_LDS + wn * 32 + j * 16,
                    K_LDS,
                    4,
                    16,
                    16,
                    K_BM,
                    K_BN,
                )
        w_base = L["Ws"] if p.separate_w else L["Ss"]
        w_end = L["Xs"] if p.separate_w else L["Ss"] + K_BM * K_LDS * 4
        for kk in range(0, K_BN, ks):
            for i in range(2):  # o_step A: W rows 32 wm + 16 i, cols kk..
                _frag_checks(w_base, w_end, (wm * 32 + i * 16) * p.LDW + kk, p.LDW, p.eb, 16, ks, K_BM, K_BN)
            for j in range(4):  # o_step B: X row-major, rows kk.. (ks), cols 64 wn + 16 j
                _frag_checks(L["Xs"], L["Stage"], kk * p.LDX + wn * 64 + j * 16, p.LDX, p.eb, ks, 16, K_BN, K_DC)
        # o_store: a per-warp 16 x 16 fp32 staging tile
        _frag_checks(L["Stage"] + warp * 1024, L["Stage"] + (warp + 1) * 1024, 0, 16, 4, 16, 16, 16, 16)


def test_fma_ownership_is_a_partition():
    s = torch.zeros(K_BM, K_BN, dtype=torch.int32)
    o = torch.zeros(K_BM, K_DC, dtype=torch.int32)
    for t in range(K_THREADS):
        for i in range(4):
            for j in range(8):
                s[fma_s_owner(t, i, j)] += 1
        for i in range(8):
            for j in range(8):
                o[fma_o_owner(t, i, j)] += 1
    assert (s == 1).all() and (o == 1).all()


def _conflict_degree(word_addrs: list[list[int]]) -> int:
    """Worst bank conflict of one shared-memory instruction: per phase (a list of the 32-bit word
    addresses its lanes touch), the largest number of distinct words mapped to one bank."""
    worst = 1
    for phase in word_addrs:
        banks: dict[int, set[int]] = {}
        for w in phase:
            banks.setdefault(w % 32, set()).add(w)
        worst = max(worst, max(len(v) for v in banks.values()))
    return worst


def test_fma_inner_loops_are_free_of_bank_conflicts():
    """MmaFMA's inner loops, per warp and instruction: s_step's As / Bs reads and o_step's W reads
    (32-bit), o_step's X reads (the compiler emits LDS.128 for each float4 run: served in phases of
    8 lanes)."""
    for warp in range(WARPS):
        lanes = range(32 * warp, 32 * warp + 32)
        for k in range(FMA.BK):
            for i in range(4):
                assert _conflict_degree([[(4 * (t // 8) + i) * FMA.LDK + k for t in lanes]]) == 1
            for j in range(8):
                assert _conflict_degree([[(t % 8 + 8 * j) * FMA.LDK + k for t in lanes]]) == 1
        for k in range(K_BN):
            for i in range(8):
                assert _conflict_degree([[(t // 16 + 8 * i) * FMA.LDW + k for t in lanes]]) == 1
            for run in range(2):
                phases = [
                    [k * FMA.LDX + fma_o_col(t % 16, 4 * run) + e for t in lanes[q * 8 : (q + 1) * 8] for e in range(4)]
                    for q in range(4)
                ]
                assert _conflict_degree(phases) == 1
                # 16-byte aligned, as LDS.128 needs
                assert all((4 * (k * FMA.LDX + fma_o_col(t % 16, 4 * run))) % 16 == 0 for t in lanes)


# ---- the host's grid and split choices -----------------------------------------------------------


def ceil_div(a, b):
    return (a + b - 1) // b


def pick_splits(blocks, ntiles, cap, sms):
    s = (4 * sms + blocks - 1) // max(blocks, 1)
    return max(1, min(s, ntiles, cap, 64))


def split_range(ntiles, splits, sp):
    per = (ntiles + splits - 1) // splits
    b = min(ntiles, sp * per)
    return b, min(ntiles, b + per)


def fwd_splits(R, M, sms):
    return pick_splits(ceil_div(R, K_BM), ceil_div(M, K_BN), 64, sms)


def bwd_splits(own_rows, other_rows, D, sms):
    blocks = ceil_div(own_rows, K_BM) * ceil_div(D, K_DC)
    cap = max(1, (64 << 20) // max(1, own_rows * D * 4))
    return pick_splits(blocks, ceil_div(other_rows, K_BN), cap, sms)


@pytest.mark.parametrize(
    "R,M,D",
    [
        (65536, 65536, 128),
        (65536, 65536, 2048),
        (131072, 131072, 2048),
        (262144, 262144, 512),
        (1, 0, 16),
        (2, 2, 2048),
        (4096, 65536, 128),
    ],
)
@pytest.mark.parametrize("sms", [1, 108, 132])
def test_grid_limits_and_split_memory(R, M, D, sms):
    sf = fwd_splits(R, M, sms)
    assert ceil_div(R, K_BM) < 2**31 and sf <= 64  # grid (x, y)
    for own, other in ((R, M), (M, R)):
        if own == 0:
            continue
        sb = bwd_splits(own, other, D, sms)
        assert ceil_div(own, K_BM) < 2**31 and ceil_div(D, K_DC) <= 65535 and sb <= 64  # grid (x, y, z)
        # extra fp32 split slices stay within the 64 MiB budget (one slice is the gradient itself)
        assert sb == 1 or sb * own * D * 4 <= 64 << 20


# ---- numerics: the kernels' loop structure on the CPU ---------------------------------------------


def tf32(x: torch.Tensor) -> torch.Tensor:
    """wmma::__float_to_tf32 (cvt.rna.tf32.f32): round to 10 mantissa bits, ties away from zero."""
    b = x.contiguous().view(torch.int32)
    r = ((b + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), r, x)


LOG2E = torch.tensor(1.4426950408889634, dtype=torch.float32)


def fast_exp(x):
    """nce::ExpFast on the device, __expf = ex2.approx.ftz(x * log2 e): the product rounded to fp32
    (its error grows with |x|; ex2.approx's own ~2 ulp is not modelled), results below 2^-126
    flushed to zero."""
    y = torch.exp2(x * LOG2E)
    return torch.where(y < 2.0**-126, torch.zeros(()), y)


def lse_merge(m, s, m2, s2):
    """nce::lse_merge with ExpFast, elementwise."""
    nan = torch.isnan(m2) | torch.isnan(s2) | torch.isnan(m)
    ninf2, ninf, gt = m2 == -math.inf, m == -math.inf, m2 > m
    with torch.no_grad():
        s_gt = s * fast_exp(m - m2) + s2
        s_le = s + s2 * fast_exp(m2 - m)
    nm = torch.where(ninf2, m, torch.where(ninf, m2, torch.where(gt, m2, m)))
    ns = torch.where(ninf2, s, torch.where(ninf, s2, torch.where(gt, s_gt, s_le)))
    return torch.where(nan, math.nan, nm), torch.where(nan, math.nan, ns)


def lse_final(m, s):
    out = m + torch.log(s)
    out = torch.where(m == -math.inf, -math.inf, out)
    return torch.where(torch.isnan(m) | torch.isnan(s), math.nan, out)


def inv_norm(sumsq, pw=None):
    """nce::inv_norm: 1 / max(||x'||, eps pw) (pw: the row's power-of-two scale, 1 if None)."""
    nrm = torch.sqrt(sumsq)
    lim = torch.full_like(nrm, 1e-12) * (1.0 if pw is None else pw)
    return 1.0 / torch.where(nrm > lim, nrm, lim)


def row_pow2_scale(maxabs):
    """nce::row_pow2_scale<float>: 1 for rows with max |x| in [2^-49, 2^48), zero and non-finite rows;
    else 2^-e (max |x| = m 2^e), e clamped to [-126, 126]."""
    _, e = torch.frexp(maxabs)
    keep = (maxabs == 0) | ~torch.isfinite(maxabs) | ((e >= -48) & (e <= 48))
    return torch.where(keep, torch.ones_like(maxabs), torch.ldexp(torch.ones_like(maxabs), -e.clamp(-126, 126)))


def norms(x):
    """norms_kernel + scale_problem: the scaled rows x' = pw x (as the host swaps them in), the sum of
    squares of x', inv' and pw."""
    pw = row_pow2_scale(x.abs().amax(1))
    xs = x * pw[:, None]
    ss = (xs * xs).sum(1)
    return xs, ss, inv_norm(ss, pw), pw


@dataclass
class Geo:
    n: int = 0
    offset: int = 0
    pair: bool = False

    def is_self(self, r, c):
        return (c == self.offset + r) & self.pair

    def is_pos(self, r, c):
        partner = torch.where(r < self.n, r + self.n, r - self.n)
        return (c == self.offset + partner) & self.pair


def padded(x: torch.Tensor, row0: int, rows: int, k0: int, cols: int) -> torch.Tensor:
    """load_tile: rows x cols of x from (row0, k0), zero outside x's rows and D."""
    out = torch.zeros(rows, cols, dtype=x.dtype)
    r1, k1 = min(x.shape[0], row0 + rows), min(x.shape[1], k0 + cols)
    if r1 > row0 and k1 > k0:
        out[: r1 - row0, : k1 - k0] = x[row0:r1, k0:k1]
    return out


def tile_dots(p: Policy, own, other, a0, b0):
    """S = own[a0:a0+64] . other[b0:b0+64]^T, D consumed BK at a time (fp32 accumulation)."""
    S = torch.zeros(K_BM, K_BN)
    for k0 in range(0, own.shape[1], p.BK):
        A = padded(own, a0, K_BM, k0, p.BK)
        B = padded(other, b0, K_BN, k0, p.BK)
        if p is TF32:
            A, B = tf32(A), tf32(B)
        S = S + A @ B.t()
    return S


class Counter:
    """Counts writes per element of an output, to prove each is written exactly once."""

    def __init__(self, *shape):
        self.n = torch.zeros(*shape, dtype=torch.int32)


def emu_forward(p: Policy, rows, cols, geo: Geo, tau: float, pos_init, sms: int, inv_r=None, inv_c=None):
    """fwd_fast_body over the grid (ceil(R / 64), splits), then lse_combine_kernel. rows / cols are the
    scaled rows with their inverse norms (`norms`); unscaled ones with inv_r / inv_c None."""
    R, M = rows.shape[0], cols.shape[0]
    inv_tau = torch.tensor(1.0 / tau, dtype=torch.float32)
    inv_r = inv_norm((rows * rows).sum(1)) if inv_r is None else inv_r
    inv_c = inv_norm((cols * cols).sum(1)) if inv_c is None else inv_c
    nblk, ntiles = ceil_div(R, K_BM), ceil_div(M, K_BN)
    splits = fwd_splits(R, M, sms)
    part_m = torch.full((splits, R), math.nan)
    part_s = torch.full((splits, R), math.nan)
    pos = torch.full((R,), math.nan)
    part_w, pos_w = Counter(splits, R), Counter(R)
    pair_seen = Counter(R, M)
    lanes = torch.arange(32)
    for bx in range(nblk):
        a0 = bx * K_BM
        ag = a0 + torch.arange(K_BM)
        in_r = ag < R
        scale_r = torch.where(in_r, inv_r[ag.clamp(max=R - 1)] * inv_tau, torch.zeros(()))
        for sp in range(splits):
            run_m = torch.full((K_BM,), -math.inf)
            run_s = torch.zeros(K_BM)
            if pos_init is not None and sp == 0:
                pi = torch.where(in_r, pos_init[ag.clamp(max=R - 1)], torch.zeros(()))
                m1, s1 = lse_merge(run_m, run_s, pi, torch.ones(K_BM))
                run_m, run_s = torch.where(in_r, m1, run_m), torch.where(in_r, s1, run_s)
                pos[ag[in_r]] = pi[in_r]
                pos_w.n[ag[in_r]] += 1
            tb, te = split_range(ntiles, splits, sp)
            for t in range(tb, te):
                b0 = t * K_BN
                bg = b0 + torch.arange(K_BN)
                inv_ct = torch.where(bg < M, inv_c[bg.clamp(max=max(M - 1, 0))], torch.zeros(()))
                S = tile_dots(p, rows, cols, a0, b0)
                x = (S * scale_r[:, None]) * inv_ct[None, :]  # nce::logit(dot, scale_r, inv_c)
                A_, B_ = torch.meshgrid(ag, bg, indexing="ij")
                valid = (B_ < M) & ~geo.is_self(A_, B_) & (A_ < R)
                ispos = geo.is_pos(A_, B_) & valid
                pos[A_[ispos]] = x[ispos]
                pos_w.n[A_[ispos]] += 1
                pair_seen.n[A_[valid], B_[valid]] += 1
                # lane l holds columns l and l + 32, added in that order (lse_add), then the butterfly
                pm = torch.full((K_BM, 32), -math.inf)
                ps = torch.zeros(K_BM, 32)
                for h in range(2):
                    b = lanes + 32 * h
                    m1, s1 = lse_merge(pm, ps, x[:, b], torch.ones(K_BM, 32))
                    v = valid[:, b]
                    pm, ps = torch.where(v, m1, pm), torch.where(v, s1, ps)
                for o in (16, 8, 4, 2, 1):
                    pm, ps = lse_merge(pm, ps, pm[:, lanes ^ o], ps[:, lanes ^ o])
                # lse_merge is symmetric: after the butterfly every lane holds the same (m, s)
                torch.testing.assert_close(pm, pm[:, :1].expand_as(pm), rtol=0, atol=0, equal_nan=True)
                torch.testing.assert_close(ps, ps[:, :1].expand_as(ps), rtol=0, atol=0, equal_nan=True)
                m1, s1 = lse_merge(run_m, run_s, pm[:, 0], ps[:, 0])
                run_m, run_s = torch.where(in_r, m1, run_m), torch.where(in_r, s1, run_s)
            part_m[sp, ag[in_r]] = run_m[in_r]
            part_s[sp, ag[in_r]] = run_s[in_r]
            part_w.n[sp, ag[in_r]] += 1
    assert (part_w.n == 1).all(), "every (split, row) partial written exactly once"
    assert (pos_w.n == 1).all(), "every row's positive logit written exactly once"
    # every logit of every row visited exactly once over the splits; the own column never
    want = torch.ones(R, M, dtype=torch.int32)
    if geo.pair:
        want[torch.arange(R), geo.offset + torch.arange(R)] = 0
    assert torch.equal(pair_seen.n, want)
    m = torch.full((R,), -math.inf)
    s = torch.zeros(R)
    for sp in range(splits):  # lse_combine_kernel: split order
        m, s = lse_merge(m, s, part_m[sp], part_s[sp])
    return lse_final(m, s), pos, splits


ROW, COL, SYM = 0, 1, 2


def emu_grad_pass(p: Policy, kind, own, other, inv_o, inv_x, lse_o, lse_x, geo: Geo, tau, splits, dtype, w_scale=None):
    """grad_fast_body over the grid (ceil(own / 64), ceil(D / 128), splits): returns the fp32
    gradient slices G[splits, own, D] w.r.t. the normalized own rows (before g / (R tau)).
    w_scale: the factor W is stored with in the 16-bit W tile (default: the kernel's kWScale)."""
    RO, RX, D = own.shape[0], other.shape[0], own.shape[1]
    inv_tau = torch.tensor(1.0 / tau, dtype=torch.float32)
    G = torch.full((splits, RO, D), math.nan)
    g_w = Counter(splits, RO, D)
    seen = Counter(ceil_div(D, K_DC), RO, RX)
    ntiles = ceil_div(RX, K_BN)
    for bx in range(ceil_div(RO, K_BM)):
        a0 = bx * K_BM
        ag = a0 + torch.arange(K_BM)
        ok_a = ag < RO
        agc = ag.clamp(max=RO - 1)
        scale_o = torch.where(ok_a, inv_o[agc] * inv_tau, torch.zeros(()))
        lse_ot = torch.where(ok_a, lse_o[agc], torch.zeros(())) if lse_o is not None else torch.zeros(K_BM)
        for sp in range(splits):
            for by in range(ceil_div(D, K_DC)):
                c0 = by * K_DC
                O = torch.zeros(K_BM, K_DC)
                tb, te = split_range(ntiles, splits, sp)
                for t in range(tb, te):
                    b0 = t * K_BN
                    bg = b0 + torch.arange(K_BN)
                    ok_b = bg < RX
                    bgc = bg.clamp(max=RX - 1)
                    inv_xt = torch.where(ok_b, inv_x[bgc], torch.zeros(()))
                    lse_xt = torch.where(ok_b, lse_x[bgc], torch.zeros(())) if lse_x is not None else torch.zeros(K_BN)
                    S = tile_dots(p, own, other, a0, b0)
                    l = (S * scale_o[:, None]) * inv_xt[None, :]
                    A_, B_ = torch.meshgrid(ag, bg, indexing="ij")
                    inb = ok_a[:, None] & ok_b[None, :]
                    seen.n[by][A_[inb], B_[inb]] += 1
                    if kind == ROW:
                        slf, ps = geo.is_self(A_, B_), geo.is_pos(A_, B_)
                        w = fast_exp(l - lse_ot[:, None]) - ps.float()
                    elif kind == COL:
                        slf, ps = geo.is_self(B_, A_), geo.is_pos(B_, A_)
                        w = fast_exp(l - lse_xt[None, :]) - ps.float()
                    else:
                        slf, ps = geo.is_self(A_, B_), geo.is_pos(A_, B_)
                        w = fast_exp(l - lse_ot[:, None]) + fast_exp(l - lse_xt[None, :]) - 2 * ps.float()
                    w = torch.where(slf, torch.zeros(()), w)
                    w = torch.where(inb, w, torch.zeros(()))
                    xhat = padded(other, b0, K_BN, c0, K_DC) * inv_xt[:, None]  # load_tile_scaled
                    if p is TC16:
                        # Ws = from_f<S>(w * kWScale); o_store multiplies by 1 / kWScale. Both are
                        # exact (powers of two), so unscaling W here equals unscaling O there.
                        ws = K_W_SCALE if w_scale is None else w_scale
                        w, xhat = (w * ws).to(dtype).float() / ws, xhat.to(dtype).float()
                    elif p is TF32:
                        w, xhat = tf32(w), tf32(xhat)
                    O = O + w @ xhat
                rows_ok = ag[ok_a]
                k1 = min(D, c0 + K_DC)
                G[sp, rows_ok, c0:k1] = O[ok_a, : k1 - c0]
                g_w.n[sp, rows_ok, c0:k1] += 1
    assert (g_w.n == 1).all(), "every gradient-slice element written exactly once"
    assert (seen.n == 1).all(), "every (own, other) pair accumulated exactly once per D chunk"
    return G


def finalize(z, G, scale_c, ss, iv, pw):
    """finalize_kernel on the scaled rows z' (`norms`): dz = c (inv_true G - beta z'),
    inv_true = pw inv', beta = pw inv'^3 (z' . G), G summed over the splits in order."""
    g = torch.zeros_like(G[0])
    for sp in range(G.shape[0]):
        g = g + G[sp]
    xg = (z * g).sum(1)
    clamped = torch.sqrt(ss) < torch.full_like(ss, 1e-12) * pw
    beta = torch.where(clamped, torch.zeros(()), pw * (((xg * iv) * iv) * iv))
    return scale_c * ((pw * iv)[:, None] * g - beta[:, None] * z)


def emulate(p: Policy, z0, z1, tau, *, bank=None, cols=None, col_offset=0, sms=132, dtype=torch.float32):
    """info_nce_cuda + info_nce_backward_cuda (fast path) for upstream gradient 1: returns
    (loss, dz0, dz1, d_other or None), all in fp32 with the output-dtype rounding applied."""
    f32 = [None if t is None else t.to(dtype).float() for t in (z0, z1, bank, cols)]
    z0f, z1f, bankf, colsf = f32
    n = z0f.shape[0]
    if bankf is not None:
        (rows, ss_r, inv_r, pw_r), (other, ss_c, inv_c, pw_c) = norms(z0f), norms(bankf)
        z1f, ss1, inv1, pw1 = norms(z1f)
        inv0 = inv_r
        dot = (rows * z1f).sum(1)
        pos_init = (dot * (inv0 * torch.tensor(1.0 / tau, dtype=torch.float32))) * inv1
        geo = Geo()
    else:
        rows, ss_r, inv_r, pw_r = norms(torch.cat([z0f, z1f]))
        other, ss_c, inv_c, pw_c = (rows, ss_r, inv_r, pw_r) if colsf is None else norms(colsf)
        geo = Geo(n=n, offset=col_offset if colsf is not None else 0, pair=True)
        pos_init = None
    R, M, D = rows.shape[0], other.shape[0], rows.shape[1]
    lse, pos, _ = emu_forward(p, rows, other, geo, tau, pos_init, sms, inv_r, inv_c)
    loss = ((lse.double() - pos.double()).sum() / R).to(dtype)

    c = torch.tensor(1.0 / (R * tau), dtype=torch.float32)  # grad 1 * scale
    single = bankf is None and colsf is None
    sr = bwd_splits(R, M, D, sms)
    if single:
        Gr = emu_grad_pass(p, SYM, rows, rows, inv_r, inv_r, lse, lse, geo, tau, sr, dtype)
    else:
        Gr = emu_grad_pass(p, ROW, rows, other, inv_r, inv_c, lse, None, geo, tau, sr, dtype)
    G1 = None
    if bankf is not None:  # bank_pos_grad_kernel (accurate exp), into split 0
        w = torch.exp(pos_init - lse) - 1
        Gr[0] = Gr[0] + (w * inv1)[:, None] * z1f
        G1 = ((w * inv0)[:, None] * rows)[None]
    dr = finalize(rows, Gr, c, ss_r, inv_r, pw_r).to(dtype)
    if bankf is not None:
        dz0, dz1 = dr, finalize(z1f, G1, c, ss1, inv1, pw1).to(dtype)
    else:
        dz0, dz1 = dr[:n], dr[n:]
    d_other = None
    if not single and M > 0:
        sc = bwd_splits(M, R, D, sms)
        Gc = emu_grad_pass(p, COL, other, rows, inv_c, inv_r, None, lse, geo, tau, sc, dtype)
        d_other = finalize(other, Gc, c, ss_c, inv_c, pw_c).to(dtype)
    return loss, dz0, dz1, d_other


def reference(z0, z1, tau, *, bank=None, cols=None, col_offset=0, dtype=torch.float32):
    ins = [t.to(dtype).double().requires_grad_(True) for t in (z0, z1)]
    extra = None
    if bank is not None:
        extra = bank.to(dtype).double().requires_grad_(True)
        loss = ref.info_nce(ins[0], ins[1], tau, extra)
    elif cols is not None:
        extra = cols.to(dtype).double().requires_grad_(True)
        loss = ref.info_nce(ins[0], ins[1], tau, cols=extra, col_offset=col_offset)
    else:
        loss = ref.info_nce(ins[0], ins[1], tau)
    grads = torch.autograd.grad(loss, ins + ([extra] if extra is not None and extra.shape[0] > 0 else []))
    return (loss.detach(), *grads)


def data(n, d, k=None, seed=0, world=None):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, d, generator=g)
    z1 = torch.randn(n, d, generator=g) + 2 * z0
    bank = None if k is None else torch.randn(k, d, generator=g)
    return z0, z1, bank


CASES = [  # (mode, n, d, k or world, sms); 2N / N in {1, 2, 3, 65, 66, 130}, ragged D and tiles
    ("single", 1, 16, None, 132),
    ("single", 1, 2048, None, 132),
    ("single", 65, 24, None, 132),
    ("single", 65, 16, None, 1),
    ("bank", 3, 24, 0, 132),
    ("bank", 3, 2048, 65, 132),
    ("bank", 65, 16, 400, 3),  # 7 column tiles in 6 splits: empty trailing splits
    ("dist", 1, 16, 3, 132),  # 3 ranks' columns, this rank 1
    ("dist", 33, 24, 2, 132),  # 2N = 66 rows inside 132 columns, offset 66
]


def run_case(p, dtype, mode, n, d, extra, sms, tau=0.1):
    if mode == "bank":
        z0, z1, bank = data(n, d, extra, seed=n + d)
        kw = {"bank": bank}
    elif mode == "dist":
        world, rank = extra, 1
        g = torch.Generator().manual_seed(n * d)
        cols = torch.randn(world * 2 * n, d, generator=g)
        cols[rank * 2 * n + n : (rank + 1) * 2 * n] += 2 * cols[rank * 2 * n : rank * 2 * n + n]
        z0 = cols[rank * 2 * n : rank * 2 * n + n].clone()
        z1 = cols[rank * 2 * n + n : (rank + 1) * 2 * n].clone()
        kw = {"cols": cols, "col_offset": rank * 2 * n}
    else:
        z0, z1, _ = data(n, d, seed=n + d)
        kw = {}
    got = emulate(p, z0, z1, tau, sms=sms, dtype=dtype, **kw)
    want = reference(z0, z1, tau, dtype=dtype, **kw)
    return got, want


def check(got, want, dtype):
    loss, dz0, dz1, d_other = got
    grads = [dz0, dz1] + ([d_other] if d_other is not None else [])
    assert len(grads) == len(want) - 1
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), want[0], rtol=1e-5, atol=1e-6)
        for g, w in zip(grads, want[1:]):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6 * max(1.0, w.abs().max().item()))
    else:  # the CUDA tests' tolerances for fp16/bf16 (tests/ops/test_info_nce.py)
        eps, step = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
        torch.testing.assert_close(loss.double(), want[0], rtol=4 * eps, atol=0)
        for g, w in zip(grads, want[1:]):
            torch.testing.assert_close(g.double(), w, rtol=0.05, atol=8 * eps * w.abs().max().item() + step)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize(
    "p,dtype",
    [(FMA, torch.float32), (TC16, torch.bfloat16), (TC16, torch.float16)],
    ids=["fma-fp32", "tc16-bf16", "tc16-fp16"],
)
def test_emulated_fast_path_matches_reference(p, dtype, case):
    got, want = run_case(p, dtype, *case)
    check(got, want, dtype)


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[8]], ids=lambda c: "-".join(map(str, c)))
def test_emulated_tf32_path_is_close(case):
    """TF32 fragments (10-bit mantissa operands): the loss within 2e-3 relative as the CUDA test asks;
    gradients within 1 % of their largest element."""
    (loss, *grads), want = run_case(TF32, torch.float32, *case)
    grads = [g for g in grads if g is not None]
    torch.testing.assert_close(loss.double(), want[0], rtol=2e-3, atol=1e-4)
    for g, w in zip(grads, want[1:]):
        torch.testing.assert_close(g.double(), w, rtol=0.02, atol=0.01 * w.abs().max().item())


@pytest.mark.parametrize("scale", ["1e19", "1e-19", "mixed"])
@pytest.mark.parametrize("mode", ["single", "bank", "dist"])
@pytest.mark.parametrize("p,dtype", [(FMA, torch.float32), (TC16, torch.bfloat16)], ids=["fma-fp32", "tc16-bf16"])
def test_emulated_scale_safety(p, dtype, mode, scale):
    """Embeddings of magnitude 1e19 overflow fp32 squares and dot products, 1e-19 underflow them: the
    per-row power-of-two scaling (norms_kernel + scale_problem) gives the definition's loss and
    gradients (float64 reference) in fp32 and bf16 (fp16 never needs it)."""
    n, d = 33, 24
    g = torch.Generator().manual_seed(11)
    z0, z1 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    other = torch.randn(120, d, generator=g)
    if scale == "mixed":
        f = 10.0 ** torch.randint(-30, 31, (3, 120), generator=g).double()
        z0, z1, other = z0 * f[0, :n, None], z1 * f[1, :n, None], other * f[2, :, None]
    else:
        z0, z1, other = (t * float(scale) for t in (z0, z1, other))
    kw = {"bank": other} if mode == "bank" else {}
    if mode == "dist":
        other[n : 3 * n] = torch.cat([z0, z1])
        kw = {"cols": other, "col_offset": n}
    got = emulate(p, z0, z1, 0.2, dtype=dtype, **kw)
    want = reference(z0, z1, 0.2, dtype=dtype, **kw)
    assert all(torch.isfinite(t).all() for t in got if t is not None)
    check(got, want, dtype)


def test_emulated_nan_propagates_through_splits_and_butterfly():
    """A NaN in one column tile of one split reaches every row's LSE through the lane butterfly and
    the split merge (fmax-style merges would drop it)."""
    z0, z1, _ = data(65, 16, seed=5)
    z1[40, 3] = math.nan  # row 105, column tile 1
    rows = torch.cat([z0, z1])
    lse, pos, splits = emu_forward(FMA, rows, rows, Geo(n=65, pair=True), 0.5, None, sms=132)
    assert splits > 1
    assert torch.isnan(lse).all()
    assert torch.isnan(pos[105]) and torch.isnan(pos[40])


def _bank_grad_errors(M, w_scales, R=16, D=64, tau=0.1):
    """Bank mode, fp16 embeddings, M negatives: the fast backward's row pass (d z0) and column pass
    (d bank) on tensor cores (TC16: fp16 W and X tiles, fp32 accumulation), each W tile stored with
    the given scales, against the fp64 reference. The LSE is the fp64 one rounded to fp32 (the
    forward's own error is covered above); gradients are compared in fp32, before the output's
    rounding to fp16 (with a GradScaler's upstream gradient they are normal fp16 numbers, while W is
    formed before that factor and cannot profit from it). Returns {scale: (d z0 error, d bank
    error)}, each the largest over rows of |got - want| / |want|."""
    gen = torch.Generator().manual_seed(M)
    z0 = torch.randn(R, D, generator=gen)
    z1 = z0 + 0.5 * torch.randn(R, D, generator=gen)
    bank = torch.randn(M, D, generator=gen)
    z0, z1, bank = (t.half().float() for t in (z0, z1, bank))
    ins = [t.double().requires_grad_(True) for t in (z0, z1, bank)]
    want0, _, want_b = torch.autograd.grad(ref.info_nce(ins[0], ins[1], tau, ins[2]), ins)
    zn, z1n, bn = (F.normalize(t.detach(), dim=1) for t in ins)
    lse = torch.logsumexp(torch.cat([(zn * z1n).sum(1, keepdim=True), zn @ bn.t()], 1) / tau, 1).float()

    (z0, ss0, inv0, pw0), (z1, _, inv1, _), (bank, ssb, invb, pwb) = (norms(t) for t in (z0, z1, bank))
    c = torch.tensor(1.0 / (R * tau), dtype=torch.float32)
    pos = ((z0 * z1).sum(1) * (inv0 * torch.tensor(1.0 / tau, dtype=torch.float32))) * inv1
    w_pos = torch.exp(pos - lse) - 1  # bank_pos_grad_kernel (fp32, accurate exp)

    def err(got, want):
        return ((got.double() - want).norm(dim=1) / want.norm(dim=1)).max().item()

    out = {}
    for ws in w_scales:
        Gr = emu_grad_pass(
            TC16, ROW, z0, bank, inv0, invb, lse, None, Geo(), tau, bwd_splits(R, M, D, 132), torch.float16, w_scale=ws
        )
        Gr[0] = Gr[0] + (w_pos * inv1)[:, None] * z1
        Gc = emu_grad_pass(
            TC16, COL, bank, z0, invb, inv0, None, lse, Geo(), tau, bwd_splits(M, R, D, 132), torch.float16, w_scale=ws
        )
        out[ws] = (err(finalize(z0, Gr, c, ss0, inv0, pw0), want0), err(finalize(bank, Gc, c, ssb, invb, pwb), want_b))
    return out


@pytest.mark.parametrize("M", [8192, 65536])
def test_fp16_coefficients_keep_their_precision_at_large_batches(M):
    """Issue 13: a negative's coefficient is ~1 / M, below fp16's smallest normal (6e-5) from M ~ 16k,
    where fp16 keeps only an absolute step of 6e-8. Stored times kWScale = 2^13 it stays normal, and
    the gradients keep fp16's relative precision: within 2^-10 (4x the unit roundoff of the W and X
    tiles) of the fp64 reference. Unscaled (as before), the bank's gradient misses that at 65,536."""
    errs = _bank_grad_errors(M, (1.0, K_W_SCALE))
    (b0, bb), (a0, ab) = errs[1.0], errs[K_W_SCALE]
    print(f"M={M}: d z0 error {b0:.2e} unscaled -> {a0:.2e} scaled; d bank {bb:.2e} -> {ab:.2e}")
    assert a0 <= 2.0**-10 and ab <= 2.0**-10
    if M >= 65536:
        assert bb > 4 * ab
