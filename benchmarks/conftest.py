"""Benchmark set-up: the `device` parameter, the default (quick) subset, progress lines, a results file
rewritten after every case, and an end-of-run table of derived figures.

`pytest benchmarks` runs a representative subset of the CPU grid (one size per benchmark family,
every implementation side by side: a few minutes on 2 cores) and every CUDA case where a GPU is
present. The full grid: `SPARKCT_BENCH_FULL=1` or `--bench-full`; a smoke subset (a few cheap cases
per family, well under a minute per file on 2 cores; what `sparkct bench --quick` runs):
`--bench-quick`; naming cases (`file::test[id]`), `-k` or `-m` selects exactly those instead. Each
bench_*.py lists its own subsets, the "default" (CPU) and "quick" cases of its BENCH table (read without
importing it, by sparkct.perf.registry, which documents the table; a file without "default" entries
runs whole by default).
`--bench-device cpu|cuda` keeps only that device's cases (default: CUDA cases where a GPU is present,
else CPU ones); `--bench-rounds N` times every case N rounds instead of its file's own count. After each
case a line says how far the run is, and
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

from sparkct.errors import UserError
from sparkct.perf.registry import Bench, discover

import benchkit


def cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from sparkct import _ext

    return _ext.with_cuda()


CUDA_READY = cuda_ready()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
_PROGRESS: _Progress | None = None

HERE = os.path.dirname(os.path.abspath(__file__))
# family -> its BENCH declaration (suite, ratio pairs, "default" and "quick" cases): set in pytest_configure
_BENCHES: dict[str, Bench] = {}


def pytest_addoption(parser):
    g = parser.getgroup("sparkct benchmarks")
    g.addoption(
        "--bench-full",
        action="store_true",
        default=False,
        help="run the full benchmark grid (also SPARKCT_BENCH_FULL=1); default: a quick CPU subset",
    )
    g.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help='run only the smoke subset (the "quick" cases of each file\'s BENCH table)',
    )
    g.addoption(
        "--bench-device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="keep only this device's cases (auto: CUDA ones where a GPU is present, else CPU ones)",
    )
    g.addoption(
        "--bench-rounds",
        type=int,
        default=None,
        help="timed rounds of every case (default: each benchmark file's own count)",
    )
    g.addoption(
        "--bench-progress",
        default=os.path.join(".benchmarks", "sparkct-progress.json"),
        help="results so far, rewritten after every case (default: %(default)s)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    rounds = config.getoption("bench_rounds")
    if rounds is not None and rounds < 1:
        raise pytest.UsageError(f"--bench-rounds {rounds}: needs at least 1 round")
    benchkit.ROUNDS = rounds
    if config.getoption("bench_device") == "cuda" and not CUDA_READY:
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU with sparkct's CUDA kernels is visible")
    global _BENCHES, _PROGRESS
    try:
        _BENCHES = discover(HERE)
    except UserError as e:  # a bench_*.py without a BENCH table, or a malformed one
        raise pytest.UsageError(str(e)) from None
    _PROGRESS = _Progress(config)
    # SIGTERM (timeouts, job schedulers) ends the run as Ctrl-C does: summaries and JSON still written
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _is_cuda(item) -> bool:
    # the mark, not `"cuda" in item.keywords`: keywords also hold the parent folders' names
    return item.get_closest_marker("cuda") is not None


def _cases(item, subset: str) -> tuple[tuple[str, str], ...]:
    """The (test function, parameter-id pattern) entries of `subset` ("default" or "quick") in the BENCH
    table of the item's file."""
    bench = _BENCHES.get(item.path.stem)
    return getattr(bench, subset) if bench is not None else ()


def _listed(item, subset: str) -> bool:
    spec = getattr(item, "callspec", None)
    pid = spec.id if spec is not None else ""
    fn_name = getattr(item, "originalname", item.name)
    return any(fn_name == fn and fnmatch.fnmatchcase(pid, p) for fn, p in _cases(item, subset))


def _default(item) -> bool:
    """In the default run: a CUDA case, a case its file's "default" entries list, or any case of a file
    without "default" entries (it runs whole)."""
    return _is_cuda(item) or not _cases(item, "default") or _listed(item, "default")


def _explicit_selection(config) -> bool:
    return any("::" in str(a) for a in config.args) or bool(config.option.keyword) or bool(config.option.markexpr)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU with sparkct's CUDA kernels")
    skip_cpu = pytest.mark.skip(reason="CPU-size case skipped on a GPU run (SPARKCT_BENCH_CPU=1 to keep)")
    keep_cpu = os.environ.get("SPARKCT_BENCH_CPU", "") == "1"
    device = config.getoption("bench_device")
    explicit = _explicit_selection(config)
    quick = config.getoption("bench_quick") and not explicit
    full = not quick and (config.getoption("bench_full") or os.environ.get("SPARKCT_BENCH_FULL", "") == "1" or explicit)
    if quick:
        selected = [_listed(it, "quick") for it in items]
    else:
        selected = [full or _default(it) for it in items]
    if device != "auto":
        selected = [s and _is_cuda(it) == (device == "cuda") for it, s in zip(items, selected)]
    dropped = [it for it, s in zip(items, selected) if not s]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [it for it, s in zip(items, selected) if s]
    for item in items:
        if _is_cuda(item) and not CUDA_READY:
            item.add_marker(skip_cuda)
        elif device == "auto" and CUDA_READY and not _is_cuda(item) and not keep_cpu:
            item.add_marker(skip_cpu)
    _PROGRESS.start(items, "quick" if quick else "full" if full else "default")


def _skipped(item) -> bool:
    return any(m.name == "skip" or (m.name == "skipif" and m.args and m.args[0] is True) for m in item.iter_markers())


class _Progress:
    """Counts finished cases, prints a line per case, and rewrites the results file after each."""

    def __init__(self, config):
        self.config = config
        self.path = config.getoption("bench_progress")
        self.cases: list[dict] = []
        self.to_run: set[str] = set()
        self.done = 0
        self.total = 0
        self.tier = "default"
        self.t0 = time.perf_counter()

    def start(self, items, tier: str) -> None:
        self.to_run = {it.nodeid for it in items if not _skipped(it)}
        self.total = len(self.to_run)
        self.tier = tier
        self.t0 = time.perf_counter()
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            what = {
                "full": "full grid",
                "quick": "smoke subset (--bench-quick)",
                "default": "quick subset (SPARKCT_BENCH_FULL=1 or --bench-full: the full grid)",
            }[tier]
            tr.write_line(f"sparkct benchmarks: {self.total} cases to run, {what}; results so far in {self.path}")
            whole = sorted({it.path.name for it in items if not _cases(it, "default")})
            if whole and tier == "default":
                tr.write_line(f'  run whole (no "default" cases in their BENCH table): {", ".join(whole)}')

    def record(self, report, row: dict | None) -> None:
        self.cases.append(
            {
                "nodeid": report.nodeid,
                "outcome": report.outcome,
                "seconds": round(report.duration, 3),
                **({"figures": row} if row else {}),
            }
        )
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
        tr.write_line(
            f"[{self.done:>3}/{self.total} {int(el) // 60}m{int(el) % 60:02d}s] {report.outcome:7s} {name}{fig}"
        )

    def write(self, complete: bool, exitstatus: int | None = None) -> None:
        from sparkct.io import write_json_atomic

        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        write_json_atomic(
            self.path,
            {
                "complete": complete,
                "exitstatus": exitstatus,
                "full_grid": self.tier == "full",
                "tier": self.tier,
                "selected": self.total,
                "elapsed_s": round(time.perf_counter() - self.t0, 1),
                "cases": self.cases,
                "derived": benchkit.DERIVED,
            },
        )


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


def pytest_terminal_summary(terminalreporter, config):
    if not benchkit.DERIVED or config.getoption("benchmark_quiet", False):  # sparkct bench prints its own
        return
    tr = terminalreporter
    tr.section("sparkct derived figures")
    keys = ["median_s", "peak_mib", "gflops_per_s", "gb_per_s"]
    for row in benchkit.DERIVED:
        extras = {k: v for k, v in row.items() if k not in ("name", "group", "device", "peak_bytes", "params", *keys)}
        base = "  ".join(
            f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row
        )
        more = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extras.items())
        tr.write_line(f"{row['name']}: {base}  {more}")
