"""sparkct profile pretrain: the normal trainer under torch.profiler -> trace JSON + top-ops table."""

from __future__ import annotations

import json

import pytest

from sparkct.cli import main

TINY = [
    "--crop",
    "64",
    "--batch",
    "4",
    "--windows",
    "lung",
    "--decoder-width",
    "32",
    "--progress",
    "false",
    "--steps",
    "3",
    "--warmup-steps",
    "1",
    "--top",
    "8",
]


def test_profile_pretrain_spark_writes_trace_and_table(small_cache, tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "pretrain", "spark", "--data", small_cache, "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    trace = json.loads((out / "trace.json").read_text())
    ann = [e for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    names = {e["name"] for e in ann}
    assert {
        "step/data",
        "step/forward+loss",
        "step/backward",
        "step/optimizer",
        "loss/spark_masked_mse",
        "sparkct.SparseEncoder",
        "sparkct.sparse_conv2d",
    } <= names, sorted(names)
    # the warm-up step is not recorded: two recorded steps, each phase once per step
    assert sum(e["name"] == "step/forward+loss" for e in ann) == 2
    assert sorted(n for n in names if n.startswith("ProfilerStep")) == ["ProfilerStep#1", "ProfilerStep#2"]
    md = (out / "profile.md").read_text()
    assert md.strip() in printed
    for phase in ("step/data", "step/forward+loss", "step/backward", "step/optimizer"):
        assert f"`{phase}`" in md
    rep = json.loads((out / "profile.json").read_text())
    assert rep["recorded"]["steps"] == 2 and len(rep["top"]) == 8 and rep["sort"] == "self_cpu_time_total"
    assert rep["top"][0]["self_ms"] >= rep["top"][-1]["self_ms"] > 0
    phases = {r["name"]: r for r in rep["ranges"]}
    assert phases["step/backward"]["calls"] == 2 and phases["step/backward"]["total_ms"] > 0
    assert (out / "run" / "metrics.csv").is_file()


def test_a_profile_replaces_its_own_run_but_not_a_foreign_folder(small_cache, tmp_path, capsys):
    def profile(out):
        return main(
            [
                "profile",
                "pretrain",
                "tiny",
                "--data",
                small_cache,
                "--out",
                str(out),
                "--crop",
                "32",
                "--batch",
                "4",
                "--progress",
                "false",
                "--steps",
                "2",
                "--warmup-steps",
                "1",
            ]
        )

    (tmp_path / "other" / "run").mkdir(parents=True)
    assert profile(tmp_path / "other") == 2
    assert "was not made by sparkct profile" in capsys.readouterr().err
    # an earlier profile's run (marker + checkpoint) is replaced, not resumed or refused
    old = tmp_path / "prof" / "run"
    old.mkdir(parents=True)
    (old / ".sparkct-profile").write_text("")
    (old / "last.ckpt").write_bytes(b"old")
    assert profile(tmp_path / "prof") == 0
    assert (old / "last.ckpt").read_bytes() != b"old" and (old / ".sparkct-profile").is_file()
    assert json.loads((tmp_path / "prof" / "profile.json").read_text())["method"] == "tiny"


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["profile", "pretrain", "spark", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["profile", "pretrain", "spark", "--steps", "2", "--warmup-steps", "2"], "leaves no step to record"),
        (["profile", "pretrain", "spark", "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
        (["profile", "pretrain", "nosuch"], "unknown method 'nosuch'"),
        (["profile", "pretrain"], "name a method to profile"),
        (["profile", "pretrain", "spark", "--max-steps", "5"], "--max-steps does not apply to sparkct profile"),
        (["profile", "pretrain", "spark", "--crop", "100"], "multiple of 32"),
        (["profile", "pretrain", "spark", "--resume"], "--resume does not apply"),
    ],
)
def test_bad_input_is_one_line_before_any_work(argv, msg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("sparkct profile pretrain")
    assert not (tmp_path / "runs").exists()


def test_a_distributed_launch_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["profile", "pretrain", "spark"]) == 2
    assert "runs one process" in capsys.readouterr().err


def test_profile_help_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from sparkct.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['profile', 'pretrain', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--steps" in r.stdout and "profile pretrain" in r.stdout
