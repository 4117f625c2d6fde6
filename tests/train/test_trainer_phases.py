"""The trainer's phases on their own: setup refuses an existing run folder without --resume, save and a
fresh trainer's restore give back step, weights, optimizer and RNG, optimizer_step accumulates, clips and
advances the step, a NaN loss stops before the optimizer, and the data is resolved by sparkct.data."""

from __future__ import annotations

import pytest
import torch

from sparkct.data import resolve_data
from sparkct.errors import TrainingDiverged, UserError
from sparkct.train import checkpoint as C
from sparkct.train.trainer import StepResult, Trainer, build_method

from test_trainer import cfg_for

pytestmark = pytest.mark.usefixtures("one_thread")


def make(cache, out, method_kw=None, resume=False, log=lambda msg: None, **kw) -> Trainer:
    from tiny_method import TinyConfig

    cfg = cfg_for(cache, out, **kw)
    return Trainer(
        build_method("tiny", cfg, TinyConfig(**(method_kw or {}))), cfg, method_name="tiny", resume=resume, log=log
    )


def started(t: Trainer) -> Trainer:
    """A trainer through the phases fit runs before its first epoch, its loader at epoch 0."""
    state = t.setup()
    t.build_data()
    t.build_optimization()
    t.restore(state)
    t.open_run()
    t.loader.set_epoch(0, 0)
    return t


class Counting:
    """An iterator that counts the batches taken from it."""

    def __init__(self, it):
        self.it, self.n = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        return next(self.it)


def test_setup_refuses_an_existing_run_and_resume_needs_a_checkpoint(small_cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no checkpoint"):
        make(small_cache, out, resume=True).setup()
    t = started(make(small_cache, out))
    t.save()
    with pytest.raises(UserError, match="already holds a run"):
        make(small_cache, out).setup()
    state = make(small_cache, out, resume=True).setup()
    assert state is not None and state["step"] == 0
    with pytest.raises(UserError, match="another config"):
        make(small_cache, out, resume=True, lr=1e-3).setup()


def test_setup_chooses_device_and_amp_and_checks_the_batch(small_cache, tmp_path):
    t = make(small_cache, tmp_path / "run")
    assert t.setup() is None
    assert (t.device.type, t.amp, t.world, t.main) == ("cpu", "none", 1, True)
    with pytest.raises(UserError, match="divisible"):
        make(small_cache, tmp_path / "run", batch=6, accum=4).setup()
    assert not (tmp_path / "run").exists()  # setup writes nothing


def test_save_then_a_fresh_trainer_restores_step_weights_optimizer_and_rng(small_cache, tmp_path):
    out = tmp_path / "run"
    a = started(make(small_cache, out))
    batches = iter(a.loader)
    for _ in range(2):
        a.optimizer_step(batches, epoch=0)
    a.run.logs = {"loss": 1.5}
    rng = torch.get_rng_state()
    path = a.save()
    assert a.run.last_saved == 2 and path is not None
    st = C.load_checkpoint(path)
    assert (st["step"], st["epoch"], st["batch_in_epoch"]) == (2, *divmod(2, a.steps_per_epoch))
    assert st["metrics"] == {"loss": 1.5} and st["best"] is None and st["scaler"] == {} and st["probe"] == {}

    torch.manual_seed(123)  # restore must bring the saved RNG back
    b = make(small_cache, out, resume=True)
    state = b.setup()
    b.build_data()
    b.build_optimization()
    b.restore(state)
    assert (b.run.step, b.run.last_saved, b.run.best) == (2, 2, None)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in a.method.state_dict().items():
        assert torch.equal(v, b.method.state_dict()[k]), k
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


def test_optimizer_step_accumulates_clips_and_advances_the_step(small_cache, tmp_path):
    t = started(make(small_cache, tmp_path / "run", batch=8, accum=2, clip_grad=1e-3))
    seen = []
    t.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            float(
                torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])
                )
            )
        )
    )
    before = [p.detach().clone() for p in t.method.parameters()]
    batches = Counting(iter(t.loader))
    r = t.optimizer_step(batches, epoch=0)
    assert isinstance(r, StepResult)
    assert t.run.step == 1 and batches.n == 2  # one optimizer step from --accum micro-batches
    assert r.grad_norm is not None and r.grad_norm > 1e-3  # the norm before clipping...
    assert seen and seen[0] <= 1e-3 * 1.001  # ...and the optimizer saw the clipped gradients
    assert r.lr == t.optimizer.param_groups[0]["lr"] and "target_mean" in r.logs and r.loss > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, t.method.parameters()))
    assert all(p.grad is None for p in t.method.parameters())  # zeroed for the next step

    t2 = started(make(small_cache, tmp_path / "run2"))
    assert t2.optimizer_step(iter(t2.loader), epoch=0).grad_norm is None  # no --clip-grad, no norm


def test_optimizer_step_stops_on_nan_before_the_optimizer(small_cache, tmp_path):
    t = started(make(small_cache, tmp_path / "run", method_kw={"nan_at": 0}))
    before = [p.detach().clone() for p in t.method.parameters()]
    with pytest.raises(TrainingDiverged, match="at step 0 .*No checkpoint was written yet"):
        t.optimizer_step(iter(t.loader), epoch=0)
    assert t.run.step == 0
    assert all(torch.equal(p, q) for p, q in zip(before, t.method.parameters()))


def test_resolve_data_lives_in_the_data_layer(small_cache, tmp_path):
    kw = {"synth_patients": 2, "synth_size": 64, "synth_slices": 4}
    assert resolve_data(small_cache, str(tmp_path / "run"), **kw) == small_cache  # a prepared cache as it is
    with pytest.raises(UserError, match="no such file"):
        resolve_data(str(tmp_path / "missing"), str(tmp_path / "run"), **kw)


def test_setup_removes_the_partial_checkpoint_files_of_an_interrupted_run(small_cache, tmp_path):
    out = tmp_path / "run"
    started(make(small_cache, out)).save()
    ours = [
        out / "checkpoints" / ".step-0000003.ckpt.k2j9x_a1.tmp",
        out / ".last.ckpt.q8w7e6r5.tmp",
        out / "last.ckpt.4242.lnk.tmp",
        out / ".metrics.csv.abcd1234.tmp",
    ]
    theirs = [out / "checkpoints" / "notes.tmp", out / ".mine.tmp", out / "checkpoints" / ".step-3.ckpt.tmp.bak"]
    for p in ours + theirs:
        p.write_bytes(b"\0" * 100)
    logs: list[str] = []
    assert make(small_cache, out, resume=True, log=logs.append).setup()["step"] == 0
    assert [p for p in ours if p.exists()] == [] and all(p.exists() for p in theirs)
    assert any("removed 4 partial files" in m for m in logs), logs


def test_a_corrupt_last_checkpoint_falls_back_to_the_newest_one_that_loads(small_cache, tmp_path):
    out = tmp_path / "run"
    t = started(make(small_cache, out, keep=3))
    batches = iter(t.loader)
    for _ in range(2):
        t.save()
        t.optimizer_step(batches, epoch=0)
    t.save()  # steps 0, 1 and 2
    last = out / "last.ckpt"
    last.unlink()
    last.write_bytes(b"")  # a zero-byte last.ckpt
    (out / "checkpoints" / "step-0000002.ckpt").write_bytes(b"\0junk")
    logs: list[str] = []
    state = make(small_cache, out, resume=True, log=logs.append).setup()
    assert state["step"] == 1 and state["path"].endswith("step-0000001.ckpt")
    skipped = [m for m in logs if m.startswith("skipped")]
    assert len(skipped) == 2 and "last.ckpt" in skipped[0] and "step-0000002.ckpt" in skipped[1], logs
    assert C.load_checkpoint(str(out))["step"] == 1  # a run folder given to export/fine-tune too
    for p in (out / "checkpoints").glob("step-*.ckpt"):
        p.write_bytes(b"")
    with pytest.raises(UserError, match="last.ckpt: not a loadable"):
        make(small_cache, out, resume=True).setup()


@pytest.mark.parametrize(("clip_grad", "expected"), [(None, 5.0), (0.0, 0.0), (2.5, 2.5)])
def test_spark_clips_at_five_by_default_as_published(small_cache, tmp_path, clip_grad, expected):
    """SparK's official run clips the global gradient norm at 5 (its --clip 5); --clip-grad 0 turns it off.
    The other methods do not clip unless asked."""
    cfg = cfg_for(small_cache, tmp_path / "run", crop=64, batch=4, max_steps=1, clip_grad=clip_grad)
    t = started(Trainer(build_method("spark", cfg), cfg, method_name="spark", log=lambda msg: None))
    assert t.clip_grad == expected and t.record["resolved"]["clip_grad"] == expected
    r = t.optimizer_step(iter(t.loader), epoch=0)
    assert (r.grad_norm is not None) == (expected > 0)
    assert started(make(small_cache, tmp_path / "tiny")).clip_grad == 0.0


def test_a_method_that_clips_per_parameter_gets_each_gradient_clipped(small_cache, tmp_path, monkeypatch):
    """Method.clip_per_parameter (DINO's clip_gradients): --clip-grad bounds each parameter's gradient
    norm on its own, so the optimizer sees every one at or below it while the global norm exceeds it."""
    t = started(make(small_cache, tmp_path / "run", batch=8, clip_grad=1e-3))
    monkeypatch.setattr(t.method, "clip_per_parameter", True)
    seen = []
    t.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            [float(p.grad.norm()) for g in opt.param_groups for p in g["params"] if p.grad is not None]
        )
    )
    r = t.optimizer_step(iter(t.loader), epoch=0)
    norms = seen[0]
    assert len(norms) > 1 and max(norms) <= 1e-3 * 1.001
    assert float(torch.linalg.vector_norm(torch.tensor(norms))) > 1e-3 * 1.01  # not the global norm's clipping
    assert r.grad_norm is not None and r.grad_norm > 1e-3  # the global norm before clipping is logged
