"""The benchmark files' BENCH declarations (sparkct.perf.registry): adding a benchmark is one file, and a
malformed declaration is a clear error naming its file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sparkct.errors import UserError
from sparkct.perf import registry, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "benchmarks")

# A new benchmark family: its suite, a ratio pair and its default / quick cases, all in the one file.
BENCH_NEW = '''"""A new benchmark: a fast and a slow implementation at two sizes."""
import pytest

import benchkit

BENCH = {
    "suite": "newsuite",
    "pairs": [{"case": {"test": "test_new", "impl": "fast"}, "base": {"impl": "slow"}, "label": "slow",
               "memory": True}],
    "default": [("test_new", "*-small")],
    "quick": [("test_new", "fast-small"), ("test_new", "slow-small")],
}


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("impl", ["slow", "fast"])
def test_new(benchmark, impl, size):
    benchkit.run(benchmark, lambda: None, "cpu", rounds=1, impl=impl, size=size)
'''


def _raw_case(test_id: str, median: float, peak: int, **axes) -> dict:
    stats = {"median": median, "min": median, "max": median, "mean": median, "stddev": 0.0, "iqr": 0.0, "rounds": 3}
    return {
        "fullname": f"benchmarks/bench_new.py::{test_id}",
        "group": "new-small",
        "params": axes,
        "stats": stats,
        "extra_info": {"params": axes, "peak_bytes": peak},
    }


def test_adding_a_benchmark_is_one_file(tmp_path):
    """bench_new.py with its BENCH table, dropped into a copy of benchmarks/, is in its suite, its pairs
    give its ratios and conftest selects its default and quick cases; no other file changes."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    for f in os.listdir(BENCHMARKS):
        if f.endswith(".py"):
            shutil.copy(os.path.join(BENCHMARKS, f), folder / f)
    before = registry.discover(str(folder))
    (folder / "bench_new.py").write_text(BENCH_NEW)
    after = registry.discover(str(folder))

    assert set(after) - set(before) == {"bench_new"}
    assert {k: v for k, v in after.items() if k != "bench_new"} == before
    assert "newsuite" in registry.suites(after) and "newsuite" not in registry.suites(before)
    assert registry.files(after, ["newsuite"]) == ["bench_new.py"]
    assert registry.files(after, ["kernels"]) == registry.files(before, ["kernels"])
    new = after["bench_new"]
    assert new.pairs == (registry.Pair({"test": "test_new", "impl": "fast"}, {"impl": "slow"}, "slow", True),)

    # its cases get their suite and ratios from the declaration
    raw = {
        "benchmarks": [
            _raw_case("test_new[slow-small]", 2.0, 400, impl="slow", size="small"),
            _raw_case("test_new[fast-small]", 0.5, 100, impl="fast", size="small"),
        ]
    }
    doc = report.convert(
        raw,
        benches=after,
        device="cpu",
        runner="cpu-2core",
        tier="quick",
        suites=["newsuite"],
        environment={},
        created="2026-01-01T00:00:00+00:00",
    )
    report.validate(doc)
    fast = next(c for c in doc["cases"] if c["id"] == "newsuite/bench_new/test_new[fast-small]")
    assert fast["suite"] == "newsuite" and fast["ratios"] == {"speedup_vs_slow": 4.0, "mem_vs_slow": 0.25}

    # benchmarks/conftest.py selects its default and quick cases (collected only; the real files of the
    # copy would import the models, so this folder holds the harness and the new file alone)
    alone = tmp_path / "alone"
    alone.mkdir()
    for f in ("conftest.py", "benchkit.py", "bench_new.py"):
        shutil.copy(folder / f, alone / f)

    def collected(*args):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--collect-only",
                "-q",
                str(alone),
                "-p",
                "no:cacheprovider",
                "-c",
                os.devnull,
                "--rootdir",
                str(alone),
                "-o",
                "python_files=bench_*.py",
                "--bench-progress",
                str(alone / "progress.json"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=alone,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("SPARKCT_BENCH")}, "PYTHONPATH": ROOT},
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return sorted(ln.split("::")[1] for ln in r.stdout.splitlines() if "::" in ln)

    assert collected("--bench-quick") == ["test_new[fast-small]", "test_new[slow-small]"]
    assert collected() == ["test_new[fast-small]", "test_new[slow-small]"]  # the default CPU subset
    assert len(collected("--bench-full")) == 4


def test_the_checkout_declares_every_suite():
    benches = registry.discover(BENCHMARKS)
    assert registry.suites(benches) == ["data", "kernels", "scale", "train"]
    assert registry.files(benches, ["kernels"]) == [
        "bench_info_nce.py",
        "bench_prototype_ce.py",
        "bench_sparse_encoder.py",
    ]
    assert registry.files(benches, ["train"]) == ["bench_contrastive.py", "bench_spark.py"]


@pytest.mark.parametrize(
    "text,msg",
    [
        ("x = 1\n", "no BENCH table"),
        ("SUITE = 'kernels'\nBENCH = {'suite': SUITE}\n", "must be written in literals"),
        ("BENCH = {'suite': 'k', 'quik': []}\n", "unknown keys ['quik']"),
        ("BENCH = {'pairs': []}\n", "BENCH['suite'] must be a non-empty name"),
        ("BENCH = {'suite': 'all'}\n", "BENCH['suite'] must be a non-empty name"),
        ("BENCH = {'suite': 'k', 'quick': ['test_x']}\n", "BENCH['quick'] must be a list of"),
        ("BENCH = {'suite': 'k', 'pairs': [{'case': {}, 'base': {'impl': 'a'}}]}\n", "BENCH['pairs'][0] must be"),
        ("BENCH = {'suite': 'k', 'pairs': [{'case': {}, 'base': {}, 'label': 'a'}]}\n", "'base' not empty"),
        ("BENCH = {'suite': 'k'}\nBENCH = {'suite': 'k'}\n", "BENCH is assigned twice"),
        ("BENCH = {'suite': 'k'\n", "not valid Python"),
    ],
)
def test_malformed_declarations_name_their_file(tmp_path, text, msg):
    (tmp_path / "bench_bad.py").write_text(text)
    with pytest.raises(UserError, match="bench_bad.py") as e:
        registry.discover(str(tmp_path))
    assert msg in str(e.value)


def test_declarations_are_read_without_importing(tmp_path):
    """The table is parsed, not run: a file whose import would fail (or import torch) is read all the same."""
    (tmp_path / "bench_x.py").write_text(
        "import no_such_module\n\nBENCH = {'suite': 'x'}\n\nraise SystemExit('imported')\n"
    )
    assert registry.discover(str(tmp_path))["bench_x"].suite == "x"
