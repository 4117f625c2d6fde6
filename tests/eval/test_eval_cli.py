"""`sparkct finetune` and `sparkct report` end to end; user mistakes as one-line errors."""

from __future__ import annotations

import json
import os

import pytest

from sparkct.cli import main


def test_finetune_and_report_commands(tmp_path, write_npz, finetune_flags):
    data = write_npz(tmp_path / "organs.npz", n=(24, 12, 12), k=3, size=20)
    out = str(tmp_path / "runs" / "a")
    assert (
        main(
            [
                "finetune",
                "--data",
                data,
                "--out",
                out,
                "--epochs",
                "2",
                "--freeze-epochs",
                "1",
                "--ramp-epochs",
                "1",
                "--name",
                "scratch",
                *finetune_flags,
            ]
        )
        == 0
    )
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["method"] == "scratch" and res["train"]["epochs"] == 2 and res["test"]["unit"] == "item"
    assert res["init"]["kind"] == "random" and len(res["val_history"]) == 2
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--resamples", "50"]) == 0
    for f in ("results.md", "auc_vs_fraction.png", "results.json", "runs.csv"):
        assert os.path.isfile(tmp_path / "rep" / f)
    md = open(tmp_path / "rep" / "results.md").read()
    assert "| scratch |" in md and "No paired comparison" in md


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--data", "{npz}", "--fraction", "0"], "fraction must be in (0, 1]"),
        (["--data", "{npz}", "--init", "/nonexistent/weights.pt"], "not 'random', a weights file or a run folder"),
        (["--data", "{npz}", "--labels", "x.csv"], "holds its own labels"),
        (["--data", "{npz}", "--freeze-epochs", "-1"], "--freeze-epochs must be finite and >= 0"),
        (["--data", "{npz}", "--crop", "30"], "multiple of 32"),
        (["--data", "/nonexistent"], "data not found"),
        (["--data", "{cache}", "--labels", "{bad}"], "no label column 'label'"),
    ],
)
def test_finetune_mistakes_are_one_line_with_exit_2(
    argv, msg, tmp_path, write_npz, eval_cache, finetune_flags, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("series_key,diagnosis\nabc,1\n")
    subs = {"{npz}": write_npz(tmp_path / "d.npz"), "{cache}": eval_cache["cache"], "{bad}": str(bad)}
    argv = [subs.get(a, a) for a in argv]
    # the case's flags last: argparse keeps the last value of a repeated flag
    assert main(["finetune", "--out", str(tmp_path / "run"), "--epochs", "1", *finetune_flags, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("sparkct finetune: error:")


def test_finetune_refuses_a_test_split_too_small_for_the_bootstrap_before_training(
    tmp_path, write_npz, finetune_flags, capsys
):
    data = write_npz(tmp_path / "d.npz", n=(24, 12, 3), k=3)  # one test image per class
    out = tmp_path / "run"
    assert main(["finetune", "--data", data, "--out", str(out), "--epochs", "1", *finetune_flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds [1, 1, 1] patients per class" in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # said before training, as `sparkct experiment` does
