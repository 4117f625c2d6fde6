"""benchmarks/conftest.py: the quick default subset, progress lines, and results kept when a run is
interrupted. Runs the real conftest and benchkit on a stand-in benchmark file of trivial cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Named and parametrized like bench_info_nce.py; its BENCH table's "default" entries pick three of five
# cases and its "quick" entry one.
_BENCH = """
import os, signal
import pytest
import torch
import benchkit

BENCH = {
    "suite": "kernels",
    "default": [("test_info_nce", "cpu-fp32-2N8192-D128-fwd+bwd-*"), ("test_info_nce", "cpu-fp32-2N2048-D128-fwd-*")],
    "quick": [("test_info_nce", "cpu-fp32-2N2048-D128-fwd-*")],
}

IDS = ["cpu-fp32-2N8192-D128-fwd+bwd-naive", "cpu-fp32-2N8192-D128-fwd+bwd-fused",
       "cpu-fp32-2N16384-D512-fwd-naive", "cpu-fp32-2N16384-D512-fwd-fused", "cpu-fp32-2N2048-D128-fwd-fused"]

@pytest.mark.parametrize("case", IDS, ids=IDS)
def test_info_nce(benchmark, case):
    if os.environ.get("STOP_AT") == case:
        os.kill(os.getpid(), signal.SIGTERM)   # as a job scheduler's timeout would
    x = torch.ones(64)
    benchkit.run(benchmark, lambda: x * 2, "cpu", rounds=1, case=case)
"""


@pytest.fixture
def bench_dir(tmp_path):
    d = tmp_path / "benchmarks"
    d.mkdir()
    for f in ("conftest.py", "benchkit.py"):
        shutil.copy(os.path.join(ROOT, "benchmarks", f), d / f)
    (d / "bench_info_nce.py").write_text(_BENCH)
    # a benchmark file that declares no "default" or "quick" cases: runs whole by default, not with --quick
    (d / "bench_new.py").write_text(
        "import pytest\n\nBENCH = {'suite': 'new'}\n\n"
        "@pytest.mark.parametrize('i', [0, 1])\ndef test_new(i):\n    pass\n"
    )
    return d


def _run(bench_dir, *args, **env):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        str(bench_dir),
        "-p",
        "no:cacheprovider",
        "-c",
        os.devnull,
        "--rootdir",
        str(bench_dir),
        "-o",
        "python_files=bench_*.py",
        "--benchmark-json",
        str(bench_dir / "bench.json"),
        "--bench-progress",
        str(bench_dir / "progress.json"),
        *args,
    ]
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPARKCT_BENCH")}
    e.update(PYTHONPATH=ROOT, **env)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=e, cwd=bench_dir)
    progress = json.loads((bench_dir / "progress.json").read_text()) if (bench_dir / "progress.json").exists() else None
    return r, progress


def test_default_run_is_the_quick_subset_with_progress(bench_dir):
    r, prog = _run(bench_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 passed, 2 deselected" in r.stdout and "run whole" in r.stdout and "bench_new.py" in r.stdout
    assert "[  1/5 " in r.stdout and "[  5/5 " in r.stdout
    assert prog["complete"] is True and not prog["full_grid"] and prog["tier"] == "default"
    timed = [c for c in prog["cases"] if "test_info_nce" in c["nodeid"]]
    assert [c["nodeid"].split("[")[1] for c in timed] == [
        "cpu-fp32-2N8192-D128-fwd+bwd-naive]",
        "cpu-fp32-2N8192-D128-fwd+bwd-fused]",
        "cpu-fp32-2N2048-D128-fwd-fused]",
    ]
    assert all(c["figures"]["median_s"] > 0 for c in timed)


def test_interrupted_full_run_keeps_what_it_measured(bench_dir):
    r, prog = _run(bench_dir, SPARKCT_BENCH_FULL="1", STOP_AT="cpu-fp32-2N16384-D512-fwd-naive")
    assert r.returncode == 2, r.stdout + r.stderr  # pytest's "interrupted"
    assert "[  2/7 " in r.stdout and prog["full_grid"]
    assert prog["complete"] is False and prog["exitstatus"] == 2
    assert [c["outcome"] for c in prog["cases"]] == ["passed", "passed"]
    assert "sparkct derived figures" in r.stdout  # the table of what was measured
    assert len(json.loads((bench_dir / "bench.json").read_text())["benchmarks"]) == 2


def test_smoke_subset_and_rounds(bench_dir):
    """--bench-quick runs only the "quick" cases of the BENCH tables (a file with none runs nothing), --bench-rounds
    sets every case's rounds, and --benchmark-quiet drops the derived-figures table (sparkct bench prints
    its own). (--bench-device: tests/perf/test_bench_cli.py's real run.)"""
    r, prog = _run(bench_dir, "--bench-quick", "--bench-rounds", "2", "--benchmark-quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 6 deselected" in r.stdout and prog["tier"] == "quick"
    assert "sparkct derived figures" not in r.stdout
    (bench,) = json.loads((bench_dir / "bench.json").read_text())["benchmarks"]
    assert bench["param"] == "cpu-fp32-2N2048-D128-fwd-fused" and bench["stats"]["rounds"] == 2
    assert bench["extra_info"]["params"] == {"case": "cpu-fp32-2N2048-D128-fwd-fused"}
