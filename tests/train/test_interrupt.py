"""A run stopped by Ctrl-C or SIGTERM: the step in flight finishes, a checkpoint is written, one line names
it and the command to resume, the exit status is the shell's for the signal; resumed with that command,
the run ends as an uninterrupted one. A second signal aborts at once and leaves the last checkpoint."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from sparkct.train import checkpoint as C

HERE = os.path.dirname(os.path.abspath(__file__))

# `sparkct pretrain tiny ...` in a fresh process (the test method registered); sys.argv as the command sets it
CLI = """
import sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from sparkct import models
models.METHODS['tiny'] = 'tiny_method:Tiny'
{patch}
from sparkct.cli import main
sys.argv = ['sparkct', *{args!r}]
sys.exit(main(sys.argv[1:]))
"""


def cli_args(cache, out):
    return [
        "pretrain",
        "tiny",
        "--data",
        cache,
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--windows",
        "lung",
        "--crop",
        "32",
        "--batch",
        "8",
        "--epochs",
        "3",  # 3 steps an epoch
        "--ckpt-every",
        "3",
        "--log-every",
        "1",
        "--preview-every",
        "0",
        "--tensorboard",
        "false",
        "--progress",
        "false",
        "--device",
        "cpu",
        "--channels-last",
        "false",
    ]


def sparkct(args, env=None, patch=""):
    code = CLI.format(here=HERE, args=list(args), patch=patch)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        preexec_fn=_as_at_a_terminal,
    )


def _as_at_a_terminal() -> None:
    """SIGINT as a command typed at a terminal gets it: a shell starts background jobs (``cmd &``, which
    is how CI may run the tests) with SIGINT ignored, and children inherit that; the trainer leaves an
    ignored signal ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rows(path):
    with open(path, newline="") as f:  # images_per_s is a wall-clock speed: everything else must match
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(f)]


def assert_same_run(a, b):
    sa, sb = C.load_checkpoint(str(a)), C.load_checkpoint(str(b))
    assert sa["step"] == sb["step"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert rows(a / "metrics.csv") == rows(b / "metrics.csv")


@pytest.fixture(scope="module")
def reference(small_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupt") / "ref"
    r = sparkct(cli_args(small_cache, out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow  # three processes (~15 s each to import torch on a loaded 2-core machine)
def test_ctrl_c_saves_the_step_and_names_the_command_that_resumes(small_cache, reference, tmp_path):
    run = tmp_path / "run"
    r = sparkct(cli_args(small_cache, run), env={"TINY_SIGNAL_AT": "5:SIGINT"})  # during step 5 of 9
    assert r.returncode == 130, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"stopped by SIGINT at step 5 of 9; checkpoint {run / 'last.ckpt'}; resume with: sparkct pretrain" in last
    assert C.load_checkpoint(str(run))["step"] == 5  # not the periodic one of step 3
    assert [int(x["step"]) for x in rows(run / "metrics.csv")] == [1, 2, 3, 4, 5]
    cmd = shlex.split(last.split("resume with: ", 1)[1])
    assert cmd[0] == "sparkct" and cmd[-1] == "--resume" and cmd[1:-1] == cli_args(small_cache, run)
    r = sparkct(cmd[1:])
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr and "at step 5 of 9" in r.stderr
    assert_same_run(reference, run)


def test_sigterm_at_an_epochs_end_exits_143_after_the_epochs_checkpoint(small_cache, tmp_path):
    run = tmp_path / "run"  # step 3 ends epoch 1: its checkpoint (written after on_epoch_end) is the stop's
    r = sparkct(cli_args(small_cache, run), env={"TINY_SIGNAL_AT": "3:SIGTERM"})
    assert r.returncode == 143, r.stderr
    assert "stopped by SIGTERM at step 3 of 9" in r.stderr.strip().splitlines()[-1]
    st = C.load_checkpoint(str(run))
    assert (st["step"], st["epoch"], st["batch_in_epoch"]) == (3, 1, 0)


def test_a_second_ctrl_c_while_saving_aborts_and_keeps_the_last_checkpoint(small_cache, tmp_path):
    # the first Ctrl-C during step 4; the second lands in the middle of writing step 4's checkpoint
    patch = """
import os, signal, torch
from sparkct.train import checkpoint as C
_save = torch.save
def save(obj, f, *a, **k):
    if 'step-0000004' in str(f):
        with open(f, 'wb') as fh:
            fh.write(b'half a checkpoint')
        os.kill(os.getpid(), signal.SIGINT)
    return _save(obj, f, *a, **k)
C.torch.save = save
"""
    run = tmp_path / "run"
    r = sparkct(cli_args(small_cache, run), env={"TINY_SIGNAL_AT": "4:SIGINT"}, patch=patch)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("interrupted")
    assert C.load_checkpoint(str(run))["step"] == 3
    assert sorted(os.listdir(run / "checkpoints")) == ["step-0000003.ckpt"]  # no temporary left


def test_ignored_signals_stay_ignored_and_handlers_come_back(small_cache, tmp_path):
    import signal

    from sparkct.train.signals import StopSignals

    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (see _as_at_a_terminal)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopSignals(announce=False) as s:
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == s._handle
            os.kill(os.getpid(), signal.SIGINT)
            assert s.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, old)


def test_resume_command_reads_as_sparkct():
    from sparkct.train.signals import resume_command

    assert resume_command(["/usr/bin/sparkct", "pretrain", "spark", "--out", "a b"]) == (
        "sparkct pretrain spark --out 'a b' --resume"
    )
    main = os.path.join("x", "sparkct", "__main__.py")
    assert resume_command([main, "finetune", "--resume"]) == "sparkct finetune --resume"
    assert resume_command([main, "experiment", "--out", "e"], flag=None) == "sparkct experiment --out e"


DDP_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from sparkct import models
models.METHODS['tiny'] = 'tiny_method:Tiny'
from sparkct.errors import TrainingInterrupted
from test_trainer import train
try:
    train({cache!r}, {out!r}, epochs=3, preview_every=0)
except TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(e.status)
"""


def test_under_ddp_a_signal_to_one_rank_stops_all_at_the_same_step(small_cache, tmp_path):
    from test_ddp import _free_port

    out = tmp_path / "run"
    code = DDP_SCRIPT.format(here=HERE, cache=small_cache, out=str(out))
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={
                **os.environ,
                **dict(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                "OMP_NUM_THREADS": "1",
                "TINY_SIGNAL_AT": "2:SIGTERM:1",  # rank 1 alone gets it, during step 2
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], errs
    assert all("stopped by SIGTERM at step 2 of " in e for e in errs), errs
    assert C.load_checkpoint(str(out))["step"] == 2
