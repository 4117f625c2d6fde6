"""The one training loop (every pretraining method, and fine-tuning, runs through it).

    trainer = Trainer(method, TrainConfig(...), method_name="spark")
    summary = trainer.fit()

The trainer owns: data (a prepared cache, a DICOM folder prepared on first use, or the built-in synthetic
CT: sparkct.data.resolve_data), the loader sharded by rank, AMP (bf16; fp16 with a grad scaler),
channels-last, gradient accumulation and clipping, optimizer + LR/WD schedules, DDP (torchrun; BatchNorm
synchronized over ranks, also on CPUs), checkpoints (atomic, keep-last-k, resume to the exact next batch),
a NaN/Inf stop that keeps the last good checkpoint, progress (tqdm), metrics (CSV, TensorBoard:
sparkct.train.metrics_log), previews (PNG) and the backbone export. The method
(sparkct.models.base.Method) owns only its step.

`Trainer.fit` reads as its phases, each a method that can also be called on its own (the tests do):
``setup`` (device, process group, AMP, checks, the run folder: refuse it or load its checkpoint),
``build_data`` (dataset, labels, loader, step counts), ``build_optimization`` (device placement,
optimizer, scaler, probe, DDP), ``restore`` (a checkpoint's state, or the fresh run's seed),
``open_run`` (config.json, metrics, progress bar), ``run_epoch`` (its ``optimizer_step`` calls, metrics
rows, previews, the method's step validations, periodic checkpoints, ``end_epoch``) and ``finish``
(final checkpoint, plots, backbone export, summary). What the loop changes as it goes (step, best
monitor, last saved step, timers, the latest metrics row) lives in ``Trainer.run``, a :class:`RunState`.

Run folder (``config.out``): ``config.json``, ``metrics.csv``, ``loss.png``, ``previews/``, ``tb/``,
``checkpoints/``, ``last.ckpt``, ``best.ckpt`` (when the method reports a monitor), ``backbone.pt``,
``summary.json``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from sparkct import distributed as D
from sparkct import io as sio
from sparkct import profiling
from sparkct.data import CTResize, CTSliceDataset, SliceLoader, label_slices, patient_split, resolve_data
from sparkct.data.source import builtin_source
from sparkct.data.windows import resolve_windows
from sparkct.device import resolve_device
from sparkct.errors import TrainingDiverged, TrainingInterrupted, UserError
from sparkct.models import get_method
from sparkct.models.backbone import build_backbone, check_fits, feature_dim
from sparkct.models.base import Method
from sparkct.nn.sync_batchnorm import convert_sync_batchnorm
from sparkct.train import checkpoint as C
from sparkct.train.config import TrainConfig, config_to_dict
from sparkct.train.metrics_log import MetricsLog
from sparkct.train.monitors import OnlineLinearProbe, extract_features, knn_accuracy
from sparkct.train.optim import apply_schedule, build_optimizer, clip_per_parameter_, lr_at, scaled_lr, wd_at
from sparkct.train.progress import ProgressLines, progress_interval
from sparkct.train.runlock import RunLock
from sparkct.train.signals import StopSignals, resume_command
from sparkct.train.visual import plot_curves, save_preview  # matplotlib/PIL load lazily in there

__all__ = ["VOLATILE_KEYS", "RunState", "StepResult", "Trainer", "TrainingDiverged", "build_method", "rank0_log"]

#: TrainConfig fields that may change on resume without changing what is computed
VOLATILE_KEYS = (
    "out",
    "device",
    "workers",
    "progress",
    "tensorboard",
    "log_every",
    "preview_every",
    "ckpt_every",
    "keep",
    "data",
)


def rank0_log(msg: str) -> None:
    """A run's default log: the line on stderr, above any progress bar, from rank 0 only."""
    if D.is_main():
        tqdm.write(msg, file=sys.stderr)


# --------------------------------------------------------------------------------------------- methods


def build_method(name: str, cfg: TrainConfig, method_cfg=None) -> Method:
    """The method `name` of sparkct.models.METHODS on a fresh backbone (cfg.arch, one input channel per
    HU window, cfg.weights if given)."""
    cls = get_method(name)
    method_cfg = method_cfg if method_cfg is not None else cls.config_class()
    method_cfg.validate()
    torch.manual_seed(cfg.seed)
    backbone, _ = build_backbone(
        cfg.arch, in_chans=len(resolve_windows(cfg.windows)), weights=cfg.weights, img_size=cfg.crop
    )
    return cls(backbone, method_cfg)


def _to(batch, device, channels_last: bool):
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device, channels_last) for k, v in batch.items()}
    return batch


def _init_distributed(device_spec: str) -> None:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (NCCL on GPUs, gloo otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # SPARKCT_DIST_TIMEOUT (seconds): how long joining the group, and every collective after it, may wait for
    # the other ranks (torch's default otherwise: 30 min for gloo, 10 min for NCCL)
    raw = os.environ.get("SPARKCT_DIST_TIMEOUT", "")
    try:
        secs = float(raw) if raw else None
        if secs is not None and not secs > 0:
            raise ValueError
    except ValueError:
        raise UserError(f"SPARKCT_DIST_TIMEOUT must be seconds > 0, got {raw!r}") from None
    try:
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=None if secs is None else datetime.timedelta(seconds=secs)
        )
    except (RuntimeError, TimeoutError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        within = f"within {secs:g} s" if secs is not None else "in torch's default timeout"
        raise UserError(
            f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: the other ranks did not "
            f"join {within} at {where} ({type(e).__name__}); start every node with the same --nnodes, "
            "--nproc-per-node, --master-addr and --master-port, check that each reaches that address, or set "
            "SPARKCT_DIST_TIMEOUT (seconds)"
        ) from e


@dataclass
class RunState:
    """What the loop changes as it goes (the model, optimizer and RNG hold the rest)."""

    step: int = 0  #: optimizer steps done
    best: float | None = None  #: the best monitor so far (best.ckpt holds its state)
    last_saved: int = -1  #: the step of the latest checkpoint (-1: none this run)
    first_loss: float | None = None  #: the run's first loss (checkpoints carry it over resumes)
    logs: dict = field(default_factory=dict)  #: the latest metrics row (checkpoints and the summary carry it)
    last_inp: Any = None  #: the latest micro-batch's input (previews)
    images_per_s: float = math.nan  #: over the latest logging interval
    t_start: float = 0.0  #: when the loop started
    t_int: float = 0.0  #: when the current logging interval started
    n_int: int = 0  #: images in the current logging interval

    def start_clock(self) -> None:
        self.t_start = self.t_int = time.perf_counter()
        self.n_int = 0


class StepResult(NamedTuple):
    """One optimizer step: its loss and method logs (averaged over the micro-steps, this rank), the LR
    and WD it ran with, and the gradient norm before clipping (None when the run does not clip)."""

    loss: float
    logs: dict
    lr: float
    wd: float
    grad_norm: float | None


class Trainer:
    """Train `method` with `config`. `dataset` (optional) replaces the data resolved from config.data (e.g.
    a labelled training split for fine-tuning). resume: False (refuse a run folder that already holds a
    checkpoint), True (continue its latest checkpoint) or a checkpoint path; force: resume even if the
    config differs. on_step(step), if given, is called after each optimizer step with the number of steps
    done (sparkct profile advances its torch.profiler schedule there). export_backbone: write backbone.pt at
    the end (fine-tuning that keeps only the tested weights does without). The phases of a step are named
    ranges for profilers (sparkct.profiling.PHASES).

    During the loop SIGINT/SIGTERM finish the step in flight, write a checkpoint and raise
    TrainingInterrupted naming it and `resume_cmd` (default: this process's command line with --resume).
    Where stderr is not a terminal, progress comes as a line every SPARKCT_PROGRESS_SECONDS (30) instead
    of a bar. A write that finds the disk full is a UserError naming the disk and the intact checkpoint."""

    def __init__(
        self,
        method: Method,
        config: TrainConfig,
        *,
        method_name: str | None = None,
        dataset=None,
        resume: bool | str = False,
        force: bool = False,
        log=rank0_log,
        on_step=None,
        resume_cmd: str | None = None,
        export_backbone: bool = True,
    ):
        config.validate()
        self.progress_seconds = progress_interval()
        self.resume_cmd = resume_cmd
        self.export_backbone = export_backbone
        self.method = method
        self.cfg = config
        self.method_name = method_name or method.name
        self.dataset = dataset
        self.resume, self.force = resume, force
        self.log = log
        self.on_step = on_step
        self.run_dir = config.out
        self.run = RunState()
        self._lock: RunLock | None = None  # the run folder's, while fit runs (rank 0)
        self.stop: StopSignals | None = None  # fit's signal handlers, while its loop runs
        self.lines: ProgressLines | None = None  # progress lines where stderr is not a terminal (open_run)
        # set by the phases: setup (rank, world, main, device, amp), build_data (dataset, classes, loader,
        # steps_per_epoch, total, epochs), build_optimization (opt_name, peak, wd0, wd1, warmup, optimizer,
        # scaler, probe, model: the method or its DDP wrap, manual_ddp, autocast), open_run (record,
        # metrics, bar)

    # ---- settings derived from config + method defaults ----
    def _setting(self, key: str):
        v = getattr(self.cfg, key, None)
        if v is not None:
            return v
        d = dict(Method.defaults)
        d.update(type(self.method).defaults)
        return d.get(key)

    def config_record(self) -> dict:
        mc = self.method.config
        return {
            "method": self.method_name,
            "train": config_to_dict(self.cfg),
            "method_config": config_to_dict(mc) if hasattr(mc, "__dataclass_fields__") else {},
            "world_size": D.world_size(),
            "data_fingerprint": getattr(self, "data_fingerprint", None),  # set by restore, once the data is built
        }

    def _check_resume_config(self, saved: dict) -> None:
        now = self.config_record()
        diffs = []
        if saved.get("method") != now["method"]:
            diffs.append(f"method {saved.get('method')} -> {now['method']}")
        for k in sorted(set(saved.get("train", {})) | set(now["train"])):
            if k in VOLATILE_KEYS:
                continue
            a, b = saved.get("train", {}).get(k), now["train"].get(k)
            if a != b:
                diffs.append(f"{k} {a!r} -> {b!r}")
        for k in sorted(set(saved.get("method_config", {})) | set(now["method_config"])):
            a, b = saved.get("method_config", {}).get(k), now["method_config"].get(k)
            if a != b:
                diffs.append(f"{k} {a!r} -> {b!r}")
        if saved.get("world_size", 1) != now["world_size"]:
            diffs.append(f"world size {saved.get('world_size', 1)} -> {now['world_size']}")
        if diffs and not self.force:
            raise UserError(
                f"the checkpoint in {self.run_dir} was made with another config ({'; '.join(diffs)}); "
                "pass --force to resume anyway, or use another --out"
            )
        if diffs:
            self.log(f"resuming despite config changes (--force): {'; '.join(diffs)}")

    # ---- the loop ----
    def fit(self) -> dict:
        """Train to the end (or resume and train to the end); return the summary (rank 0; {} elsewhere)."""
        try:
            state = self.setup()
            self.build_data()
            self.build_optimization()
            self.restore(state)
            self.open_run()
            # from here a signal lets the step in flight finish, then run_epoch saves and stops (interrupt)
            with StopSignals(announce=self.main) as self.stop:
                try:
                    self.model.train()
                    self.run.start_clock()
                    for epoch in range(self.run.step // self.steps_per_epoch, self.epochs):
                        if self.run.step >= self.total:
                            break
                        self.run_epoch(epoch)
                finally:
                    self.bar.close()  # also on errors: the message must not land inside the bar
                    self.stop = None
            return self.finish()
        finally:
            # not left to garbage collection: a notebook keeps the trainer (or a traceback holding it) alive
            self.release()

    def release(self) -> None:
        """Let go of the run folder's lock (fit does when it ends, however it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ---- phases, in the order fit calls them ----
    def setup(self) -> dict | None:
        """Join the process group, choose the device and AMP, check the batch against accumulation x ranks
        and the method; then the run folder: refuse one that another process holds (its lock) or that holds
        a run unless resuming, remove the partial files of an interrupted write, and return the checkpoint
        to resume (the newest that loads, its config checked against this one) or None."""
        cfg = self.cfg
        _init_distributed(cfg.device)
        self.rank, self.world = D.rank(), D.world_size()
        self.main = D.is_main()
        device = resolve_device(cfg.device)
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if cfg.batch % (cfg.accum * self.world):
            raise UserError(f"--batch {cfg.batch} must be divisible by --accum x ranks = {cfg.accum * self.world}")
        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
        if amp == "fp16" and device.type == "cpu":
            raise UserError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or none")
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
        self.amp = amp
        self.method.check_run(cfg.batch // cfg.accum)
        self.method.check_input(cfg.crop, cfg.windows)
        if self.method.needs_labels and cfg.labels is None and (cfg.data is not None or self.dataset is not None):
            raise UserError(
                f"{self.method_name} pretraining needs --labels (a CSV over --data: slice, series or patient rows)"
            )

        self._lock_run(create=False)  # a folder another run writes into is refused before its checkpoint is read
        # the run folder: refuse to overwrite a run unless resuming it
        state = None
        if self.resume:
            if isinstance(self.resume, str):
                state = C.load_checkpoint(self.resume)
            elif C.find_latest(self.run_dir) is None:
                raise UserError(f"--resume: no checkpoint in {self.run_dir} (last.ckpt or checkpoints/)")
            else:  # the newest that loads: a corrupt last.ckpt is skipped, with a log line
                state = C.load_latest(self.run_dir, log=self.log)
        elif C.find_latest(self.run_dir) is not None:
            raise UserError(
                f"{self.run_dir} already holds a run; pass --resume to continue it (or --out for a new one)"
            )
        if self.main:  # a kill during a write leaves its temporary (a checkpoint's: tens of MB); nothing reads them
            n, size = C.remove_partial(self.run_dir)
            if n:
                self.log(
                    f"removed {n} partial files ({size / 1e6:.1f} MB) that an interrupted run left in {self.run_dir}"
                )
        if state is not None:
            self._check_resume_config(state["config"])
        return state

    def _lock_run(self, create: bool) -> None:
        """Hold the run folder's lock (rank 0, for all ranks): a second process training into the same
        --out would mix its checkpoints, metrics and config with this run's. Every rank raises if it is
        taken. Without `create`, a folder that does not exist yet is left alone (setup writes nothing).
        Taken once per run: by setup where the folder exists (before its checkpoint is read), else by
        build_data (before data is prepared into it); the other call finds it held."""
        err = None
        if self.main and (create or os.path.isdir(self.run_dir)) and self._lock is None:
            try:
                self._lock = RunLock(self.run_dir)
            except UserError as e:
                err = str(e)
        if self.world > 1:
            box = [err]
            dist.broadcast_object_list(box, 0)
            err = box[0]
        if err is not None:
            raise UserError(err)

    def _check_resume_data(self, state: dict) -> None:
        """Refuse (without --force) to resume on other data than the checkpoint's: --data may change (the
        same cache moved elsewhere) but not what it holds. Checkpoints without a fingerprint pass."""
        saved, now = state["config"].get("data_fingerprint"), self.data_fingerprint
        if saved is None or now is None or saved == now:
            return
        was = state["config"].get("train", {}).get("data")
        n = state["config"].get("resolved", {}).get("slices", "?")
        what = (
            f"the checkpoint {state['path']} was trained on other data ({n} slices of "
            f"{'the built-in synthetic CT' if was is None else was}; now {len(self.dataset)} slices of "
            f"{'the built-in synthetic CT' if self.cfg.data is None else self.cfg.data})"
        )
        if not self.force:
            raise UserError(f"{what}; pass --force to resume on this data anyway, or use another --out")
        self.log(f"resuming on other data (--force): {what}")

    def build_data(self) -> None:
        """The run folder locked (made if new); the dataset (the given one, or config.data resolved and
        prepared), labels for the monitors, the loader (sharded by rank) and the step counts:
        steps_per_epoch, total, epochs."""
        cfg, method = self.cfg, self.method
        self._lock_run(create=True)  # a new run folder, before its data is prepared into it
        if self.dataset is None:
            cache = resolve_data(
                cfg.data,
                cfg.out,
                synth_patients=cfg.synth_patients,
                synth_size=cfg.synth_size,
                synth_slices=cfg.synth_slices,
                log=self.log,
            )
            self.dataset = CTSliceDataset(cache)
        ds = self.dataset
        self.classes = None
        labels = cfg.labels
        if labels is None and method.needs_labels:  # setup let it through only on the built-in data
            labels = os.path.join(builtin_source(cfg.out), "slice_labels.csv")
            self.log(f"built-in synthetic data (no --labels): training on its slice labels, {labels}")
        if labels is not None:
            ds, self.classes = label_slices(ds, labels)
            if len(self.classes) < 2:
                what = "--labels" if cfg.labels else "the built-in slice labels"
                raise UserError(f"{what} {labels}: a single class ({self.classes}); at least two are needed")
            if method.needs_labels:  # an unlabelled slice has nothing to teach a method that learns from labels
                ds = ds.subset(np.nonzero(ds.targets >= 0)[0])
            self.dataset = ds
        micro = cfg.batch // cfg.accum  # images per micro-step, all ranks together
        if len(ds) < micro:
            raise UserError(f"the data has {len(ds)} slices, fewer than one batch of {micro}; lower --batch")
        method.seed = cfg.seed
        if self.classes is not None:
            method.set_classes(self.classes)
        self.loader = SliceLoader(
            ds,
            micro,
            transform=method.transform(cfg.crop, cfg.windows),
            seed=cfg.seed,
            device=self.device,
            workers=cfg.workers,
            shard=(self.rank, self.world),
            pairs=method.pairs(ds),
        )
        self.steps_per_epoch = len(self.loader) // cfg.accum
        if self.steps_per_epoch < 1:
            raise UserError(f"one epoch holds {len(self.loader)} micro-batches, fewer than --accum {cfg.accum}")
        self.total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total / self.steps_per_epoch)

    def build_optimization(self) -> None:
        """The method on the device (channels-last, synchronized BatchNorm over ranks), the schedule's
        settings, the optimizer, the fp16 grad scaler, the online probe (with labels), the DDP wrap (or,
        for methods that run their own backward, one broadcast of the weights) and autocast."""
        cfg, method, device = self.cfg, self.method, self.device
        method.to(device)
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        if self.world > 1:
            convert_sync_batchnorm(method)
        self.opt_name = self._setting("optimizer")
        self.peak = cfg.lr if cfg.lr is not None else scaled_lr(self._setting("base_lr"), cfg.batch)
        self.wd0 = self._setting("weight_decay")
        wd1 = self._setting("weight_decay_end")
        self.wd1 = self.wd0 if wd1 is None else wd1
        self.warmup = round(self._setting("warmup_epochs") * self.steps_per_epoch)
        self.clip_grad = float(self._setting("clip_grad") or 0.0)
        # an optional hook (a method with its own parameter groups), not part of the Method contract
        param_groups = getattr(method, "param_groups", None)
        groups = param_groups(self.wd0) if param_groups is not None else None
        self.optimizer = build_optimizer(
            method,
            self.opt_name,
            self.peak,
            self.wd0,
            betas=self._setting("betas"),
            no_decay=method.no_weight_decay(),
            groups=groups,
        )
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None
        self.probe = None
        if self.classes is not None:
            self.probe = OnlineLinearProbe(feature_dim(method.backbone), len(self.classes)).to(device)
        self.model: nn.Module = method  # the method, or DDP around it
        self.manual_ddp = self.world > 1 and method.manual_backward
        if self.manual_ddp:
            # one forward, several backward passes (gradient caching): DDP's reducer cannot follow that,
            # so the gradients are averaged once after the last backward instead
            for t in method.state_dict().values():
                dist.broadcast(t, 0)
        elif self.world > 1:
            self.model = DDP(
                method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
            if self.amp != "none"
            else contextlib.nullcontext()
        )

    def restore(self, state: dict | None) -> None:
        """Continue from `state` (a loaded checkpoint, checked against the data and to fit the model and
        optimizer: weights, optimizer, scaler, RNG, probe, step, best monitor, first loss and latest metrics
        row), or, with None, seed a fresh run (the seed differs by rank)."""
        self.data_fingerprint = _data_fingerprint(self.dataset)
        run = self.run
        if state is None:
            torch.manual_seed(self.cfg.seed + 1000 * self.rank)
            return
        self._check_resume_data(state)
        # a --force resume with another arch, width, windows or optimizer: one line, not a load traceback
        check_fits(
            self.method,
            state["model"],
            f"{state['path']} cannot be loaded into this model",
            "; a changed model needs a new run (use another --out)",
        )
        _check_optimizer_fits(self.optimizer, state["optimizer"], state["path"])
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        C.set_rng_state(state["rng"])
        if self.probe is not None and state.get("probe"):
            self.probe.restore(state["probe"])
        run.step, run.best = int(state["step"]), state.get("best")
        run.last_saved = run.step
        # the summary describes the whole run, also when this process has nothing left to do
        run.first_loss = state.get("first_loss")
        run.logs = dict(state.get("metrics") or {})
        run.images_per_s = float(run.logs.get("images_per_s", math.nan))
        self.log(f"resumed {state['path']} at step {run.step} of {self.total}")
        if run.step >= self.total:
            self.log("that run had already finished")

    def open_run(self) -> None:
        """The run folder's config.json (the config and what it resolved to), the metrics log (rows past a
        resumed step dropped), the run's one-line description and the progress bar."""
        cfg, run = self.cfg, self.run
        os.makedirs(self.run_dir, exist_ok=True)
        record = self.config_record()
        record["resolved"] = {
            "optimizer": self.opt_name,
            "peak_lr": self.peak,
            "weight_decay": [self.wd0, self.wd1],
            "warmup_steps": self.warmup,
            "clip_grad": self.clip_grad,
            "total_steps": self.total,
            "steps_per_epoch": self.steps_per_epoch,
            "amp": self.amp,
            "device": str(self.device),
            "slices": len(self.dataset),
            "world_size": self.world,
        }
        self.record = record
        if self.main:
            with self._writing(os.path.join(self.run_dir, "config.json")):
                sio.write_json_atomic(os.path.join(self.run_dir, "config.json"), record)
        self.metrics = MetricsLog(self.run_dir, run.step, enabled=self.main, tensorboard=cfg.tensorboard)
        self.log(
            f"{self.method_name}: {cfg.arch} on {self.device} ({self.world} rank{'s' if self.world > 1 else ''}), "
            f"{len(self.dataset)} slices, batch {cfg.batch}"
            f"{f' ({cfg.accum} accumulation steps)' if cfg.accum > 1 else ''}, {self.total} steps "
            f"({self.steps_per_epoch} per epoch), {self.opt_name} peak lr {self.peak:.3g}, amp {self.amp}"
        )
        # a bar redraws in place, which only a terminal shows; a log file gets a line now and then instead
        tty = _isatty(sys.stderr)
        if self.main and not tty:
            self.lines = ProgressLines(self.total, run.step, self.progress_seconds, self.log)
        self.bar = tqdm(
            total=self.total,
            initial=run.step,
            disable=not (cfg.progress and self.main and tty),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def run_epoch(self, epoch: int) -> None:
        """Epoch `epoch` from the run's current step (which lies in it) to its end or the run's: each
        step's metrics row (every --log-every), preview, validation (every method.validate_every steps),
        periodic checkpoint and on_step; then end_epoch and, if the last step is a checkpoint step not
        yet saved, its checkpoint."""
        cfg, run = self.cfg, self.run
        first = run.step - epoch * self.steps_per_epoch
        self.loader.set_epoch(epoch, first * cfg.accum)
        batches = iter(self.loader)
        for in_epoch in range(first, self.steps_per_epoch):
            if run.step >= self.total:
                break
            result = self.optimizer_step(batches, epoch)
            run.n_int += cfg.batch
            if run.first_loss is None:
                run.first_loss = result.loss
            self.bar.update(1)
            # step 1 too: the curve starts at the untrained model's loss, not --log-every steps in
            if run.step % cfg.log_every == 0 or run.step in (1, self.total):
                self.log_step(epoch, result)
            if self.main and cfg.preview_every and run.step % cfg.preview_every == 0:
                self._preview(run.last_inp, run.step)
            # an epoch's last step is saved after on_epoch_end: what that changes (SwAV's epoch
            # count, say) belongs to the checkpoint the next epoch resumes from
            epoch_done = in_epoch + 1 == self.steps_per_epoch or run.step >= self.total
            # an epoch's last step validates in end_epoch (once, in the epoch's row), after on_epoch_end:
            # a new best's checkpoint must hold what that changes too
            if not epoch_done and self._validates_now():
                self.record_monitors(epoch, self.method.validate(run.step), f"step {run.step} (epoch {epoch + 1})")
            # a new best monitor may just have saved this step
            if run.step % cfg.ckpt_every == 0 and not epoch_done and run.last_saved != run.step:
                self.save_periodic()
            if self.on_step is not None:
                self.on_step(run.step)
            if self.lines is not None:
                self.lines.update(run.step, cfg.batch, result.loss)
            # an epoch's last step stops after end_epoch (below), as its checkpoint is written after it
            if not epoch_done:
                self._stop_if_signalled()
        # the loop above ends with the epoch's last step or the run's: the epoch is over
        self.end_epoch(epoch)
        if run.step % cfg.ckpt_every == 0 and run.last_saved != run.step:
            self.save_periodic()
        if run.step < self.total:  # at the end the run finishes as if no signal had come
            self._stop_if_signalled()

    def optimizer_step(self, batches: Iterator, epoch: int) -> StepResult:
        """One optimizer step from `batches` (the loader's iterator): the step's LR/WD, --accum micro-steps
        (forward, loss, the NaN/Inf check over all ranks, backward; DDP synchronizes only the last), then
        gradient averaging (gradient caching over ranks), unscaling, clipping, the optimizer, the method's
        after_step and the online probe. Advances run.step."""
        cfg, method, run = self.cfg, self.method, self.run
        step = run.step
        lr, wd = lr_at(step, self.total, self.warmup, self.peak), wd_at(step, self.total, self.wd0, self.wd1)
        apply_schedule(self.optimizer, lr, wd)
        loss_sum = 0.0
        logs_sum: dict[str, float] = {}
        for m in range(cfg.accum):
            method.micro = m
            with profiling.range("step/data"):
                batch = _to(next(batches), self.device, cfg.channels_last)
            if self.probe is not None:
                x_only, targets = batch
                inp = batch if method.accepts_targets else x_only
            else:
                inp = batch
            run.last_inp = inp
            sync = (
                cast(DDP, self.model).no_sync()
                if self.world > 1 and not self.manual_ddp and m < cfg.accum - 1
                else contextlib.nullcontext()
            )
            with sync:
                if method.manual_backward:
                    with profiling.range("step/forward+loss+backward"), self.autocast:
                        loss, logs = self.model(inp, step, backward=self.backward)
                else:
                    with profiling.range("step/forward+loss"), self.autocast:
                        loss, logs = self.model(inp, step)
                with profiling.range("step/sync-loss"):  # reading the loss waits for the device
                    lv = float(loss.detach().float())
                self._check_finite(lv, epoch)
                if not method.manual_backward:
                    with profiling.range("step/backward"):
                        self.backward(loss)
            loss_sum += lv / cfg.accum
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / cfg.accum
        with profiling.range("step/optimizer"):
            grad_norm = self._apply_gradients()
        with profiling.range("step/after_step"):
            method.after_step(step, self.total)
        if self.probe is not None:
            with profiling.range("step/probe"):
                logs_sum.update(self._probe_step(self.probe, x_only, targets))
        run.step += 1
        return StepResult(loss_sum, logs_sum, lr, wd, grad_norm)

    def backward(self, tensors, grad_tensors=None) -> None:
        """Backward of `tensors` (a loss, or tensors with `grad_tensors`) scaled by 1/--accum and by the
        fp16 grad scaler; methods that run their own backward (gradient caching) call this."""
        f = 1.0 / self.cfg.accum
        scaler = self.scaler
        if grad_tensors is None:
            t = tensors * f
            (scaler.scale(t) if scaler is not None else t).backward()
        else:
            tl = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
            gl = list(grad_tensors) if isinstance(grad_tensors, (list, tuple)) else [grad_tensors]
            gl = [(scaler.scale(g * f) if scaler is not None else g * f) for g in gl]
            torch.autograd.backward(tl, gl)

    def _check_finite(self, lv: float, epoch: int) -> None:
        """Stop (on every rank, if any rank's loss is NaN/Inf) without saving the bad state."""
        bad = torch.tensor([0.0 if math.isfinite(lv) else 1.0])
        if self.world > 1:
            bad = bad.to(self.device)
            dist.all_reduce(bad)
        if float(bad) > 0:
            kept = C.find_latest(self.run_dir)
            raise TrainingDiverged(
                f"loss is {lv} at step {self.run.step} (epoch {epoch + 1}); stopped without saving this "
                f"state. {'The last good checkpoint ' + kept + ' is kept' if kept else 'No checkpoint was written yet'}"
                "; lower --lr/--base-lr, set --clip-grad, or change --amp"
            )

    def _apply_gradients(self) -> float | None:
        """Average (gradient caching over ranks), unscale, clip, step and zero; the norm before clipping."""
        method, optimizer, scaler = self.method, self.optimizer, self.scaler
        if self.manual_ddp:
            _average_gradients(method)
        method.on_before_optimizer_step(self.run.step)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = None
        if self.clip_grad > 0:
            if method.clip_per_parameter:
                grad_norm = clip_per_parameter_(method.parameters(), self.clip_grad)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(method.parameters(), self.clip_grad))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def log_step(self, epoch: int, result: StepResult) -> None:
        """The metrics row of the step just done: the loss averaged over ranks, LR, WD, images/s over the
        interval since the last row, the method's logs, gradient norm and loss scale; the bar's postfix."""
        run = self.run
        loss = _mean_over_ranks(result.loss, self.device)
        now = time.perf_counter()
        run.images_per_s = run.n_int / max(now - run.t_int, 1e-9)
        run.t_int, run.n_int = now, 0
        logs = {"loss": loss, "lr": result.lr, "wd": result.wd, "images_per_s": run.images_per_s, **result.logs}
        if result.grad_norm is not None:
            logs["grad_norm"] = result.grad_norm
        if self.scaler is not None:
            logs["loss_scale"] = float(self.scaler.get_scale())
        run.logs = logs
        self.metrics.write(run.step, epoch + 1, logs)
        self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{result.lr:.2e}", img_s=f"{run.images_per_s:.1f}")

    def end_epoch(self, epoch: int) -> None:
        """The method's on_epoch_end, its validate (every epoch, or where the epoch's last step is a
        validation step) and the kNN monitor (with labels, every --knn-every epochs): record_monitors."""
        cfg, run = self.cfg, self.run
        ep_logs = dict(self.method.on_epoch_end(epoch) or {})
        if not self.method.validate_every or self._validates_now():
            ep_logs.update(self.method.validate(run.step) or {})
        if self.probe is not None and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and self.main:
            ep_logs.update(self._knn(self.dataset, self.device))
        self.record_monitors(epoch, ep_logs, f"epoch {epoch + 1}")

    def _validates_now(self) -> bool:
        """Whether the step just done is one of the method's validation steps (every validate_every
        steps, and the last): a function of the step alone, so a resumed run validates where one
        uninterrupted run does."""
        n, step = self.method.validate_every, self.run.step
        return n > 0 and (step % n == 0 or step >= self.total)

    def record_monitors(self, epoch: int, logs: dict | None, where: str) -> None:
        """Monitors at the current step (in epoch `epoch`, 0-based), if any: their metrics row (keys
        ``epoch/...``, which marks the monitor rows for their readers, also mid-epoch) and log line
        (`where`: ...); a new best "monitor" is checkpointed and linked as best.ckpt."""
        run = self.run
        if not logs:
            return
        self.metrics.write(run.step, epoch + 1, {f"epoch/{k}": float(v) for k, v in logs.items()})
        self.log(f"{where}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items()))
        mon = logs.get("monitor")
        if mon is not None and (run.best is None or float(mon) > run.best):
            run.best = float(mon)
            path = self.save()
            if path:
                C.link_atomic(path, os.path.join(self.run_dir, "best.ckpt"))
                # keep-last-k must not delete the file best.ckpt names: it is a hard link

    def save(self) -> str | None:
        """Checkpoint the run at its current step (rank 0 writes; keep-last-k; last.ckpt): weights,
        optimizer, scaler, RNG, the data position (the next step's epoch and batch), best monitor, the
        latest metrics row, the probe and the config; the metrics files are written first. Returns the
        checkpoint's path (None on other ranks)."""
        run = self.run
        prev, run.last_saved = run.last_saved, run.step
        if not self.main:
            return None
        # the log up to a checkpoint is on disk before the checkpoint: a kill at any point after the
        # checkpoint leaves every row up to its step (rows past a resumed step are dropped on resume)
        with self._writing(self.metrics.csv_path, prev):
            self.metrics.flush()
        epoch, in_epoch = divmod(run.step, self.steps_per_epoch)
        st = {
            "config": json.dumps(self.record),
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "step": run.step,
            "epoch": epoch,
            "batch_in_epoch": in_epoch,
            "rng": C.rng_state(),
            "best": run.best,
            "metrics": {k: float(v) for k, v in run.logs.items()},
            "first_loss": run.first_loss,
            "probe": self.probe.checkpoint() if self.probe is not None else {},
        }
        with self._writing(os.path.join(self.run_dir, "checkpoints", f"step-{run.step:07d}.ckpt"), prev):
            return C.save_checkpoint(self.run_dir, st, run.step, self.cfg.keep)

    def save_periodic(self) -> None:
        """A --ckpt-every checkpoint, with the metrics files (save writes them) and loss.png brought up to it."""
        self.save()
        if self.main:
            self._plot()

    def finish(self) -> dict:
        """The final checkpoint (unless the last step was just saved), metrics files, loss.png, the last
        preview, backbone.pt (unless export_backbone is off) and summary.json; the closing log line, naming what
        the run folder holds. Returns the summary (rank 0)."""
        run = self.run
        if run.last_saved != run.step:
            self.save()
        seconds = time.perf_counter() - run.t_start
        summary: dict = {}
        if self.main:
            with self._writing(self.metrics.csv_path):
                self.metrics.flush()
            self._plot()
            if run.last_inp is not None:
                self._preview(run.last_inp, run.step)
            backbone = os.path.join(self.run_dir, "backbone.pt") if self.export_backbone else None
            if backbone is not None:
                with self._writing(backbone):
                    C.export_backbone(self.method.backbone, backbone, arch=self.cfg.arch)
            summary = {
                "method": self.method_name,
                "steps": run.step,
                "total_steps": self.total,
                "seconds": round(seconds, 2),
                "first_loss": run.first_loss,
                "final": run.logs,
                "best_monitor": run.best,
                "images_per_s": run.images_per_s,
                "run_dir": self.run_dir,
                "checkpoint": os.path.join(self.run_dir, "last.ckpt"),
                "backbone": backbone,
            }
            with self._writing(os.path.join(self.run_dir, "summary.json")):
                sio.write_json_atomic(os.path.join(self.run_dir, "summary.json"), summary)
            first, final = run.first_loss, run.logs.get("loss")
            made = [
                f for f in ("loss.png", "previews/", "backbone.pt") if os.path.exists(os.path.join(self.run_dir, f))
            ]
            self.log(
                f"done: {run.step} steps in {seconds:.0f} s; loss {first if first is None else f'{first:.4g}'}"
                f" -> {final if final is None else f'{final:.4g}'}; run folder {self.run_dir} ({', '.join(made)})"
            )
        self.metrics.close()
        return summary

    def _stop_if_signalled(self) -> None:
        """After a step: if a signal came (to any rank: the ranks agree, so all stop at this step), interrupt."""
        signum = (self.stop.signum or 0) if self.stop is not None else 0
        if self.world > 1:
            # every rank reaches this call at the same step; the largest signal number stands for them all
            t = torch.tensor([signum], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t)
        if signum:
            self.interrupt(signum)

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Stop the run after signal `signum`: the metrics and a checkpoint at the current step (unless it
        was just written), then TrainingInterrupted naming the checkpoint and the command to resume, with
        the shell's status for the signal (130 for SIGINT, 143 for SIGTERM)."""
        run = self.run
        if run.last_saved != run.step:
            self.save()
        elif self.main:  # rows written after that checkpoint (an epoch's monitor row)
            with self._writing(self.metrics.csv_path):
                self.metrics.flush()
        self.metrics.close()
        name = signal.Signals(signum).name
        cmd = self.resume_cmd if self.resume_cmd is not None else resume_command()
        raise TrainingInterrupted(
            f"stopped by {name} at step {run.step} of {self.total}; checkpoint "
            f"{os.path.join(self.run_dir, 'last.ckpt')}; resume with: {cmd}",
            128 + signum,
        )

    @contextlib.contextmanager
    def _writing(self, path: str, saved: int | None = None) -> Iterator[None]:
        """Turn a full disk while writing `path` into one line that says so and names the intact
        checkpoint (step `saved`, default the run's latest; the atomic writers leave it, and remove
        their temporary)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if not sio.is_disk_full(e):
                raise
            step = self.run.last_saved if saved is None else saved
            kept = f"the last checkpoint (step {step}) is intact" if step >= 0 else "no checkpoint was written yet"
            raise UserError(f"no space left on {sio.filesystem_of(path)} while writing {path}; {kept}") from e

    def _best_effort(self, path: str, write) -> None:
        """loss.png and previews are only for looking at: a full disk skips them with a log line and the
        run goes on (its next checkpoint stops it with a UserError if the disk is still full)."""
        try:
            write()
        except (OSError, RuntimeError) as e:
            if not sio.is_disk_full(e):
                raise
            self.log(f"warning: no space left on {sio.filesystem_of(path)}; {path} not written")

    def _plot(self) -> None:
        path = os.path.join(self.run_dir, "loss.png")
        ref = self.method.loss_reference(self.cfg.batch // self.cfg.accum)
        marks = self.method.plot_marks()
        self._best_effort(
            path,
            lambda: plot_curves(self.metrics.csv_path, path, title=self._title(), reference=ref, marks=marks),
        )

    # ---- helpers ----
    @torch.no_grad()
    def _probe_step(self, probe, x, targets) -> dict:
        """Train the online linear probe on this step's detached backbone features (the method's own, or
        a no-grad eval-mode forward of the whole image: no gradient or statistic reaches the backbone)."""
        method = self.method
        feats = getattr(method, "last_features", None)
        if feats is None or feats.shape[0] != targets.shape[0]:
            x0 = x if isinstance(x, torch.Tensor) else x[0]
            was = method.backbone.training
            method.backbone.eval()
            try:
                feats = method.backbone(x0).float().flatten(1)
            finally:
                method.backbone.train(was)
        return probe.step(feats.float(), targets)

    def _knn(self, ds, device) -> dict:
        """kNN accuracy of the backbone's features: labelled slices of 80 % of the labelled patients are
        the bank, those of the other 20 % the queries."""
        lab = ds.subset(np.nonzero(ds.targets >= 0)[0])
        try:
            split = patient_split(lab, (0.8, 0.2), seed=self.cfg.seed, names=("bank", "query"))
        except UserError as e:
            if not getattr(self, "_knn_warned", False):
                self.log(f"kNN monitor skipped: {e}")
                self._knn_warned = True
            return {}
        out = []
        for part in ("bank", "query"):
            loader = SliceLoader(
                lab.subset(split[part]),
                64,
                shuffle=False,
                drop_last=False,
                transform=CTResize(self.cfg.crop, windows=self.cfg.windows),
                device=device,
            )
            out.append(extract_features(self.method.backbone, loader, device))
        (fb, yb), (fq, yq) = out
        return {"knn_acc": knn_accuracy(fb, yb, fq, yq, k=min(20, len(yb)))}

    def _title(self) -> str:
        return f"{self.method_name} · {self.cfg.arch} · batch {self.cfg.batch} · {self.run_dir}"

    def _preview(self, batch, step: int) -> None:
        # eval mode and the RNG state restored: a preview changes nothing the training computes
        method = self.method
        rng = torch.get_rng_state()
        was = method.training
        method.eval()
        try:
            rows = method.preview(batch)
        finally:
            method.train(was)
            torch.set_rng_state(rng)
        if rows:
            d = os.path.join(self.run_dir, "previews")
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"step-{step:07d}.png")

            def write() -> None:
                save_preview(rows, path, title=f"{self._title()} · step {step}")
                C.link_atomic(path, os.path.join(d, "latest.png"))

            self._best_effort(path, write)


def _data_fingerprint(ds) -> str | None:
    """A hash of what a dataset over a prepared cache holds (its series' keys and sizes, the slices it
    uses, their labels), not of where the cache lies; None for other datasets."""
    series = getattr(getattr(ds, "cache", None), "series", None)
    rows = getattr(ds, "rows", None)  # CTSliceDataset: the slices of items, without a per-slice array
    indices = None if callable(rows) else getattr(ds, "indices", None)
    if not isinstance(series, dict) or "key" not in series or (indices is None and not callable(rows)):
        return None
    h = hashlib.sha256()
    h.update(json.dumps([[str(k) for k in series["key"].tolist()], np.asarray(series["n"]).tolist()]).encode())
    h.update(np.asarray(series["shape"], np.int64).tobytes())
    if indices is not None:
        h.update(np.asarray(indices, np.int64).tobytes())
    else:  # the same bytes, a chunk at a time (a dataset of 10^8 slices would need 800 MB at once)
        chunk = 1 << 22
        for lo in range(0, len(ds), chunk):
            h.update(np.asarray(rows(np.arange(lo, min(len(ds), lo + chunk))), np.int64).tobytes())  # type: ignore[misc]
    targets = getattr(ds, "targets", None)
    if targets is not None:
        t = np.asarray(targets)
        h.update(str(t.dtype).encode() + t.tobytes())
    return h.hexdigest()[:16]


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: dict, path: str) -> None:
    """A one-line UserError when a checkpoint's optimizer state is not this optimizer's (another
    --optimizer, or other parameter groups): torch would load it and fail at the first step."""
    groups, now = saved.get("param_groups"), optimizer.state_dict()["param_groups"]
    why = None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        why = "no parameter groups"
    elif len(groups) != len(now):
        why = f"{len(groups)} parameter groups, this one has {len(now)}"
    else:
        for i, (a, b) in enumerate(zip(groups, now)):
            if set(a) != set(b):
                diff = sorted(set(a) ^ set(b))
                why = f"group {i} has other settings ({', '.join(diff[:3])}): another optimizer"
            elif len(a.get("params", [])) != len(b["params"]):
                why = f"group {i} holds {len(a.get('params', []))} parameters, this one {len(b['params'])}"
            if why:
                break
    if why:
        raise UserError(
            f"{path}: its optimizer state does not fit this run's optimizer ({why}); resume with the same "
            "--optimizer, or use another --out"
        )


def _average_gradients(module: torch.nn.Module) -> None:
    """All-reduce and average the gradients over the ranks, in one flat buffer (what DDP does, for the
    steps DDP cannot wrap)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= D.world_size()
    for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(v)


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _mean_over_ranks(v: float, device) -> float:
    if not D.is_distributed():
        return v
    t = torch.tensor([v], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / D.world_size()
