"""``sparkct finetune``: fine-tune (or linearly probe) a backbone on labelled data and test it with CIs;
``sparkct report``: results.md, auc_vs_fraction.png, results.json and runs.csv from fine-tuning runs;
``sparkct experiment``: the whole small-data experiment; ``sparkct eval probe``: bias probes of a frozen
backbone's embeddings on DICOM metadata."""

from __future__ import annotations

import argparse

from sparkct.cliargs import add_dataclass_args, dataclass_from_args
from sparkct.device import resolve_device
from sparkct.errors import UserError
from sparkct.eval.config import PROBE_TARGETS, ExperimentConfig, FinetuneConfig
from sparkct.train.config import TrainConfig

_FINETUNE_EPILOG = """examples:
  sparkct finetune --init runs/spark --data data/cache --labels labels.csv --fraction 0.1 --seed 0
  sparkct finetune --init random --data organsmnist.npz --crop 32 --epochs 20
  sparkct finetune --init resnet50_imagenet.pth --arch resnet50 --data slices/ --linear-probe true
--init: random, a state_dict FILE (a backbone export or torchvision weights), or a pretraining RUN folder
(its backbone.pt). --data: a prepared cache (with --labels: a CSV per slice, series or patient), an image
folder (one subfolder per class) or a MedMNIST-style .npz. The fine-tuned run folder (--out) gets the
trainer's checkpoints and logs, result.json (test metrics with bootstrap CIs) and predictions.npz."""

_SKIP = ("data", "weights", "synth_patients", "synth_size", "synth_slices", "labels", "knn_every")


def _split(s: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {s!r}") from None
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions (train,val,test), got {s!r}")
    return v


def add_task_args(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="prepared cache, image folder, or MedMNIST-style .npz")
    g.add_argument("--labels", default=None, help="labels CSV for a cache (slice, series or patient rows)")
    g.add_argument("--label-column", default="label", help="the labels CSV's class column")
    g.add_argument(
        "--level",
        default="auto",
        choices=["auto", "slice", "series", "patient"],
        help="what a labels row names (auto: from the columns)",
    )
    g.add_argument(
        "--split",
        type=_split,
        default=(0.7, 0.15, 0.15),
        help="train,val,test fractions of the patients (a .npz keeps its own splits)",
    )
    g.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (keep it fixed across runs)")
    g.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="fraction of the training patients used (stratified, nested across fractions per --seed)",
    )
    g.add_argument("--image-size", type=int, default=None, help="resize folder images to this size")
    g.add_argument("--group", default=None, help="image folders: regex naming a file's patient")
    g.add_argument(
        "--aggregate",
        default="auto",
        choices=["auto", "none", "series", "patient"],
        help="test unit: slices, or mean probability per series / patient (auto: the labels' level)",
    )
    g.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the test CIs")


def _load_task(ns):
    from sparkct.eval.data import load_task  # noqa: PLC0415 (lazy: the parser imports no numpy)

    return load_task(
        ns.data,
        ns.labels,
        label_column=ns.label_column,
        level=ns.level,
        split=ns.split,
        split_seed=ns.split_seed,
        fraction=ns.fraction,
        seed=ns.seed,
        windows=ns.windows,
        image_size=ns.image_size,
        group=ns.group,
    )


def cmd_finetune(ns: argparse.Namespace) -> int:
    from sparkct.eval.finetune import finetune, resolve_init  # noqa: PLC0415 (lazy: the parser imports no torch)

    cfg = dataclass_from_args(TrainConfig, ns, skip=_SKIP)
    fcfg = dataclass_from_args(FinetuneConfig, ns)
    cfg.validate()
    fcfg.validate()
    if ns.resamples < 1:
        raise UserError(f"--resamples must be >= 1, got {ns.resamples}")
    resolve_init(ns.init, cfg.arch)  # a wrong --init is reported before any data work

    resolve_device(cfg.device)
    task = _load_task(ns)
    finetune(
        task,
        init=ns.init,
        train_cfg=cfg,
        config=fcfg,
        aggregate=ns.aggregate,
        n_resamples=ns.resamples,
        resume=ns.resume,
        name=ns.name,
    )
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from sparkct.eval.report import collect_runs, write_report  # noqa: PLC0415 (lazy: the parser imports no numpy)

    runs = collect_runs(ns.runs)
    paths = write_report(runs, ns.out, baseline=ns.baseline, n_resamples=ns.resamples)
    print("wrote " + ", ".join(paths.values()))
    return 0


def cmd_experiment(ns: argparse.Namespace) -> int:
    from sparkct.eval.experiment import run_experiment  # noqa: PLC0415 (lazy: the parser imports no numpy)

    cfg = dataclass_from_args(ExperimentConfig, ns)
    cfg.set = list(ns.set or [])
    cfg.init_weights = list(ns.init_weights or [])
    run_experiment(cfg)
    return 0


_EXPERIMENT_EPILOG = r"""examples:
  sparkct experiment                                  # built-in synthetic CT on the CPU (minutes)
  sparkct experiment --methods random,spark --fractions 1,0.1 --seeds 0   # a quick look
  sparkct experiment --data data/cache --labels labels.csv --pretrain-data data/unlabelled-cache \
      --arch resnet50 --crop 224 --pretrain-epochs 800 --pretrain-batch 512 --finetune-steps 20000 \
      --finetune-batch 64 --freeze-steps 3000 --ramp-steps 3000 --eval-every 500 --seeds 0,1,2 --device cuda
Re-running the same command skips finished runs and resumes interrupted ones."""


def cmd_probe(ns: argparse.Namespace) -> int:
    from sparkct.eval.probe import parse_targets, run_probe  # noqa: PLC0415 (lazy: the parser imports no numpy)

    targets = parse_targets(ns.targets)  # a typo is reported before any work
    try:
        split = tuple(float(v) for v in ns.split.split(","))
    except ValueError:
        raise UserError(f"--split: expected two comma-separated fractions (train,test), got {ns.split!r}") from None
    run_probe(
        ns.init,
        ns.data,
        targets=targets,
        out=ns.out,
        arch=ns.arch,
        windows=ns.windows,
        crop=ns.crop,
        split=split,
        split_seed=ns.split_seed,
        max_slices=ns.max_slices,
        n_resamples=ns.resamples,
        seed=ns.seed,
        batch=ns.batch,
        device=ns.device,
    )
    return 0


_PROBE_EPILOG = """examples:
  sparkct eval probe --init runs/spark --data data/cache
  sparkct eval probe --init random --data data/cache --arch resnet50 --out runs/probe-random   # the baseline
  sparkct eval probe --init backbone.pt --data data/cache --targets sex,age_band --crop 224
probe.md / probe.json in --out: per target AUC, balanced accuracy and accuracy with 95 % CIs beside chance
(0.5, 1/K, the majority class); targets absent from the cache or with a single value are listed as skipped."""


def _register_eval(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="evaluations of a pretrained backbone (probe: bias probes on DICOM metadata)",
        description="Evaluations of a frozen pretrained backbone. Fine-tuning "
        "and the whole experiment are `sparkct finetune` and `sparkct experiment`.",
    )
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "probe",
        help="linear probes on frozen embeddings predicting DICOM metadata (sex, age band, manufacturer, "
        "kernel, kVp), with CIs beside chance",
        epilog=_PROBE_EPILOG,
        description="The bias check of the chest-CT study: embed the cache's slices with a frozen backbone, fit "
        "linear probes (logistic regression on standardized features) predicting metadata from the "
        "cache's series records on some patients, test them on the others with patient-bootstrap "
        "95 %% CIs, and report them beside chance level.",
    )
    p.add_argument(
        "--init",
        required=True,
        help="random, a state_dict FILE (a backbone export or torchvision "
        "weights), or a pretraining RUN folder (its backbone.pt)",
    )
    p.add_argument("--data", required=True, help="a prepared cache (its series records hold the metadata)")
    p.add_argument(
        "--targets", default=",".join(PROBE_TARGETS), help="comma-separated, from " + ", ".join(PROBE_TARGETS)
    )
    p.add_argument("--out", default="runs/probe", help="folder for probe.md and probe.json")
    p.add_argument(
        "--arch",
        default="resnet18",
        help="backbone architecture: a torchvision ResNet (resnet18, ...) or a timm ViT "
        "(vit_tiny, vit_small, vit_base, vit_tiny_p8, vit_small_p8, vit_base_p8); "
        "a RUN's or an export's (FILE.json) own arch wins",
    )
    p.add_argument(
        "--windows", default=None, help="HU windows as input channels (default: the RUN's, else lung,mediastinum,bone)"
    )
    p.add_argument(
        "--crop", type=int, default=None, help="slice size fed to the backbone (default: the RUN's crop, else 224)"
    )
    p.add_argument("--split", default="0.7,0.3", help="train,test fractions of the patients")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split")
    p.add_argument("--max-slices", type=int, default=20000, help="embed at most this many slices (drawn evenly)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (and of a random init)")
    p.add_argument("--batch", type=int, default=128, help="embedding batch size")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=cmd_probe)


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "finetune",
        help="fine-tune a backbone (random, a weights file, or a pretraining run) on labelled data",
        description="Fine-tune (or linearly probe) a backbone on labelled CT slices, image folders or a "
        "MedMNIST-style .npz with the published protocol (Adam lr 1e-4 at batch 64, weight decay "
        "5e-4, 70 epochs, backbone frozen for 10 epochs then lr/10 ramping up), keep the best "
        "validation AUC checkpoint and test it with bootstrap confidence intervals.",
        epilog=_FINETUNE_EPILOG,
    )
    s.add_argument("--init", default="random", help="random, a state_dict FILE, or a pretraining RUN folder")
    s.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    s.add_argument(
        "--name",
        default=None,
        help="the method's name in reports (default: random, the run's method, or the weights file's name)",
    )
    add_task_args(s)
    add_dataclass_args(
        s,
        TrainConfig,
        {"out": "runs/finetune", "epochs": 70, "batch": 64, "crop": 224},
        title="training (the trainer's options)",
        skip=_SKIP,
    )
    add_dataclass_args(s, FinetuneConfig, title="fine-tuning")
    s.set_defaults(func=cmd_finetune)

    e = subparsers.add_parser(
        "experiment",
        help="the small-data experiment: pretrain each method, fine-tune on shrinking labelled "
        "fractions, report AUC with CIs",
        epilog=_EXPERIMENT_EPILOG,
        description="Pretrain each method on unlabelled CT, fine-tune it (and a random-init baseline) on nested "
        "labelled fractions over several seeds, test on the same held-out patients with bootstrap "
        "CIs and paired tests, and write results.md, auc_vs_fraction.png, results.json and runs.csv "
        "into --out. Resumable.",
    )
    add_dataclass_args(e, ExperimentConfig, skip=("set", "init_weights"))
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a method option (repeatable), e.g. --set spark.mask_ratio=0.75",
    )
    e.add_argument(
        "--init-weights",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a row NAME whose backbone starts from the local weights file PATH (repeatable): torchvision or timm "
        "ResNet weights (plain, under 'state_dict' or 'model', prefixed module./backbone./encoder.) or a "
        "`sparkct export`; fine-tuned, probed and tested like the pretrained methods, e.g. "
        "--init-weights imagenet=resnet18-imagenet.pth",
    )
    e.set_defaults(func=cmd_experiment)

    r = subparsers.add_parser(
        "report",
        help="tables, plot and JSON from fine-tuning runs (results.md, auc_vs_fraction.png, ...)",
        description="Collect the result.json of fine-tuning runs under the given folders and write results.md, "
        "auc_vs_fraction.png, results.json and runs.csv.",
    )
    r.add_argument("runs", nargs="+", help="run folders (searched recursively for result.json)")
    r.add_argument("--out", required=True, help="folder for the report files")
    r.add_argument("--baseline", default="random", help="the method the paired tests compare against")
    r.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the paired tests")
    r.set_defaults(func=cmd_report)

    _register_eval(subparsers)
