"""Fused InfoNCE (sparkct.ops.info_nce) vs the naive PyTorch form (normalize, matmul,
cross-entropy) vs lightly's NTXentLoss, forward and forward+backward: time, peak extra memory,
and derived figures.

Per (device, dtype, 2N, D, pass) group, in this order:
  gemm     the ideal: only the GEMMs the loss needs ((2N)^2 D multiply-adds once for the forward,
           three times for forward+backward), through torch.mm on 2048-column slabs (cuBLAS /
           MKL at their best, no softmax, nothing materialized beyond a slab);
  naive    sparkct.ops.reference.info_nce (full logits, F.cross_entropy);
  lightly  lightly.loss.NTXentLoss (skipped where lightly is not installed);
  fused    sparkct.ops.info_nce.
Derived (in extra_info and the end-of-run table): gflops_per_s (GEMM FLOPs: 2 (2N)^2 D per GEMM,
the same count for every implementation), gb_per_s (of the loss's compulsory traffic,
`compulsory_bytes`: flops / bytes_moved is the arithmetic intensity a roofline places it at),
speedup_vs_naive, mem_vs_naive (fraction of naive's
extra peak memory), frac_of_gemm (gemm time / this time: 1.0 = as fast as the bare GEMMs) and, on
known GPUs, frac_of_tc_peak (achieved / the tensor-core dense peak of the dtype).

CPU sizes: 2N in {2048, 8192, 16384} x D in {128, 512}, fp32 (few rounds: the whole CPU suite takes
a few minutes on 2 cores). CUDA (marked): 2N in {8192, 65536} x D = 128, fp32 and bf16; naive and
lightly are skipped where they run out of memory. Targets (checked by reading the table, not
asserted): CPU fp32 2N=8192 D=128 fwd+bwd: fused no slower than naive with <= 1/10 of its extra
peak memory; H100 bf16 2N=65536 D=128 fwd+bwd: >= 2x faster than naive, extra memory < 64 MiB.
The largest 2N each implementation runs at: benchmarks/info_nce_max_rows.py.
"""

from __future__ import annotations

import pytest
import torch

from sparkct.ops import info_nce
from sparkct.ops import reference as ref

import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file)
BENCH = {
    "suite": "kernels",
    "pairs": [  # fused vs the naive form (full logits), lightly's NTXentLoss, and the bare GEMMs (the ideal)
        {
            "case": {"test": "test_info_nce", "impl": "fused"},
            "base": {"impl": "naive"},
            "label": "naive",
            "memory": True,
        },
        {"case": {"test": "test_info_nce", "impl": "fused"}, "base": {"impl": "lightly"}, "label": "lightly"},
        {"case": {"test": "test_info_nce", "impl": "fused"}, "base": {"impl": "gemm"}, "label": "gemm"},
    ],
    "default": [
        ("test_info_nce", "cpu-fp32-2N8192-D128-fwd+bwd-*"),  # README's headline size
        ("test_info_nce", "cpu-fp32-2N2048-D128-fwd-*"),
    ],
    "quick": [
        ("test_info_nce", "cpu-fp32-2N2048-D128-fwd-*"),  # gemm, naive, lightly, fused
        ("test_info_nce", "cuda-bf16-2N8192-D128-*"),
    ],
}

try:
    from lightly.loss import NTXentLoss
except ImportError:  # pragma: no cover - lightly is a dev extra
    NTXentLoss = None

TAU = 0.2
_RESULTS: dict[tuple, dict] = {}  # (device, dtype, n2, d, mode, impl) -> extra_info


def _cases():
    out = []
    for n2 in (2048, 8192, 16384):
        for d in (128, 512):
            for mode in ("fwd", "fwd+bwd"):
                for impl in ("gemm", "naive", "lightly", "fused"):
                    out.append(
                        pytest.param("cpu", torch.float32, n2, d, mode, impl, id=f"cpu-fp32-2N{n2}-D{d}-{mode}-{impl}")
                    )
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for n2 in (8192, 65536):
            for mode in ("fwd", "fwd+bwd"):
                for impl in ("gemm", "naive", "lightly", "fused"):
                    out.append(
                        pytest.param(
                            "cuda",
                            dtype,
                            n2,
                            128,
                            mode,
                            impl,
                            marks=pytest.mark.cuda,
                            id=f"cuda-{tag}-2N{n2}-D128-{mode}-{impl}",
                        )
                    )
    return out


def _rounds(device, n2):
    if device == "cuda":
        return 10
    return {2048: 5, 8192: 3}.get(n2, 2)


def compulsory_bytes(n2: int, d: int, elt: int, backward: bool) -> int:
    """The loss's unavoidable memory traffic, the same for every implementation: the forward reads
    the 2N x D embeddings once and writes one fp32 log-sum-exp per row; the backward reads the
    embeddings and the log-sum-exps again and writes the 2N x D gradient. (What an implementation
    materializes beyond that, the naive form's (2N)^2 logits, is its own cost: it shows as a lower
    point under the same roof.)"""
    fwd = n2 * d * elt + n2 * 4
    return fwd + (n2 * d * elt * 2 + n2 * 4 if backward else 0)


def _gemm_ideal(z, passes):
    """The loss's GEMM work alone: `passes` times (2N x D) @ (D x 2N), 2048 columns at a time."""
    out = torch.empty(z.shape[0], 2048, device=z.device, dtype=z.dtype)

    def fn():
        for _ in range(passes):
            for c in range(0, z.shape[0], 2048):
                blk = z[c : c + 2048]
                torch.mm(z, blk.t(), out=out[:, : blk.shape[0]])
        return out

    return fn


@pytest.mark.parametrize("device,dtype,n2,d,mode,impl", _cases())
def test_info_nce(benchmark, device, dtype, n2, d, mode, impl):
    if impl == "lightly" and NTXentLoss is None:
        pytest.skip("lightly is not installed")
    benchmark.group = f"info_nce-{device}-{str(dtype)[6:]}-2N{n2}-D{d}-{mode}"
    gen = torch.Generator().manual_seed(0)
    n = n2 // 2
    z0 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(mode != "fwd")
    z1 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(mode != "fwd")
    backward = mode == "fwd+bwd"

    if impl == "gemm":
        fn = _gemm_ideal(torch.cat([z0, z1]).detach(), 3 if backward else 1)
    else:
        loss_fn = {
            "naive": lambda a, b: ref.info_nce(a, b, TAU),
            "lightly": (NTXentLoss(TAU) if NTXentLoss else None),
            "fused": lambda a, b: info_nce(a, b, TAU),
        }[impl]

        def fn():
            z0.grad = z1.grad = None
            loss = loss_fn(z0, z1)
            if backward:
                loss.backward()
            return loss

        # correctness before timing: against the fp64 reference on small slices of the same data
        if impl == "fused":
            m = min(n, 512)
            a, b = z0[:m].detach(), z1[:m].detach()
            want = ref.info_nce(a.double(), b.double(), TAU)
            got = info_nce(a, b, TAU)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert abs(got.double().item() - want.item()) <= tol * max(1.0, abs(want.item())), (got, want)
    try:
        extra = benchkit.run(
            benchmark,
            fn,
            device,
            rounds=_rounds(device, n2),
            warmup=1,
            impl=impl,
            n2=n2,
            D=d,
            mode=mode,
            dtype=str(dtype)[6:],
            flops=(3 if backward else 1) * 2 * n2 * n2 * d,
            bytes_moved=compulsory_bytes(n2, d, z0.element_size(), backward),
        )
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} runs out of memory at 2N={n2}, D={d}")
    key = (device, dtype, n2, d, mode)
    _RESULTS[key + (impl,)] = extra
    derived = {}
    naive = _RESULTS.get(key + ("naive",))
    gemm = _RESULTS.get(key + ("gemm",))
    if naive and impl != "naive":
        derived["speedup_vs_naive"] = round(naive["median_s"] / extra["median_s"], 3)
        if naive["peak_bytes"] > 0:
            derived["mem_vs_naive"] = round(extra["peak_bytes"] / naive["peak_bytes"], 4)
    if gemm and impl != "gemm":
        derived["frac_of_gemm"] = round(gemm["median_s"] / extra["median_s"], 3)
    if device == "cuda":
        from sparkct.perf.peaks import compute_peak, gpu_table_peaks

        peaks = gpu_table_peaks(torch.cuda.get_device_name())  # the datasheet table, one for all of sparkct
        peak = compute_peak(peaks, dtype)[0] if peaks else None
        if peak:
            derived["frac_of_tc_peak"] = round(extra.get("gflops_per_s", 0) / peak, 4)
    benchmark.extra_info.update(derived)
    benchkit.DERIVED[-1].update(derived)
