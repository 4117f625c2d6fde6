"""Timing and memory measurement, the one implementation: CUDA-synchronizing timers, medians, peak
memory. The benchmark suites (through benchmarks/benchkit.py) and the CPU peak calibration
(`sparkct.perf.peaks`) use it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

__all__ = ["sync", "Timer", "time_fn", "peak_memory", "median"]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cpu_alloc_peak(fn) -> int:
    """Peak bytes allocated through the ATen CPU allocator while fn runs, above what was live before.
    Read from the profiler's allocation events (each carries a signed size); scratch that kernels
    allocate outside ATen is not seen, so sparkct kernels allocate theirs with at::empty."""
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


class Timer:
    """Wall-clock seconds of a block, synchronizing `device` (CUDA work is asynchronous) at both ends.

    with Timer(device) as t: step()
    t.seconds
    """

    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def median(xs) -> float:
    return float(statistics.median(xs))


def time_fn(fn, device="cpu", *, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones (CUDA synchronized)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        out.append(t.seconds)
    return out
