"""Benchmark set-up: the `device` parameter and an end-of-run table of derived figures."""
from __future__ import annotations

import pytest
import torch

import benchkit


def cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from sparkct import _ext
    return _ext.with_cuda()


CUDA_READY = cuda_ready()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU with sparkct's CUDA kernels")
    skip_cpu = pytest.mark.skip(reason="CPU-size case skipped on a GPU run (SPARKCT_BENCH_CPU=1 to keep)")
    import os
    keep_cpu = os.environ.get("SPARKCT_BENCH_CPU", "") == "1"
    for item in items:
        if "cuda" in item.keywords and not CUDA_READY:
            item.add_marker(skip_cuda)
        elif CUDA_READY and "cuda" not in item.keywords and not keep_cpu:
            item.add_marker(skip_cpu)


def pytest_terminal_summary(terminalreporter):
    if not benchkit.DERIVED:
        return
    tr = terminalreporter
    tr.section("sparkct derived figures")
    keys = ["median_s", "peak_mib", "gflops_per_s", "gb_per_s"]
    for row in benchkit.DERIVED:
        extras = {k: v for k, v in row.items() if k not in ("name", "group", "device", "peak_bytes", *keys)}
        base = "  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                         for k in keys if k in row)
        more = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extras.items())
        tr.write_line(f"{row['name']}: {base}  {more}")
