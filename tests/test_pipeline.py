"""The main job (sparkct pipeline) end to end on a small synthetic set: checks pass, the report is
written, and a second run reuses the data."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pydicom")

from sparkct.cli import main  # noqa: E402
from sparkct.pipeline import PipelineConfig, run_pipeline  # noqa: E402


def test_pipeline_small(tmp_path):
    cfg = PipelineConfig(workdir=str(tmp_path / "w"), patients=2, size=96, slices=8, batch=4, crop=64,
                         steps=1, proj_dim=16)
    lines = []
    rep = run_pipeline(cfg, log=lines.append)
    assert rep["checks_passed"], rep
    assert rep["data"]["slices"] > 0 and rep["data"]["series_failed"] == 0
    assert rep["spark"]["features_rel_err"] < 1e-3
    assert rep["contrastive"]["loss_rel_err"] < 1e-4
    with open(tmp_path / "w" / "report.json") as f:
        assert json.load(f)["spark"]["batch"] == 4
    # a re-run reuses the synthetic data and the cache
    lines.clear()
    run_pipeline(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "reusing synthetic CT" in text and "0 written" in text


def test_pipeline_bad_config(tmp_path, capsys):
    assert main(["pipeline", "--workdir", str(tmp_path), "--crop", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
