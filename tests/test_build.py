"""The build reports itself, and bad device use gives clear errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparkct import _ext


def test_build_info_fields():
    info = _ext.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (
        "extension built against another torch than the one running")
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert _ext.cuda_version() is not None
        assert all(a.count(".") == 1 for a in info["cuda_archs"]), info["cuda_archs"]
    else:
        assert _ext.cuda_version() is None and info["cuda_archs"] == []


def test_cuda_built_when_torch_and_nvcc_allow():
    """CI compiles the CUDA sources: a CUDA torch plus nvcc must give a CUDA build."""
    import os
    import shutil
    if os.environ.get("SPARKCT_FORCE_CPU"):
        pytest.skip("CPU-only build requested")
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no CUDA torch or no nvcc here")
    assert _ext.with_cuda(), "nvcc and a CUDA torch are present but the CUDA kernels were not built"


def test_cli_info_runs():
    r = subprocess.run([sys.executable, "-m", "sparkct.cli", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "CUDA kernels" in r.stdout and "sparkct" in r.stdout


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="different devices"):
        _ext.check_device("op", torch.zeros(1), torch.zeros(1, device="meta"))


def _fake_build(monkeypatch, cuda_version: int, torch_cuda):
    info = dict(_ext.build_info())
    info.update(cuda_version=cuda_version, with_cuda=cuda_version > 0)
    monkeypatch.setattr(_ext, "build_info", lambda: info)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    _ext._check_cuda_runtime.cache_clear()


def test_cuda_tensor_on_cpu_only_build_is_a_clear_error(monkeypatch):
    _fake_build(monkeypatch, 0, "13.0")
    try:
        with pytest.raises(RuntimeError, match="without CUDA kernels|no CUDA kernels"):
            _ext._check_cuda_runtime()
    finally:
        _ext._check_cuda_runtime.cache_clear()


def test_built_and_runtime_cuda_mismatch_is_a_clear_error(monkeypatch):
    _fake_build(monkeypatch, 12080, "13.0")
    try:
        with pytest.raises(RuntimeError, match=r"CUDA version mismatch.*12\.8.*13\.0"):
            _ext._check_cuda_runtime()
    finally:
        _ext._check_cuda_runtime.cache_clear()
    _fake_build(monkeypatch, 13000, None)
    try:
        with pytest.raises(RuntimeError, match="no CUDA support"):
            _ext._check_cuda_runtime()
    finally:
        _ext._check_cuda_runtime.cache_clear()
