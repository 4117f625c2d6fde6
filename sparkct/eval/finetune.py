"""Fine-tuning and linear probing of a backbone on a labelled task, through the one trainer.

:class:`Classifier` is a :class:`sparkct.models.base.Method`: a linear head on the backbone's pooled
features, cross-entropy, and the published fine-tuning protocol of the CT comparison of SparK with
SwAV / MoCo v2 / BYOL as its defaults: Adam, lr 1e-4 at batch 64 (``base_lr`` 4e-4 per 256), weight
decay 5e-4, 70 epochs, the backbone frozen for the first 10 epochs (only the head learns), then
trained at lr / 10 rising linearly to the full lr over ``ramp_epochs``. ``linear_probe`` keeps the
backbone frozen throughout. The validation AUC (after every epoch, or with ``eval_every`` N after
every N-th optimizer step, mid-epoch too, and the last) is the trainer's "monitor", so ``best.ckpt``,
the checkpoint of the best validation, is the one that is tested.

How the backbone's learning rate is scaled without a handle on the optimizer: the trainer builds the
optimizer and restores it on resume (new param-group dicts), so the method cannot keep group
references. Instead, while the ramp is below 1 the backbone's parameters are remembered before each
optimizer step and the step's change is scaled afterwards, ``p = p_before + s (p - p_before)``. For
Adam, AdamW and SGD the change of a step is proportional to the learning rate (their moment buffers do
not depend on it), so this is exactly a learning rate of s x lr for the backbone, and it depends only
on the step number, so it resumes correctly. While frozen, the backbone runs in eval mode (its
BatchNorm statistics stay those of the initialization) and gets no gradient, which Adam skips.

:func:`finetune` runs one fine-tuning (init, data fraction, seed) into a run folder and tests the best
checkpoint: ``result.json`` (test metrics with bootstrap CIs, validation history, sizes, timing) and
``predictions.npz`` (test probabilities per evaluation unit, for paired comparisons between methods);
with ``robustness`` (default) also the test AUC under each fixed perturbation of the test slices
(:mod:`sparkct.eval.robustness`) and those probabilities.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparkct import distributed as D
from sparkct import io as sio
from sparkct.data.augment import CTAugment, CTResize
from sparkct.data.datasets import SliceLoader
from sparkct.data.windows import resolve_windows
from sparkct.errors import UserError
from sparkct.eval.config import PERTURBED_KEY, FinetuneConfig
from sparkct.eval.metrics import bootstrap_ci, compute_metrics, units_per_class
from sparkct.eval.robustness import evaluate_robustness, robustness_summary
from sparkct.models.backbone import build_backbone, feature_dim
from sparkct.models.base import Method
from sparkct.train import checkpoint as C
from sparkct.train.config import TrainConfig, config_to_dict
from sparkct.train.trainer import Trainer, rank0_log

__all__ = [
    "FinetuneConfig",
    "Classifier",
    "predict",
    "evaluate",
    "resolve_init",
    "check_test_set",
    "finetune",
    "AGGREGATE",
]

AGGREGATE = ("auto", "none", "series", "patient")


def eval_transform(crop: int, windows):
    return CTResize(crop, windows=windows)


def train_transform(crop: int, windows):
    """Milder than pretraining: most of each slice is kept (a finding must stay in the crop)."""
    return CTAugment(
        crop,
        windows=windows,
        scale=(0.6, 1.0),
        hflip=0.5,
        rotate=10.0,
        p_rotate=0.3,
        p_hu=0.3,
        p_intensity=0.3,
        p_gamma=0.0,
        p_noise=0.1,
        noise=(0.0, 15.0),
        p_blur=0.0,
    )


class Classifier(Method):
    """A linear classifier on a backbone, fine-tuned (or linearly probed) with the published protocol.
    The trainer calls ``validate`` (validation AUC as the monitor that picks ``best.ckpt``) at every
    epoch end, or, with ``eval_every`` N > 0 (``validate_every``), after every N-th optimizer step,
    mid-epoch too, and after the last."""

    name = "finetune"
    config_class = FinetuneConfig
    defaults = {
        "optimizer": "adam",
        "base_lr": 4e-4,
        "weight_decay": 5e-4,
        "weight_decay_end": None,
        "warmup_epochs": 0.0,
        "betas": (0.9, 0.999),
    }

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        config: FinetuneConfig | None = None,
        *,
        windows,
        steps_per_epoch: int,
        val_data=None,
        crop: int = 224,
    ):
        super().__init__(backbone, config)
        if n_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.n_classes = int(n_classes)
        self.head = nn.Linear(feature_dim(backbone), self.n_classes)
        self.windows = resolve_windows(windows)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.val_data = val_data
        self.crop = int(crop)
        self.validate_every = self.config.eval_every  # the trainer validates every N steps (0: epoch ends)
        self.history: list[dict] = []
        self._before: list[torch.Tensor] | None = None

    # --- the schedule -------------------------------------------------------------------------------
    def freeze_end(self) -> int:
        """The first step with the backbone unfrozen (--freeze-steps, else --freeze-epochs in steps)."""
        c = self.config
        return c.freeze_steps if c.freeze_steps is not None else round(c.freeze_epochs * self.steps_per_epoch)

    def ramp_length(self) -> int:
        c = self.config
        return c.ramp_steps if c.ramp_steps is not None else round(c.ramp_epochs * self.steps_per_epoch)

    def frozen(self, step: int) -> bool:
        return self.config.linear_probe or step < self.freeze_end()

    def backbone_lr_scale(self, step: int) -> float:
        """0 while frozen; then backbone_lr_start rising linearly to 1 over ramp_epochs."""
        if self.frozen(step):
            return 0.0
        start, ramp = self.freeze_end(), self.ramp_length()
        if ramp <= 0:
            return 1.0
        s0 = self.config.backbone_lr_start
        return s0 + (1.0 - s0) * min(1.0, (step - start) / ramp)

    def plot_marks(self) -> list[tuple[int, str]]:
        """The backbone's unfreezing and the end of its learning-rate ramp, for loss.png."""
        if self.config.linear_probe:
            return []
        start, ramp = self.freeze_end(), self.ramp_length()
        marks = [(start, "backbone unfrozen")] if start > 0 else []
        return marks + ([(start + ramp, "backbone at full lr")] if ramp > 0 else [])

    # --- data ---------------------------------------------------------------------------------------
    def transform(self, crop: int, windows):
        # The task's windows (pseudo-HU for image sets) rule, not the trainer's CT default.
        return train_transform(crop, self.windows)

    # --- the step -----------------------------------------------------------------------------------
    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, step: int):
        x, y = batch
        frozen = self.frozen(step)
        self.backbone.train(not frozen)
        if frozen and not D.is_distributed():
            with torch.no_grad():
                f = self.backbone(x)
        else:  # DDP expects every parameter in the graph; frozen gradients are dropped before the step
            f = self.backbone(x)
        logits = self.head(f)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        acc = (logits.detach().argmax(1) == y).float().mean()
        return loss, {"acc": acc, "backbone_lr_scale": self.backbone_lr_scale(step)}

    def on_before_optimizer_step(self, step: int) -> None:
        s = self.backbone_lr_scale(step)
        if s == 0.0:
            for p in self.backbone.parameters():
                p.grad = None
        elif s < 1.0:
            self._before = [p.detach().clone() for p in self.backbone.parameters()]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        if self._before is not None:
            s = self.backbone_lr_scale(step)
            for p, b in zip(self.backbone.parameters(), self._before):
                p.copy_(torch.lerp(b, p, s))
            self._before = None

    # --- evaluation ---------------------------------------------------------------------------------
    def validate(self, step: int) -> dict[str, float]:
        """Validation AUC ("monitor"), accuracy, balanced accuracy and loss after step `step`."""
        if self.val_data is None:
            return {}
        prob, y = predict(self, self.val_data, batch=self.config.eval_batch)
        logp = np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, None))
        m = compute_metrics(y, prob, metrics=("auc", "accuracy", "balanced_accuracy"))
        out = {
            "monitor": m["auc"],
            "val_auc": m["auc"],
            "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["balanced_accuracy"],
            "val_loss": float(-logp.mean()),
        }
        self.history.append({"step": step, **out})
        return out


def _as_read(hu: torch.Tensor) -> torch.Tensor:
    return hu


@torch.no_grad()
def predict(
    model: Classifier, dataset, *, batch: int = 128, crop: int | None = None, perturbation=None
) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, K), labels (N,)) of every item of `dataset`, in order, with the
    evaluation transform (the whole slice resized to the crop size, windowed), in eval mode.
    `perturbation`: a :class:`sparkct.eval.robustness.Perturbation` applied to every slice in HU."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        tf = eval_transform(crop or model.crop, model.windows)
        loader = SliceLoader(
            dataset,
            batch,
            shuffle=False,
            drop_last=False,
            device=dev,
            # perturbed: the loader gives the HU as read, and the perturbation, which needs each slice's
            # index, runs the evaluation transform itself
            transform=tf if perturbation is None else _as_read,
            tune_malloc=False,
        )
        # unshuffled, the batches are the items in order; a perturbation seeds its noise by the slice index
        ids, start = (np.asarray(dataset.indices) if perturbation is not None else None), 0
        probs, ys = [], []
        for x, y in loader:
            if perturbation is not None:
                x = perturbation(x, ids[start : start + len(x)], tf)
            start += len(x)
            x = x.to(dev)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            probs.append(torch.softmax(model.forward_logits(x).float(), 1).cpu())
            ys.append(y.cpu())
    finally:
        model.train(was)
    if not probs:
        return np.zeros((0, model.n_classes)), np.zeros(0, np.int64)
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(ys).numpy().astype(np.int64)


def _units(dataset, aggregate: str, level: str | None) -> tuple[str, np.ndarray | None]:
    """(unit kind, unit id per item or None). auto: the level the labels were given at."""
    if aggregate not in AGGREGATE:
        raise UserError(f"aggregate must be one of {', '.join(AGGREGATE)}, got {aggregate!r}")
    if aggregate == "auto":
        aggregate = level if level in ("series", "patient") else "none"
    if aggregate == "series":
        if not hasattr(dataset, "series"):
            raise UserError("per-series evaluation needs a cache dataset (image sets have no series)")
        return "series", np.asarray(dataset.series)
    if aggregate == "patient":
        return "patient", np.asarray(dataset.patients)
    return "item", None


def pool_units(dataset, scores: np.ndarray, y: np.ndarray, *, aggregate: str = "auto", level: str | None = None):
    """(unit kind, scores, labels, patients) per evaluation unit from per-item `scores` ((N,) or (N, K)):
    with aggregate 'series' / 'patient' (auto: the labels' level) a unit's score is the mean of its
    slices' and its label the largest of theirs."""
    pats = np.asarray(dataset.patients)
    unit, ids = _units(dataset, aggregate, level)
    if ids is not None:
        uniq, inv = np.unique(ids, return_inverse=True)
        cnt = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
        p = np.zeros((len(uniq), *scores.shape[1:]))
        np.add.at(p, inv, scores)
        scores = p / cnt.reshape(-1, *[1] * (scores.ndim - 1))
        lab = np.full(len(uniq), -1, np.int64)
        np.maximum.at(lab, inv, y)
        up = np.zeros(len(uniq), np.int64)
        up[inv] = pats
        y, pats = lab, up
    return unit, scores, y, pats


def evaluate(
    model: Classifier,
    dataset,
    *,
    aggregate: str = "auto",
    level: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    batch: int = 128,
    perturbation=None,
) -> dict:
    """Test metrics with bootstrap confidence intervals.

    Items are scored one by one; with aggregate 'series' / 'patient' (auto: the labels' level) a unit's
    probability is the mean of its slices' and its label the largest of theirs. The bootstrap resamples
    patients (stratified by class), so slices of one scan never count as independent evidence.
    Returns {"metrics": {name: {value, low, high, se}}, "unit", "n_units", "n_patients", "per_class",
    "probabilities", "labels", "patients"} (the last three as arrays, for paired comparisons).
    `perturbation`: tested on perturbed slices (see :mod:`sparkct.eval.robustness`)."""
    prob, y = predict(model, dataset, batch=batch, perturbation=perturbation)
    unit, prob, y, pats = pool_units(dataset, prob, y, aggregate=aggregate, level=level)
    ci = bootstrap_ci(y, prob, groups=pats, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return {
        "metrics": ci,
        "unit": unit,
        "n_units": int(len(y)),
        "n_patients": int(len(np.unique(pats))),
        "per_class": np.bincount(y, minlength=prob.shape[1]).tolist(),
        "probabilities": prob,
        "labels": y,
        "patients": pats,
        "confidence": confidence,
        "n_resamples": n_resamples,
    }


# ------------------------------------------------------------------------------------------ one run


def init_name(init: str) -> str:
    """A method name for reports: 'random', a pretraining run's method (e.g. 'spark'), or a file's stem."""
    if init in (None, "", "random"):
        return "random"
    if os.path.isdir(init):
        cfg = os.path.join(init, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                m = json.load(f).get("method")
            if m:
                return str(m)
        return os.path.basename(os.path.normpath(init))
    return os.path.splitext(os.path.basename(init))[0]


def _export_arch(path: str) -> str | None:
    """The arch a ``sparkct export`` recorded beside `path` (``path.json``), if any."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and meta.get("format") == "sparkct-backbone" and isinstance(meta.get("arch"), str):
        return meta["arch"]
    return None


def resolve_init(init: str, arch: str) -> tuple[str | None, str, str]:
    """(weights file or None, arch, kind) for --init: 'random', a state_dict FILE (a backbone export, whose
    ``FILE.json`` names its arch, or torchvision / timm weights), or a pretraining RUN folder (its
    backbone.pt export; its arch). A run's or an export's own arch wins over `arch`."""
    if init in (None, "", "random"):
        return None, arch, "random"
    if os.path.isdir(init):
        w = os.path.join(init, "backbone.pt")
        if not os.path.isfile(w):
            raise UserError(
                f"--init {init}: a run folder without backbone.pt (did the run finish? "
                f"`sparkct export {init} --out FILE` writes one from its checkpoint)"
            )
        cfg = os.path.join(init, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                run_arch = json.load(f).get("train", {}).get("arch")
            if run_arch:
                arch = run_arch
        return w, arch, "run"
    if os.path.isfile(init):
        return init, _export_arch(init) or arch, "file"
    raise UserError(f"--init {init}: not 'random', a weights file or a run folder")


def check_test_set(task) -> None:
    """The test CIs resample patients within each class (a patient counts in the class of its largest
    label): each class needs two of them, else a run would fail at its evaluation, after training."""
    t = task.test
    have = units_per_class(np.asarray(t.targets), np.asarray(t.patients))
    per_class = [have.get(c, 0) for c in range(task.n_classes)]
    if min(per_class) < 2:
        raise UserError(
            f"the test split holds {per_class} patients per class ({', '.join(map(str, task.classes))}); "
            "bootstrap CIs need at least 2 per class: use more labelled patients or a larger test "
            "fraction (--split)"
        )


def _steps_per_epoch(n: int, batch: int, accum: int) -> int:
    return (n // (batch // accum)) // accum


def finetune(
    task,
    *,
    init: str = "random",
    train_cfg=None,
    config: FinetuneConfig | None = None,
    aggregate: str = "auto",
    n_resamples: int = 1000,
    resume: bool = False,
    log=None,
    name: str | None = None,
    resume_cmd: str | None = None,
) -> dict:
    """Fine-tune on `task` (a :class:`sparkct.eval.data.TaskData`) into ``train_cfg.out``; test the
    best-validation checkpoint; write result.json and predictions.npz there; return the result.

    A batch larger than the training fraction is lowered to fit (recorded as ``effective_batch``).
    `resume_cmd`: the command an interrupted run names to resume (default: this one with --resume)."""
    log = log or rank0_log
    cfg = train_cfg if train_cfg is not None else TrainConfig(out="runs/finetune", epochs=70, batch=64, crop=224)
    config = config if config is not None else FinetuneConfig()
    cfg.validate()
    config.validate()
    check_test_set(task)
    if os.path.isfile(os.path.join(cfg.out, "result.json")) and C.find_latest(cfg.out) is None:
        # its checkpoints were removed after testing: nothing to resume, and a new run would overwrite it
        raise UserError(f"{cfg.out} holds a finished fine-tuning run (result.json): use another --out")
    weights, arch, kind = resolve_init(init, cfg.arch)
    cfg.arch = arch
    n = len(task.train)
    world = D.world_size()
    if n < cfg.accum * world:
        raise UserError(f"the training fraction holds {n} items, fewer than --accum x ranks")
    if cfg.batch > n:
        step = cfg.accum * world
        new = n // step * step
        log(f"batch {cfg.batch} is larger than the training set ({n} items): using batch {new}")
        cfg.batch = new
    spe = _steps_per_epoch(n, cfg.batch, cfg.accum)
    torch.manual_seed(cfg.seed)
    backbone, _ = build_backbone(arch, in_chans=len(task.windows), weights=weights, img_size=cfg.crop)
    model = Classifier(
        backbone,
        task.n_classes,
        config,
        windows=task.windows,
        steps_per_epoch=spe,
        val_data=task.val,
        crop=cfg.crop,
    )
    t0 = time.perf_counter()
    summary = Trainer(
        model,
        cfg,
        method_name="finetune",
        dataset=task.train,
        resume=resume,
        log=log,
        resume_cmd=resume_cmd,
        export_backbone=config.keep_checkpoints,  # else removed after testing: tested.pt holds the weights
    ).fit()
    train_s = time.perf_counter() - t0
    best = os.path.join(cfg.out, "best.ckpt")
    # no best.ckpt without a validation set: then the newest checkpoint that loads
    state = C.load_checkpoint(best) if os.path.isfile(best) else C.load_latest(cfg.out, log=log)
    model.load_state_dict(state["model"])
    t1 = time.perf_counter()
    res = evaluate(
        model,
        task.test,
        aggregate=aggregate,
        level=task.level,
        n_resamples=n_resamples,
        seed=cfg.seed,
        batch=config.eval_batch,
    )
    t_test = time.perf_counter() - t1
    robust, t_robust = _test_robustness(model, task, config, aggregate, n_resamples, cfg.seed, log)
    history = _read_history(cfg.out)
    result = {
        "method": name or init_name(init),
        "status": "done",
        "init": {
            "kind": kind,
            "source": None if kind == "random" else os.path.abspath(init),
            "weights": weights,
            "arch": arch,
        },
        "task": task.describe(),
        "fraction": task.fraction,
        "seed": cfg.seed,
        "train": config_to_dict(cfg),
        "finetune": config_to_dict(config),
        "effective_batch": cfg.batch,
        "steps_per_epoch": spe,
        "tested_checkpoint": {"path": state["path"], "step": int(state["step"]), "best_val_auc": state.get("best")},
        "test": {k: v for k, v in res.items() if k not in ("probabilities", "labels", "patients")},
        "val_history": history,
        "seconds": {"train": round(train_s, 2), "test": round(t_test, 2)},
        "summary": {k: summary.get(k) for k in ("steps", "total_steps", "seconds", "images_per_s")} if summary else {},
    }
    if robust is not None:
        result["robustness"] = robustness_summary(robust)
        result["seconds"]["robustness"] = round(t_robust, 2)
    if D.is_main():
        sio.write_npz_atomic(
            os.path.join(cfg.out, "predictions.npz"),
            {
                "probabilities": res["probabilities"],
                "labels": res["labels"],
                "patients": res["patients"],
                **{PERTURBED_KEY + k: v["probabilities"] for k, v in (robust or {}).items()},
            },
        )
        if not config.keep_checkpoints:  # the tested weights first: result.json names them
            result["tested_weights"] = _save_tested(cfg.out, model)
        sio.write_json_atomic(os.path.join(cfg.out, "result.json"), result)
        if not config.keep_checkpoints:
            _remove_checkpoints(cfg.out, log)
    m = res["metrics"]["auc"]
    log(
        f"test AUC {m['value']:.4f} ({int(100 * res['confidence'])}% CI {m['low']:.4f}-{m['high']:.4f}) on "
        f"{res['n_units']} {res['unit']}s of {res['n_patients']} patients; {cfg.out}/result.json"
    )
    return result


def _test_robustness(model, task, config, aggregate, n_resamples, seed, log) -> tuple[dict | None, float]:
    """(the tested model's results under each of the robustness PERTURBATIONS, or None where not tested;
    seconds). The perturbations are in HU: image sets (pseudo-HU) are not tested."""
    if not config.robustness:
        return None, 0.0
    if task.kind != "cache":
        log(f"robustness not tested: its perturbations are in HU, and {task.kind} images are not CT")
        return None, 0.0
    t0 = time.perf_counter()
    robust = evaluate_robustness(
        model,
        task.test,
        aggregate=aggregate,
        level=task.level,
        n_resamples=n_resamples,
        seed=seed,
        batch=config.eval_batch,
    )
    auc = {k: r["metrics"]["auc"]["value"] for k, r in robust.items()}
    worst = min(auc, key=auc.get)
    log(
        f"robustness: AUC {min(auc.values()):.4f}-{max(auc.values()):.4f} under {len(auc)} perturbations of the "
        f"test slices, lowest under {worst} ({time.perf_counter() - t0:.1f} s)"
    )
    return robust, time.perf_counter() - t0


#: what a fine-tuning run keeps besides its result, predictions, metrics, config and plots, unless
#: --keep-checkpoints: the tested weights (tested.pt); checkpoints hold the optimizer state too (~3x)
CHECKPOINT_FILES = ("checkpoints", "last.ckpt", "best.ckpt", "backbone.pt", "backbone.pt.json")


def _save_tested(run_dir: str, model: Classifier) -> str:
    """The model as tested (backbone and head state_dict) as ``tested.pt``; returns its path."""
    path = os.path.join(run_dir, "tested.pt")
    with sio.atomic_path(path, ".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    return path


def _remove_checkpoints(run_dir: str, log) -> None:
    """Remove the run's checkpoints and a backbone export, if any (tested.pt holds what was tested)."""
    before = _du(run_dir)
    for name in CHECKPOINT_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    after = _du(run_dir)
    log(f"removed the checkpoints (tested.pt holds the tested weights): {before / 1e6:.0f} -> {after / 1e6:.0f} MB")


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _read_history(run_dir: str) -> list[dict]:
    """The validation metrics (with their step and epoch) from the trainer's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for ln in f:
                r = json.loads(ln)
                if any(k.startswith("epoch/") for k in r):
                    out.append(
                        {
                            "epoch": r["epoch"],
                            "step": r["step"],
                            **{k[len("epoch/") :]: v for k, v in r.items() if k.startswith("epoch/")},
                        }
                    )
    return out
