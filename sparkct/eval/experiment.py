"""``sparkct experiment``: the small-data experiment end to end.

For each selected method: pretrain a backbone on the unlabelled CT (one run of the trainer), then
fine-tune it, and a randomly initialized baseline, on nested class-stratified fractions of the labelled
training patients for several seeds, and (--protocols) train a linear probe of each beside it (the
backbone frozen throughout, on the same patients with the same steps), test every model on the same
held-out patients with bootstrap CIs, and every fully fine-tuned model under fixed perturbations of the
test slices (sparkct.eval.robustness), score the task with a detector that needs no training
(sparkct.eval.reference) as a check on its difficulty, and write the report (``results.md``,
``auc_vs_fraction.png``, ``convergence.png``, ``robustness.png``, ``results.json``, ``runs.csv``) into the
experiment folder.

Without data it runs on the built-in synthetic chest CT: a pretraining pool and a disjoint labelled task
(nodule present / absent per slice, from ``sparkct data synth``'s ``slice_labels.csv``), sized for a 2-core
CPU in minutes; flags scale everything for real archives on GPUs.

Resumable: every pretraining and fine-tuning run lives in a folder named by a hash of its config; a
finished run (``summary.json`` / ``result.json``) is skipped, an interrupted one resumes from its last
checkpoint, a failed one is recorded (``failed.json``) and reported as failed, never dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import traceback

import numpy as np
from tqdm import tqdm

from sparkct import io as sio
from sparkct.cliargs import parse_field
from sparkct.data import CTSliceDataset, SliceCache, prepare, synth
from sparkct.data.windows import resolve_windows
from sparkct.device import resolve_device
from sparkct.errors import UserError
from sparkct.eval.config import SMALL_DATA_OVERRIDES, ExperimentConfig, FinetuneConfig
from sparkct.eval.data import load_task
from sparkct.eval.finetune import Classifier, check_test_set, finetune
from sparkct.eval.overlap import Overlap, find_overlap, without_patients
from sparkct.eval.reference import DIAMETERS_MM, blob_reference
from sparkct.eval.reference import NAME as REFERENCE_NAME
from sparkct.eval.report import collect_runs, run_protocol, write_report
from sparkct.models import get_method
from sparkct.models.backbone import arch_family, build_backbone
from sparkct.train.config import TrainConfig, config_to_dict
from sparkct.train.optim import scaled_lr
from sparkct.train.signals import resume_command
from sparkct.train.trainer import Trainer, build_method

__all__ = ["ExperimentConfig", "run_experiment", "SMALL_DATA_OVERRIDES"]


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _data_id(path: str | None) -> str | None:
    """What identifies data beyond its path (a folder rewritten with other data keeps its path): for a
    prepared cache, its settings, salt, series and slice positions; for a file (labels CSV, .npz), its
    bytes. A folder of images is known by its path only."""
    if path is None:
        return None
    if os.path.isfile(os.path.join(path, "cache.json")):
        c = SliceCache(path)
        h = hashlib.sha1(json.dumps(c.manifest, sort_keys=True, default=str).encode())
        for a in (c.series["key"], c.patients):
            h.update(np.asarray(a).astype(str).tobytes())
        for a in (c.slice_series, c.slice_z):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:12]
    if os.path.isfile(path):
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:12]
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differs(old: dict, new: dict) -> str:
    """What differs between two runs' settings, briefly: ``field old (now new)``."""
    a, b = _flat(old), _flat(new)
    parts = []
    for k in sorted(set(a) | set(b)):
        if k in ("train.out", "train.seed", "fraction") or a.get(k) == b.get(k):
            continue
        va, vb = a.get(k, "unset"), b.get(k, "unset")
        if k == "init":  # a pretraining run's folder (its name holds the method and its settings' hash) or a file
            k = "pretraining run" if os.path.isdir(str(vb)) or os.path.isdir(str(va)) else "weights file"
            va, vb = os.path.basename(str(va)), os.path.basename(str(vb))
        elif k.endswith("_id"):  # a content hash: that it differs is what a reader needs
            parts.append(f"{k[: -len('_id')]} contents differ")
            continue
        parts.append(f"{k} {va} (now {vb})")
    return "; ".join(parts) or "settings hash differs"


def _split_runs(runs: list[dict], current: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(the runs of this experiment's settings, the others): a run is current only when its folder is
    the one its full settings' hash names now (`current`: run folder -> settings). The others stay on disk
    and are listed as stale, each with what differs from the current run of its method, protocol, fraction
    and seed (or why none is current), never averaged with current runs."""
    by_cell = {(s["method"], run_protocol(s), s["fraction"], s["seed"]): s for s in current.values()}
    here, stale = [], []
    for r in runs:
        d = os.path.normpath(r["run_dir"])
        if d in current:
            here.append(r)
            continue
        path = os.path.join(d, "settings.json")
        old = sio.read_json(path)["settings"] if os.path.isfile(path) else None
        cell = (r.get("method"), run_protocol(r), float(r.get("fraction") or 0), int(r.get("seed") or 0))
        now = by_cell.get(cell)
        if now is None:
            why = "method, protocol, fraction or seed not requested now"
        elif old is None:
            why = "settings not recorded (made by an older sparkct): not comparable"
        else:
            why = _differs(old, now)
        stale.append({**r, "stale": why})
    return here, stale


def _lr_line(cfg: ExperimentConfig, ft_cfg: TrainConfig, methods: list[str]) -> str:
    """The fine-tuning lr every arm used, where it came from, and a built-in override left out."""
    given = {k.split("=", 1)[0].strip() for k in cfg.set}
    builtin = cfg.data is None and cfg.pretrain_data is None
    base = ft_cfg.base_lr if ft_cfg.base_lr is not None else Classifier.defaults["base_lr"]
    if ft_cfg.lr is not None:
        peak, why = ft_cfg.lr, "--set finetune.lr"
    else:
        peak = scaled_lr(base, ft_cfg.batch)
        if "finetune.base_lr" in given:
            why = f"--set finetune.base_lr={base:g}"
        elif builtin and "finetune.base_lr" in SMALL_DATA_OVERRIDES:
            why = f"built-in override finetune.base_lr={base:g} (chosen on the built-in task's validation split)"
        else:
            why = f"default base_lr {base:g} per 256 (the published protocol)"
        why += f" x batch {ft_cfg.batch} / 256"
    text = f"peak {peak:.3g} for every arm ({', '.join(methods)}): {why}"
    dropped = (
        "finetune.base_lr" in SMALL_DATA_OVERRIDES and not builtin and not given & {"finetune.base_lr", "finetune.lr"}
    )
    if dropped:
        flags = " and ".join(f for f, v in (("--data", cfg.data), ("--pretrain-data", cfg.pretrain_data)) if v)
        b = SMALL_DATA_OVERRIDES["finetune.base_lr"]
        text += (
            f"; the built-in override finetune.base_lr={b:g} (lr {scaled_lr(b, ft_cfg.batch):.3g}) is not applied "
            f"because {flags} is given (--set finetune.base_lr={b:g} applies it)"
        )
    return text


def _overrides_line(cfg: ExperimentConfig, overrides: dict, pre_methods: list[str]) -> str:
    """The built-in data's overrides in effect, or which were left out and why."""
    relevant = {k: v for k, v in SMALL_DATA_OVERRIDES.items() if k.split(".", 1)[0] in (*pre_methods, "finetune")}
    if not relevant:
        return "none apply to these methods"
    if cfg.data is None and cfg.pretrain_data is None:
        given = {k.split("=", 1)[0].strip() for k in cfg.set}
        used = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in relevant.items() if k not in given]
        replaced = [k for k in relevant if k in given]
        return f"in effect: {', '.join(used) or 'none'}" + (
            f"; replaced by --set: {', '.join(replaced)}" if replaced else ""
        )
    flags = " and ".join(f for f, v in (("--data", cfg.data), ("--pretrain-data", cfg.pretrain_data)) if v)
    return f"none in effect ({flags} given); left out: " + ", ".join(f"{k}={v}" for k, v in relevant.items())


def _protocol_line(ft_cfg: TrainConfig, fcfg: FinetuneConfig) -> str:
    """The fine-tuning protocol as the trainer and the Classifier run it (not as published)."""

    def setting(k):
        v = getattr(ft_cfg, k, None)
        return v if v is not None else Classifier.defaults.get(k)

    wd, wd_end, warm = setting("weight_decay"), setting("weight_decay_end"), setting("warmup_epochs") or 0
    wd_text = f"{wd:g}" if wd_end is None or wd_end == wd else f"{wd:g} falling by cosine to {wd_end:g}"
    warm_text = f"linear warm-up over {warm:g} epoch(s), then " if warm else ""
    text = (
        f"optimizer {setting('optimizer')}, weight decay {wd_text} on weights only (biases and 1-D norm "
        f"parameters are not decayed); lr {warm_text}"
        "half-cycle cosine decay from the peak to 0.001 x peak over all steps (the published protocol: "
        "constant Adam lr 1e-4); "
    )
    # a ViT's LayerNorms keep no running statistics: eval mode changes nothing there to state
    vit = arch_family(ft_cfg.arch) == "vit"
    if fcfg.linear_probe:
        text += "linear probe: the backbone frozen throughout, in eval mode" + (
            "" if vit else " (BatchNorm keeps the initialization's statistics)"
        )
    else:
        text += (
            f"backbone frozen for the first {_span(fcfg.freeze_steps, fcfg.freeze_epochs)}, only the head "
            "learning"
            + (
                ""
                if vit
                else ", with its BatchNorm in eval mode (running statistics stay the initialization's: for random "
                "init, mean 0 and variance 1)"
            )
            + f", then trained at {fcfg.backbone_lr_start:g} x lr rising linearly to lr over "
            f"{_span(fcfg.ramp_steps, fcfg.ramp_epochs)}"
        )
    return text + "; the checkpoint of best validation AUC is tested"


def _span(steps: int | None, epochs: float) -> str:
    return f"{steps} step(s)" if steps is not None else f"{epochs:g} epoch(s)"


def _fractions_line(runs: list[dict]) -> str:
    """The labelled training set each fraction actually got (patients and items), per seed where they
    differ; every arm of a seed and fraction uses the same patients."""
    got: dict[float, dict] = {}
    for r in runs:
        t = r.get("task") or {}
        if r.get("status", "done") != "done" or "train" not in t:
            continue
        unit = "slices" if t.get("kind") == "cache" else "images"
        full = t.get("full_train", {})
        got.setdefault(float(r["fraction"]), {})[r.get("seed")] = (
            t["train"]["patients"],
            full.get("patients"),
            t["train"]["items"],
            full.get("items"),
            unit,
        )
    parts = []
    for fr in sorted(got, reverse=True):
        sizes = got[fr]
        vals = sorted(set(sizes.values()), key=str)
        texts = []
        for v in vals:
            p, pf, n, nf, unit = v
            seeds = sorted(s for s, w in sizes.items() if w == v)
            txt = f"{p} of {pf} patients ({100 * p / max(pf or 1, 1):.0f} %), {n} of {nf} {unit}"
            texts.append(txt + (f" (seed {', '.join(map(str, seeds))})" if len(vals) > 1 else ""))
        parts.append(f"{_pct(fr)}: {'; '.join(texts)}")
    return (
        " | ".join(parts) + " (the same patients for every arm of a fraction and seed)" if parts else "no finished runs"
    )


def _pct(f: float) -> str:
    return f"{100 * f:g} %"


def _typed(cls, values: dict, method: str):
    """An instance of dataclass `cls` with string values converted by the field types (--set `method`.k=v)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in values.items():
        if k not in names:
            raise UserError(
                f"--set {method}.{k}: {method} has no option {k!r} (its options: {', '.join(sorted(names))}; "
                "trainer options such as base_lr or epochs are accepted too)"
            )
        try:
            kw[k] = parse_field(cls, k, v) if isinstance(v, str) else v
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"--set {method}.{k}={v}: {e}") from None
    return cls(**kw)


def _run_configs(
    cfg: ExperimentConfig, what: str, config_class, opts: dict, base: dict, **train
) -> tuple[TrainConfig, object]:
    """(trainer config, `config_class` instance) of one kind of run, both validated: the experiment's
    settings (`train`: the trainer's, `base`: the method's), then `opts` (``--set WHAT.FIELD=VALUE`` and
    the built-in data's defaults; trainer fields go to the trainer config, the others to the method's)."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    mcfg = _typed(config_class, {**base, **{k: v for k, v in opts.items() if k not in train_fields}}, what)
    tcfg = TrainConfig(
        arch=cfg.arch,
        windows=cfg.windows,
        crop=cfg.crop,
        device=cfg.device,
        amp=cfg.amp,
        seed=0,
        progress=False,
        tensorboard=False,
        log_every=5,
        keep=1,
        preview_every=0,
        **train,
    )
    for k, v in _typed(TrainConfig, {k: v for k, v in opts.items() if k in train_fields}, what).__dict__.items():
        if k in opts:
            setattr(tcfg, k, v)
    try:
        tcfg.validate()
        mcfg.validate()
    except UserError as e:
        given = f" (options {', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""
        raise UserError(f"{what}: {e}{given}") from None
    return tcfg, mcfg


def _check_outside_weights(cfg: ExperimentConfig) -> dict[str, str]:
    """--init-weights as {row name: file}, each file loaded into the --arch backbone with --windows' channels
    before anything is written: a file that does not fit fails here, not after the pretraining."""
    outside = cfg.outside_weights()
    in_chans = len(resolve_windows(cfg.windows))
    for name, path in outside.items():
        try:
            build_backbone(cfg.arch, in_chans=in_chans, weights=path, img_size=cfg.crop)
        except UserError as e:
            raise UserError(f"--init-weights {name}: {e}") from None
    return outside


def _pretrain_configs(cfg: ExperimentConfig, method: str, opts: dict) -> tuple[TrainConfig, object]:
    """The pretraining run's configs (``data`` is set once the data is ready)."""
    cls = get_method(method)
    if cls.resnet_only and arch_family(cfg.arch) == "vit":
        raise UserError(f"--methods {method} with --arch {cfg.arch}: {cls.resnet_only}")
    c = cls.config_class
    tcfg, mcfg = _run_configs(
        cfg, method, c, opts, {}, epochs=cfg.pretrain_epochs, batch=cfg.pretrain_batch, ckpt_every=25
    )
    # what the trainer's set-up checks on the method (the batch, the crop: e.g. SparK's mask grid), here,
    # before other methods have spent their time
    try:
        m = build_method(method, tcfg, mcfg)
        m.check_run(tcfg.batch // tcfg.accum)
        m.check_input(tcfg.crop, tcfg.windows)
    except UserError as e:
        raise UserError(f"{method}: {e}") from None
    return tcfg, mcfg


def _finetune_configs(cfg: ExperimentConfig, opts: dict) -> tuple[TrainConfig, FinetuneConfig]:
    """The fine-tuning runs' configs (``seed`` and ``out`` are set per run)."""
    base = {
        "freeze_steps": cfg.freeze_steps,
        "ramp_steps": cfg.ramp_steps,
        "eval_every": cfg.eval_every,
        "keep_checkpoints": cfg.keep_checkpoints,
    }
    # a budget in steps (max_steps) whatever the fraction's size; `epochs` is then only the trainer's default
    tcfg, fcfg = _run_configs(
        cfg,
        "finetune",
        FinetuneConfig,
        opts,
        base,
        epochs=1,
        max_steps=cfg.finetune_steps,
        batch=cfg.finetune_batch,
        ckpt_every=50,
    )
    assert isinstance(fcfg, FinetuneConfig)
    return tcfg, fcfg


class _Progress:
    """Which run of how many is going and the time left: a tqdm bar over the runs (on a terminal) and one log
    line per run (readable where stderr is a file, e.g. CI). Pretraining and fine-tuning runs differ in length
    by an order of magnitude, so the time left is estimated per kind (the mean of the runs of that kind done
    in this session times those left); a kind not timed yet is named instead of guessed. The log lines count
    every run of the experiment (a skipped one says so on its next line); the bar counts those to run, so
    skipped runs leave its total instead of counting as instant runs. Off a terminal the bar writes to
    os.devnull: it still counts, only the log lines show."""

    def __init__(self, totals: dict[str, int], log):
        self.log, self._sink = log, None
        self.total, self.started = sum(totals.values()), 0
        self.left = dict(totals)
        self.times: dict[str, list[float]] = {k: [] for k in totals}
        self._kind, self._t0 = None, 0.0
        tty = sys.stderr.isatty()
        if not tty:
            self._sink = open(os.devnull, "w")  # closed in close()
        self.bar = tqdm(
            total=sum(totals.values()),
            unit="run",
            desc="experiment",
            smoothing=0,
            dynamic_ncols=True,
            file=sys.stderr if tty else self._sink,
            mininterval=1.0,
        )

    def eta(self) -> str:
        known = sum(n * sum(self.times[k]) / len(self.times[k]) for k, n in self.left.items() if n and self.times[k])
        unknown = [
            f"{n} {k} run{'s' if n > 1 else ''} not timed yet" for k, n in self.left.items() if n and not self.times[k]
        ]
        parts = ([f"about {tqdm.format_interval(known)} left"] if known else []) + unknown
        return ", " + "; ".join(parts) if parts else ""

    def start(self, kind: str, what: str) -> None:
        b = self.bar
        self._kind, self._t0 = kind, time.perf_counter()
        self.started += 1
        b.set_postfix_str(what.split(" -> ")[0], refresh=False)
        elapsed = tqdm.format_interval(b.format_dict["elapsed"])
        self.log(f"[{self.started}/{self.total}] {what} ({elapsed} elapsed{self.eta()})")

    def finish(self, ran: bool) -> None:
        self.left[self._kind] -= 1
        if ran:
            self.times[self._kind].append(time.perf_counter() - self._t0)
            self.bar.update(1)
        else:
            self.bar.total -= 1
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        if self._sink is not None:
            self._sink.close()


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # above the progress bar, not through it


def _synth_once(
    dst: str,
    patients: int,
    seed: int,
    size: int,
    slices: int,
    log,
    thickness: float | None = None,
    min_nodule_mm: float = 4.0,
    p_finding: float = 0.5,
    max_nodule_mm: float = 30.0,
) -> str:
    want = {
        # one series per patient: a second series of the same chest adds slices, synthesis and test time
        # but little new evidence (its slices are the same anatomy and findings)
        "series_per_patient": [1, 1],
        "max_nodule_mm": max_nodule_mm,
        "p_finding": p_finding,
        "seed": seed,
        "patients": patients,
        "size": size,
        "slices": slices,
        "thickness": thickness,
        "min_nodule_mm": min_nodule_mm,
    }
    marker = os.path.join(dst, "synth.json")
    have = sio.read_json(marker) if os.path.isfile(marker) else None
    if have is None or any(have.get(k) != v for k, v in want.items()):
        log(f"synthesizing {patients} patients ({size}x{size}, {slices} slices per series) into {dst}")
        shutil.rmtree(dst, ignore_errors=True)
        synth(
            dst,
            patients=patients,
            seed=seed,
            size=size,
            slices=slices,
            localizer=False,
            thickness=thickness,
            min_nodule_mm=min_nodule_mm,
            max_nodule_mm=max_nodule_mm,
            p_finding=p_finding,
            series_per_patient=(1, 1),
        )
    return dst


#: salt of the built-in synthetic caches: their patients are fictitious, and a fixed salt fixes the patient
#: pseudonyms, hence the patient splits (ordered by pseudonym), so built-in runs are reproducible. Real data
#: gets a random salt (sparkct data prepare's default).
SYNTHETIC_SALT = "5e1f" * 8


def _prepare_once(src: str, dst: str, log, salt: str | None = None) -> str:
    if os.path.isfile(os.path.join(src, "cache.json")):
        return src
    rep = prepare(src, dst, progress=False, salt=salt)
    if rep.slices == 0:
        raise UserError(f"{src}: no usable CT slices")
    log(f"cache {dst}: {rep.slices} slices of {rep.series} series")
    return dst


def _recorded_seconds(pretrain_dirs: list[str], runs: list[dict]) -> float:
    """The time the finished runs recorded (pretraining summary.json, fine-tuning result.json): the
    experiment's compute time whichever invocation ran each run, so a re-run that skips them keeps it."""
    total = 0.0
    for d in pretrain_dirs:
        path = os.path.join(d, "summary.json")
        if os.path.isfile(path):
            total += float(sio.read_json(path).get("seconds") or 0)
    for r in runs:
        if r.get("status", "done") == "done":
            total += sum(float(v or 0) for v in (r.get("seconds") or {}).values())
    return total


def _pretraining_set(cfg: ExperimentConfig, pre_cache: str, task, builtin: bool):
    """(the pretraining dataset, or None where the trainer opens ``pre_cache`` itself; its description;
    its overlap with the labelled val/test patients, None where that cannot be checked). Without
    --pretrain-data, --data's cache is pretrained on less its validation and test patients."""
    whole = CTSliceDataset(pre_cache)
    subset = cfg.pretrain_data is None and not builtin
    ds = without_patients(whole, task) if subset else whole
    overlap = find_overlap(task, ds)
    source = (
        "the built-in synthetic pool"
        if builtin
        else f"{cfg.data} less its labelled validation and test patients"
        if subset
        else cfg.pretrain_data
    )
    desc = f"{source}: {len(set(ds.patients.tolist()))} patients, {len(ds)} slices"
    return (ds if subset else None), desc, overlap


def _overlap_lines(overlap: Overlap | None, allowed: bool) -> tuple[str, str | None]:
    """(the header line on the overlap, the line for the top of results.md or None)."""
    if overlap is None:
        return "not checked (the labelled data is not a prepared CT cache: no UIDs)", None
    if not overlap.any:
        return f"none with the labelled validation/test patients (checked by {overlap.checked_by})", None
    what = f"{overlap.describe()} (by {overlap.checked_by})"
    note = (
        f"Pretraining data overlaps the labelled validation/test patients (--allow-overlap): {what}; "
        "the pretrained methods have seen scans they are tested on."
    )
    return f"{what}, allowed by --allow-overlap", note if allowed else None


def _reference(cfg: ExperimentConfig, task, log) -> dict:
    """The no-training reference on the task's validation and test splits (the same for every run): the
    blob detector, its sigmas matched to the built-in data's nodule diameters, or to lung nodules' range."""
    if task.kind != "cache" or task.n_classes != 2:
        return {"name": REFERENCE_NAME, "skipped": f"it scores nodules in HU: needs two classes of CT, not {task.kind}"}
    diameters = (cfg.synth_min_nodule, cfg.synth_max_nodule) if cfg.data is None else DIAMETERS_MM
    t0 = time.perf_counter()
    ref = blob_reference(task, crop=cfg.crop, diameters_mm=diameters, n_resamples=cfg.resamples)
    a, v = ref["test"]["auc"], ref["val"]["auc"]
    log(
        f"reference, {REFERENCE_NAME}: AUC {v['value']:.4f} on validation, {a['value']:.4f} on test (95% CI "
        f"{a['low']:.4f}-{a['high']:.4f}) ({time.perf_counter() - t0:.1f} s)"
    )
    return ref


def run_experiment(cfg: ExperimentConfig, log=_log) -> dict:
    """Run (or resume) the experiment; returns the report's paths."""
    cfg.validate()
    methods, fractions, seeds = cfg.lists()
    resolve_device(cfg.device)
    overrides = cfg.overrides()
    # every run's options, for every method named, built and checked before anything is written
    pre_methods = [m for m in methods if m != "random"]
    pre_cfgs = {m: _pretrain_configs(cfg, m, overrides.get(m, {})) for m in pre_methods}
    ft_opts = overrides.get("finetune", {})
    ft_cfg, fcfg = _finetune_configs(cfg, ft_opts)
    protocols = cfg.protocol_list()
    outside = _check_outside_weights(cfg)
    rows = [*methods, *outside]  # the table's rows: each method, then each --init-weights file
    # the probe differs from fine-tuning in linear_probe alone: same patients, steps, lr and validation; the
    # robustness test is of the fully fine-tuned models only (the report's Robustness section compares those)
    arm_cfgs = {"finetune": fcfg, "linear": dataclasses.replace(fcfg, linear_probe=True, robustness=False)}
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    t_start = time.perf_counter()
    rerun = resume_command(flag=None)  # an interrupted training names it: running it again resumes

    # ---- data ------------------------------------------------------------------------------------
    if cfg.data is None:
        synth_kw = {
            "thickness": cfg.synth_thickness,
            "min_nodule_mm": cfg.synth_min_nodule,
            "max_nodule_mm": cfg.synth_max_nodule,
        }
        task_src = _synth_once(
            os.path.join(data_dir, "synth-task"),
            cfg.synth_patients,
            2,
            cfg.synth_size,
            cfg.synth_slices,
            log,
            p_finding=cfg.synth_finding,
            **synth_kw,
        )
        task_data = _prepare_once(task_src, os.path.join(data_dir, "cache-task"), log, SYNTHETIC_SALT)
        labels = os.path.join(task_src, "slice_labels.csv")
        data_desc = (
            f"built-in synthetic chest CT: {cfg.synth_patients} labelled patients (nodule present/absent "
            f"per slice), {cfg.pretrain_patients} other patients for pretraining, {cfg.synth_size}x"
            f"{cfg.synth_size}, {cfg.synth_slices} slices per series of {cfg.synth_thickness:g} mm, "
            f"nodules {cfg.synth_min_nodule:g}-{cfg.synth_max_nodule:g} mm"
        )
    else:
        task_data, labels = cfg.data, cfg.labels
        data_desc = f"{cfg.data}" + (f" with labels {cfg.labels}" if cfg.labels else "")
    if cfg.pretrain_data is not None:
        pre_cache = _prepare_once(cfg.pretrain_data, os.path.join(data_dir, "cache-pretrain"), log)
    elif cfg.data is None and pre_methods:
        pre_src = _synth_once(
            os.path.join(data_dir, "synth-pretrain"),
            cfg.pretrain_patients,
            1,
            cfg.synth_size,
            cfg.synth_slices,
            log,
            p_finding=cfg.pretrain_finding,
            **synth_kw,
        )
        pre_cache = _prepare_once(pre_src, os.path.join(data_dir, "cache-pretrain"), log, SYNTHETIC_SALT)
    elif cfg.data is not None and os.path.isfile(os.path.join(cfg.data, "cache.json")):
        pre_cache = cfg.data
    else:  # nothing to pretrain on (built-in data and random init alone needs no pool)
        pre_cache = None
        if any(m != "random" for m in methods):
            raise UserError("--pretrain-data is needed: --data is not a CT cache, and pretraining reads CT")

    split = cfg.split_fractions()
    split_text = ",".join(f"{v:g}" for v in split)
    task0 = load_task(task_data, labels, split=split, seed=seeds[0], windows=cfg.windows)  # checks labels early
    desc = task0.describe()
    log(
        f"task: {len(task0.classes)} classes; train (full) {desc['full_train']}, val {desc['val']}, test {desc['test']}"
    )
    check_test_set(task0)  # said once, before any training
    # the data's identity beyond its path, in every run's settings hash: new data in the same folder (e.g.
    # other --synth-* settings) makes new runs, never a finished run of the old data counted as one
    # hashed once per path: --data alone is the pretraining cache as well
    ids = {p: _data_id(p) for p in {task_data, labels, *([pre_cache] if pre_methods else [])}}
    task_id = {"data": task_data, "data_id": ids[task_data], "labels": labels, "labels_id": ids[labels]}
    pre_id = ids[pre_cache] if pre_methods else None
    outside_ids = {m: _data_id(p) for m, p in outside.items()}
    pre_ds, pre_desc, overlap_line, overlap_note = None, None, "", None
    if pre_methods and pre_cache is not None:
        pre_ds, pre_desc, overlap = _pretraining_set(cfg, pre_cache, task0, builtin=cfg.data is None)
        if overlap is not None and overlap.any and not cfg.allow_overlap:
            raise UserError(
                f"the pretraining data overlaps the labelled patients: {overlap.describe()} (by "
                f"{overlap.checked_by}); pretrain on other patients, or pass --allow-overlap to run anyway"
            )
        log(f"pretraining data: {pre_desc}")
        overlap_line, overlap_note = _overlap_lines(overlap, cfg.allow_overlap)

    if ft_opts:
        log(
            f"fine-tuning options: {', '.join(f'{k}={v}' for k, v in ft_opts.items())}"
            + (" (built-in data defaults; --set finetune.FIELD=VALUE overrides)" if cfg.data is None else "")
        )

    n_cells = len(rows) * len(fractions) * len(seeds)
    prog = _Progress(
        {
            "pretraining": len(pre_methods),
            "fine-tuning": n_cells * ("finetune" in protocols),
            "linear probe": n_cells * ("linear" in protocols),
        },
        log,
    )
    try:
        inits: dict[str, str | None] = {"random": "random", **outside}
        failed_pre: dict[str, str] = {}
        pre_dirs: list[str] = []

        # ---- pretraining -------------------------------------------------------------------------------
        for m in pre_methods:
            tcfg, mcfg = pre_cfgs[m]
            tcfg.data = pre_cache
            what = {
                "method": m,
                "train": config_to_dict(tcfg),
                "method_config": config_to_dict(mcfg),
                "data_id": pre_id,
            }
            if pre_ds is not None:  # a subset of the cache: which slices is part of the run's identity
                what["slices"] = hashlib.sha256(pre_ds.indices.tobytes()).hexdigest()[:16]
            key = _key(what)
            run_dir = os.path.join(out, "pretrain", f"{m}-{key}")
            tcfg.out = run_dir
            pre_dirs.append(run_dir)
            prog.start("pretraining", f"pretrain {m} -> {run_dir}")
            if os.path.isfile(os.path.join(run_dir, "summary.json")):
                log("  finished earlier: skipped")
                inits[m] = run_dir
                prog.finish(False)
                continue
            try:
                method = build_method(m, tcfg, mcfg)
                resume = os.path.isfile(os.path.join(run_dir, "last.ckpt"))
                Trainer(
                    method,
                    tcfg,
                    method_name=m,
                    dataset=pre_ds,
                    resume=resume,
                    log=lambda s: log("  " + s),
                    resume_cmd=rerun,
                ).fit()
                inits[m] = run_dir
            except (Exception, KeyboardInterrupt) as e:  # a failed method is reported, not fatal
                if isinstance(e, KeyboardInterrupt):
                    raise
                failed_pre[m] = f"pretraining failed: {type(e).__name__}: {e}"
                log(f"  FAILED: {failed_pre[m]}")
                sio.write_json_atomic(
                    os.path.join(run_dir, "pretrain_failed.json"),
                    {"method": m, "error": failed_pre[m], "traceback": traceback.format_exc()},
                )
            prog.finish(True)

        # ---- fine-tuning -------------------------------------------------------------------------------
        current: dict[str, dict] = {}  # run folder -> its full settings: the runs this report may use
        for m in rows:
            for seed in seeds:
                for fr, protocol in itertools.product(fractions, protocols):
                    tcfg, pcfg = dataclasses.replace(ft_cfg, seed=seed), arm_cfgs[protocol]
                    settings = {
                        "init": inits.get(m, m),
                        # the file's bytes: other weights under the same path make new runs
                        **({"init_id": outside_ids[m]} if m in outside else {}),
                        "train": config_to_dict(tcfg),
                        # keeping checkpoints changes no result: the same run either way; linear_probe (the
                        # protocol) is in it
                        "finetune": {k: v for k, v in config_to_dict(pcfg).items() if k != "keep_checkpoints"},
                        "fraction": fr,
                        "split": split_text,
                        **task_id,
                    }
                    key = _key(settings)
                    prefix = "linear-" if protocol == "linear" else ""
                    run_dir = os.path.join(out, "finetune", m, f"{prefix}f{fr:g}-s{seed}-{key}")
                    tcfg.out = run_dir
                    current[os.path.normpath(run_dir)] = {**settings, "method": m, "seed": seed}
                    if not os.path.isfile(os.path.join(run_dir, "settings.json")):
                        # what the hash stands for: a later experiment with other settings says what differs
                        sio.write_json_atomic(
                            os.path.join(run_dir, "settings.json"),
                            {"key": key, "settings": current[os.path.normpath(run_dir)]},
                        )
                    kind, verb = (
                        ("linear probe", "linear probe of") if protocol == "linear" else ("fine-tuning", "fine-tune")
                    )
                    prog.start(kind, f"{verb} {m} on {fr:.0%} of the labelled patients, seed {seed}")
                    if os.path.isfile(os.path.join(run_dir, "result.json")):
                        log("  finished earlier: skipped")
                        prog.finish(False)
                        continue
                    failed = os.path.join(run_dir, "failed.json")
                    if os.path.isfile(failed):
                        os.unlink(failed)  # try again: the cause may have been fixed
                    try:
                        if m in failed_pre:
                            raise RuntimeError(failed_pre[m])
                        task = load_task(task_data, labels, split=split, fraction=fr, seed=seed, windows=cfg.windows)
                        resume = os.path.isfile(os.path.join(run_dir, "last.ckpt"))
                        finetune(
                            task,
                            init=inits[m],
                            train_cfg=tcfg,
                            config=pcfg,
                            n_resamples=cfg.resamples,
                            resume=resume,
                            name=m,
                            log=lambda s: log("  " + s),
                            resume_cmd=rerun,
                        )
                    except (Exception, KeyboardInterrupt) as e:
                        if isinstance(e, KeyboardInterrupt):
                            raise
                        msg = str(e) if m in failed_pre else f"{type(e).__name__}: {e}"
                        log(f"  FAILED: {msg}")
                        sio.write_json_atomic(
                            failed,
                            {
                                "method": m,
                                "protocol": protocol,
                                "fraction": fr,
                                "seed": seed,
                                "error": msg,
                                "traceback": traceback.format_exc(),
                            },
                        )
                    prog.finish(True)
    finally:
        prog.close()

    # ---- report ------------------------------------------------------------------------------------
    runs, stale = _split_runs(collect_runs(os.path.join(out, "finetune")), current)
    extra = {
        "experiment data": data_desc,
        "pretraining data": "none (no pretraining method among --methods)",
        "labelled training set per fraction": _fractions_line(runs),
        "built-in overrides": _overrides_line(cfg, overrides, pre_methods),
        "fine-tuning lr": _lr_line(cfg, ft_cfg, rows),
        "fine-tuning protocol": _protocol_line(ft_cfg, fcfg),
        "linear probe protocol": _protocol_line(ft_cfg, arm_cfgs["linear"]),
        "pretraining": (
            f"{', '.join(pre_methods) or 'none'}: {cfg.arch}, crop {cfg.crop}, "
            f"{cfg.pretrain_epochs} epochs, batch {cfg.pretrain_batch}"
            + (
                f"; options {json.dumps(used)}"
                if (used := {k: v for k, v in overrides.items() if k in pre_methods})
                else ""
            )
        ),
        "fine-tuning schedule": (
            f"{cfg.finetune_steps} optimizer steps at every fraction, batch {cfg.finetune_batch}, backbone frozen "
            f"{cfg.freeze_steps} steps then ramped over {cfg.ramp_steps}, validated every {cfg.eval_every}; "
            "fractions "
            f"{', '.join(f'{f:g}' for f in fractions)}; seeds {', '.join(map(str, seeds))}; "
            f"split {split_text} of the labelled patients; protocols: "
            + ", ".join(
                {"finetune": "full fine-tuning", "linear": "linear probe (the same steps)"}[p] for p in protocols
            )
            + (f"; options {json.dumps(ft_opts)}" if ft_opts else "")
        ),
        "experiment time": (
            f"{_recorded_seconds(pre_dirs, runs) / 60:.1f} min of pretraining and fine-tuning, as its finished "
            f"runs recorded them ({(time.perf_counter() - t_start) / 60:.1f} min in this invocation)"
        ),
    }
    for p, k in (("finetune", "fine-tuning protocol"), ("linear", "linear probe protocol")):
        if p not in protocols:
            del extra[k]
    if outside:
        extra["outside weights"] = "; ".join(f"{m} = {p} (sha1 {outside_ids[m]})" for m, p in outside.items())
    if pre_desc is not None:
        extra["pretraining data"] = pre_desc
        extra["pretraining overlap"] = overlap_line
    if failed_pre:
        extra["failed pretraining"] = "; ".join(f"{k}: {v}" for k, v in failed_pre.items())
    paths = write_report(
        runs,
        out,
        baseline="random" if "random" in methods else methods[0],
        n_resamples=cfg.resamples,
        extra=extra,
        config={
            **dataclasses.asdict(cfg),
            "overrides": overrides,
            "outside_weights": {m: {"path": p, "sha1": outside_ids[m]} for m, p in outside.items()},
        },
        stale=stale,
        notice=overlap_note,
        reference=_reference(cfg, task0, log),
    )
    log(f"report: {', '.join(paths.values())} ({(time.perf_counter() - t_start) / 60:.1f} min)")
    return paths
