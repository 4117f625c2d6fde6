"""Shared benchmark helpers: CUDA-synchronizing timing, peak memory, derived figures.

Every benchmark records its derived figures in ``benchmark.extra_info`` (they land in
``--benchmark-json``) and they are printed in a table at the end of the run.
"""

from __future__ import annotations

import torch

from sparkct.bench import peak_memory, sync  # the package's timers, re-exported here

DERIVED: list[dict] = []  # rows for the end-of-run table (benchmarks/conftest.py prints them)
ROUNDS: int | None = None  # --bench-rounds: every case's timed rounds, instead of each file's own count


def run(benchmark, fn, device, *, rounds: int | None = None, warmup: int = 1, **info):
    """Time fn (synchronizing CUDA), measure its peak memory once, record `info` and derived
    figures in benchmark.extra_info. Returns the extra_info dict (with median seconds).

    `info` describes the case (its sizes and implementation; ``flops`` and ``bytes_moved`` give its
    work); the keys other than those two are also kept under extra_info["params"], apart from the
    figures the benchmark derives later, for `sparkct bench` to tell a case's sizes from its results."""
    if ROUNDS is not None:
        rounds = ROUNDS

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
    extra["params"] = {k: v for k, v in info.items() if k not in ("flops", "bytes_moved")}
    extra["peak_bytes"] = int(mem)
    extra["peak_mib"] = round(mem / 2**20, 3)
    extra["median_s"] = median
    if "flops" in info and median > 0:
        extra["gflops_per_s"] = round(info["flops"] / median / 1e9, 2)
    if "bytes_moved" in info and median > 0:
        extra["gb_per_s"] = round(info["bytes_moved"] / median / 1e9, 2)
    extra["device"] = (
        torch.cuda.get_device_name()
        if torch.device(device).type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads"
    )
    benchmark.extra_info.update(extra)
    DERIVED.append({"name": benchmark.name, "group": benchmark.group, **extra})
    return extra
