"""Fused prototype cross-entropy (sparkct.ops.prototype_cross_entropy, DINO's loss) vs the plain
PyTorch loss (sparkct.ops.reference.prototype_cross_entropy: all logits, log_softmax per student crop,
one weighted sum per (teacher, student) pair, as DINO/DINOv2 write it), forward and forward+backward:
time, peak extra memory, derived figures.

Per (device, dtype, size, pass) group, in this order:
  gemm   the ideal: only the GEMMs the fused op does, each a whole-matrix torch.mm (no softmax; its
         preallocated outputs are not a memory target): forward (S+T) B K D multiply-adds; forward +
         backward (2 (S+T) + 2 S) B K D (the backward recomputes the logits, then d student and
         d w_student). The plain loss does (S+T) + 2 S: the fused op pays (S+T) B K D of recomputation
         for never storing the logits;
  plain  the reference loss;
  fused  sparkct.ops.prototype_cross_entropy.
Derived: gflops_per_s (the fused op's GEMM FLOPs for every implementation), speedup_vs_plain,
mem_vs_plain (fraction of the plain loss's extra peak memory; both include the K x D gradient of
w_student they return), frac_of_gemm (gemm time / this time: 1.0 = as fast as the bare GEMMs).

Sizes. CPU: 64 images x (2 global + 6 local) crops (T = 2, S = 8), D = 256, K = 65,536, fp32.
CUDA (marked): 1,024 images x (2 + 8) crops (T = 2, S = 10), D = 256, K = 65,536, bf16 (and fp32).
Targets (read from the table, not asserted): CPU fwd+bwd: fused no slower than plain, extra peak memory
<= 0.05 x the plain loss's. `python benchmarks/bench_prototype_ce.py` times fused, plain and gemm
interleaved (one round of each in turn) on the CPU case and prints one JSON line: on a shared machine
that is the fairer comparison.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from sparkct.ops import prototype_cross_entropy
from sparkct.ops import reference as ref

try:
    import benchkit
except ImportError:  # run as a script from elsewhere
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file)
BENCH = {
    "suite": "kernels",
    "pairs": [
        {
            "case": {"test": "test_prototype_ce", "impl": "fused"},
            "base": {"impl": "plain"},
            "label": "plain",
            "memory": True,
        },
        {"case": {"test": "test_prototype_ce", "impl": "fused"}, "base": {"impl": "gemm"}, "label": "gemm"},
    ],
    "default": [("test_prototype_ce", "cpu-fp32-B64-S8T2-D256-K65536-fwd+bwd-*")],
    "quick": [
        ("test_prototype_ce", "cpu-fp32-B16-S8T2-D256-K8192-fwd+bwd-*"),
        ("test_prototype_ce", "cuda-bf16-B256-S10T2-D256-K65536-fwd+bwd-*"),
    ],
}

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
IMPLS = ("gemm", "plain", "fused")
_RESULTS: dict[tuple, dict] = {}


def _cases():
    out = []
    cpu = [(64, 8, 2, 256, 65536, m) for m in ("fwd", "fwd+bwd")] + [(16, 8, 2, 256, 8192, "fwd+bwd")]
    for B, S, T, D, K, mode in cpu:
        for impl in IMPLS:
            out.append(
                pytest.param(
                    "cpu",
                    torch.float32,
                    B,
                    S,
                    T,
                    D,
                    K,
                    mode,
                    impl,
                    id=f"cpu-fp32-B{B}-S{S}T{T}-D{D}-K{K}-{mode}-{impl}",
                )
            )
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for B in (256, 1024):
            for mode in ("fwd", "fwd+bwd"):
                for impl in IMPLS:
                    out.append(
                        pytest.param(
                            "cuda",
                            dtype,
                            B,
                            10,
                            2,
                            256,
                            65536,
                            mode,
                            impl,
                            marks=pytest.mark.cuda,
                            id=f"cuda-{tag}-B{B}-S10T2-D256-K65536-{mode}-{impl}",
                        )
                    )
    return out


def make_inputs(B, S, T, D, K, *, device="cpu", dtype=torch.float32, seed=0):
    """DINO-like inputs: L2-normalized crop features (crops of one image correlated) and prototypes;
    student and w_student require grad; a centering bias."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, B, D, generator=g)
    st = F.normalize(base + torch.randn(S, B, D, generator=g), dim=-1)
    te = F.normalize(base + torch.randn(T, B, D, generator=g), dim=-1)
    ws = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    wt = F.normalize(ws + 0.05 * torch.randn(K, D, generator=g), dim=-1)
    bias = -0.1 * torch.randn(K, generator=g) / TEACHER_TEMP
    st, te, ws, wt, bias = (x.to(device=device, dtype=dtype) for x in (st, te, ws, wt, bias))
    return st.requires_grad_(True), te, ws.requires_grad_(True), wt, bias


def gemm_flops(B, S, T, D, K, backward):
    return 2 * B * K * D * ((2 * (S + T) + 2 * S) if backward else (S + T))


def _gemm_ideal(st, te, ws, backward):
    """The fused op's GEMMs alone, each one whole-matrix torch.mm (MKL / cuBLAS at their best; the
    outputs are preallocated, so this forms the logits the fused op never stores): logits of all crops
    (twice with the backward), then d student = W w and d w = W^T student."""
    D = st.shape[-1]
    rows = torch.cat([st, te]).detach().reshape(-1, D)
    srows = st.detach().reshape(-1, D)
    w = ws.detach()
    logits = rows.new_empty(rows.shape[0], w.shape[0])
    gs = torch.empty_like(srows)
    gw = torch.empty_like(w)

    def fn():
        for _ in range(2 if backward else 1):
            torch.mm(rows, w.t(), out=logits)
        if backward:
            blk = logits[: srows.shape[0]]
            torch.mm(blk, w, out=gs)
            torch.mm(blk.t(), srows, out=gw)
        return logits

    return fn


def _loss_fn(impl):
    f = prototype_cross_entropy if impl == "fused" else ref.prototype_cross_entropy
    return lambda st, te, ws, wt, b: f(st, te, ws, wt, b, STUDENT_TEMP, TEACHER_TEMP, True)


def _step_fn(impl, inputs, backward):
    st, te, ws, wt, bias = inputs
    if impl == "gemm":
        return _gemm_ideal(st, te, ws, backward)
    loss_fn = _loss_fn(impl)

    def fn():
        st.grad = ws.grad = None
        loss = loss_fn(st, te, ws, wt, bias)
        if backward:
            loss.backward()
        return loss

    return fn


def _check_fused(inputs):
    """Correctness before timing: fused against the fp64 reference on a slice (8 images, 4096 prototypes)."""
    st, te, ws, wt, bias = (x.detach()[..., :8, :] if x.dim() == 3 else x.detach() for x in inputs)
    ws, wt, bias = ws[:4096], wt[:4096], bias[:4096]
    want = ref.prototype_cross_entropy(*(x.double() for x in (st, te, ws, wt, bias)), STUDENT_TEMP, TEACHER_TEMP)
    got = prototype_cross_entropy(st, te, ws, wt, bias, STUDENT_TEMP, TEACHER_TEMP)
    tol = 1e-4 if st.dtype == torch.float32 else 3e-2
    assert abs(got.double().item() - want.item()) <= tol * max(1.0, abs(want.item())), (got, want)


@pytest.mark.parametrize("device,dtype,B,S,T,D,K,mode,impl", _cases())
def test_prototype_ce(benchmark, device, dtype, B, S, T, D, K, mode, impl):
    benchmark.group = f"prototype_ce-{device}-{str(dtype)[6:]}-B{B}-S{S}T{T}-D{D}-K{K}-{mode}"
    backward = mode == "fwd+bwd"
    inputs = make_inputs(B, S, T, D, K, device=device, dtype=dtype)
    if impl == "fused":
        _check_fused(inputs)
    fn = _step_fn(impl, inputs, backward)
    try:
        extra = benchkit.run(
            benchmark,
            fn,
            device,
            rounds=10 if device == "cuda" else 3,
            warmup=1,
            impl=impl,
            B=B,
            S=S,
            T=T,
            D=D,
            K=K,
            mode=mode,
            dtype=str(dtype)[6:],
            flops=gemm_flops(B, S, T, D, K, backward),
        )
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} runs out of memory at B={B}, K={K}")
    key = (device, dtype, B, S, T, D, K, mode)
    _RESULTS[key + (impl,)] = extra
    derived = {}
    plain = _RESULTS.get(key + ("plain",))
    gemm = _RESULTS.get(key + ("gemm",))
    if plain and impl != "plain":
        derived["speedup_vs_plain"] = round(plain["median_s"] / extra["median_s"], 3)
        if plain["peak_bytes"] > 0:
            derived["mem_vs_plain"] = round(extra["peak_bytes"] / plain["peak_bytes"], 4)
    if gemm and impl != "gemm":
        derived["frac_of_gemm"] = round(gemm["median_s"] / extra["median_s"], 3)
    benchmark.extra_info.update(derived)
    benchkit.DERIVED[-1].update(derived)


def interleaved(rounds: int = 3, size=(64, 8, 2, 256, 65536)) -> dict:
    """fused, plain and gemm fwd+bwd, one round of each in turn, on the CPU case: medians, the
    ratios, and each one's extra peak memory (measured separately, twice: after a warm-up, as the pytest
    cases do, where a step first frees the previous step's gradients, so the figure is the loss's
    working memory; and from no gradients, which adds the gradients it returns, 64 MiB of d w_student)."""
    import statistics
    import time

    from sparkct.bench import peak_memory

    inputs = make_inputs(*size)
    _check_fused(inputs)
    fns = {impl: _step_fn(impl, inputs, True) for impl in IMPLS}
    st, ws = inputs[0], inputs[2]
    fresh = {}  # extra peak from no gradients at all: counts the d student, d w_student each returns
    for impl, fn in fns.items():
        st.grad = ws.grad = None
        fresh[impl] = peak_memory(fn, "cpu")
    peaks = {}  # after a warm-up, as the pytest cases measure: the step frees the last step's gradients first
    for impl, fn in fns.items():
        fn()
        peaks[impl] = peak_memory(fn, "cpu")
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(rounds):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - t0)
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    B, S, T, D, K = size
    return {
        "size": dict(B=B, S=S, T=T, D=D, K=K, dtype="float32", pass_="fwd+bwd"),
        "threads": torch.get_num_threads(),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "peak_mib_with_new_grads": {k: round(v / 2**20, 1) for k, v in fresh.items()},
        "time_fused_over_plain": round(med["fused"] / med["plain"], 3),
        "mem_fused_over_plain": round(peaks["fused"] / peaks["plain"], 4),
        "mem_fused_over_plain_with_new_grads": round(fresh["fused"] / fresh["plain"], 4),
        "frac_of_gemm": round(med["gemm"] / med["fused"], 3),
        "grad_w_mib": round(K * D * 4 / 2**20, 1),
    }


if __name__ == "__main__":
    print(json.dumps(interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
