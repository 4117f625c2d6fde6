"""``sparkct pretrain METHOD ...`` and ``sparkct export RUN --out FILE``."""

from __future__ import annotations

import argparse
import os
import sys

from sparkct.cliargs import Parser, add_dataclass_args, dataclass_from_args, flag
from sparkct.device import resolve_device
from sparkct.errors import UserError
from sparkct.models import BUILTIN_DATA_OPTIONS, METHODS, get_method
from sparkct.train.config import TrainConfig

_PRETRAIN_EPILOG = """examples:
  sparkct pretrain spark                                   # built-in synthetic CT, CPU, a few minutes
  sparkct pretrain spark --data data/cache --arch resnet50 --crop 224 --batch 256 --amp bf16 --device cuda
  sparkct pretrain spark --out runs/spark --resume         # continue an interrupted run
  torchrun --nproc_per_node=4 -m sparkct.cli pretrain spark --device cuda ...   # DDP
  sparkct pretrain --list                                  # the methods and their defaults
run `sparkct pretrain METHOD -h` for every option of a method."""


def _method_parser(name: str):
    from sparkct.models.base import Method  # noqa: PLC0415 (lazy: the parser imports no torch)

    cls = get_method(name)
    p = Parser(prog=f"sparkct pretrain {name}", description=(cls.__doc__ or "").strip().split("\n\n")[0])
    add_dataclass_args(p, TrainConfig, {"out": f"runs/{name}"}, title="training (shared by every method)")
    add_dataclass_args(p, cls.config_class, title=f"{name}")
    g = p.add_argument_group("run control")
    g.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    g.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    d = dict(Method.defaults)
    d.update(cls.defaults)
    p.epilog = "method defaults for unset options: " + ", ".join(f"{k}={v}" for k, v in d.items())
    return p, cls


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.list or not args.method:
        if not args.method and not args.list:
            print("sparkct pretrain: error: name a method (" + ", ".join(METHODS) + ") or --list", file=sys.stderr)
            return 2
        from sparkct.models.base import Method  # noqa: PLC0415 (lazy: the parser imports no torch)

        for name in METHODS:
            cls = get_method(name)
            d = dict(Method.defaults)
            d.update(cls.defaults)
            doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
            print(f"{name:10s} {doc}")
            cfg = cls.config_class()
            fields = getattr(cfg, "__dataclass_fields__", {})
            print(" " * 11 + ", ".join([f"{k}={getattr(cfg, k)}" for k in fields] + [f"{k}={v}" for k, v in d.items()]))
        return 0
    ns, cfg, mcfg = pretrain_configs(args.method, args.rest)
    from sparkct.train.trainer import Trainer, build_method  # noqa: PLC0415 (lazy: the parser imports no torch)

    method = build_method(args.method, cfg, mcfg)
    summary = Trainer(method, cfg, method_name=args.method, resume=ns.resume, force=ns.force).fit()
    return 0 if summary is not None else 1


def pretrain_configs(name: str, argv: list[str], extend=None, check=None, prog: str | None = None):
    """(parsed flags, TrainConfig, method config) of ``sparkct pretrain NAME ARGV``, validated, with the
    built-in data's options applied and a missing device reported. A command built on pretraining (sparkct
    profile pretrain) adds its flags with ``extend(parser)`` and checks them with ``check(flags)`` first."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    p, cls = _method_parser(name)
    if prog:
        p.prog = prog
    if extend is not None:
        extend(p)
    ns = p.parse_args(argv)
    if check is not None:
        check(ns)
    cfg = dataclass_from_args(TrainConfig, ns)
    mcfg = dataclass_from_args(cls.config_class, ns)
    applied = _builtin_data_options(name, argv, cfg, mcfg) if cfg.data is None else []
    if cfg.labels and getattr(mcfg, "hybrid_weight", 0) > 0 and not getattr(mcfg, "num_classes", 0):
        from sparkct.data.datasets import (  # noqa: PLC0415 (lazy: the parser imports no torch)
            normalize_label,
            read_labels_csv,
        )

        if not os.path.isfile(cfg.labels):
            raise UserError(f"--labels {cfg.labels}: no such file")
        rows = read_labels_csv(cfg.labels)
        if not rows or "label" not in rows[0]:
            found = ", ".join(map(str, rows[0])) if rows else "no rows"
            raise UserError(f"--labels {cfg.labels}: expected a CSV with a 'label' column (columns: {found})")
        # the hybrid classifier's width: one output per class, as the dataset will count them (1.0 is 1)
        mcfg.num_classes = len({normalize_label(r["label"]) for r in rows} - {""})
    cfg.validate()
    mcfg.validate()

    resolve_device(cfg.device)  # before any data work: a missing GPU is reported at once
    if applied:
        print(
            f"built-in synthetic data (no --data): using {' '.join(applied)} (the published settings are for "
            "long runs on real data; give these flags to override)",
            file=sys.stderr,
        )
    return ns, cfg, mcfg


def _builtin_data_options(method: str, argv: list[str], cfg, mcfg) -> list[str]:
    """On the built-in synthetic CT, set the options of sparkct.models.BUILTIN_DATA_OPTIONS for this method
    (those not given on the command line); returns them as flags, for the note."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    applied = []
    for key, value in BUILTIN_DATA_OPTIONS.items():
        m, field = key.split(".", 1)
        if m != method or flag(field) in given:
            continue
        target = cfg if hasattr(cfg, field) else mcfg
        setattr(target, field, value)
        applied.append(f"{flag(field)} {value}")
    return applied


def cmd_export(args: argparse.Namespace) -> int:
    from sparkct.train.checkpoint import export_backbone, load_checkpoint  # noqa: PLC0415 (lazy: imports torch)

    src = args.run
    if os.path.isdir(src) and args.best:
        src = os.path.join(src, "best.ckpt")
    state = load_checkpoint(src)
    sd = export_backbone(state, args.out)
    arch = state["config"].get("train", {}).get("arch", "?")
    if str(arch).startswith("vit"):
        how = f"load with timm.create_model(NAME, **KWARGS) as recorded in {args.out}.json, strict=True"
    else:
        how = f"load with torchvision.models.{arch}() whose fc is replaced by nn.Identity(), strict=True"
    print(
        f"wrote {args.out} (and {args.out}.json): {arch} backbone ({len(sd)} tensors, step {state['step']} "
        f"of {state['path']}); {how}"
    )
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining on CT (SparK, ...) with the one trainer",
        description="Pretrain a CNN or ViT backbone on CT slices with a self-supervised method; checkpoints, resume, "
        "metrics, previews and the backbone export go to --out.",
        epilog=_PRETRAIN_EPILOG,
    )
    s.add_argument("method", nargs="?", help="the method (see --list)")
    s.add_argument("--list", action="store_true", help="list the methods with their defaults")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="the method's options (sparkct pretrain METHOD -h)")
    s.set_defaults(func=cmd_pretrain)

    s = subparsers.add_parser(
        "export",
        help="write a run's backbone as a plain torchvision / timm state_dict",
        description="Write the backbone of a pretraining run (its last.ckpt, or a given "
        "checkpoint) as a torchvision ResNet or timm ViT state_dict without the classifier, and beside it "
        "OUT.json: the arch and, for a ViT, the timm.create_model name and keyword arguments that load it strictly.",
    )
    s.add_argument("run", help="a run folder or a checkpoint file")
    s.add_argument("--out", required=True, help="where to write the state_dict (.pt)")
    s.add_argument("--best", action="store_true", help="export best.ckpt instead of last.ckpt")
    s.set_defaults(func=cmd_export)
