"""Compositions: the backbone builder, the SparK cell-mask generator, pretraining methods.

``METHODS`` maps a method's name (``sparkct pretrain NAME``) to ``"module:Class"``; :func:`get_method`
imports the class on first use, so listing the methods (``--help``) imports no model code or torch.
"""

from __future__ import annotations

import importlib

from sparkct.errors import UserError

__all__ = ["METHODS", "get_method", "BUILTIN_DATA_OPTIONS"]

#: options ("method.field": value, method or trainer fields) for runs on the built-in synthetic CT (a few
#: hundred slices, ~100 steps on a CPU): SparK's published lr and 768-wide decoder are for 1,600 epochs of
#: ImageNet-size data and learn nothing visible here; a 3,000-prototype SwAV or a 65,536-key MoCo queue
#: would hold mostly random vectors. `sparkct pretrain` and `sparkct experiment` apply them only when no
#: --data is given, only to options not set on the command line, and say so.
BUILTIN_DATA_OPTIONS = {
    "spark.decoder_width": 256,
    "spark.base_lr": 3e-2,
    "swav.prototypes": 100,
    "swav.freeze_prototypes": 20,
    # ~576 keys made per epoch of the 48-patient pool: a 512-key queue holds no slice's own older key, and
    # at 0.999 the key encoder would still be ~75 % its random initialisation after ~300 steps
    "moco.queue_size": 512,
    "moco.momentum": 0.99,
    "moco.momentum_end": 0.99,
    # DINO: the built-in run is a ResNet-18's, so DINO's ResNet-50 recipe (its README: SGD, lr 0.03, weight
    # decay 1e-4, global crops 0.14 - 1, local 0.05 - 0.14, main_dino.py's teacher temperature 0.04); 65,536
    # prototypes for a few hundred slices would mostly stay untouched (as SwAV's 3,000); a 0.99 teacher
    # (0.996 -> 1 would hold it near its random start over ~180 steps, as MoCo's 0.999); 2 warm-up epochs of
    # the 20; 4 local crops (each costs ~10 % of a step on a CPU)
    "dino.optimizer": "sgd",
    "dino.base_lr": 0.03,
    "dino.weight_decay": 1e-4,
    "dino.weight_decay_end": 1e-4,
    "dino.global_scale": (0.14, 1.0),
    "dino.local_scale": (0.05, 0.14),
    "dino.teacher_temp": 0.04,
    "dino.prototypes": 1024,
    "dino.momentum": 0.99,
    "dino.warmup_epochs": 2.0,
    "dino.n_local": 4,
}

METHODS: dict[str, str] = {
    "spark": "sparkct.models.spark.model:SparK",
    "simclr": "sparkct.models.simclr:SimCLR",
    "moco": "sparkct.models.moco:MoCo",
    "swav": "sparkct.models.swav:SwAV",
    "byol": "sparkct.models.byol:BYOL",
    "dino": "sparkct.models.dino:DINO",
    "rotation": "sparkct.models.pretext:Rotation",
    "flip": "sparkct.models.pretext:Flip",
    "denoise": "sparkct.models.pretext:Denoise",
    "inpaint": "sparkct.models.pretext:Inpaint",
    "nextslice": "sparkct.models.pretext:NextSlice",
    "supervised": "sparkct.models.supervised:Supervised",
}


def get_method(name: str):
    """The :class:`sparkct.models.base.Method` subclass registered as `name`."""
    target = METHODS.get(name)
    if target is None:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
