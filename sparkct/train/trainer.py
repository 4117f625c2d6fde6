"""The one training loop (every pretraining method, and fine-tuning, runs through it).

    trainer = Trainer(method, TrainConfig(...), method_name="spark")
    summary = trainer.fit()

The trainer owns: data (a prepared cache, a DICOM folder prepared on first use, or the built-in synthetic
CT), the loader sharded by rank, AMP (bf16; fp16 with a grad scaler), channels-last, gradient
accumulation and clipping, optimizer + LR/WD schedules, DDP (torchrun; BatchNorm synchronized over ranks,
also on CPUs), checkpoints (atomic, keep-last-k, resume to the exact next batch), a NaN/Inf stop that keeps
the last good checkpoint, progress (tqdm), metrics (CSV, TensorBoard), previews (PNG) and the backbone
export. The method (sparkct.models.base.Method) owns only its step.

Run folder (``config.out``): ``config.json``, ``metrics.csv``, ``loss.png``, ``previews/``, ``tb/``,
``checkpoints/``, ``last.ckpt``, ``best.ckpt`` (when the method reports a monitor), ``backbone.pt``,
``summary.json``.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
import torch

from sparkct import distributed as D
from sparkct import io as sio
from sparkct import profiling
from sparkct.errors import TrainingDiverged, UserError
from sparkct.models.base import Method
from sparkct.train import checkpoint as C
from sparkct.train.config import TrainConfig, config_to_dict
from sparkct.train.optim import apply_schedule, build_optimizer, lr_at, scaled_lr, wd_at

__all__ = ["Trainer", "TrainingDiverged", "resolve_data", "build_method", "VOLATILE_KEYS"]

#: TrainConfig fields that may change on resume without changing what is computed
VOLATILE_KEYS = ("out", "device", "workers", "progress", "tensorboard", "log_every", "preview_every", "ckpt_every",
                 "keep", "data")


def _log(msg: str) -> None:
    if D.is_main():
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ data

def resolve_data(cfg: TrainConfig, log=_log) -> str:
    """The prepared cache this run reads: cfg.data if it is one; a DICOM/NIfTI folder prepared (resumable)
    beside the run folder; or the built-in synthetic chest CT, synthesized and prepared once."""
    from sparkct.data import prepare

    root = os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "data")
    if cfg.data is None:
        from sparkct.data import synth

        src = os.path.join(root, "synth")
        want = {"seed": 0, "patients": cfg.synth_patients, "size": cfg.synth_size, "slices": cfg.synth_slices}
        marker = os.path.join(src, "synth.json")
        have = sio.read_json(marker) if os.path.isfile(marker) else None
        if have is None or any(have.get(k) != v for k, v in want.items()):
            if D.is_main():
                log(f"synthesizing {cfg.synth_patients} patients of chest CT ({cfg.synth_size}x{cfg.synth_size}, "
                    f"{cfg.synth_slices} slices per series) into {src}")
                import shutil
                shutil.rmtree(src, ignore_errors=True)
                synth(src, patients=cfg.synth_patients, seed=0, size=cfg.synth_size, slices=cfg.synth_slices)
            D.barrier()
        cache = os.path.join(root, f"cache-synth-{cfg.synth_patients}-{cfg.synth_size}-{cfg.synth_slices}")
    else:
        if not os.path.exists(cfg.data):
            raise UserError(f"--data {cfg.data}: no such file or folder")
        if os.path.isfile(os.path.join(cfg.data, "cache.json")):
            return cfg.data
        if not os.path.isdir(cfg.data):
            raise UserError(f"--data {cfg.data}: expected a prepared cache or a DICOM/NIfTI folder")
        src = cfg.data
        cache = os.path.join(root, "cache-" + (os.path.basename(os.path.normpath(cfg.data)) or "data"))
    if D.is_main():
        if not os.path.isfile(os.path.join(cache, "report.json")) or cfg.data is not None:
            log(f"preparing the slice cache {cache} from {src} (resumable)")
        rep = prepare(src, cache, progress=False)
        if rep.slices == 0:
            raise UserError(f"{src}: no usable CT slices found ({rep.summary().splitlines()[0]})")
    D.barrier()
    return cache


# --------------------------------------------------------------------------------------------- methods

def build_method(name: str, cfg: TrainConfig, method_cfg=None) -> Method:
    """The method `name` of sparkct.models.METHODS on a fresh backbone (cfg.arch, one input channel per
    HU window, cfg.weights if given)."""
    from sparkct.data.windows import resolve_windows
    from sparkct.models import get_method
    from sparkct.models.backbone import build_backbone

    cls = get_method(name)
    method_cfg = method_cfg if method_cfg is not None else cls.config_class()
    method_cfg.validate()
    torch.manual_seed(cfg.seed)
    backbone, _ = build_backbone(cfg.arch, in_chans=len(resolve_windows(cfg.windows)), weights=cfg.weights)
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
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


class Trainer:
    """Train `method` with `config`. `dataset` (optional) replaces the data resolved from config.data (e.g.
    a labelled training split for fine-tuning). resume: False (refuse a run folder that already holds a
    checkpoint), True (continue its latest checkpoint) or a checkpoint path; force: resume even if the
    config differs. on_step(step), if given, is called after each optimizer step with the number of steps
    done (sparkct profile advances its torch.profiler schedule there). The phases of a step are named
    ranges for profilers (sparkct.profiling.PHASES)."""

    def __init__(self, method: Method, config: TrainConfig, *, method_name: str | None = None, dataset=None,
                 resume: bool | str = False, force: bool = False, log=_log, on_step=None):
        config.validate()
        self.method = method
        self.cfg = config
        self.method_name = method_name or method.name
        self.dataset = dataset
        self.resume, self.force = resume, force
        self.log = log
        self.on_step = on_step
        self.run_dir = config.out

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
        return {"method": self.method_name, "train": config_to_dict(self.cfg),
                "method_config": config_to_dict(mc) if hasattr(mc, "__dataclass_fields__") else {},
                "world_size": D.world_size()}

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
            raise UserError(f"the checkpoint in {self.run_dir} was made with another config ({'; '.join(diffs)}); "
                            "pass --force to resume anyway, or use another --out")
        if diffs:
            self.log(f"resuming despite config changes (--force): {'; '.join(diffs)}")

    # ---- the loop ----
    def fit(self) -> dict:
        from sparkct.device import resolve_device

        cfg = self.cfg
        _init_distributed(cfg.device)
        rank, world = D.rank(), D.world_size()
        device = resolve_device(cfg.device)
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        if cfg.batch % (cfg.accum * world):
            raise UserError(f"--batch {cfg.batch} must be divisible by --accum x ranks = {cfg.accum * world}")
        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
        if amp == "fp16" and device.type == "cpu":
            raise UserError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or none")
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")

        self.method.check_run(cfg.batch // cfg.accum)
        # the run folder: refuse to overwrite a run unless resuming it
        latest = None
        if self.resume:
            latest = self.resume if isinstance(self.resume, str) else C.find_latest(self.run_dir)
            if latest is None:
                raise UserError(f"--resume: no checkpoint in {self.run_dir} (last.ckpt or checkpoints/)")
        elif C.find_latest(self.run_dir) is not None:
            raise UserError(f"{self.run_dir} already holds a run; pass --resume to continue it (or --out for a new one)")
        state = C.load_checkpoint(latest) if latest else None
        if state is not None:
            self._check_resume_config(state["config"])

        # data
        from sparkct.data import CTSliceDataset, SliceLoader

        if self.dataset is None:
            cache = resolve_data(cfg, self.log)
            self.dataset = CTSliceDataset(cache)
        ds = self.dataset
        classes = None
        if cfg.labels is not None:
            from sparkct.data import label_slices
            ds, classes = label_slices(ds, cfg.labels)
            if len(classes) < 2:
                raise UserError(f"--labels {cfg.labels}: a single class ({classes}); monitors need at least two")
            self.dataset = ds
        micro = cfg.batch // cfg.accum  # images per micro-step, all ranks together
        if len(ds) < micro:
            raise UserError(f"the data has {len(ds)} slices, fewer than one batch of {micro}; lower --batch")
        method = self.method
        method.seed = cfg.seed
        loader = SliceLoader(ds, micro, transform=method.transform(cfg.crop, cfg.windows), seed=cfg.seed,
                             device=device, workers=cfg.workers, shard=(rank, world), pairs=method.pairs(ds))
        steps_per_epoch = len(loader) // cfg.accum
        if steps_per_epoch < 1:
            raise UserError(f"one epoch holds {len(loader)} micro-batches, fewer than --accum {cfg.accum}")
        total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        epochs = math.ceil(total / steps_per_epoch)

        # model, optimizer, scaler
        method.to(device)
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        if world > 1:
            from sparkct.nn.sync_batchnorm import convert_sync_batchnorm
            convert_sync_batchnorm(method)
        opt_name = self._setting("optimizer")
        peak = cfg.lr if cfg.lr is not None else scaled_lr(self._setting("base_lr"), cfg.batch)
        wd0 = self._setting("weight_decay")
        wd1 = self._setting("weight_decay_end")
        wd1 = wd0 if wd1 is None else wd1
        warmup = round(self._setting("warmup_epochs") * steps_per_epoch)
        groups = method.param_groups(wd0) if hasattr(method, "param_groups") else None
        optimizer = build_optimizer(method, opt_name, peak, wd0, betas=self._setting("betas"),
                                    no_decay=method.no_weight_decay(), groups=groups)
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        probe = None
        if classes is not None:
            from sparkct.models.backbone import feature_dim
            from sparkct.train.monitors import OnlineLinearProbe
            probe = OnlineLinearProbe(feature_dim(method.backbone), len(classes)).to(device)
        model = method
        manual_ddp = world > 1 and method.manual_backward
        if manual_ddp:
            # one forward, several backward passes (gradient caching): DDP's reducer cannot follow that,
            # so the gradients are averaged once after the last backward instead
            import torch.distributed as dist
            for t in method.state_dict().values():
                dist.broadcast(t, 0)
        elif world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(method, device_ids=[device.index] if device.type == "cuda" else None,
                        broadcast_buffers=False)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                    if amp != "none" else contextlib.nullcontext())

        step, best = 0, None
        if state is not None:
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            C.set_rng_state(state["rng"])
            if probe is not None and state.get("probe"):
                probe.restore(state["probe"])
            step, best = int(state["step"]), state.get("best")
            self.log(f"resumed {state['path']} at step {step} of {total}")
            if step >= total:
                self.log("that run had already finished")
        else:
            torch.manual_seed(cfg.seed + 1000 * rank)

        main = D.is_main()
        os.makedirs(self.run_dir, exist_ok=True)
        record = self.config_record()
        record["resolved"] = {"optimizer": opt_name, "peak_lr": peak, "weight_decay": [wd0, wd1], "warmup_steps": warmup,
                              "total_steps": total, "steps_per_epoch": steps_per_epoch, "amp": amp,
                              "device": str(device), "slices": len(ds), "world_size": world}
        if main:
            sio.write_json_atomic(os.path.join(self.run_dir, "config.json"), record)
        metrics = _MetricsLog(self.run_dir, step, enabled=main, tensorboard=cfg.tensorboard)
        self.log(f"{self.method_name}: {cfg.arch} on {device} ({world} rank{'s' if world > 1 else ''}), "
                 f"{len(ds)} slices, batch {cfg.batch}{f' ({cfg.accum} accumulation steps)' if cfg.accum > 1 else ''}, "
                 f"{total} steps ({steps_per_epoch} per epoch), {opt_name} peak lr {peak:.3g}, amp {amp}")

        def save(cur_step: int, epoch: int, in_epoch: int, logs: dict) -> str | None:
            if not main:
                return None
            st = {"config": json.dumps(record), "model": method.state_dict(), "optimizer": optimizer.state_dict(),
                  "scaler": scaler.state_dict() if scaler is not None else {}, "step": cur_step, "epoch": epoch,
                  "batch_in_epoch": in_epoch, "rng": C.rng_state(), "best": best,
                  "metrics": {k: float(v) for k, v in logs.items()},
                  "probe": probe.checkpoint() if probe is not None else {}}
            return C.save_checkpoint(self.run_dir, st, cur_step, cfg.keep)

        def backward(tensors, grad_tensors=None):
            f = 1.0 / cfg.accum
            if grad_tensors is None:
                t = tensors * f
                (scaler.scale(t) if scaler is not None else t).backward()
            else:
                tl = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
                gl = list(grad_tensors) if isinstance(grad_tensors, (list, tuple)) else [grad_tensors]
                gl = [(scaler.scale(g * f) if scaler is not None else g * f) for g in gl]
                torch.autograd.backward(tl, gl)

        def save_periodic():
            nonlocal last_saved
            nxt_epoch, nxt_in = divmod(step, steps_per_epoch)
            save(step, nxt_epoch, nxt_in, logs_out)
            last_saved = step
            if main:
                metrics.flush()
                from sparkct.train.visual import plot_curves
                plot_curves(metrics.csv_path, os.path.join(self.run_dir, "loss.png"), title=self._title())

        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, disable=not (cfg.progress and main), unit="step", dynamic_ncols=True,
                   file=sys.stderr)
        try:
            model.train()
            t_start = time.perf_counter()
            t_int, n_int, images_per_s = time.perf_counter(), 0, float("nan")
            first_loss = None
            logs_out: dict = {}
            last_saved = step if state is not None else -1
            last_inp = None
            start_epoch, start_in = divmod(step, steps_per_epoch)
            for epoch in range(start_epoch, epochs):
                if step >= total:
                    break
                s0 = start_in if epoch == start_epoch else 0
                loader.set_epoch(epoch, s0 * cfg.accum)
                it = iter(loader)
                for in_epoch in range(s0, steps_per_epoch):
                    if step >= total:
                        break
                    lr, wd = lr_at(step, total, warmup, peak), wd_at(step, total, wd0, wd1)
                    apply_schedule(optimizer, lr, wd)
                    loss_sum, logs_sum = 0.0, {}
                    for m in range(cfg.accum):
                        method.micro = m
                        with profiling.range("step/data"):
                            batch = _to(next(it), device, cfg.channels_last)
                        targets = None
                        if probe is not None:
                            x_only, targets = batch
                            inp = batch if method.accepts_targets else x_only
                        else:
                            inp = batch
                        last_inp = inp
                        sync = (model.no_sync() if world > 1 and not manual_ddp and m < cfg.accum - 1
                                else contextlib.nullcontext())
                        with sync:
                            if method.manual_backward:
                                with profiling.range("step/forward+loss+backward"), autocast:
                                    loss, logs = model(inp, step, backward=backward)
                            else:
                                with profiling.range("step/forward+loss"), autocast:
                                    loss, logs = model(inp, step)
                            with profiling.range("step/sync-loss"):  # reading the loss waits for the device
                                lv = float(loss.detach().float())
                            bad = torch.tensor([0.0 if math.isfinite(lv) else 1.0])
                            if world > 1:
                                import torch.distributed as dist
                                bad = bad.to(device)
                                dist.all_reduce(bad)
                            if float(bad) > 0:
                                kept = C.find_latest(self.run_dir)
                                raise TrainingDiverged(
                                    f"loss is {lv} at step {step} (epoch {epoch + 1}); stopped without saving this "
                                    f"state. {'The last good checkpoint ' + kept + ' is kept' if kept else 'No checkpoint was written yet'}"
                                    "; lower --lr/--base-lr, set --clip-grad, or change --amp")
                            if not method.manual_backward:
                                with profiling.range("step/backward"):
                                    backward(loss)
                        loss_sum += lv / cfg.accum
                        for k, v in logs.items():
                            logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / cfg.accum
                    with profiling.range("step/optimizer"):
                        if manual_ddp:
                            _average_gradients(method)
                        method.on_before_optimizer_step(step)
                        if scaler is not None:
                            scaler.unscale_(optimizer)
                        gnorm = None
                        if cfg.clip_grad > 0:
                            gnorm = float(torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.clip_grad))
                        if scaler is not None:
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    with profiling.range("step/after_step"):
                        method.after_step(step, total)
                    if probe is not None:
                        with profiling.range("step/probe"):
                            logs_sum.update(self._probe_step(probe, x_only, targets))
                    step += 1
                    n_int += cfg.batch
                    if first_loss is None:
                        first_loss = loss_sum
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == total:
                        D_loss = _mean_over_ranks(loss_sum, device)
                        now = time.perf_counter()
                        images_per_s = n_int / max(now - t_int, 1e-9)
                        t_int, n_int = now, 0
                        logs_out = {"loss": D_loss, "lr": lr, "wd": wd, "images_per_s": images_per_s, **logs_sum}
                        if gnorm is not None:
                            logs_out["grad_norm"] = gnorm
                        if scaler is not None:
                            logs_out["loss_scale"] = float(scaler.get_scale())
                        metrics.write(step, epoch + 1, logs_out)
                        bar.set_postfix(loss=f"{D_loss:.4g}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                    if main and cfg.preview_every and step % cfg.preview_every == 0:
                        self._preview(last_inp, step)
                    # an epoch's last step is saved after on_epoch_end: what that changes (SwAV's epoch
                    # count, say) belongs to the checkpoint the next epoch resumes from
                    if step % cfg.ckpt_every == 0 and not (in_epoch + 1 == steps_per_epoch or step >= total):
                        save_periodic()
                    if self.on_step is not None:
                        self.on_step(step)
                if in_epoch + 1 == steps_per_epoch or step >= total:
                    ep_logs = dict(method.on_epoch_end(epoch) or {})
                    if probe is not None and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and main:
                        ep_logs.update(self._knn(ds, device))
                    if ep_logs:
                        metrics.write(step, epoch + 1, {f"epoch/{k}": float(v) for k, v in ep_logs.items()})
                        self.log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in ep_logs.items()))
                        mon = ep_logs.get("monitor")
                        if mon is not None and (best is None or float(mon) > best):
                            best = float(mon)
                            nxt_epoch, nxt_in = divmod(step, steps_per_epoch)
                            path = save(step, nxt_epoch, nxt_in, logs_out)
                            last_saved = step
                            if main:  # the log up to a checkpoint goes with it, or a resume would lose those rows
                                metrics.flush()
                            if path:
                                C.link_atomic(path, os.path.join(self.run_dir, "best.ckpt"))
                                # keep-last-k must not delete the file best.ckpt names: it is a hard link
                    if step % cfg.ckpt_every == 0 and last_saved != step:
                        save_periodic()
        finally:
            bar.close()  # also on errors: the message must not land inside the bar
        if last_saved != step:
            nxt_epoch, nxt_in = divmod(step, steps_per_epoch)
            save(step, nxt_epoch, nxt_in, logs_out)
        seconds = time.perf_counter() - t_start
        summary = {}
        if main:
            metrics.flush()
            from sparkct.train.visual import plot_curves
            plot_curves(metrics.csv_path, os.path.join(self.run_dir, "loss.png"), title=self._title())
            if last_inp is not None:
                self._preview(last_inp, step)
            C.export_backbone(method.backbone, os.path.join(self.run_dir, "backbone.pt"))
            summary = {"method": self.method_name, "steps": step, "total_steps": total, "seconds": round(seconds, 2),
                       "first_loss": first_loss, "final": logs_out, "best_monitor": best,
                       "images_per_s": images_per_s, "run_dir": self.run_dir,
                       "checkpoint": os.path.join(self.run_dir, "last.ckpt"),
                       "backbone": os.path.join(self.run_dir, "backbone.pt")}
            sio.write_json_atomic(os.path.join(self.run_dir, "summary.json"), summary)
            fl = logs_out.get("loss")
            self.log(f"done: {step} steps in {seconds:.0f} s; loss {first_loss if first_loss is None else f'{first_loss:.4g}'}"
                     f" -> {fl if fl is None else f'{fl:.4g}'}; run folder {self.run_dir} (loss.png, previews/, "
                     f"backbone.pt)")
        metrics.close()
        return summary

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
        import numpy as np

        from sparkct.data import CTResize, SliceLoader, patient_split
        from sparkct.train.monitors import extract_features, knn_accuracy

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
            loader = SliceLoader(lab.subset(split[part]), 64, shuffle=False, drop_last=False,
                                 transform=CTResize(self.cfg.crop, windows=self.cfg.windows), device=device)
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
            from sparkct.train.visual import save_preview
            d = os.path.join(self.run_dir, "previews")
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"step-{step:07d}.png")
            save_preview(rows, path, title=f"{self._title()} · step {step}")
            C.link_atomic(path, os.path.join(d, "latest.png"))


def _average_gradients(module: torch.nn.Module) -> None:
    """All-reduce and average the gradients over the ranks, in one flat buffer (what DDP does, for the
    steps DDP cannot wrap)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= D.world_size()
    for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(v)


def _mean_over_ranks(v: float, device) -> float:
    if not D.is_distributed():
        return v
    import torch.distributed as dist
    t = torch.tensor([v], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / D.world_size()


class _MetricsLog:
    """metrics.csv (fixed columns from the first row: loss, lr, wd, images/s and the method's logs; later
    keys go to metrics.jsonl only) and TensorBoard. On resume, rows past the resumed step are dropped."""

    def __init__(self, run_dir: str, start_step: int, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.fields: list[str] | None = None
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if os.path.isfile(self.csv_path):
            with open(self.csv_path, newline="") as f:
                r = csv.DictReader(f)
                self.fields = r.fieldnames
                self.rows = [row for row in r if int(row["step"]) <= start_step]
        self._jsonl = [ln for ln in _read_lines(self.jsonl_path) if json.loads(ln).get("step", 0) <= start_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                self.tb = None

    def write(self, step: int, epoch: int, logs: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, **{k: float(v) for k, v in logs.items()}}
        self._jsonl.append(json.dumps(row))
        if not any(k.startswith("epoch/") for k in logs):
            if self.fields is None:
                self.fields = list(row)
            self.rows.append({k: row.get(k, "") for k in self.fields})
        if self.tb is not None:
            for k, v in logs.items():
                self.tb.add_scalar(k, float(v), step)

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.fields is not None:  # no step row yet (before the first --log-every); epoch rows may exist
            import io
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)
            sio.write_text_atomic(self.csv_path, buf.getvalue())
        if self._jsonl:
            sio.write_text_atomic(self.jsonl_path, "\n".join(self._jsonl) + "\n")
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]

