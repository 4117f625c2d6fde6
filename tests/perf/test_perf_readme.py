"""sparkct.perf.readme: the benchmark blocks of docs/benchmarks.md are what the stored baselines generate."""

from __future__ import annotations

import os
import shutil

import pytest

from sparkct.errors import UserError
from sparkct.perf import readme as R

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURE = os.path.join(HERE, "baseline_fixture.json")

DOC = """# title

<!-- bench:begin cpu-fixture kernels/bench_info_nce/* -->
typed by hand
<!-- bench:end -->

prose in between stays

<!-- bench:begin cpu-fixture roofline -->
<!-- bench:end -->
<!-- bench:begin cpu-fixture data/* -->
<!-- bench:end -->
<!-- bench:begin cuda-later -->
<!-- bench:end -->
"""


def test_docs_match_the_stored_baselines():
    """docs/benchmarks.md's blocks equal what benchmarks/baselines/*.json generate (placeholders where a
    runner's baseline is not stored yet), and every stored baseline is shown by a block.
    Fix: python -m sparkct.perf.readme"""
    doc, baselines = os.path.join(ROOT, "docs", "benchmarks.md"), os.path.join(ROOT, "benchmarks", "baselines")
    assert R.DOC == doc
    diff = R.check(doc, baselines)
    assert diff == "", "docs/benchmarks.md's benchmark blocks drifted; run python -m sparkct.perf.readme\n" + diff
    with open(doc, encoding="utf-8") as f:
        assert R.unshown(f.read(), baselines) == []


@pytest.fixture
def repo(tmp_path):
    bl = tmp_path / "benchmarks" / "baselines"
    bl.mkdir(parents=True)
    shutil.copy(FIXTURE, bl / "cpu-fixture.json")
    (tmp_path / "README.md").write_text(DOC)
    return tmp_path


def test_render_fills_blocks_and_check_catches_drift(repo):
    readme, bl = str(repo / "README.md"), str(repo / "benchmarks" / "baselines")
    assert R.check(readme, bl) != ""
    assert R.main(["--readme", readme, "--baselines", bl]) == 0
    text = (repo / "README.md").read_text()
    assert "typed by hand" not in text and "prose in between stays" in text
    assert "`benchmarks/baselines/cpu-fixture.json` (quick run of 2030-01-01: cpu-fixture, Test CPU (2 cores)" in text
    # info_nce block: its two cases, figures, ratios and roofline fractions; no other family's
    assert (
        "| fp32-2N8192-D128-fwd+bwd-fused | 0.400 | ±2% | 6.30 | 25.0 | 0.250 | 1.25 | 0.00810 | 100 | 50% | 50% |"
        in text
    )
    assert (
        "| case | median s | ±½IQR | peak MiB | GFLOP/s | GB/s | × naive | mem vs naive | FLOP/byte | of roof | of peak |"  # noqa: E501 (the row as rendered)
        in text
    )
    assert "| default-augment | 0.0160 | ±3% | — | 4,000 |" in text
    assert text.count("sparse-0.6") == 1  # only in the roofline table
    assert "![roofline of cpu-fixture](img/roofline-cpu-fixture.png)" in text  # in the page's folder
    assert (repo / "img" / "roofline-cpu-fixture.png").is_file()
    assert "`benchmarks/baselines/cuda-later.json` once a cuda-later baseline is stored there" in text
    assert R.check(readme, bl) == ""
    assert R.main(["--readme", readme, "--baselines", bl, "--check"]) == 0
    # a hand edit inside a block, a changed baseline, a deleted plot: each is drift
    (repo / "README.md").write_text(text.replace("| 25.0 |", "| 26.0 |"))
    assert "-| fp32-2N8192-D128-fwd+bwd-fused" in R.check(readme, bl)
    assert R.main(["--readme", readme, "--baselines", bl, "--check"]) == 1
    (repo / "README.md").write_text(text)
    os.remove(repo / "img" / "roofline-cpu-fixture.png")
    assert "missing img/roofline-cpu-fixture.png" in R.check(readme, bl)


def test_unpaired_markers_are_refused(repo):
    bl = str(repo / "benchmarks" / "baselines")
    with pytest.raises(UserError, match="pair up"):
        R.render(DOC + "<!-- bench:begin cpu-fixture -->\n", bl)
    with pytest.raises(UserError, match="pair up"):
        R.render(DOC + "<!-- bench:end -->\n", bl)
    assert R.unshown("no blocks", bl) == ["cpu-fixture"]
