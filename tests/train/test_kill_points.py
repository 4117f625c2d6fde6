"""A run SIGKILLed at the exact points where a kill could lose or mix work, and resumed each time, ends
with the metrics log, summary, checkpoint and backbone of an uninterrupted run: right after a checkpoint,
in the middle of a checkpoint write, of a metrics write, between a checkpoint and its last.ckpt link,
after the final checkpoint (before the summary), and in the middle of the summary write."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_interrupt import cli_args, rows, sparkct

from sparkct.train import checkpoint as C

# each kill: Python run in the training process before `sparkct` starts (os, signal imported)
_KILL = "import os, signal, torch\nfrom sparkct import io as sio\nfrom sparkct.train import checkpoint as C\n"
KILLS = {
    "right after the checkpoint of step 3": """
_f = C.save_checkpoint
def f(run_dir, state, step, keep):
    p = _f(run_dir, state, step, keep)
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return p
C.save_checkpoint = f
""",
    "while writing the checkpoint of step 6": """
_f = torch.save
def f(obj, p, *a, **k):
    if 'step-0000006' in str(p):
        with open(p, 'wb') as fh:
            fh.write(b'PK' * 5000)
        os.kill(os.getpid(), signal.SIGKILL)
    return _f(obj, p, *a, **k)
C.torch.save = f
""",
    "while writing metrics.csv": """
_f = sio.write_bytes_atomic
def f(path, data):
    if path.endswith('metrics.csv'):
        with sio.atomic_path(path) as t:
            with open(t, 'wb') as fh:
                fh.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return _f(path, data)
sio.write_bytes_atomic = f
""",
    "between the checkpoint of step 6 and its last.ckpt link": """
_f = C.link_atomic
def f(src, dst):
    if dst.endswith('last.ckpt') and 'step-0000006' in src:
        os.kill(os.getpid(), signal.SIGKILL)
    return _f(src, dst)
C.link_atomic = f
""",
    "right after the final checkpoint, before the summary": """
_f = C.save_checkpoint
def f(run_dir, state, step, keep):
    p = _f(run_dir, state, step, keep)
    if step == 9:
        os.kill(os.getpid(), signal.SIGKILL)
    return p
C.save_checkpoint = f
""",
    "while writing summary.json": """
_f = sio.write_bytes_atomic
def f(path, data):
    if path.endswith('summary.json'):
        with sio.atomic_path(path) as t:
            with open(t, 'wb') as fh:
                fh.write(data[:10])
            os.kill(os.getpid(), signal.SIGKILL)
    return _f(path, data)
sio.write_bytes_atomic = f
""",
}


def _summary(path):
    with open(path) as f:
        s = json.load(f)
    # wall-clock fields, and paths that name the run folder
    for k in ("seconds", "images_per_s", "run_dir", "checkpoint", "backbone"):
        s.pop(k)
    s["final"].pop("images_per_s")
    return s


def _jsonl(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(ln).items() if k != "images_per_s"} for ln in f if ln.strip()]


@pytest.mark.slow  # eight processes (~15 s each to import torch on a loaded 2-core machine)
def test_killed_at_every_point_and_resumed_equals_an_uninterrupted_run(small_cache, tmp_path):
    ref = tmp_path / "ref"
    r = sparkct(cli_args(small_cache, ref))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    for i, (where, patch) in enumerate(KILLS.items()):
        args = cli_args(small_cache, run) + (["--resume"] if i else [])
        r = sparkct(args, patch=_KILL + patch)
        assert r.returncode == -9, (where, r.returncode, r.stderr)
        assert not (run / "summary.json").exists(), where
        # the log on disk holds every row up to the checkpoint that a resume starts from
        step = C.load_checkpoint(str(run))["step"]
        assert [int(x["step"]) for x in rows(run / "metrics.csv")][:step] == list(range(1, step + 1)), where
    r = sparkct(cli_args(small_cache, run) + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert rows(run / "metrics.csv") == rows(ref / "metrics.csv")
    assert _jsonl(run / "metrics.jsonl") == _jsonl(ref / "metrics.jsonl")
    assert _summary(run / "summary.json") == _summary(ref / "summary.json")
    a, b = C.load_checkpoint(str(ref)), C.load_checkpoint(str(run))
    assert a["step"] == b["step"] == 9
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ba, bb = (torch.load(p / "backbone.pt", weights_only=True) for p in (ref, run))
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert not [f for d, _, fs in os.walk(run) for f in fs if f.endswith(".tmp")]  # the partial files removed
