"""Device peaks, the roofs of a roofline: compute (GFLOP/s, per dtype) and memory bandwidth (GB/s).

CPU peaks are measured by a short calibration (a few seconds): fp32 GEMM through torch.mm at a size
that saturates the BLAS, and memory bandwidth from a copy and an add of tensors far larger than the
last-level cache; medians of a few repeats (the best GEMM repeat is kept too), with the thread count
they ran with. They are *attained* peaks, not the vendor's theoretical ones (a 2-core VM's theoretical
peak is not published anyway), so on a shared machine a kernel timed in a quiet moment can land above
a roof calibrated in a busy one: calibrate in the same run as the cases and store the peaks with them.

GPU peaks come from a table of vendor datasheet figures (dense, i.e. without 2:4 structured
sparsity; the datasheets mark the sparse figures with an asterisk and they are twice these). An
unknown GPU is said to be unknown and, where it is present, measured by the same kind of short
calibration as the CPU (torch.mm per dtype, a device-memory copy).

`device_peaks(device)` returns one dict (JSON-ready) that `sparkct bench` stores in its result under
"peaks", so a roofline can be drawn later on another machine:

    {"device": "cpu", "name": "AMD EPYC", "source": "measured", "threads": 2,
     "compute_gflop_s": 61.2, "compute_by_dtype_gflop_s": {"fp32": 61.2},
     "bandwidth_gb_s": 9.8, "calibration": {...}}
    {"device": "cuda", "name": "NVIDIA H200", "source": "table:H200 SXM", "reference": "<datasheet>",
     "compute_gflop_s": 67000.0, "compute_by_dtype_gflop_s": {"fp32": 67000.0, "tf32": 494700.0,
     "bf16": 989400.0, "fp16": 989400.0}, "bandwidth_gb_s": 4800.0}

compute_gflop_s is the fp32 (non-tensor-core) peak; `compute_peak(peaks, dtype)` picks the roof of a
dtype.
"""

from __future__ import annotations

import functools
import platform
import re
import statistics
import time

from sparkct.device import resolve_device

__all__ = [
    "GPU_PEAKS",
    "gpu_table_peaks",
    "calibrate",
    "cpu_peaks",
    "gpu_peaks",
    "device_peaks",
    "compute_peak",
    "dtype_key",
]

# Vendor datasheets, dense figures (TFLOP/s; memory TB/s). "fp32" is the CUDA-core FP32 rate; "tf32",
# "bf16", "fp16" are the tensor-core rates (bf16/fp16 with fp32 accumulation, which is what PyTorch
# uses). Matched against torch.cuda.get_device_name() by regular expression, first match wins, so
# specific names (H100 PCIe, A100 80GB PCIe, L40S) come before their families.
_H100_DS = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet (H100 datasheet)"
_H200_DS = "https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446 (H200 datasheet)"
_A100_DS = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (A100 datasheet)"
)
_L4_DS = "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet (L4 datasheet)"
_L40S_DS = "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413 (L40S datasheet)"
_L40_DS = "https://images.nvidia.com/content/Solutions/data-center/vgpu-L40-datasheet.pdf (L40 datasheet)"
_ADA_WP = (
    "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf "
    "(Ada Lovelace architecture whitepaper, appendix A: GeForce RTX 4090)"
)
_A10_DS = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/datasheet-new/nvidia-a10-datasheet.pdf"
)
_V100_DS = (
    "https://images.nvidia.com/content/technologies/volta/pdf/"
    "volta-v100-datasheet-update-us-1165301-r5.pdf (V100 datasheet)"
)
_T4_DS = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"

# (pattern, table name, {dtype: TFLOP/s}, memory TB/s, reference)
GPU_PEAKS: list[tuple[str, str, dict[str, float], float, str]] = [
    (r"H200 NVL", "H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}, 4.8, _H200_DS),
    (r"H200", "H200 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}, 4.8, _H200_DS),
    (r"H100 NVL", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}, 3.9, _H100_DS),
    (r"H100.*PCIe", "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}, 2.0, _H100_DS),
    (r"H100", "H100 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}, 3.35, _H100_DS),
    (
        r"A100.*80GB.*PCIe|A100-PCIE-80GB",
        "A100 80GB PCIe",
        {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
        1.935,
        _A100_DS,
    ),
    (r"A100.*80GB", "A100 80GB SXM", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, 2.039, _A100_DS),
    (r"A100", "A100 40GB", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, 1.555, _A100_DS),
    (r"A10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}, 0.6, _A10_DS),
    (r"L40S", "L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05}, 0.864, _L40S_DS),
    (r"L40\b", "L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.05, "fp16": 181.05}, 0.864, _L40_DS),
    (r"L4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}, 0.3, _L4_DS),
    (r"RTX 4090", "GeForce RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}, 1.008, _ADA_WP),
    (r"V100S", "V100S PCIe", {"fp32": 16.4, "fp16": 130.0}, 1.134, _V100_DS),
    (r"V100.*PCIE", "V100 PCIe", {"fp32": 14.0, "fp16": 112.0}, 0.9, _V100_DS),
    (r"V100", "V100 SXM2", {"fp32": 15.7, "fp16": 125.0}, 0.9, _V100_DS),
    (r"\bT4\b", "T4", {"fp32": 8.1, "fp16": 65.0}, 0.32, _T4_DS),
]

_DTYPES = {
    "float32": "fp32",
    "fp32": "fp32",
    "float": "fp32",
    "tf32": "tf32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
    "float64": "fp64",
    "fp64": "fp64",
    "double": "fp64",
}


def dtype_key(dtype) -> str:
    """'fp32', 'bf16', 'fp16', ... from a torch dtype or its name ('torch.float32', 'float32', 'fp32')."""
    s = str(dtype).replace("torch.", "").lower()
    if s not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return _DTYPES[s]


def gpu_table_peaks(name: str) -> dict | None:
    """The datasheet peaks of a GPU by its device name, or None for a GPU the table does not know."""
    for pattern, label, tflops, tb_s, ref in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            by_dtype = {k: round(v * 1e3, 1) for k, v in tflops.items()}
            return {
                "device": "cuda",
                "name": name,
                "source": f"table:{label}",
                "reference": ref,
                "compute_gflop_s": by_dtype["fp32"],
                "compute_by_dtype_gflop_s": by_dtype,
                "bandwidth_gb_s": round(tb_s * 1e3, 1),
            }
    return None


def _seconds(fn, device, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, best) seconds of `repeats` timed calls."""
    from sparkct.bench import time_fn  # noqa: PLC0415 (lazy: imports torch; sparkct.perf must not at import)

    ts = time_fn(fn, device, repeats=repeats, warmup=warmup)
    return statistics.median(ts), min(ts)


def calibrate(
    device: str = "cpu",
    *,
    gemm_n: int | None = None,
    stream_mib: int | None = None,
    repeats: int = 3,
    dtypes: tuple[str, ...] | None = None,
) -> dict:
    """Attained peaks of `device` by a short measurement: GFLOP/s of an n x n x n torch.mm per dtype
    (2 n^3 FLOPs), and GB/s of a copy (read + write) and an add (two reads + a write) of tensors of
    `stream_mib` MiB, medians of `repeats`. The bandwidth roof is the better of copy and add."""
    import torch  # noqa: PLC0415 (lazy: sparkct.perf imports no torch at import time)

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = gemm_n or (8192 if cuda else 2048)
    mib = stream_mib or (1024 if cuda else 128)  # CPU: 4x a 32 MiB L3; GPU: far beyond a 50-60 MB L2
    dtypes = dtypes or (("fp32", "tf32", "bf16", "fp16") if cuda else ("fp32",))
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(0)
    by_dtype: dict[str, float] = {}
    best_gemm: dict[str, float] = {}
    torch_dt = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for k in dtypes:
            a = torch.randn(n, n, generator=gen).to(device=dev, dtype=torch_dt[k])
            b = torch.randn(n, n, generator=gen).to(device=dev, dtype=torch_dt[k])
            out = torch.empty(n, n, device=dev, dtype=torch_dt[k])
            if cuda:
                torch.backends.cuda.matmul.allow_tf32 = k == "tf32"
            s, best = _seconds(functools.partial(torch.mm, a, b, out=out), device, repeats)
            by_dtype[k] = round(2 * n**3 / s / 1e9, 1)
            best_gemm[k] = round(2 * n**3 / best / 1e9, 1)
            del a, b, out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    numel = mib * 2**20 // 4
    x = torch.ones(numel, device=dev)
    y = torch.empty_like(x)
    z = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    copy_gb_s = 2 * nbytes / _seconds(functools.partial(y.copy_, x), device, repeats)[0] / 1e9
    add_gb_s = 3 * nbytes / _seconds(functools.partial(torch.add, x, y, out=z), device, repeats)[0] / 1e9
    del x, y, z
    out = {
        "device": dev.type,
        "source": "measured",
        "compute_gflop_s": by_dtype["fp32"],
        "compute_by_dtype_gflop_s": by_dtype,
        "bandwidth_gb_s": round(max(copy_gb_s, add_gb_s), 2),
        "calibration": {
            "gemm_n": n,
            "stream_mib": mib,
            "repeats": repeats,
            "copy_gb_s": round(copy_gb_s, 2),
            "add_gb_s": round(add_gb_s, 2),
            "gemm_best_gflop_s": best_gemm,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    }
    if cuda:
        out["name"] = torch.cuda.get_device_name(dev)
    else:
        out["threads"] = torch.get_num_threads()
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peaks(**kw) -> dict:
    """The CPU's attained peaks, measured now with torch's current thread count."""
    out = calibrate("cpu", **kw)
    out["name"] = _cpu_model()
    return out


def gpu_peaks(device="cuda", *, measure_unknown: bool = True, **kw) -> dict:
    """The datasheet peaks of the GPU `device`; for a GPU the table does not know, a note saying so
    and (with measure_unknown, the default) its attained peaks from a short calibration."""
    import torch  # noqa: PLC0415 (lazy: sparkct.perf imports no torch at import time)

    name = torch.cuda.get_device_name(torch.device(device))
    table = gpu_table_peaks(name)
    if table is not None:
        return table
    note = f"{name} is not in sparkct.perf.peaks.GPU_PEAKS"
    if not measure_unknown:
        return {
            "device": "cuda",
            "name": name,
            "source": "unknown",
            "note": note,
            "compute_gflop_s": None,
            "compute_by_dtype_gflop_s": {},
            "bandwidth_gb_s": None,
        }
    out = calibrate(device, **kw)
    out["note"] = note + "; peaks measured by a short calibration (attained, not theoretical)"
    return out


def device_peaks(device="cpu", **kw) -> dict:
    """Peaks of `device` ('cpu' or a CUDA device): measured on a CPU, from the table on a known GPU."""
    import torch  # noqa: PLC0415 (lazy: sparkct.perf imports no torch at import time)

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return gpu_peaks(dev, **kw) if dev.type == "cuda" else cpu_peaks(**kw)


def compute_peak(peaks: dict, dtype="fp32", *, tf32: bool = False) -> tuple[float | None, str]:
    """(GFLOP/s, the dtype whose roof it is) for work in `dtype`: fp32 on tensor cores when `tf32`
    and the device has a TF32 rate; a dtype the peaks lack (bf16 on a CPU calibrated in fp32) falls
    back to the fp32 roof, and says so in the returned label."""
    by = peaks.get("compute_by_dtype_gflop_s") or {}
    k = dtype_key(dtype)
    if k == "fp32" and tf32 and "tf32" in by:
        k = "tf32"
    if k in by and by[k]:
        return float(by[k]), k
    fp32 = by.get("fp32", peaks.get("compute_gflop_s"))
    return (float(fp32) if fp32 else None), ("fp32" if k == "fp32" else f"fp32 (no {k} peak)")
