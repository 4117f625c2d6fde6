"""Shared test set-up: the `device` fixture (cpu always, cuda where a GPU and CUDA kernels exist)."""

from __future__ import annotations

import pytest
import torch


def cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from sparkct import _ext
    except ImportError:
        return False
    return _ext.with_cuda()


CUDA_READY = cuda_ready()
needs_cuda = pytest.mark.cuda

# Parametrize an op test over devices with `@pytest.mark.parametrize("device", DEVICES)` or use the
# `device` fixture; the CUDA case carries the `cuda` mark and is skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if CUDA_READY:
        return
    why = "no CUDA device visible" if not torch.cuda.is_available() else "sparkct was built without CUDA kernels"
    skip = pytest.mark.skip(reason=f"needs CUDA: {why}")
    for item in items:
        # the mark, not `"cuda" in item.keywords`: keywords also hold the parent folders' names, so a
        # checkout in a folder named cuda skipped every test
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small tensors and tiny models run fastest on one thread: on a loaded 2-core machine intra-op threads
    spin-wait for each other (one CUDA-emulation case went from 0.5 s to 2 min). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
