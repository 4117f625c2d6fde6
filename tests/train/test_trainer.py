"""The trainer: loss falls, resume after SIGKILL is bit-identical, NaN stops with the last good
checkpoint kept, checkpoints never unpickle code, a changed config is refused on resume, the export loads
strictly into torchvision, previews and metrics are written."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sparkct.errors import TrainingDiverged, UserError
from sparkct.train import checkpoint as C
from sparkct.train.config import TrainConfig
from sparkct.train.runlock import RunLock
from sparkct.train.trainer import Trainer, build_method

HERE = os.path.dirname(os.path.abspath(__file__))


def cfg_for(cache, out, **kw):
    base = dict(
        data=cache,
        out=str(out),
        arch="resnet18",
        windows="lung",
        crop=32,
        batch=8,
        epochs=2,
        ckpt_every=3,
        keep=2,
        log_every=1,
        preview_every=4,
        tensorboard=False,
        progress=False,
        device="cpu",
        channels_last=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def train(cache, out, method_kw=None, resume=False, force=False, **kw):
    from tiny_method import TinyConfig

    cfg = cfg_for(cache, out, **kw)
    m = build_method("tiny", cfg, TinyConfig(**(method_kw or {})))
    return Trainer(m, cfg, method_name="tiny", resume=resume, force=force).fit()


def test_loss_falls_and_run_folder_is_complete(small_cache, tmp_path):
    out = tmp_path / "run"
    s = train(small_cache, out, epochs=4)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == s["steps"] and s["steps"] >= 8
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    for f in ("config.json", "summary.json", "last.ckpt", "backbone.pt", "loss.png", "previews/latest.png"):
        assert (out / f).exists(), f
    assert len(list((out / "checkpoints").glob("step-*.ckpt"))) <= 2  # keep-last-k
    rec = json.load(open(out / "config.json"))
    assert rec["method"] == "tiny" and rec["resolved"]["optimizer"] == "adamw"


def test_export_loads_strictly_into_torchvision(small_cache, tmp_path):
    import torchvision

    out = tmp_path / "run"
    train(small_cache, out, max_steps=2, windows="lung,mediastinum,bone")
    from sparkct.cli import main

    assert main(["export", str(out), "--out", str(tmp_path / "b.pt")]) == 0
    sd = torch.load(tmp_path / "b.pt", weights_only=True)
    m = torchvision.models.resnet18()
    m.fc = torch.nn.Identity()
    m.load_state_dict(sd, strict=True)
    ck = C.load_checkpoint(str(out))
    assert torch.equal(sd["conv1.weight"], ck["model"]["backbone.conv1.weight"])


def _run_script(cache, out, die_at=-1):
    code = f"""
import sys; sys.path.insert(0, {HERE!r})
from sparkct import models; models.METHODS['tiny'] = 'tiny_method:Tiny'
from test_trainer import train
train({cache!r}, {str(out)!r}, resume={die_at < 0 and (out / "last.ckpt").exists()!r})
"""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2", "TINY_DIE_AT": str(die_at)},
    )


def test_resume_after_sigkill_is_bit_identical(small_cache, tmp_path):
    ref = tmp_path / "ref"
    r = _run_script(small_cache, ref)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = _run_script(small_cache, run, die_at=5)  # killed after step 5; last checkpoint at step 3
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert C.load_checkpoint(str(run))["step"] == 3
    r = _run_script(small_cache, run)  # resumes from step 3
    assert r.returncode == 0, r.stderr
    a, b = C.load_checkpoint(str(ref)), C.load_checkpoint(str(run))
    assert a["step"] == b["step"] > 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
    la = [r["loss"] for r in csv.DictReader(open(ref / "metrics.csv"))]
    lb = [r["loss"] for r in csv.DictReader(open(run / "metrics.csv"))]
    assert la == lb  # the resumed run's log has no duplicated or missing steps


def test_nan_stops_and_keeps_the_last_good_checkpoint(small_cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="at step 4"):
        train(small_cache, out, method_kw={"nan_at": 4})
    st = C.load_checkpoint(str(out))
    assert st["step"] == 3
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


def test_existing_run_needs_resume_and_same_config(small_cache, tmp_path):
    out = tmp_path / "run"
    train(small_cache, out, max_steps=3)
    with pytest.raises(UserError, match="already holds a run"):
        train(small_cache, out, max_steps=3)
    with pytest.raises(UserError, match=r"another config \(crop 32 -> 64"):
        train(small_cache, out, max_steps=3, crop=64, resume=True)
    s = train(small_cache, out, max_steps=4, resume=True, force=True)
    assert s["steps"] == 4


def test_checkpoint_loading_refuses_code_and_foreign_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.ckpt"
    torch.save({"format": C.FORMAT, "x": Evil()}, bad)
    with pytest.raises(UserError, match="not a loadable sparkct checkpoint"):
        C.load_checkpoint(str(bad))
    assert not (tmp_path / "pwned").exists()
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(UserError, match="not a loadable"):
        C.load_checkpoint(str(junk))
    other = tmp_path / "other.ckpt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="not a sparkct checkpoint"):
        C.load_checkpoint(str(other))
    with pytest.raises(UserError, match="no checkpoint"):
        C.load_checkpoint(str(tmp_path))


def test_bad_config_is_refused_before_any_work(small_cache, tmp_path):
    for kw, msg in [
        ({"crop": 48}, "multiple of 32"),
        ({"arch": "resnet999"}, "unknown arch"),
        ({"batch": 6, "accum": 4}, "divisible"),
        ({"amp": "fp8"}, "--amp"),
        ({"data": str(tmp_path / "missing")}, "no such file"),
    ]:
        with pytest.raises(UserError, match=msg):
            train(small_cache, tmp_path / "x", **kw)
    assert not (tmp_path / "x" / "last.ckpt").exists()


def test_labels_drive_the_online_probe_and_knn_monitors(small_synth, small_cache, tmp_path):
    out = tmp_path / "run"
    train(small_cache, out, epochs=2, labels=os.path.join(small_synth, "slice_labels.csv"), knn_every=1)
    rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert any("probe_acc" in r for r in rows)
    knn = [r for r in rows if "epoch/knn_acc" in r]
    assert len(knn) == 2 and all(0.0 <= r["epoch/knn_acc"] <= 1.0 for r in knn)
    assert C.load_checkpoint(str(out))["probe"]["model"]["linear.weight"].shape[0] == 2


class _Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs (BaseException: no `except Exception` catches it)."""


def _kill_after_save(monkeypatch, at_step):
    """Make the checkpoint of `at_step` the last thing the run does, as a kill right after it would."""
    save = C.save_checkpoint

    def save_then_die(run_dir, state, step, keep):
        path = save(run_dir, state, step, keep)
        if step == at_step:
            raise _Killed(path)
        return path

    monkeypatch.setattr(C, "save_checkpoint", save_then_die)


def _rows(path):
    # images_per_s is a wall-clock speed: everything else must match
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(f)]


@pytest.mark.usefixtures("one_thread")
def test_a_kill_right_after_a_checkpoint_keeps_the_metrics_up_to_it(small_cache, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train(small_cache, ref)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_after_save(m, 3)
        with pytest.raises(_Killed):
            train(small_cache, run)
    assert [int(r["step"]) for r in _rows(run / "metrics.csv")] == [1, 2, 3]
    train(small_cache, run, resume=True)
    assert _rows(run / "metrics.csv") == _rows(ref / "metrics.csv")


def _summary_of_the_run(path):
    with open(path) as f:
        s = json.load(f)
    final = {k: v for k, v in s["final"].items() if k != "images_per_s"}
    return s["steps"], s["first_loss"], final, math.isfinite(s["images_per_s"])


@pytest.mark.usefixtures("one_thread")
def test_resuming_a_finished_run_keeps_its_summary(small_cache, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train(small_cache, ref, max_steps=3)
    want = _summary_of_the_run(ref / "summary.json")
    assert want[1] is not None and want[2] and want[3]
    s = train(small_cache, ref, max_steps=3, resume=True)  # nothing left to do
    assert _summary_of_the_run(ref / "summary.json") == want
    assert s["first_loss"] == want[1]
    run = tmp_path / "run"  # killed after its final checkpoint, before the summary
    with monkeypatch.context() as m:
        _kill_after_save(m, 3)
        with pytest.raises(_Killed):
            train(small_cache, run, max_steps=3)
    assert not (run / "summary.json").exists()
    train(small_cache, run, max_steps=3, resume=True)
    assert _summary_of_the_run(run / "summary.json") == want


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_runs_summary_describes_the_whole_run(small_cache, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train(small_cache, ref, max_steps=4)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_after_save(m, 3)
        with pytest.raises(_Killed):
            train(small_cache, run, max_steps=4)
    train(small_cache, run, max_steps=4, resume=True)
    assert _summary_of_the_run(run / "summary.json") == _summary_of_the_run(ref / "summary.json")


def test_force_resume_into_another_model_or_optimizer_is_one_line(small_cache, tmp_path):
    # --resume --force with another arch, windows or optimizer: size/key tracebacks and KeyError: 'momentum'
    out = tmp_path / "run"
    train(small_cache, out, max_steps=1)
    for kw, msg in [
        ({"windows": "lung,bone"}, r"shape mismatch 3 \(backbone\.conv1\.weight \(64, 1, 7, 7\) vs \(64, 2, 7, 7\)"),
        ({"arch": "resnet34"}, r"missing 96 \(backbone\.layer1\.2\.conv1\.weight"),
        ({"optimizer": "sgd"}, r"optimizer state does not fit this run's optimizer \(group 0 has other settings"),
    ]:
        with pytest.raises(UserError, match=msg) as e:
            train(small_cache, out, max_steps=2, resume=True, force=True, **kw)
        assert "\n" not in str(e.value)
    assert C.load_checkpoint(str(out))["step"] == 1  # nothing was written


@pytest.mark.parametrize(
    "change,msg",
    [
        (lambda st: st.pop("config"), r"damaged sparkct checkpoint \(no valid config\)"),
        (lambda st: st.update(config="{not json"), r"its config is not a JSON object"),
        (lambda st: st.update(config="[1, 2]"), r"its config is not a JSON object"),
        (lambda st: st.pop("model"), r"no valid model\)"),
        (lambda st: (st.pop("step"), st.pop("rng")), r"no valid step, rng\)"),
    ],
)
def test_crafted_checkpoints_are_refused_naming_the_file(small_cache, tmp_path, change, msg):
    # KeyError: 'config' and JSONDecodeError before
    out = tmp_path / "run"
    train(small_cache, out, max_steps=1)
    st = torch.load(out / "last.ckpt", weights_only=True)
    change(st)
    bad = tmp_path / "crafted.ckpt"
    torch.save(st, bad)
    with pytest.raises(UserError, match="crafted.ckpt: .*" + msg):
        C.load_checkpoint(str(bad))
    with pytest.raises(UserError, match="crafted.ckpt: "):
        train(small_cache, tmp_path / "new", max_steps=2, resume=str(bad))


def _hold_lock(out):
    """Another process holding the run folder's lock, as sparkct.train.runlock does (spelled out: the tests
    also run against code without it); closing its stdin ends it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, json, os, socket, sys; os.makedirs({str(out)!r}, exist_ok=True); "
            f"f = open(os.path.join({str(out)!r}, '.lock'), 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "json.dump({'pid': os.getpid(), 'host': socket.gethostname()}, f); f.flush(); "
            "print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_on_the_same_out_is_refused_naming_the_holder(small_cache, tmp_path):
    # two processes trained into one --out at once: config.json of one run, checkpoints of the other
    import socket

    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        with pytest.raises(
            UserError, match=rf"in use by another run \(pid {holder.pid} on host {socket.gethostname()}\)"
        ):
            train(small_cache, out, max_steps=1)
        assert not (out / "config.json").exists() and C.find_latest(str(out)) is None
    finally:
        holder.stdin.close()  # the holder exits: the system releases its lock
        holder.wait(timeout=60)
    assert train(small_cache, out, max_steps=1)["steps"] == 1
    assert json.load(open(out / ".lock"))["pid"] == os.getpid()
    # two fresh runs started at once: the folder appears between one's setup and its data preparation
    from tiny_method import TinyConfig

    cfg = cfg_for(small_cache, tmp_path / "new", max_steps=1)
    t = Trainer(build_method("tiny", cfg, TinyConfig()), cfg, method_name="tiny")
    t.setup()
    holder = _hold_lock(tmp_path / "new")
    try:
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid} "):
            t.build_data()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_the_run_lock_is_taken_once_per_run(small_cache, tmp_path, monkeypatch):
    """setup takes it for a folder that exists, build_data for a new one (setup writes nothing)."""
    from sparkct.train import trainer as T

    from tiny_method import TinyConfig

    taken = []
    monkeypatch.setattr(T, "RunLock", lambda d: taken.append(d) or RunLock(d))
    (tmp_path / "existing").mkdir()
    for name, by_setup in (("new", []), ("existing", [str(tmp_path / "existing")])):
        cfg = cfg_for(small_cache, tmp_path / name, max_steps=1)
        t = Trainer(build_method("tiny", cfg, TinyConfig()), cfg, method_name="tiny")
        taken.clear()
        t.setup()
        assert taken == by_setup
        t.build_data()
        assert taken == [str(tmp_path / name)]
        t.release()


def test_run_lock_is_reentrant_in_a_process_and_released(tmp_path):
    import fcntl

    a = RunLock(str(tmp_path))
    b = RunLock(str(tmp_path))  # a trainer that raised may still hold it when this process runs again
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        a.release()
        a.release()  # idempotent: b still holds it
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        del b  # collected: released
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_resuming_on_other_data_needs_force_and_a_moved_cache_resumes(small_cache, tmp_path, capsys):
    # resumed on a cache of other slices, the loss changed with no word
    import shutil

    from sparkct.data import prepare
    from sparkct.data.synthetic import synth

    other = tmp_path / "other-cache"
    synth(str(tmp_path / "src"), patients=2, seed=9, size=64, slices=8, series_per_patient=(1, 1), localizer=False)
    prepare(str(tmp_path / "src"), str(other), progress=False)
    out = tmp_path / "run"
    train(small_cache, out, max_steps=2)
    with pytest.raises(UserError, match=r"trained on other data \(24 slices of .*; now 16 slices of .*other-cache\)"):
        train(str(other), out, max_steps=2, resume=True)
    moved = tmp_path / "moved-cache"
    shutil.copytree(small_cache, moved)
    assert train(str(moved), out, max_steps=2, resume=True)["steps"] == 2  # a finished run: nothing to do
    capsys.readouterr()
    assert train(str(other), out, max_steps=2, resume=True, force=True)["steps"] == 2
    assert "resuming on other data (--force)" in capsys.readouterr().err


def test_fit_lets_go_of_the_lock_when_it_ends(small_cache, tmp_path):
    """A finished or failed run does not keep its folder locked while its trainer lives on (a notebook,
    a traceback holding it)."""
    import fcntl

    from tiny_method import TinyConfig

    def free(out) -> bool:
        fd = os.open(out / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    cfg = cfg_for(small_cache, tmp_path / "done", max_steps=1)
    t = Trainer(build_method("tiny", cfg, TinyConfig()), cfg, method_name="tiny")
    t.fit()
    assert free(tmp_path / "done")
    cfg = cfg_for(small_cache, tmp_path / "nan", max_steps=2)
    t = Trainer(build_method("tiny", cfg, TinyConfig(nan_at=1)), cfg, method_name="tiny")
    with pytest.raises(TrainingDiverged):
        t.fit()
    assert free(tmp_path / "nan")
