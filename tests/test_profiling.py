"""sparkct.profiling: ranges only while a profiler (or SPARKCT_NVTX) listens; the op ranges reach torch.profiler."""

from __future__ import annotations

import pytest
import torch

from sparkct import profiling


@pytest.fixture
def nvtx_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    prev = profiling.set_nvtx(False)
    yield calls
    profiling.set_nvtx(prev)


def _names(prof) -> set[str]:
    return {e.key for e in prof.key_averages()}


def test_off_is_a_shared_no_op_that_records_nothing(nvtx_calls, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("record_function used while nothing profiles")

    monkeypatch.setattr(torch.autograd.profiler, "record_function", fail)
    assert not profiling.active()
    assert profiling.range("a") is profiling.range("b")  # nothing allocated per use

    @profiling.ranged("sparkct.test")
    def f(x, *, y=1):
        return x + y

    assert f(1, y=2) == 3 and f.__name__ == "f"
    with profiling.range("step/data"):
        pass
    assert nvtx_calls == []


def test_ranges_show_in_a_torch_profiler_trace_on_cpu(tmp_path):
    from sparkct.ops import info_nce

    z0 = torch.randn(6, 8, requires_grad=True)
    z1 = torch.randn(6, 8, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with profiling.range("step/forward+loss"):
            loss = info_nce(z0, z1, 0.5)
        with profiling.range("step/backward"):
            loss.backward()
    names = _names(prof)
    assert {
        "step/forward+loss",
        "step/backward",
        "sparkct.info_nce",
        "sparkct.info_nce.backward",
        "sparkct::info_nce",
        "sparkct::info_nce_backward",
    } <= names, sorted(names)
    # the Chrome trace holds them as user annotations, the op range nested in the phase
    import json

    path = tmp_path / "t.json"
    prof.export_chrome_trace(str(path))
    ev = {e["name"]: e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "user_annotation"}
    outer, inner = ev["step/forward+loss"], ev["sparkct.info_nce"]
    assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    assert not profiling.active()  # off again once the profiler stops


def test_sparse_op_ranges_forward_and_backward():
    from sparkct.ops import sparse as S

    mask = torch.tensor([[[True, False], [True, True]]])
    layout = S.cell_layout(mask)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        p = S.pack(x, layout)
        y = S.sparse_conv2d(p, layout, w, padding=1, method="halo") + S.sparse_conv2d(
            p, layout, w, padding=1, method="gemm"
        )
        y = S.sparse_max_pool2d(y, layout, 3, 1, 1)
        S.unpack(y, layout).sum().backward()
    names = _names(prof)
    want = {
        "sparkct.pack",
        "sparkct.unpack",
        "sparkct.sparse_conv2d",
        "sparkct.sparse_conv2d[halo]",
        "sparkct.sparse_conv2d[gemm]",
        "sparkct.sparse_max_pool2d",
        "sparkct.unpack.backward",
        "sparkct.sparse_conv2d[halo].backward",
        "sparkct.sparse_conv2d[gemm].backward",
        "sparkct.sparse_max_pool2d[halo].backward",
        "sparkct.pack.backward",
        "sparkct::sparse_halo",
        "sparkct::sparse_im2col",
    }
    assert want <= names, sorted(want - names)


def test_nvtx_ranges_are_balanced_also_on_errors(nvtx_calls):
    profiling.set_nvtx(True)
    assert profiling.active()

    @profiling.ranged("sparkct.boom")
    def boom():
        raise ValueError("x")

    with profiling.range("step/optimizer"):
        with pytest.raises(ValueError):
            boom()
    assert nvtx_calls == [("push", "step/optimizer"), ("push", "sparkct.boom"), ("pop",), ("pop",)]


def test_env_variable_turns_nvtx_on(nvtx_calls, monkeypatch):
    import importlib

    try:
        for value, want in (("1", True), ("0", False), ("", False), ("yes", True)):
            monkeypatch.setenv("SPARKCT_NVTX", value)
            importlib.reload(profiling)  # the variable is read at import
            assert profiling.nvtx_enabled() is want, value
    finally:
        monkeypatch.delenv("SPARKCT_NVTX")
        importlib.reload(profiling)


def test_overhead_measures_the_disabled_path(nvtx_calls):
    r = profiling.overhead(calls=2000, repeats=2)
    assert set(r) == {"bare_ns", "ranged_ns", "range_ns", "ranged_extra_ns", "range_extra_ns"}
    assert all(v > 0 for k, v in r.items() if not k.endswith("extra_ns"))
    profiling.set_nvtx(True)
    with pytest.raises(RuntimeError, match="disabled path"):
        profiling.overhead(calls=10)


@pytest.mark.cuda
def test_emit_nvtx_turns_the_ranges_on():
    # under emit_nvtx torch makes each record_function an NVTX range (seen by nsys, not from Python)
    with torch.autograd.profiler.emit_nvtx():
        assert profiling.active()
        assert isinstance(profiling.range("step/data"), profiling._Range)
    assert not profiling.active()


def test_kernel_driver_runs_every_op_with_its_ranges(capsys):
    # scripts/run_kernels.py is what docs/profiling.md puts under ncu / nsys / compute-sanitizer
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "run_kernels.py"
    spec = importlib.util.spec_from_file_location("run_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert mod.main(["--device", "cpu", "--size", "small", "--iters", "1"]) == 0
    names = _names(prof)
    assert {f"run/{op}#0" for op in mod.OPS} <= names
    assert {
        "sparkct::info_nce_backward",
        "sparkct::sparse_halo_backward",
        "sparkct::sparse_im2col_backward",
        "sparkct::sparse_cell_tables",
    } <= names
    assert len(capsys.readouterr().out.splitlines()) == len(mod.OPS)
    with pytest.raises(SystemExit):
        mod.main(["--ops", "nope"])


def test_profiling_doc_names_every_cuda_kernel():
    # docs/profiling.md's Nsight Compute table is what `ncu -k NAME` needs: it must follow csrc/cuda
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    src = "\n".join(p.read_text() for p in sorted((root / "csrc" / "cuda").glob("*.cu")))
    kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", src))
    assert len(kernels) >= 20, kernels
    doc = (root / "docs" / "profiling.md").read_text()
    missing = sorted(k for k in kernels if f"`{k}`" not in doc)
    assert not missing, missing
