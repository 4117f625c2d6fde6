"""The fine-tuning and experiment configs (no torch here: ``sparkct finetune/experiment -h`` stay instant)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from sparkct.cliargs import flag, option
from sparkct.errors import UserError
from sparkct.models import BUILTIN_DATA_OPTIONS, METHODS

#: the experiment's "METHOD.FIELD": value defaults on the built-in synthetic CT (no --data): the pretraining
#: methods' BUILTIN_DATA_OPTIONS, and "finetune.*" for the fine-tuning runs (trainer or FinetuneConfig
#: fields; ``--set finetune.FIELD=VALUE`` sets them on any data). The published fine-tuning lr (4e-4 per 256,
#: 5e-5 at batch 32) is for 70 epochs on thousands of slices; in the built-in task's 150 steps random init
#: from scratch reached validation AUC 0.709 at 4e-3 per 256 and 0.757 at 8e-3 (240 patients, seed 0; chosen
#: on validation, not on test).
SMALL_DATA_OVERRIDES = {**BUILTIN_DATA_OPTIONS, "finetune.base_lr": 8e-3}

#: --split when none is given: the built-in task has 240 patients: 84 for testing (at 18 a random test set
#: was a lottery: a fixed detector's AUC varied by 0.08 SD over test draws) and 36 for validation; real data
#: keeps the larger training share
BUILTIN_SPLIT, DATA_SPLIT = "0.5,0.15,0.35", "0.5,0.2,0.3"

__all__ = ["FinetuneConfig", "ExperimentConfig", "SMALL_DATA_OVERRIDES", "PROBE_TARGETS", "PROTOCOLS", "PERTURBED_KEY"]

#: the experiment's fine-tuning protocols (--protocols): full fine-tuning, and the linear probe (the backbone
#: frozen throughout), which the published comparisons report beside it
PROTOCOLS = ("finetune", "linear")

#: predictions.npz of a fine-tuning run holds its test probabilities under each robustness perturbation as
#: PERTURBED_KEY + the perturbation's name (sparkct.eval.robustness; here so the report needs no torch)
PERTURBED_KEY = "perturbed_"

#: what ``sparkct eval probe`` can predict (sparkct.eval.probe; here so the CLI parser needs no numpy)
PROBE_TARGETS = ("sex", "age_band", "manufacturer", "kernel", "kvp")


@dataclass
class FinetuneConfig:
    """The fine-tuning method's options (each a ``sparkct finetune`` flag); the trainer's own options
    (epochs, batch, lr, ...) are in :class:`sparkct.train.config.TrainConfig`."""

    linear_probe: bool = option("keep the backbone frozen throughout (linear probing)", default=False)
    freeze_epochs: float = option(
        "epochs with the backbone frozen (only the head learns) before it is unfrozen", default=10.0
    )
    ramp_epochs: float = option(
        "epochs over which the backbone's lr rises from --backbone-lr-start x lr to lr", default=10.0
    )
    freeze_steps: int | None = option(
        "optimizer steps with the backbone frozen (overrides --freeze-epochs): a budget that does not shrink "
        "with the labelled fraction",
        default=None,
    )
    ramp_steps: int | None = option("optimizer steps of the backbone's lr ramp (overrides --ramp-epochs)", default=None)
    backbone_lr_start: float = option("backbone lr, as a fraction of the lr, when it is unfrozen", default=0.1)
    label_smoothing: float = option("cross-entropy label smoothing", default=0.0)
    eval_batch: int = option("batch size for validation and testing", default=128)
    eval_every: int = option(
        "validate every N optimizer steps (mid-epoch too) and after the last; the best validation AUC "
        "picks the tested checkpoint (0: validate after every epoch)",
        default=0,
    )
    robustness: bool = option(
        "skip the robustness test (by default the tested model is tested again under each fixed perturbation "
        "of the test slices: HU shift and scale, noise, rotation, scaling; sparkct.eval.robustness; CT only)",
        default=True,
        negate=True,
    )
    keep_checkpoints: bool = option(
        "keep the run's checkpoints and backbone.pt after testing (default: only tested.pt, the tested "
        "weights, is kept beside result.json, predictions.npz and the metrics)",
        default=False,
    )

    def validate(self) -> None:
        for name in ("freeze_epochs", "ramp_epochs"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise UserError(f"{flag(name)} must be finite and >= 0, got {v}")
        for name in ("freeze_steps", "ramp_steps"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"{flag(name)} must be >= 0, got {v}")
        if self.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0, got {self.eval_every}")
        if not 0 < self.backbone_lr_start <= 1:
            raise UserError(f"--backbone-lr-start must be in (0, 1], got {self.backbone_lr_start}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.eval_batch < 1:
            raise UserError(f"--eval-batch must be >= 1, got {self.eval_batch}")


@dataclass
class ExperimentConfig:
    out: str = option("experiment folder: data, pretraining and fine-tuning runs, report", default="runs/experiment")
    data: str | None = option(
        "labelled task data: a prepared cache (with --labels), an image folder or a .npz; "
        "default: built-in synthetic chest CT",
        default=None,
    )
    labels: str | None = option("labels CSV for a cache (slice, series or patient rows)", default=None)
    pretrain_data: str | None = option(
        "unlabelled CT for pretraining (cache or DICOM folder); default: the built-in "
        "synthetic pool, or with --data its cache less the labelled validation and test patients; "
        "overlap with those patients is refused (see --allow-overlap)",
        default=None,
    )
    allow_overlap: bool = option(
        "run even where the pretraining data holds labelled validation/test patients (same Study/Series "
        "Instance UID, or pseudonym under a shared salt); results.md then says so at the top",
        default=False,
    )
    methods: str = option(
        "comma-separated: random and pretraining methods (sparkct pretrain --list)",
        default="random,spark",
    )
    fractions: str = option("labelled training fractions", default="1,0.1")
    seeds: str = option("fine-tuning seeds (each seed draws its own nested fractions)", default="0")
    protocols: str = option(
        "comma-separated: finetune (full fine-tuning) and linear (a linear probe: the backbone frozen throughout), "
        "each for every method (random init's probe is the floor), seed and fraction, on the same patients "
        "and steps",
        default="finetune,linear",
    )
    arch: str = option(
        "backbone: torchvision resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d/64x4d, wide_resnet50_2/101_2; "
        "timm ViTs vit_tiny, vit_small, vit_base (16-px patches), "
        "vit_tiny_p8, vit_small_p8, vit_base_p8 (8-px patches, for small crops)",
        default="resnet18",
    )
    windows: str = option("HU windows as input channels", default="lung,mediastinum,bone")
    crop: int = option("crop size for pretraining and fine-tuning (multiple of 32)", default=64)
    pretrain_epochs: int = option("pretraining epochs per method", default=16)
    pretrain_batch: int = option("pretraining batch", default=32)
    finetune_steps: int = option(
        "fine-tuning optimizer steps per run, at every fraction (a budget in epochs would give the smallest "
        "fractions a handful of steps)",
        default=150,
    )
    finetune_batch: int = option("fine-tuning batch", default=32)
    freeze_steps: int = option("fine-tuning: steps with the backbone frozen (only the head learns)", default=15)
    ramp_steps: int = option("fine-tuning: steps of the backbone's lr ramp after unfreezing", default=15)
    eval_every: int = option("fine-tuning: validate every N steps (the curves of convergence.png)", default=10)
    keep_checkpoints: bool = option(
        "fine-tuning runs keep their checkpoints (default: only the tested weights, tested.pt)", default=False
    )
    split: str | None = option(
        f"train,val,test fractions of the labelled patients (default {BUILTIN_SPLIT} on the "
        f"built-in data, {DATA_SPLIT} with --data)",
        default=None,
    )
    resamples: int = option("bootstrap resamples for CIs and paired tests", default=1000)
    device: str = option("cpu, cuda, cuda:N or auto", default="auto")
    amp: str = option("mixed precision (auto: bf16 on CUDA, off on CPU)", default="auto")
    synth_patients: int = option("built-in data: labelled patients", default=240)
    pretrain_patients: int = option("built-in data: unlabelled pretraining patients", default=48)
    synth_finding: float = option("built-in data: share of labelled patients with nodules", default=0.5)
    pretrain_finding: float = option(
        "built-in data: share of pretraining patients with nodules (an unlabelled pool where the structure "
        "the label depends on is common, as in a screening archive; pretraining never sees labels)",
        default=0.9,
    )
    synth_size: int = option("built-in data: slice size", default=96)
    synth_slices: int = option("built-in data: slices per series", default=12)
    synth_thickness: float = option(
        "built-in data: slice thickness of every series in mm (one protocol: with "
        "random thicknesses a thicker series covers more chest, so the scan settings "
        "alone would predict the nodule label)",
        default=5.0,
    )
    synth_min_nodule: float = option(
        "built-in data: smallest nodule diameter in mm (a 96-px slice of a ~370 mm field of view resized to "
        "the 64-px crop is ~5.5 mm per pixel, and the ResNet stem divides that by 4: a 20 mm nodule is under "
        "one pixel of layer1)",
        default=30.0,
    )
    synth_max_nodule: float = option(
        "built-in data: largest nodule diameter in mm (above 30 mm a lesion is called a mass: the built-in "
        "task's findings are 30-45 mm, 5-8 px at crop 64, so that a 2-core CPU can learn them from scratch)",
        default=45.0,
    )
    set: list = option(
        "METHOD.FIELD=VALUE (repeatable): a method option, or a trainer option of that method's "
        "pretraining, e.g. spark.mask_ratio=0.75 or spark.base_lr=2e-3",
        default_factory=list,
    )
    init_weights: list = option(
        "NAME=PATH (repeatable): a row NAME whose backbone starts from the local weights file PATH (e.g. "
        "ImageNet-supervised torchvision or timm ResNet weights, or a `sparkct export`), fine-tuned, probed "
        "and tested like the pretrained methods; nothing is downloaded",
        default_factory=list,
    )

    def lists(self) -> tuple[list[str], list[float], list[int]]:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in methods if m != "random" and m not in METHODS]
        if not methods or bad:
            raise UserError(f"--methods: unknown {bad or 'none given'}; choose from random, {', '.join(METHODS)}")
        from sparkct.models import get_method  # noqa: PLC0415 (lazy: a method's class imports torch)

        for m in methods:
            if m != "random" and get_method(m).needs_labels:
                # pretraining on the task's own labelled patients would leak the task's labels (test ones
                # included) into the "pretrained" backbone
                raise UserError(
                    f"--methods {m}: {m} pretraining needs its own labelled set, not this task's patients; run "
                    f"`sparkct pretrain {m} --data OTHER --labels OTHER_LABELS.csv`, then pass its backbone.pt "
                    "with --init-weights NAME=PATH"
                )
        try:
            fr = [float(v) for v in self.fractions.split(",") if v.strip()]
            seeds = [int(v) for v in self.seeds.split(",") if v.strip()]
        except ValueError:
            raise UserError(
                f"--fractions / --seeds: expected comma-separated numbers, got {self.fractions!r} / {self.seeds!r}"
            ) from None
        if not fr or any(not 0 < f <= 1 for f in fr):
            raise UserError(f"--fractions must be in (0, 1], got {self.fractions}")
        if not seeds:
            raise UserError("--seeds: give at least one seed")
        return methods, sorted(set(fr), reverse=True), sorted(set(seeds))

    def outside_weights(self) -> dict[str, str]:
        """--init-weights as {row name: weights file}, in the order given."""
        methods = self.lists()[0]
        out: dict[str, str] = {}
        for item in self.init_weights:
            name, sep, path = (t.strip() for t in item.partition("="))
            if not sep or not name or not path:
                raise UserError(f"--init-weights {item!r}: expected NAME=PATH")
            if not name.isidentifier():
                raise UserError(f"--init-weights {item!r}: NAME must be a simple identifier (letters, digits, _)")
            if name == "random" or name in methods:
                raise UserError(f"--init-weights {item!r}: {name!r} is already a row of --methods; choose another NAME")
            if name in out:
                raise UserError(f"--init-weights {item!r}: {name!r} is given twice")
            if not os.path.isfile(path):
                raise UserError(f"--init-weights {item!r}: no such file {path}")
            out[name] = path
        return out

    def protocol_list(self) -> list[str]:
        """--protocols in the order of PROTOCOLS."""
        given = {p.strip() for p in self.protocols.split(",") if p.strip()}
        bad = sorted(given - set(PROTOCOLS))
        if not given or bad:
            raise UserError(f"--protocols: unknown {bad or 'none given'}; choose from {', '.join(PROTOCOLS)}")
        return [p for p in PROTOCOLS if p in given]

    def split_fractions(self) -> tuple[float, ...]:
        text = self.split or (BUILTIN_SPLIT if self.data is None else DATA_SPLIT)
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise UserError(
                f"--split: expected three comma-separated fractions (train,val,test), got {text!r}"
            ) from None

    def validate(self) -> None:
        from sparkct.models.backbone import check_arch  # noqa: PLC0415 (lazy: the parser imports no torch)

        self.lists()
        self.outside_weights()
        self.protocol_list()
        check_arch(self.arch)
        if self.crop < 32 or self.crop % 32:
            raise UserError(f"--crop must be a positive multiple of 32, got {self.crop}")
        for k in (
            "pretrain_epochs",
            "pretrain_batch",
            "finetune_steps",
            "finetune_batch",
            "resamples",
            "synth_patients",
            "pretrain_patients",
            "synth_size",
            "synth_slices",
        ):
            if getattr(self, k) < 1:
                raise UserError(f"{flag(k)} must be >= 1, got {getattr(self, k)}")
        for k in ("synth_finding", "pretrain_finding"):
            if not 0 <= getattr(self, k) <= 1:
                raise UserError(f"{flag(k)} must be in [0, 1], got {getattr(self, k)}")
        if not 0.5 <= self.synth_thickness <= 20:
            raise UserError(f"--synth-thickness must be in [0.5, 20] mm, got {self.synth_thickness}")
        if not 1 <= self.synth_min_nodule <= 30:
            raise UserError(f"--synth-min-nodule must be in [1, 30] mm, got {self.synth_min_nodule}")
        if not self.synth_min_nodule <= self.synth_max_nodule <= 60:
            raise UserError(f"--synth-max-nodule must be in [--synth-min-nodule, 60] mm, got {self.synth_max_nodule}")
        self.split_fractions()
        if self.data is not None and not os.path.exists(self.data):
            raise UserError(f"--data {self.data}: no such file or folder")
        if self.pretrain_data is not None and not os.path.exists(self.pretrain_data):
            raise UserError(f"--pretrain-data {self.pretrain_data}: no such file or folder")
        if self.labels is not None and not os.path.isfile(self.labels):
            raise UserError(f"--labels {self.labels}: no such file")
        if "linear_probe" in self.overrides().get("finetune", {}):
            # one way to choose it: a probe set here would turn the fine-tuning arm into a second probe
            raise UserError("--set finetune.linear_probe: choose the protocols with --protocols (finetune, linear)")

    def overrides(self) -> dict[str, dict]:
        """{method: {field: value}}: the built-in data's small-pool defaults (when no --data), then --set."""
        pairs = dict(SMALL_DATA_OVERRIDES) if self.data is None and self.pretrain_data is None else {}
        pretrained = [m for m in self.lists()[0] if m != "random"]
        for item in self.set:
            if "=" not in item or "." not in item.split("=", 1)[0]:
                raise UserError(f"--set {item!r}: expected METHOD.FIELD=VALUE")
            k, v = item.split("=", 1)
            m = k.split(".", 1)[0].strip()
            if m != "finetune" and m not in pretrained:
                # an option for a method that is not run would be silently ignored
                why = (
                    "random pretrains nothing and has no options"
                    if m == "random"
                    else f"{m!r} is not among --methods"
                    if m in METHODS
                    else f"no method {m!r}"
                )
                raise UserError(
                    f"--set {item!r}: {why}; METHOD is one of {', '.join([*pretrained, 'finetune'])} "
                    "(finetune: the fine-tuning runs)"
                )
            pairs[k.strip()] = v.strip()
        out: dict[str, dict] = {}
        for k, v in pairs.items():
            m, f = k.split(".", 1)
            out.setdefault(m, {})[f] = v
        return out
