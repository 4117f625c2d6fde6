"""Compositions: the backbone builder, the SparK cell-mask generator, pretraining methods.

``METHODS`` maps a method's name (``sparkct pretrain NAME``) to ``"module:Class"``; :func:`get_method`
imports the class on first use, so listing the methods (``--help``) imports no model code or torch.
"""
from __future__ import annotations

import importlib

__all__ = ["METHODS", "get_method"]

METHODS: dict[str, str] = {
    "spark": "sparkct.models.spark.model:SparK",
    "simclr": "sparkct.models.simclr:SimCLR",
    "moco": "sparkct.models.moco:MoCo",
    "swav": "sparkct.models.swav:SwAV",
    "byol": "sparkct.models.byol:BYOL",
    "rotation": "sparkct.models.pretext:Rotation",
    "flip": "sparkct.models.pretext:Flip",
    "denoise": "sparkct.models.pretext:Denoise",
    "inpaint": "sparkct.models.pretext:Inpaint",
}


def get_method(name: str):
    """The :class:`sparkct.train.method.Method` subclass registered as `name`."""
    from sparkct.errors import UserError

    target = METHODS.get(name)
    if target is None:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
