"""A full disk: a checkpoint or metrics write that runs out of space ends the run with one line naming the
disk, the file and the checkpoint that is still intact (its temporary removed); loss.png and previews are
skipped with a warning instead (they are for looking at; the next checkpoint reports a disk still full)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sparkct import io as sio
from sparkct.errors import UserError
from sparkct.train import checkpoint as C
from sparkct.train import trainer as T

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.usefixtures("one_thread")

# what torch.save's zip writer raises when the disk fills up under it
TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 11200 vs 11088"


def _train(cache, out, **kw):
    from test_trainer import train

    return train(cache, out, **dict(dict(preview_every=0), **kw))


def _no_temporaries(run):
    left = [f for d, _, fs in os.walk(run) for f in fs if f.endswith(".tmp")]
    assert left == []


def test_a_checkpoint_that_fills_the_disk_is_one_line_and_keeps_the_last(small_cache, tmp_path, monkeypatch):
    real = torch.save

    def save(obj, f, *a, **k):
        if "step-0000006" in str(f):  # half written, then the disk is full
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04" * 1000)
            raise RuntimeError(TORCH_ENOSPC)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(C.torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        _train(small_cache, run, epochs=3)
    fs = sio.filesystem_of(str(run))
    assert str(e.value) == (
        f"no space left on {fs} while writing {run / 'checkpoints' / 'step-0000006.ckpt'}; "
        "the last checkpoint (step 3) is intact"
    )
    monkeypatch.undo()
    assert C.load_checkpoint(str(run))["step"] == 3
    assert sorted(os.listdir(run / "checkpoints")) == ["step-0000003.ckpt"]
    _no_temporaries(run)


def test_metrics_that_fill_the_disk_before_any_checkpoint(small_cache, tmp_path, monkeypatch):
    real = sio.write_bytes_atomic

    def write(path, data):
        if path.endswith("metrics.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(sio, "write_bytes_atomic", write)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"while writing .*metrics\.csv; no checkpoint was written yet$"):
        _train(small_cache, run, epochs=3)
    assert not (run / "last.ckpt").exists()


def test_a_full_disk_under_loss_png_and_previews_does_not_stop_the_run(small_cache, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "plot_curves", full)
    monkeypatch.setattr(T, "save_preview", full)
    logged: list[str] = []
    from test_trainer import cfg_for
    from tiny_method import TinyConfig

    cfg = cfg_for(small_cache, tmp_path / "run", epochs=2, preview_every=2)
    s = T.Trainer(T.build_method("tiny", cfg, TinyConfig()), cfg, method_name="tiny", log=logged.append).fit()
    assert s["steps"] == 6 and (tmp_path / "run" / "summary.json").exists()
    warned = [x for x in logged if x.startswith("warning: no space left")]
    assert any(x.endswith("loss.png not written") for x in warned), logged
    assert any("step-0000002.png not written" in x for x in warned), logged


def test_the_cli_prints_the_full_disk_as_one_line_with_status_2(small_cache, tmp_path, monkeypatch, capsys):
    from test_interrupt import cli_args

    from sparkct.cli import main

    def save(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.torch, "save", save)
    run = tmp_path / "run"
    assert main(cli_args(small_cache, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sparkct pretrain tiny: error: no space left on ")
    assert err[-1].endswith("step-0000003.ckpt; no checkpoint was written yet")
    assert not any("Traceback" in x for x in err)


SMALL_FS = """
import json, os, sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from sparkct import models
models.METHODS['tiny'] = 'tiny_method:Tiny'
from sparkct.cli import main
from sparkct.train import checkpoint as C
from test_interrupt import cli_args
status = main(cli_args({cache!r}, {run!r}))
print(json.dumps({{
    "status": status,
    "step": C.load_checkpoint({run!r})["step"],
    "files": sorted(os.listdir(os.path.join({run!r}, "checkpoints"))),
    "tmp": [f for d, _, fs in os.walk({run!r}) for f in fs if f.endswith(".tmp")],
}}))
"""


def _can_mount_tmpfs(d) -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    cmd = f"mount -t tmpfs -o size=1m tmpfs {d}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True).returncode == 0


def test_a_genuinely_full_filesystem(small_cache, tmp_path):
    """A tmpfs made in a user + mount namespace (no root needed where the kernel allows them), sized to
    hold one checkpoint and metrics but not two checkpoints."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a small tmpfs here (no unprivileged user namespaces): injection only")
    ref = tmp_path / "ref"  # how big a checkpoint is
    _train(small_cache, ref, max_steps=1)
    size = os.path.getsize(ref / "last.ckpt")
    run = str(mnt / "run")
    code = SMALL_FS.format(here=HERE, cache=small_cache, run=run)
    sh = f'mount -t tmpfs -o size={int(size * 1.6)} tmpfs {mnt} && exec {sys.executable} -c "$0"'
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", sh, code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"status": 2, "step": 3, "files": ["step-0000003.ckpt"], "tmp": []}, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"sparkct pretrain tiny: error: no space left on {mnt} while writing "
        f"{os.path.join(run, 'checkpoints', 'step-0000006.ckpt')}; the last checkpoint (step 3) is intact"
    )
