"""Shared benchmark helpers: CUDA-synchronizing timing, peak memory, derived figures.

Every benchmark records its derived figures in ``benchmark.extra_info`` (they land in
``--benchmark-json``) and they are printed in a table at the end of the run.
"""
from __future__ import annotations

import torch

DERIVED: list[dict] = []  # rows for the end-of-run table (benchmarks/conftest.py prints them)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cpu_alloc_peak(fn) -> int:
    """Peak bytes allocated through the ATen CPU allocator while fn runs, above what was live before.
    Read from the profiler's allocation events (each carries a signed size); scratch that kernels
    allocate outside ATen is not seen, so sparkct kernels allocate theirs with at::empty."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []

    def walk(ev):
        if ev.typed[0] == _EventType.Allocation and str(ev.typed[1].device) == "cpu":
            events.append((ev.start_time_ns, ev.typed[1].alloc_size))
        for c in ev.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def peak_memory(fn, device) -> int:
    """Extra peak bytes fn allocates on `device` (inputs already live are not counted); the
    outputs fn returns are counted, then freed."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    return _cpu_alloc_peak(fn)


def run(benchmark, fn, device, *, rounds: int | None = None, warmup: int = 1, **info):
    """Time fn (synchronizing CUDA), measure its peak memory once, record `info` and derived
    figures in benchmark.extra_info. Returns the extra_info dict (with median seconds)."""
    def call():
        out = fn()
        sync(device)
        return out

    for _ in range(warmup):
        call()
    mem = peak_memory(fn, device)
    if rounds is None:
        benchmark(call)
    else:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: one timed call, a smoke run
        import time
        t0 = time.perf_counter()
        call()
        median = time.perf_counter() - t0
    else:
        median = benchmark.stats.stats.median
    extra = dict(info)
    extra["peak_bytes"] = int(mem)
    extra["peak_mib"] = round(mem / 2**20, 3)
    extra["median_s"] = median
    if "flops" in info and median > 0:
        extra["gflops_per_s"] = round(info["flops"] / median / 1e9, 2)
    if "bytes_moved" in info and median > 0:
        extra["gb_per_s"] = round(info["bytes_moved"] / median / 1e9, 2)
    extra["device"] = (torch.cuda.get_device_name() if torch.device(device).type == "cuda"
                       else f"cpu x{torch.get_num_threads()} threads")
    benchmark.extra_info.update(extra)
    DERIVED.append({"name": benchmark.name, "group": benchmark.group, **extra})
    return extra
