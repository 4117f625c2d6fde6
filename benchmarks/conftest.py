"""Benchmark set-up: the `device` parameter, the default (quick) subset, progress lines, a results file
rewritten after every case, and an end-of-run table of derived figures.

`pytest benchmarks` runs a representative subset of the CPU grid (one size per benchmark family,
every implementation side by side: a few minutes on 2 cores) and every CUDA case where a GPU is
present. The full grid: `SPARKCT_BENCH_FULL=1` or `--bench-full`; naming cases (`file::test[id]`),
`-k` or `-m` selects exactly those instead. After each case a line says how far the run is, and
the figures measured so far are written atomically to `--bench-progress` (default
`.benchmarks/sparkct-progress.json`), so an interrupted run (Ctrl-C, SIGTERM, or killed) keeps them;
SIGTERM ends the run as Ctrl-C does (table printed, pytest-benchmark's JSON written).
"""
from __future__ import annotations

import fnmatch
import os
import signal
import time

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
_PROGRESS: "_Progress | None" = None

# The default CPU subset: (file, test function, parameter-id pattern). Chosen so that each family keeps
# its comparison (kernel, reference, peers) at the size the README quotes.
QUICK_CPU = [
    ("bench_info_nce.py", "test_info_nce", "cpu-fp32-2N8192-D128-fwd+bwd-*"),   # README's headline size
    ("bench_info_nce.py", "test_info_nce", "cpu-fp32-2N2048-D128-fwd-*"),
    ("bench_sparse_encoder.py", "test_encoder", "*-0.6-cpu"),                   # dense, spark, sparse
    ("bench_sparse_encoder.py", "test_conv3x3", "*-64-8-fwd-cpu"),              # halo tiles, with spconv
    ("bench_sparse_encoder.py", "test_conv3x3", "*-512-1-fwdbwd-cpu"),          # gather-GEMM cells
    ("bench_data.py", "test_pydicom_decode_baseline", ""),
    ("bench_data.py", "test_prepare_throughput", "j1"),
    ("bench_data.py", "test_loader_throughput", "read-only"),
    ("bench_data.py", "test_loader_throughput", "default-augment"),
    ("bench_contrastive.py", "test_method_step", "cpu-simclr-*"),              # naive, fused, chunked
]


def pytest_addoption(parser):
    g = parser.getgroup("sparkct benchmarks")
    g.addoption("--bench-full", action="store_true", default=False,
                help="run the full benchmark grid (also SPARKCT_BENCH_FULL=1); default: a quick CPU subset")
    g.addoption("--bench-progress", default=os.path.join(".benchmarks", "sparkct-progress.json"),
                help="results so far, rewritten after every case (default: %(default)s)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    global _PROGRESS
    _PROGRESS = _Progress(config)
    # SIGTERM (timeouts, job schedulers) ends the run as Ctrl-C does: summaries and JSON still written
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _quick(item) -> bool:
    """In the default run: a CUDA case, a QUICK_CPU case, or any case of a file QUICK_CPU does not
    list (a new benchmark file runs whole until it gets its entries)."""
    if "cuda" in item.keywords or item.path.name not in {f for f, _, _ in QUICK_CPU}:
        return True
    spec = getattr(item, "callspec", None)
    pid = spec.id if spec is not None else ""
    return any(item.path.name == f and getattr(item, "originalname", item.name) == fn and fnmatch.fnmatchcase(pid, p)
               for f, fn, p in QUICK_CPU)


def _explicit_selection(config) -> bool:
    return (any("::" in str(a) for a in config.args) or bool(config.option.keyword)
            or bool(config.option.markexpr))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU with sparkct's CUDA kernels")
    skip_cpu = pytest.mark.skip(reason="CPU-size case skipped on a GPU run (SPARKCT_BENCH_CPU=1 to keep)")
    keep_cpu = os.environ.get("SPARKCT_BENCH_CPU", "") == "1"
    full = (config.getoption("bench_full") or os.environ.get("SPARKCT_BENCH_FULL", "") == "1"
            or _explicit_selection(config))
    if not full:
        keep = [it for it in items if _quick(it)]
        dropped = [it for it in items if not _quick(it)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    for item in items:
        if "cuda" in item.keywords and not CUDA_READY:
            item.add_marker(skip_cuda)
        elif CUDA_READY and "cuda" not in item.keywords and not keep_cpu:
            item.add_marker(skip_cpu)
    _PROGRESS.start(items, full)


def _skipped(item) -> bool:
    return any(m.name == "skip" or (m.name == "skipif" and m.args and m.args[0] is True)
               for m in item.iter_markers())


class _Progress:
    """Counts finished cases, prints a line per case, and rewrites the results file after each."""

    def __init__(self, config):
        self.config = config
        self.path = config.getoption("bench_progress")
        self.cases: list[dict] = []
        self.to_run: set[str] = set()
        self.done = 0
        self.total = 0
        self.full = False
        self.t0 = time.perf_counter()

    def start(self, items, full: bool) -> None:
        self.to_run = {it.nodeid for it in items if not _skipped(it)}
        self.total = len(self.to_run)
        self.full = full
        self.t0 = time.perf_counter()
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            what = "full grid" if full else "quick subset (SPARKCT_BENCH_FULL=1 or --bench-full: the full grid)"
            tr.write_line(f"sparkct benchmarks: {self.total} cases to run, {what}; "
                          f"results so far in {self.path}")
            listed = {f for f, _, _ in QUICK_CPU}
            whole = sorted({it.path.name for it in items if it.path.name not in listed})
            if whole and not full:
                tr.write_line(f"  run whole (no quick cases listed in benchmarks/conftest.py): {', '.join(whole)}")

    def record(self, report, row: dict | None) -> None:
        self.cases.append({"nodeid": report.nodeid, "outcome": report.outcome,
                           "seconds": round(report.duration, 3), **({"figures": row} if row else {})})
        self.write(complete=False)
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None or report.nodeid not in self.to_run:  # skipped before it started: no line
            return
        self.done += 1
        el = time.perf_counter() - self.t0
        fig = ""
        if row and "median_s" in row:
            fig = f"  median {row['median_s']:.4g} s"
            if row.get("peak_mib") is not None:
                fig += f", peak {row['peak_mib']:.4g} MiB"
        name = report.nodeid.split("/")[-1]
        # after the reporter's own mark for the case ("." / "s" / "F", or "PASSED" with -v)
        tr.write(" " if tr._tw.width_of_current_line else "")
        tr.write_line(f"[{self.done:>3}/{self.total} {int(el) // 60}m{int(el) % 60:02d}s] "
                      f"{report.outcome:7s} {name}{fig}")

    def write(self, complete: bool, exitstatus: int | None = None) -> None:
        from sparkct.io import write_json_atomic
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        write_json_atomic(self.path, {
            "complete": complete, "exitstatus": exitstatus, "full_grid": self.full,
            "selected": self.total, "elapsed_s": round(time.perf_counter() - self.t0, 1),
            "cases": self.cases, "derived": benchkit.DERIVED})


@pytest.hookimpl(trylast=True)  # after the terminal reporter's own mark for the case
def pytest_runtest_logreport(report):
    if _PROGRESS is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        name = report.nodeid.split("::")[-1]
        row = next((r for r in reversed(benchkit.DERIVED) if r.get("name") == name), None)
        _PROGRESS.record(report, row if report.outcome == "passed" else None)


def pytest_sessionfinish(session, exitstatus):
    if _PROGRESS is not None:
        _PROGRESS.write(complete=int(exitstatus) in (0, 1) and not session.shouldstop, exitstatus=int(exitstatus))


def pytest_terminal_summary(terminalreporter):
    if not benchkit.DERIVED:
        return
    tr = terminalreporter
    tr.section("sparkct derived figures")
    keys = ["median_s", "peak_mib", "gflops_per_s", "gb_per_s"]
    for row in benchkit.DERIVED:
        extras = {k: v for k, v in row.items()
                  if k not in ("name", "group", "device", "peak_bytes", *keys)}
        base = "  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                         for k in keys if k in row)
        more = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extras.items())
        tr.write_line(f"{row['name']}: {base}  {more}")
