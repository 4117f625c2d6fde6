"""sparkct.perf.roofline on a hand-made bench result (tests/perf/baseline_fixture.json): peaks
50 GFLOP/s and 10 GB/s, so the ridge is at 5 FLOP/byte."""

from __future__ import annotations

import copy
import json
import os

import pytest

from sparkct.errors import UserError
from sparkct.perf import roofline

FIXTURE = os.path.join(os.path.dirname(__file__), "baseline_fixture.json")


@pytest.fixture
def result():
    with open(FIXTURE) as f:
        return json.load(f)


def test_roof_and_fractions_either_side_of_the_ridge(result):
    rows = {r["label"]: r for r in roofline.points(result, result["peaks"])}
    # 1 GFLOP over 1 GB (intensity 1, below the ridge) in 0.5 s: 2 GFLOP/s under a 10 GFLOP/s roof
    naive = rows["info_nce[fp32-2N8192-D128-fwd+bwd-naive]"]
    assert naive["intensity"] == pytest.approx(1.0)
    assert naive["roof_gflop_s"] == pytest.approx(10.0) and naive["bound"] == "memory"
    assert naive["achieved_gflop_s"] == pytest.approx(2.0)
    assert naive["of_roof"] == pytest.approx(0.2) and naive["of_peak"] == pytest.approx(0.04)
    assert naive["achieved_gb_s"] == pytest.approx(2.0)
    # 10 GFLOP over 0.1 GB (intensity 100, above it) in 0.4 s: 25 of the 50 GFLOP/s compute roof
    fused = rows["info_nce[fp32-2N8192-D128-fwd+bwd-fused]"]
    assert fused["intensity"] == pytest.approx(100.0) and fused["bound"] == "compute"
    assert fused["roof_gflop_s"] == pytest.approx(50.0)
    assert fused["of_roof"] == pytest.approx(0.5) and fused["of_peak"] == pytest.approx(0.5)
    # no byte count: no intensity, the compute peak as the roof, only a fraction of the peak
    enc = rows["encoder[sparse-0.6]"]
    assert enc["intensity"] is None and enc["of_roof"] is None and enc["of_peak"] == pytest.approx(0.4)
    # bf16 on a CPU calibrated in fp32: the fp32 roof, said so
    assert rows["conv3x3[sparse-64-8-fwd]"]["dtype"] == "fp32 (no bf16 peak)"
    assert len(rows) == 4  # the data case has no FLOPs


def test_write_makes_a_png_and_a_table(result, tmp_path):
    png, md = roofline.write(result, str(tmp_path))
    assert os.path.basename(png) == "roofline-cpu-fixture.png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0
    text = open(md).read()
    assert (
        "| 1 | info_nce[fp32-2N8192-D128-fwd+bwd-naive] | fp32 | 1.00 | 1.00 | 2.00 | 10.0 | memory | 20% | 4.0% |"
        in text
    )
    assert (
        "| 2 | info_nce[fp32-2N8192-D128-fwd+bwd-fused] | fp32 | 10.0 | 100 | 25.0 | 50.0 | compute | 50% | 50% |"
        in text
    )
    assert "compute fp32 50.0 GFLOP/s, bandwidth 10.0 GB/s (measured)" in text


def test_peaks_from_the_gpu_table_or_refused(result):
    gpu = copy.deepcopy(result)
    del gpu["peaks"]
    gpu["device"] = "cuda"
    gpu["environment"]["gpu_name"] = "NVIDIA H100 80GB HBM3"
    pk = roofline.resolve_peaks(gpu)
    assert pk["source"] == "table:H100 SXM"
    rows = {r["label"]: r for r in roofline.points(gpu, pk)}
    # bf16 conv: the bf16 tensor-core roof, intensity 10 x 3350 GB/s = 33.5 TFLOP/s (memory bound)
    conv = rows["conv3x3[sparse-64-8-fwd]"]
    assert conv["dtype"] == "bf16" and conv["roof_gflop_s"] == pytest.approx(33500.0)
    gpu["environment"]["gpu_name"] = "NVIDIA Mystery X1"
    with pytest.raises(UserError, match="Mystery X1"):
        roofline.resolve_peaks(gpu)
    cpu = copy.deepcopy(result)
    del cpu["peaks"]
    with pytest.raises(UserError, match="no measured peaks"):
        roofline.resolve_peaks(cpu)


def test_nothing_to_draw_and_cli_errors(result, tmp_path, capsys):
    for c in result["cases"]:
        c.pop("flops", None)
    with pytest.raises(UserError, match="FLOPs"):
        roofline.write(result, str(tmp_path))
    assert roofline.main([str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert roofline.main([FIXTURE, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "roofline-cpu-fixture.png").is_file()


def test_roofline_of_a_stored_result_through_sparkct_bench(tmp_path, capsys):
    import subprocess
    import sys

    from sparkct.cli import main as sparkct_main

    assert sparkct_main(["bench", "--results", FIXTURE, "--roofline", str(tmp_path)]) == 0
    assert "roofline-cpu-fixture.md" in capsys.readouterr().out
    assert (tmp_path / "roofline-cpu-fixture.png").is_file()
    # the sparkct CLI builds its parsers without importing torch
    code = "import sys, sparkct.perf.roofline, sparkct.perf.readme; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))},
    )
    assert out.stdout.strip() == "False"
