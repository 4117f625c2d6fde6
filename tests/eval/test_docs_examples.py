"""docs/experiment.md's `sparkct finetune` and `sparkct eval probe` examples run as written after the
built-in experiment: they parse with the CLI, and each runs/experiment/... path they name is one that
`sparkct experiment` without --data makes (its labelled task, its pretraining run)."""

from __future__ import annotations

import glob
import pathlib
import re
import shlex

import pytest

from sparkct.cli import build_parser
from sparkct.eval import experiment as exp_mod
from sparkct.eval.config import ExperimentConfig

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "experiment.md"
BUILTIN = "runs/experiment/"


def doc_commands(text: str, prefix: str) -> list[list[str]]:
    """The commands of the ```bash blocks in `text` that start with `prefix`, continuation lines joined,
    comments dropped, split as a shell splits them (globs left as written)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if " ".join(argv).startswith(prefix):
                out.append(argv)
    return out


def builtin_examples() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    cmds = doc_commands(text, "sparkct finetune") + doc_commands(text, "sparkct eval probe")
    return [c for c in cmds if any(a.startswith(BUILTIN) for a in c)]


def test_doc_commands_joins_lines_and_drops_comments():
    text = "```bash\nsparkct a --x 1 \\\n    --y 'b c'   # why\nother\n```\n"
    assert doc_commands(text, "sparkct a") == [["sparkct", "a", "--x", "1", "--y", "b c"]]


def test_the_examples_parse():
    cmds = builtin_examples()
    assert {tuple(c[1:3]) for c in cmds} == {("finetune", "--init"), ("eval", "probe")}, cmds
    for argv in cmds:
        build_parser().parse_args(argv[1:])


class _Stop(BaseException):  # not an Exception: the experiment reports those as a failed method
    pass


def test_the_examples_name_the_builtin_experiments_folders(tmp_path, monkeypatch):
    def trainer(method, cfg, **kw):  # the pretraining run's folder, then stop: no training
        pathlib.Path(cfg.out).mkdir(parents=True)
        raise _Stop

    monkeypatch.setattr(exp_mod, "Trainer", trainer)
    monkeypatch.setattr(exp_mod, "check_test_set", lambda task: None)  # a tiny test split is fine here
    monkeypatch.chdir(tmp_path)
    cfg = ExperimentConfig(
        methods="random,spark", synth_patients=12, pretrain_patients=2, synth_size=64, synth_slices=6, device="cpu"
    )
    assert cfg.out + "/" == BUILTIN
    with pytest.raises(_Stop):
        exp_mod.run_experiment(cfg, log=lambda s: None)
    paths = {a for argv in builtin_examples() for a in argv if a.startswith(BUILTIN)}
    assert any("/pretrain/" in p for p in paths) and any(p.endswith(".csv") for p in paths)
    for p in paths:
        assert len(glob.glob(p)) == 1, p
