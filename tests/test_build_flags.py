"""setup.py refuses fast-math flags (issue 13): the kernels' NaN checks and the simple CUDA kernels'
exact maths would silently change."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture(scope="module")
def setup_py():
    if not SETUP.exists():
        pytest.skip("setup.py is not next to the tests (installed package)")
    spec = importlib.util.spec_from_file_location("sparkct_setup_py", SETUP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() runs only under __main__
    return mod


@pytest.mark.parametrize(
    "var,flags,bad",
    [
        ("SPARKCT_NVCC_FLAGS", "-O3 --use_fast_math", "--use_fast_math"),
        ("SPARKCT_NVCC_FLAGS", "-use_fast_math -lineinfo", "-use_fast_math"),
        ("SPARKCT_NVCC_FLAGS", "--use-fast-math", "--use-fast-math"),
        ("SPARKCT_NVCC_FLAGS", "-Xcompiler=-fopenmp,-ffast-math", "-Xcompiler=-fopenmp,-ffast-math"),
        ("SPARKCT_NVCC_FLAGS", "-Xcompiler -ffinite-math-only", "-ffinite-math-only"),
        ("SPARKCT_CXX_FLAGS", "-march=native -ffast-math", "-ffast-math"),
        ("SPARKCT_CXX_FLAGS", "-Ofast", "-Ofast"),
    ],
)
def test_fast_math_flags_are_rejected(setup_py, var, flags, bad):
    with pytest.raises(SystemExit, match=f"{var}: {bad} is not supported"):
        setup_py.reject_fast_math({var: flags})


def test_other_flags_pass(setup_py):
    setup_py.reject_fast_math(
        {
            "SPARKCT_NVCC_FLAGS": "-O3 -lineinfo -Xptxas -v --ftz=false -fno-fast-math",
            "SPARKCT_CXX_FLAGS": "-O2 -march=native -fno-finite-math-only",
        }
    )
    setup_py.reject_fast_math({})


def test_main_checks_before_building(setup_py, monkeypatch):
    def no_build(**kw):
        raise AssertionError("setup() reached: the flag was not rejected")

    monkeypatch.setattr(setup_py, "setup", no_build)
    monkeypatch.setenv("SPARKCT_FORCE_CPU", "1")
    monkeypatch.setenv("SPARKCT_NVCC_FLAGS", "--use_fast_math")
    with pytest.raises(SystemExit, match="SPARKCT_NVCC_FLAGS: --use_fast_math"):
        setup_py.main()
