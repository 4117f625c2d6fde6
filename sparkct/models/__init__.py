"""Compositions: the backbone builder, the SparK cell-mask generator, pretraining methods.

``METHODS`` maps a method's name to ``"module:Class"``; classes load on first use (``get_method``), so
listing the names imports no torch.
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
    from sparkct.errors import UserError

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    mod, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)
