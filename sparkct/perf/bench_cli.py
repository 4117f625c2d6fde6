"""``sparkct bench``: run the benchmark suites of a source checkout, write one sparkct-bench/1 JSON,
print a table, and compare with a stored baseline (a regression gate for CI).

The parser imports nothing heavy; the command imports torch when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

import sparkct
from sparkct.device import resolve_device
from sparkct.errors import UserError
from sparkct.perf import environment, peaks, registry, report
from sparkct.perf.report import case_id

_EPILOG = """\
suites: each benchmarks/bench_*.py names its suite, the ratios the gate reads and its subsets of
cases in a BENCH table (sparkct/perf/registry.py); what it measures is in its docstring. Adding a
benchmark is adding one such file.

sizes: each file sizes its cases per device (small on CPU, large on GPU). --device cpu runs the default
CPU subset (each file's "default" cases: a few minutes per suite on 2 cores; a file without them runs
whole), --full the whole grid, --quick the smoke subset (each file's "quick" cases: well under a minute
per suite; SparK's CPU step is not in it). --device cuda runs every CUDA case (--quick: a few of them).

the gate (--compare): ratios (speedup_vs_<baseline implementation>, mem_vs_<...>) are measured within
one run, so load on a shared machine cancels out of them; the exit status is 1 when one of them
regressed by more than --fail-above AND by more than its noise band. A baseline gates only the runner
class it was measured on (runner and CPU model: "cpu-2core AMD EPYC", "cuda-h200"): ratios move between
CPU models (the sparse conv's speed-up over spconv: 5.7 on an AMD EPYC, 2.9 on an Intel Xeon, both 2
cores), so against another class the changes are shown and not gated, and an explicit --fail-above or
--gate-absolute is refused up front. Record a baseline on your machine to gate there. Median times and
peak memory are listed too, and gate only with --gate-absolute. Cases missing from this run are
listed, not failed.

exit status: 0, 1 (the gate failed, or a benchmark case failed its correctness check), 2 (a mistake
in the arguments or a bad baseline file)."""


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "bench",
        help="run the benchmark suites, write one JSON, compare with a baseline (regression gate)",
        description="Run sparkct's benchmarks (benchmarks/ of this source checkout) through pytest-benchmark, "
        "write one sparkct-bench/1 JSON (environment; per case the median and spread, peak "
        "memory, derived figures and speed-ups over each baseline implementation), print a "
        "table, and optionally compare with a baseline file.",
        epilog=_EPILOG,
    )
    s.add_argument(
        "--suite",
        choices=_SuiteChoices(),
        default="all",
        metavar="SUITE",
        help="what to run: all, or one of the suites the benchmark files declare (%(choices)s)",
    )
    s.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="device of the cases (auto: cuda when a GPU with sparkct's CUDA kernels is visible)",
    )
    size = s.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the smoke subset (see below)")
    size.add_argument("--full", action="store_true", help="the full grid (long on CPU)")
    s.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="N",
        help="timed rounds of every case (default: each benchmark's own count)",
    )
    s.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="results file (default: .benchmarks/sparkct-bench-<runner>.json in the current folder)",
    )
    s.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="run nothing: print (and --compare) this results file of an earlier run",
    )
    s.add_argument(
        "--compare",
        default=None,
        metavar="BASELINE",
        help="a results file to compare with, e.g. benchmarks/baselines/cpu-2core.json",
    )
    s.add_argument(
        "--fail-above",
        default=argparse.SUPPRESS,
        metavar="PCT",
        help="with --compare: exit 1 when a ratio figure regressed by more than this (and more "
        "than its noise band); default 10%%",
    )
    s.add_argument(
        "--roofline",
        default=None,
        metavar="DIR",
        help="write roofline-<runner>.png and .md (arithmetic intensity vs achieved GFLOP/s of the "
        "kernel cases against the device's peaks) into DIR",
    )
    s.add_argument(
        "--gate-absolute",
        action="store_true",
        help="with --compare: gate median times and peak memory too (only against a baseline of the same runner class)",
    )
    s.set_defaults(func=cmd_bench)


class _SuiteChoices:
    """--suite's choices: "all" and the suites of the checkout's benchmark files, read when argparse first
    asks (lazy: building `sparkct`'s parser, which every command does, reads no benchmark file). Outside a
    checkout, or with a malformed declaration, any name passes here and the run says what is wrong."""

    def __init__(self):
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            try:
                self._names = [*registry.suites(_benches(source_root())), "all"]
            except UserError:
                self._names = []
        return self._names

    def __contains__(self, value) -> bool:
        return not self.names() or value in self.names()

    def __iter__(self):
        return iter(self.names())


def _benches(root: str) -> dict[str, registry.Bench]:
    """The declarations of the checkout's benchmark files (a UserError for a malformed one)."""
    return registry.discover(os.path.join(root, "benchmarks"))


def source_root(package_dir: str | None = None) -> str:
    """The checkout holding benchmarks/ beside the sparkct package; a UserError for an installed copy."""
    if package_dir is None:
        package_dir = os.path.dirname(os.path.abspath(sparkct.__file__))
    root = os.path.dirname(package_dir)
    if not all(os.path.isfile(os.path.join(root, "benchmarks", f)) for f in ("conftest.py", "benchkit.py")):
        raise UserError(
            f"sparkct bench runs the benchmarks of a source checkout, and this sparkct "
            f"({package_dir}) has no benchmarks/ folder beside it: run it from a clone of the "
            f"repository (pip install -e '.[dev]')"
        )
    return root


def _device(spec: str) -> str:
    import torch  # noqa: PLC0415 (lazy: sparkct.perf imports no torch)

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(spec).type  # a UserError when no GPU is visible
    if dev == "cuda":
        from sparkct import _ext  # noqa: PLC0415 (lazy: sparkct.perf imports no torch)

        if not _ext.with_cuda():
            if spec == "cuda":
                raise UserError(
                    "--device cuda: this sparkct was built without CUDA kernels (rebuild with the "
                    "CUDA toolkit, see `sparkct info`)"
                )
            dev = "cpu"
    return dev


def _run_pytest(
    root: str, files: list[str], device: str, tier: str, rounds: int | None, raw_path: str, progress_path: str
) -> tuple[int, bool]:
    """(pytest's exit status, interrupted?). pytest's output goes to this terminal."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-quiet",
        "--benchmark-json",
        raw_path,
        "--bench-progress",
        progress_path,
        "--bench-device",
        device,
    ]
    if tier == "quick":
        cmd.append("--bench-quick")
    elif tier == "full":
        cmd.append("--bench-full")
    if rounds is not None:
        cmd += ["--bench-rounds", str(rounds)]
    env = {k: v for k, v in os.environ.items() if k not in ("SPARKCT_BENCH_FULL", "SPARKCT_BENCH_CPU")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, cwd=root, env=env)
    try:
        return proc.wait(), False
    except KeyboardInterrupt:  # pytest got the signal too: let it write what it measured
        try:
            return proc.wait(timeout=120), True
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            return proc.wait(), True


def _failed_cases(progress_path: str, benches: dict[str, registry.Bench]) -> list[str]:
    """Ids of the cases that failed (a correctness check, an error), from conftest's progress file."""
    from sparkct.io import read_json  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    try:
        prog = read_json(progress_path)
    except (OSError, ValueError):
        return []
    return [case_id(c["nodeid"], benches)[0] for c in prog.get("cases", []) if c.get("outcome") == "failed"]


def cmd_bench(args) -> int:
    from sparkct.io import write_json_atomic  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

    fail_above = getattr(args, "fail_above", None)
    threshold = report.parse_percent("10%" if fail_above is None else fail_above)
    if not args.compare and (fail_above is not None or args.gate_absolute):
        raise UserError("--fail-above and --gate-absolute set the gate of --compare BASELINE; give --compare")
    if args.rounds is not None and args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: needs at least 1")
    baseline = report.load(args.compare, "--compare") if args.compare else None
    # an explicit gate that cannot apply is refused before minutes of benchmarks, not shown "not gated"
    gate_flag = "--fail-above" if fail_above is not None else "--gate-absolute" if args.gate_absolute else None
    if args.results:
        if args.quick or args.full or args.rounds is not None or args.json:
            raise UserError("--results prints an earlier run: --quick, --full, --rounds and --json do not apply")
        doc = report.load(args.results, "--results")
        if baseline is not None and gate_flag:
            why = report.gate_refusal(baseline, report.machine(doc), gate_flag)
            if why:
                raise UserError(why)
        print(report.format_cases(doc))
        interrupted, status = False, 0
    else:
        if importlib.util.find_spec("pytest_benchmark") is None:
            raise UserError("sparkct bench needs pytest and pytest-benchmark: pip install -e '.[dev]'")
        root = source_root()
        device = _device(args.device)
        env = environment.collect(device, root)
        runner = environment.runner_slug(device, env)
        if baseline is not None and gate_flag:
            why = report.gate_refusal(
                baseline, report.machine({"device": device, "runner": runner, "environment": env}), gate_flag
            )
            if why:
                raise UserError(why)
        out = args.json or os.path.join(".benchmarks", f"sparkct-bench-{runner}.json")
        if os.path.isdir(out):
            raise UserError(f"--json {out!r} is a folder")
        benches = _benches(root)
        suites = registry.suites(benches) if args.suite == "all" else [args.suite]
        files = [os.path.join("benchmarks", f) for f in registry.files(benches, suites)]
        tier = "quick" if args.quick else "full" if args.full else "default"
        print(f"sparkct bench: suites {', '.join(suites)} on {runner} ({tier} sizes), results -> {out}", flush=True)
        with tempfile.TemporaryDirectory(prefix="sparkct-bench-") as tmp:
            raw_path, prog_path = os.path.join(tmp, "raw.json"), os.path.join(tmp, "progress.json")
            rc, interrupted = _run_pytest(root, files, device, tier, args.rounds, raw_path, prog_path)
            if rc == 5:
                raise UserError(
                    f"no benchmark case selected for --suite {args.suite} --device {device}"
                    + (" --quick" if args.quick else "")
                )
            if not os.path.isfile(raw_path):
                if interrupted:
                    raise KeyboardInterrupt
                raise RuntimeError(f"pytest exited with status {rc} and wrote no benchmark results")
            from sparkct.io import read_json  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

            raw = read_json(raw_path)
            failed = _failed_cases(prog_path, benches)
        doc = report.convert(
            raw,
            benches=benches,
            device=device,
            runner=runner,
            tier=tier,
            suites=suites,
            environment=env,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            rounds=args.rounds,
            complete=rc in (0, 1) and not interrupted,
            failed=failed,
        )
        # The roofline needs the peaks of the machine that ran the cases: measured here (a few seconds
        # of calibration on a CPU; a table lookup on a known GPU) and stored with the results.
        doc["peaks"] = peaks.device_peaks(device)
        report.validate(doc, "the results of this run")
        write_json_atomic(out, doc)
        print()
        print(report.format_cases(doc))
        print(f"results: {out}")
        status = 1 if (failed or rc not in (0, 1) and not interrupted) else 0
        if failed:
            print(f"sparkct bench: {len(failed)} benchmark case(s) failed (see pytest's report above)", file=sys.stderr)
    if args.roofline:
        from sparkct.perf import roofline  # noqa: PLC0415 (lazy: `sparkct -h` imports no numpy)

        png, md = roofline.write(doc, args.roofline)
        print(f"roofline: {png}, {md}")
    if baseline is not None:
        cmp = report.compare(baseline, doc, threshold=threshold, gate_absolute=args.gate_absolute)
        print()
        print(report.format_comparison(cmp, baseline, doc))
        if cmp.failures:
            status = 1
    if interrupted:
        raise KeyboardInterrupt
    return status
