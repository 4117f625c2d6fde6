"""`sparkct bench`: the comparison gate on hand-made results, the results schema, the pairing of cases
into ratios, bad input, and one real quick run of the kernel suite."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import subprocess
import sys

import pytest

from sparkct.cli import main
from sparkct.errors import UserError
from sparkct.perf import registry, report
from sparkct.perf.bench_cli import _failed_cases, source_root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE = os.path.join(ROOT, "benchmarks", "baselines", "cpu-2core.json")
BENCHES = registry.discover(os.path.join(ROOT, "benchmarks"))  # the checkout's benchmark declarations


def case(cid, median=1.0, noise=0.02, ratios=None, ratio_noise=None, peak=1000, params=None):
    return {
        "id": cid,
        "suite": cid.split("/")[0],
        "family": cid.split("/")[1],
        "group": "g",
        "params": params or {"impl": "fused"},
        "time_s": {
            "median": median,
            "min": median * 0.95,
            "mean": median,
            "stddev": 0.0,
            "iqr": 0.0,
            "max": median * 1.05,
            "rounds": 5,
            "noise": noise,
        },
        "peak_bytes": peak,
        "figures": {},
        "ratios": dict(ratios or {}),
        "ratio_noise": dict(ratio_noise or {k: noise for k in (ratios or {})}),
    }


def doc(cases, runner="cpu-2core", device="cpu"):
    return {
        "schema": report.SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "device": device,
        "runner": runner,
        "quick": False,
        "tier": "default",
        "rounds": None,
        "suites": ["kernels"],
        "complete": True,
        "failed": [],
        "environment": {"git_commit": "abc"},
        "cases": cases,
    }


A = "kernels/bench_info_nce/test_info_nce[fused]"
B = "kernels/bench_sparse_encoder/test_encoder[sparse]"


def _cli(tmp_path, old, new, *extra):
    po, pn = tmp_path / "old.json", tmp_path / "new.json"
    po.write_text(json.dumps(old))
    pn.write_text(json.dumps(new))
    return main(["bench", "--results", str(pn), "--compare", str(po), *extra])


def _row(cmp, cid, figure):
    return next(r for r in cmp.rows if r.case == cid and r.figure == figure)


# ---- the gate ----------------------------------------------------------------------------------------


def test_improvement_passes(tmp_path, capsys):
    old = doc([case(A, ratios={"speedup_vs_naive": 2.0, "mem_vs_naive": 0.1})])
    new = doc([case(A, ratios={"speedup_vs_naive": 2.6, "mem_vs_naive": 0.05})])
    cmp = report.compare(old, new)
    assert _row(cmp, A, "speedup_vs_naive").verdict == "improved"
    assert _row(cmp, A, "mem_vs_naive").verdict == "improved"  # less memory is better
    assert _cli(tmp_path, old, new) == 0
    out = capsys.readouterr().out
    assert "+30.0%" in out and "gate: pass" in out


def test_ratio_regression_past_threshold_fails(tmp_path, capsys):
    old = doc([case(A, ratios={"speedup_vs_naive": 2.0})])
    new = doc([case(A, ratios={"speedup_vs_naive": 1.5})])  # -25 %, noise ~3 %
    cmp = report.compare(old, new, threshold=0.10)
    r = _row(cmp, A, "speedup_vs_naive")
    assert r.verdict == "regressed" and r.fail and r.change == pytest.approx(-0.25)
    assert _cli(tmp_path, old, new, "--fail-above", "10%") == 1
    out = capsys.readouterr().out
    assert "regressed FAIL" in out and "gate: FAIL (1 figures regressed past 10%" in out
    # the same regression under a looser threshold passes
    assert _cli(tmp_path, old, new, "--fail-above", "30") == 0


def test_memory_ratio_regression_fails():
    old = doc([case(A, ratios={"mem_vs_naive": 0.10}, ratio_noise={"mem_vs_naive": 0.0})])
    new = doc([case(A, ratios={"mem_vs_naive": 0.13}, ratio_noise={"mem_vs_naive": 0.0})])
    assert [(r.figure, r.verdict) for r in report.compare(old, new).failures] == [("mem_vs_naive", "regressed")]


@pytest.mark.parametrize(
    "new_ratio,noise,verdict",
    [
        (1.6, 0.20, "within noise"),  # -20 % is past 10 % but inside the +-28 % band of two noisy runs
        (1.9, 0.01, "regressed"),  # -5 % is beyond the noise but inside the threshold
        (2.0, 0.00, "within noise"),
    ],
)
def test_changes_inside_noise_or_threshold_pass(tmp_path, new_ratio, noise, verdict):
    old = doc([case(A, noise=noise, ratios={"speedup_vs_naive": 2.0})])
    new = doc([case(A, noise=noise, ratios={"speedup_vs_naive": new_ratio})])
    r = _row(report.compare(old, new, threshold=0.10), A, "speedup_vs_naive")
    assert r.verdict == verdict and not r.fail
    assert _cli(tmp_path, old, new) == 0


def test_missing_and_new_cases_are_listed_not_failed(tmp_path, capsys):
    c = "train/bench_contrastive/test_method_step[cpu-simclr-fused-chunk0]"
    d = "data/bench_data/test_loader_throughput[read-only]"  # a suite this run did not include
    old = doc([case(A, ratios={"speedup_vs_naive": 2.0, "speedup_vs_lightly": 5.0}), case(B), case(d)])
    new = doc([case(A, ratios={"speedup_vs_naive": 2.0}), case(c)])  # lightly not installed here
    cmp = report.compare(old, new)
    assert cmp.missing_cases == [B, d] and cmp.new_cases == [c] and not cmp.failures
    assert _row(cmp, A, "speedup_vs_lightly").verdict == "missing"
    assert _cli(tmp_path, old, new) == 0
    out = capsys.readouterr().out
    assert "missing from this run (1, not a failure): bench_sparse_encoder::test_encoder[sparse]" in out
    assert "not compared: 1 baseline cases of suites this run did not include (data)" in out
    assert "new in this run (1): bench_contrastive::test_method_step[cpu-simclr-fused-chunk0]" in out


def test_absolute_times_gate_only_on_the_same_runner_with_gate_absolute(tmp_path, capsys):
    old = doc([case(A, median=1.0, noise=0.01)])
    slow = [case(A, median=3.0, noise=0.01)]
    assert _cli(tmp_path, old, doc(slow)) == 0  # shown, not gated by default
    assert "regressed (not gated)" in capsys.readouterr().out
    assert _cli(tmp_path, old, doc(slow), "--gate-absolute") == 1
    assert "gate: FAIL" in capsys.readouterr().out
    other = doc(slow, runner="cpu-8core")
    assert _cli(tmp_path, old, other, "--gate-absolute") == 2  # a gate that cannot apply: refused
    assert "the baseline was measured on cpu-2core unknown CPU and this run is on cpu-8core" in capsys.readouterr().err


def test_a_baseline_gates_only_its_own_runner_class(tmp_path, capsys):
    """Measured: the same commit's speedup_vs_spconv was 5.7 on a 2-core AMD EPYC and 2.9 on a 2-core
    Intel Xeon. Against a baseline of another CPU model the changes are shown and not gated; an explicit
    --fail-above is refused before anything runs."""

    def on(cpu, ratio):
        d = doc([case(A, ratios={"speedup_vs_spconv": ratio})])
        d["environment"] = {"git_commit": "abc", "cpu_model": cpu}
        return d

    old, new = on("AMD EPYC", 5.7), on("Intel(R) Xeon(R) CPU @ 2.20GHz", 2.9)
    cmp = report.compare(old, new)
    assert not cmp.ratios_gated and not cmp.failures
    assert _row(cmp, A, "speedup_vs_spconv").verdict == "regressed"
    assert _cli(tmp_path, old, new) == 0
    out = capsys.readouterr().out
    assert "gate: not applied (the baseline is of cpu-2core AMD EPYC, this run of cpu-2core Intel(R) Xeon(R)" in out
    assert "ratio figures: 0 improved, 1 regressed" in out
    assert _cli(tmp_path, old, new, "--fail-above", "10%") == 2
    err = capsys.readouterr().err
    assert "--fail-above: the baseline was measured on cpu-2core AMD EPYC" in err and "Record one here" in err
    assert len(err.strip().splitlines()) == 1
    # the same CPU model gates
    assert _cli(tmp_path, old, on("AMD EPYC", 2.9), "--fail-above", "10%") == 1


def test_cases_with_changed_sizes_are_not_compared():
    old = doc([case(A, ratios={"speedup_vs_naive": 2.0}, params={"impl": "fused", "n2": 8192})])
    new = doc([case(A, ratios={"speedup_vs_naive": 1.0}, params={"impl": "fused", "n2": 4096})])
    cmp = report.compare(old, new)
    assert [r.verdict for r in cmp.rows] == ["sizes changed"] and not cmp.failures


# ---- the results file --------------------------------------------------------------------------------


def test_bad_baseline_files_are_clear_errors(tmp_path, capsys):
    new = tmp_path / "new.json"
    new.write_text(json.dumps(doc([case(A)])))
    bad = {
        "notjson.json": "{not json",
        "list.json": "[1, 2]",
        "schema.json": json.dumps({**doc([case(A)]), "schema": "other/2"}),
        "pytest.json": json.dumps({"machine_info": {}, "benchmarks": []}),
        "nomedian.json": json.dumps(doc([{**case(A), "time_s": {"min": 1.0, "rounds": 1}}])),
        "twice.json": json.dumps(doc([case(A), case(A)])),
    }
    want = {
        "notjson.json": "not JSON (Expecting property name",
        "list.json": "a JSON list, not an object",
        "schema.json": "schema 'other/2', expected 'sparkct-bench/1'",
        "pytest.json": "pytest-benchmark's --benchmark-json output",
        "nomedian.json": "positive 'median'",
        "twice.json": "appears twice",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        assert main(["bench", "--results", str(new), "--compare", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert want[name] in err and len(err.splitlines()) == 1, err
    assert main(["bench", "--results", str(new), "--compare", str(tmp_path / "nosuch.json")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", [0.0, -1.25, float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["--compare", "--results"])
def test_ratios_must_be_finite_and_positive(tmp_path, capsys, ratio, which):
    good = doc([case(A, ratios={"speedup_vs_naive": 1.5})])
    bad = doc([case(A, ratios={"speedup_vs_naive": ratio})])
    old, new = (bad, good) if which == "--compare" else (good, bad)
    assert _cli(tmp_path, old, new) == 2
    err = capsys.readouterr().err.strip()
    name = "old.json" if which == "--compare" else "new.json"
    assert len(err.splitlines()) == 1 and "gate" not in err, err
    assert f"{which} '" in err and name in err and A in err and "speedup_vs_naive" in err and "> 0" in err, err


def test_a_zero_memory_ratio_is_allowed():
    # convert writes mem_vs_X = 0 for a case with no extra peak memory; _judge handles an old 0
    report.validate(doc([case(A, ratios={"speedup_vs_naive": 1.5, "mem_vs_naive": 0.0})]))
    with pytest.raises(UserError, match="mem_vs_naive"):
        report.validate(doc([case(A, ratios={"mem_vs_naive": -0.5})]))


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("git_commit", 12345, "'environment.git_commit'"),
        ("git_dirty", "yes", "'environment.git_dirty'"),
        ("cpu_model", ["x"], "'environment.cpu_model'"),
        ("gpu_name", 3, "'environment.gpu_name'"),
        ("cpu_usable_cores", "two", "'environment.cpu_usable_cores'"),
        ("peaks", "fast", "'peaks'"),
    ],
)
@pytest.mark.parametrize("which", ["--compare", "--results"])
def test_malformed_environment_and_peaks_are_one_line_errors(tmp_path, capsys, key, value, msg, which):
    good = doc([case(A, ratios={"speedup_vs_naive": 1.5})])
    bad = json.loads(json.dumps(good))
    if key == "peaks":
        bad["peaks"] = value
    else:
        bad["environment"][key] = value
    old, new = (bad, good) if which == "--compare" else (good, bad)
    assert _cli(tmp_path, old, new, "--roofline", str(tmp_path / "roof")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and f"{which} '" in err, err


def test_peaks_fields_are_checked():
    good = doc([case(A)])
    report.validate({**good, "peaks": None})
    report.validate(
        {
            **good,
            "peaks": {
                "device": "cpu",
                "compute_gflop_s": 50.0,
                "bandwidth_gb_s": 10.0,
                "compute_by_dtype_gflop_s": {"fp32": 50.0},
            },
        }
    )
    for bad in (
        {"bandwidth_gb_s": "fast"},
        {"compute_gflop_s": -1.0},
        {"compute_by_dtype_gflop_s": [1]},
        {"compute_by_dtype_gflop_s": {"fp32": "x"}},
    ):
        with pytest.raises(UserError, match="'peaks"):
            report.validate({**good, "peaks": bad})


def _raw(name, group, median, axes, info=None, derived=None, peak=0, rounds=5, spread=0.0):
    """One benchmark of pytest-benchmark's JSON as benchkit.run records it; name "<family>::<test>[id]"."""
    info = info or {}
    stats = {
        "median": median,
        "min": median - spread,
        "max": median + spread,
        "mean": median,
        "stddev": 0.0,
        "iqr": spread,
        "rounds": rounds,
    }
    extra = {
        **info,
        "params": {k: v for k, v in info.items() if k != "flops"},
        "peak_bytes": peak,
        "median_s": median,
        **(derived or {}),
    }
    family, test = name.split("::")
    return {
        "fullname": f"benchmarks/bench_{family}.py::{test}",
        "group": group,
        "params": axes,
        "stats": stats,
        "extra_info": extra,
    }


def test_cases_pair_with_their_baselines_in_the_same_group():
    g = "info_nce-cpu-float32-2N8192-D128-fwd+bwd"
    inp = {"device": "cpu", "dtype": "UNSERIALIZABLE[torch.float32]", "n2": 8192, "d": 128, "mode": "fwd+bwd"}
    sc = {"device": "cpu", "name": "simclr"}
    raw = {
        "benchmarks": [
            _raw(
                "info_nce::test_info_nce[naive]",
                g,
                0.8,
                {**inp, "impl": "naive"},
                {"impl": "naive", "flops": 1e9},
                peak=4000,
                spread=0.08,
            ),
            _raw(
                "info_nce::test_info_nce[fused]",
                g,
                0.2,
                {**inp, "impl": "fused"},
                {"impl": "fused", "flops": 1e9},
                {"speedup_vs_naive": 4.0, "gflops_per_s": 5.0, "meets_target": True},
                peak=100,
                spread=0.01,
            ),
            _raw(
                "info_nce::test_info_nce[fused-other-size]",
                "other-group",
                0.1,
                {**inp, "n2": 2048, "impl": "fused"},
                {"impl": "fused"},
            ),
            _raw(
                "contrastive::test_method_step[naive-0]",
                "m",
                4.0,
                {**sc, "loss": "naive", "chunk": 0},
                peak=200,
                rounds=3,
                spread=0.4,
            ),
            _raw(
                "contrastive::test_method_step[fused-0]",
                "m",
                2.0,
                {**sc, "loss": "fused", "chunk": 0},
                peak=100,
                rounds=3,
            ),
            _raw(
                "contrastive::test_method_step[fused-16]",
                "m",
                3.0,
                {**sc, "loss": "fused", "chunk": 16},
                peak=25,
                rounds=1,
            ),
            _raw("data::test_pydicom_decode_baseline", "data-prepare-512", 1.0, {}),
            _raw("data::test_prepare_throughput[j1]", "data-prepare-512", 2.0, {"workers": 1, "resample": False}),
        ]
    }
    d = report.convert(
        raw,
        benches=BENCHES,
        device="cpu",
        runner="cpu-2core",
        tier="default",
        suites=["kernels", "train", "data"],
        environment={},
        created="2026-01-01T00:00:00+00:00",
    )
    report.validate(d)
    by = {c["id"].split("/", 2)[-1]: c for c in d["cases"]}
    fused = by["test_info_nce[fused]"]
    assert fused["id"] == "kernels/bench_info_nce/test_info_nce[fused]" and fused["suite"] == "kernels"
    assert fused["ratios"] == {"speedup_vs_naive": pytest.approx(4.0), "mem_vs_naive": pytest.approx(0.025)}
    assert fused["ratio_noise"]["speedup_vs_naive"] == pytest.approx((0.1**2 + 0.05**2) ** 0.5)  # IQR/median
    # its own speedup_vs_naive is superseded by the ratios; flags and labels are not figures
    assert fused["figures"] == {"gflop_per_s": 5.0} and fused["flops"] == 1e9 and fused["params"] == {"impl": "fused"}
    assert by["test_info_nce[fused-other-size]"]["ratios"] == {}  # no naive in its group
    assert by["test_info_nce[naive]"]["ratios"] == {}
    assert by["test_method_step[fused-0]"]["ratios"] == {"speedup_vs_naive": 2.0, "mem_vs_naive": 0.5}
    assert by["test_method_step[fused-0]"]["ratio_noise"]["speedup_vs_naive"] == pytest.approx(0.2)  # (max-min)/median
    # chunked vs the fused unchunked step (not the naive one); one round: noise unknown
    assert by["test_method_step[fused-16]"]["ratios"] == {
        "speedup_vs_unchunked": pytest.approx(2 / 3),
        "mem_vs_unchunked": 0.25,
    }
    assert by["test_method_step[fused-16]"]["ratio_noise"]["speedup_vs_unchunked"] is None
    assert by["test_prepare_throughput[j1]"]["ratios"] == {"speedup_vs_pydicom-decode": 0.5}
    assert by["test_prepare_throughput[j1]"]["suite"] == "data"


def test_failed_cases_are_read_from_the_progress_file(tmp_path):
    prog = tmp_path / "progress.json"
    prog.write_text(
        json.dumps(
            {
                "cases": [
                    {"nodeid": "benchmarks/bench_spark.py::test_step[sparse-cpu]", "outcome": "failed"},
                    {"nodeid": "benchmarks/bench_data.py::test_loader_throughput[read-only]", "outcome": "passed"},
                    {"nodeid": "benchmarks/bench_info_nce.py::test_info_nce[x-lightly]", "outcome": "skipped"},
                ]
            }
        )
    )
    assert _failed_cases(str(prog), BENCHES) == ["train/bench_spark/test_step[sparse-cpu]"]
    assert _failed_cases(str(tmp_path / "none.json"), BENCHES) == []


def test_pairs_name_real_benchmark_cases():
    """Every selector value of a file's declared pairs is a value the file uses (a renamed implementation
    would silently drop its ratio)."""
    for b in BENCHES.values():
        with open(os.path.join(ROOT, "benchmarks", b.file)) as f:
            lines = f.read().splitlines()
        table = next(
            n
            for n in ast.parse("\n".join(lines)).body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "BENCH" for t in n.targets)
        )
        src = "\n".join(lines[: table.lineno - 1] + lines[table.end_lineno :])  # the file without its BENCH table
        for p in b.pairs:
            for sel in (p.case, p.base):
                for k, v in sel.items():
                    token = f"def {v}(" if k == "test" else (f'"{v}"' if isinstance(v, str) else None)
                    if token is not None:
                        assert token in src, (b.file, p, k, v)


def test_stored_baseline_is_valid():
    d = report.load(BASELINE, "baseline")
    assert d["device"] == "cpu" and d["runner"] == "cpu-2core" and not d["quick"]
    assert {c["suite"] for c in d["cases"]} == {"kernels", "train", "data"}
    assert any("speedup_vs_naive" in c["ratios"] for c in d["cases"])


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["bench", "--fail-above", "ten", "--compare", "x.json"], "--fail-above 'ten': expected a percentage"),
        (["bench", "--fail-above=-5%", "--compare", "x.json"], "must be a percentage >= 0"),
        (["bench", "--fail-above", "5%"], "give --compare"),
        (["bench", "--rounds", "0"], "--rounds 0: needs at least 1"),
        (["bench", "--results", "x.json", "--quick"], "--results prints an earlier run"),
    ],
)
def test_user_mistakes(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps(doc([case(A)])))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "gpu"])
    assert e.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused_before_any_run(capsys, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cuda", "--json", "out.json"]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_outside_a_source_checkout(tmp_path):
    (tmp_path / "sparkct").mkdir()
    with pytest.raises(UserError, match="runs the benchmarks of a source checkout"):
        source_root(str(tmp_path / "sparkct"))
    assert source_root(os.path.join(ROOT, "sparkct")) == ROOT


# ---- the quick subsets and one real run --------------------------------------------------------------


def _subset_entries(subset: str) -> list[tuple[str, str, str]]:
    """(file, test function, parameter-id pattern) of every file's "default" or "quick" entries."""
    return [(b.file, fn, pat) for b in BENCHES.values() for fn, pat in getattr(b, subset)]


def test_quick_lists_name_benchmark_functions():
    """Every "default" and "quick" entry of the files' BENCH tables names a test function that exists
    (test_quick_lists_select_collected_cases checks the parameter patterns too, by collecting)."""
    for f, fn, _ in _subset_entries("default") + _subset_entries("quick"):
        assert f"def {fn}(" in open(os.path.join(ROOT, "benchmarks", f)).read(), (f, fn)
    files = {b.file for b in BENCHES.values()}
    assert {f for f, _, _ in _subset_entries("quick")} == files  # --quick runs something of every suite on some device
    assert files == {f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.startswith("bench_")}


@pytest.mark.slow
def test_quick_lists_select_collected_cases():
    """Every "default" and "quick" entry of the files' BENCH tables selects at least one benchmark case."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "benchmarks",
            "--bench-full",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cases = []
    for ln in r.stdout.splitlines():
        if ln.startswith("benchmarks/"):
            path, _, name = ln.partition("::")
            fn, _, pid = name.partition("[")
            cases.append((os.path.basename(path), fn, pid[:-1]))
    for f, fn, pat in _subset_entries("default") + _subset_entries("quick"):
        assert any(c[:2] == (f, fn) and fnmatch.fnmatchcase(c[2], pat) for c in cases), (f, fn, pat)


def test_quick_kernel_run_end_to_end(tmp_path, capfd):
    out = tmp_path / "res" / "bench.json"
    (tmp_path / "res").mkdir()
    rc = main(
        [
            "bench",
            "--quick",
            "--suite",
            "kernels",
            "--device",
            "cpu",
            "--rounds",
            "3",
            "--json",
            str(out),
            "--roofline",
            str(tmp_path / "roof"),
        ]
    )
    text = capfd.readouterr().out
    assert rc == 0, text
    # --device cpu drops the CUDA cases of the smoke subset (deselected, not skipped for want of a GPU)
    summary = next(ln for ln in text.splitlines() if re.match(r"\d+ passed", ln))
    assert summary.startswith("10 passed, ") and "deselected" in summary and "skipped" not in summary, summary
    d = report.load(str(out), "results")
    assert d["device"] == "cpu" and d["runner"].startswith("cpu-") and d["quick"] and d["complete"]
    assert d["suites"] == ["kernels"] and d["rounds"] == 3 and not d["failed"]
    env = d["environment"]
    assert env["torch"] and env["sparkct"] and env["cpu_logical_cores"] >= 1 and "git_commit" in env
    by = {c["id"]: c for c in d["cases"]}
    fused = by["kernels/bench_info_nce/test_info_nce[cpu-fp32-2N2048-D128-fwd-fused]"]
    naive = by["kernels/bench_info_nce/test_info_nce[cpu-fp32-2N2048-D128-fwd-naive]"]
    assert {c["family"] for c in d["cases"]} == {"bench_info_nce", "bench_sparse_encoder", "bench_prototype_ce"}
    proto = [c for c in d["cases"] if c["family"] == "bench_prototype_ce" and c["params"]["impl"] == "fused"]
    assert proto and all({"speedup_vs_plain", "mem_vs_plain", "speedup_vs_gemm"} <= set(c["ratios"]) for c in proto)
    assert all(c["time_s"]["rounds"] == 3 and c["time_s"]["noise"] is not None for c in d["cases"])
    assert fused["ratios"]["speedup_vs_naive"] == pytest.approx(naive["time_s"]["median"] / fused["time_s"]["median"])
    assert fused["ratios"]["mem_vs_naive"] < 0.1  # O(rows) extra memory, not O(rows^2)
    assert fused["params"]["impl"] == "fused" and fused["figures"]["gflop_per_s"] > 0
    sparse = by["kernels/bench_sparse_encoder/test_conv3x3[sparse-64-8-fwd-cpu]"]
    assert {"speedup_vs_dense", "mem_vs_dense"} <= set(sparse["ratios"])
    assert "case" in text and "speedup_vs_naive" in text  # the table
    # the machine's peaks are measured in the run and stored with it; the roofline is drawn from them
    assert d["peaks"]["source"] == "measured" and d["peaks"]["compute_gflop_s"] > 0
    assert d["peaks"]["bandwidth_gb_s"] > 0
    roof = (tmp_path / "roof" / f"roofline-{d['runner']}.md").read_text()
    assert "test_info_nce" in roof or "info_nce" in roof
    assert (tmp_path / "roof" / f"roofline-{d['runner']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # against itself: every figure within noise; against the stored baseline: the cases it did not run
    # are listed as missing, and the gate's status is one of its two answers
    assert main(["bench", "--results", str(out), "--compare", str(out)]) == 0
    assert "0 improved, 0 regressed" in capfd.readouterr().out
    rc = main(["bench", "--results", str(out), "--compare", BASELINE])
    text = capfd.readouterr().out
    assert rc in (0, 1) and "missing from this run" in text and "gate:" in text
    assert "baseline cases of suites this run did not include (data, train)" in text
