"""The layer contracts (pyproject.toml [tool.importlinter], run by `lint-imports`): the package keeps
them, and a copy of it with one import the wrong way breaks the contract that names that import, at
module level or inside a function (grimp reads both: a lazy import is no way around a layer)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the contracts' names, as pyproject.toml gives them
LAYERS = "Layers run one way: cli, eval, train, models, nn, ops, data, leaves"
NO_DATA = "ops and nn know no data"
DATA = "data knows no models, training or evaluation"
MODELS = "A method knows no trainer (models know no train)"
TRAIN = "Training knows no evaluation (train knows no eval)"
PERF = "perf sits beside: it knows no training, models, evaluation or the cli"
NO_PERF = "The library layers know no perf"


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not os.path.isfile(exe):
        pytest.skip("lint-imports (import-linter, in the dev extra) is not installed")
    return exe


def _copy_package(dst: Path) -> None:
    """sparkct's .py files and pyproject.toml: enough for import-linter, which only reads the source."""
    for src in (ROOT / "sparkct").rglob("*.py"):
        out = dst / src.relative_to(ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    shutil.copyfile(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _run(root: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    r = subprocess.run(
        [_lint_imports(), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return r.returncode, " ".join((r.stdout + r.stderr).split())  # contract names may wrap


def test_the_package_keeps_its_layers(tmp_path):
    _lint_imports()
    _copy_package(tmp_path)
    code, out = _run(tmp_path)
    assert code == 0, out
    for name in (LAYERS, NO_DATA, DATA, MODELS, TRAIN, PERF, NO_PERF):
        assert f"{name} KEPT" in out, out
    assert "0 broken" in out


@pytest.mark.parametrize(
    "module,line,broken",
    [
        # a method that imports the trainer: against the layers and against "models know no train"
        ("models/ssl.py", "import sparkct.train.trainer", [LAYERS, MODELS]),
        # the same inside a function
        ("models/base.py", "def _late():\n    import sparkct.train.trainer", [LAYERS, MODELS]),
        ("ops/sparse.py", "import sparkct.models", [LAYERS]),
        ("nn/heads.py", "from sparkct.data import augment", [NO_DATA]),
        ("data/labels.py", "def _late():\n    from sparkct.models import ssl", [LAYERS, DATA]),
        ("train/optim.py", "import sparkct.eval.metrics", [LAYERS, TRAIN]),
        ("perf/report.py", "import sparkct.train.trainer", [PERF]),
        ("eval/metrics.py", "import sparkct.perf.report", [NO_PERF]),
        ("io.py", "import sparkct.profiling", [LAYERS]),  # the leaves are independent of one another
    ],
)
def test_a_broken_layer_fails(tmp_path, module, line, broken):
    _lint_imports()
    _copy_package(tmp_path)
    path = tmp_path / "sparkct" / module
    path.write_text(path.read_text() + f"\n\n{line}  # noqa\n")
    code, out = _run(tmp_path)
    assert code != 0, out
    for name in broken:
        assert f"{name} BROKEN" in out, out
    for name in {LAYERS, NO_DATA, DATA, MODELS, TRAIN, PERF, NO_PERF} - set(broken):
        assert f"{name} KEPT" in out, out
