"""The trainer's config and the one way a config dataclass becomes command-line flags.

Nothing here imports torch: ``sparkct pretrain -h`` and ``--list`` stay fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from sparkct.errors import UserError

__all__ = ["TrainConfig", "add_dataclass_args", "dataclass_from_args", "config_to_dict", "AMP_CHOICES"]

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def _h(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """What every pretraining run shares. ``None`` = the method's default (``Method.defaults``)."""

    data: str | None = _h("a prepared slice cache, or a DICOM/NIfTI folder (prepared into OUT/../cache on first "
                          "use); default: the built-in synthetic chest CT", default=None)
    out: str = _h("run folder: checkpoints, metrics, previews, backbone export", default="runs/pretrain")
    arch: str = _h("torchvision backbone (resnet18/34/50/101/152, resnext..., wide_resnet...)", default="resnet18")
    weights: str | None = _h("initialize the backbone from this state_dict file (e.g. ImageNet weights)",
                             default=None)
    windows: str = _h("HU windows as input channels (presets lung, mediastinum, abdomen, bone, brain or C/W)",
                      default="lung,mediastinum,bone")
    crop: int = _h("training crop size in pixels", default=128)
    epochs: int = _h("passes over the data", default=20)
    max_steps: int | None = _h("stop after this many optimizer steps (overrides epochs)", default=None)
    batch: int = _h("global batch size (all ranks, all accumulation steps together)", default=32)
    accum: int = _h("gradient accumulation steps per optimizer step", default=1)
    optimizer: str | None = _h("lamb, lars, adamw, adam or sgd", default=None)
    base_lr: float | None = _h("learning rate per 256 images (lr = base_lr x batch / 256)", default=None)
    lr: float | None = _h("absolute peak learning rate (overrides base_lr)", default=None)
    weight_decay: float | None = _h("weight decay at the start (cosine schedule)", default=None)
    weight_decay_end: float | None = _h("weight decay at the end", default=None)
    warmup_epochs: float | None = _h("linear learning-rate warm-up, in epochs", default=None)
    clip_grad: float = _h("clip the global gradient norm at this value (0: off)", default=0.0)
    amp: str = _h("mixed precision: auto (bf16 on CUDA, off on CPU), none, bf16, fp16 (with loss scaling)",
                  default="auto")
    channels_last: bool = _h("channels-last memory format for the model and inputs", default=True)
    device: str = _h("cpu, cuda, cuda:N or auto", default="auto")
    seed: int = _h("seed of weights, data order, augmentations and masks", default=0)
    workers: int | None = _h("loader threads (default: 0 on CPU, 2 on CUDA)", default=None)
    ckpt_every: int = _h("write last.ckpt every N optimizer steps (and at the end)", default=50)
    keep: int = _h("keep the last K step checkpoints", default=2)
    log_every: int = _h("log metrics every N optimizer steps", default=5)
    preview_every: int = _h("write a preview PNG every N optimizer steps (0: only at the end)", default=50)
    labels: str | None = _h("a labels CSV over the data (slice or series level, column 'label'): enables the "
                             "online linear probe, kNN accuracy and the hybrid objective", default=None)
    knn_every: int = _h("with --labels: kNN accuracy on held-out labelled patients every N epochs (0: off)",
                        default=1)
    tensorboard: bool = _h("also log to TensorBoard (OUT/tb)", default=True)
    progress: bool = _h("show a progress bar", default=True)
    synth_patients: int = _h("built-in data: synthetic patients", default=8)
    synth_size: int = _h("built-in data: synthetic slice size", default=160)
    synth_slices: int = _h("built-in data: slices per synthetic series", default=24)

    def validate(self) -> None:
        from sparkct.models.backbone import check_arch

        check_arch(self.arch)
        if self.crop < 32 or self.crop % 32:
            raise UserError(f"--crop must be a positive multiple of 32 (SparK's cell grid), got {self.crop}")
        for name in ("epochs", "batch", "accum", "ckpt_every", "keep", "log_every", "synth_patients", "synth_size",
                     "synth_slices"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.knn_every < 0:
            raise UserError(f"--knn-every must be >= 0, got {self.knn_every}")
        if self.labels is not None and not os.path.isfile(self.labels):
            raise UserError(f"--labels {self.labels}: no such file")
        if self.preview_every < 0:
            raise UserError(f"--preview-every must be >= 0, got {self.preview_every}")
        if self.batch % self.accum:
            raise UserError(f"--batch {self.batch} is not divisible by --accum {self.accum}")
        for name in ("base_lr", "lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise UserError(f"--{name.replace('_', '-')} must be finite and > 0, got {v}")
        for name in ("weight_decay", "weight_decay_end", "warmup_epochs"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise UserError(f"--{name.replace('_', '-')} must be finite and >= 0, got {v}")
        if not (self.clip_grad >= 0 and math.isfinite(self.clip_grad)):
            raise UserError(f"--clip-grad must be finite and >= 0, got {self.clip_grad}")
        if self.amp not in AMP_CHOICES:
            raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        from sparkct.data.windows import resolve_windows
        try:
            resolve_windows(self.windows)
        except (ValueError, KeyError) as e:
            raise UserError(f"--windows {self.windows!r}: {e}") from None


# ---------------------------------------------------------------------------------- dataclass <-> CLI

def _base_type(tp) -> tuple[type, bool]:
    """(scalar type, optional) of an annotation like `int | None`."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing})  # annotations are strings under `from __future__ import annotations`
    args = typing.get_args(tp)
    if args:
        non_none = [a for a in args if a is not type(None)]
        if typing.get_origin(tp) in (tuple,):
            return tp, False
        return (non_none[0] if len(non_none) == 1 else str), len(non_none) < len(args)
    return tp, False


def _parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _tuple_of(tp):
    inner = typing.get_args(tp)[0]

    def parse(s: str):
        try:
            return tuple(inner(x) for x in s.replace(" ", "").split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {inner.__name__}s, got {s!r}") from None
    return parse


def _arg_type(tp):
    if tp is bool:
        return _parse_bool
    if typing.get_origin(tp) is tuple:
        return _tuple_of(tp)
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, defaults: dict | None = None, *,
                       title: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of dataclass `cls` (underscores -> dashes), typed from the annotation, with the
    field's help; `defaults` override the dataclass defaults (e.g. a method's preferred optimizer)."""
    group = parser.add_argument_group(title) if title else parser
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else
                               f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw = dict(dest=f.name, default=default, help=f.metadata.get("help", ""))
        kw["type"] = _arg_type(tp)
        if tp is bool:
            kw.update(metavar="{true,false}", nargs="?", const=True)  # a bare --flag means true
        elif typing.get_origin(tp) is tuple:
            kw["metavar"] = "A,B"
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def dataclass_from_args(cls, args: argparse.Namespace, skip: tuple[str, ...] = ()):
    """`cls` from the parsed flags; fields in `skip` keep their defaults (flags of the same name that
    belong to something else, e.g. a fine-tuning task's --labels)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.init and f.name not in skip and hasattr(args, f.name)})


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists: what a JSON round trip gives
