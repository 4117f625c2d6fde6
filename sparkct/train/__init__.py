"""The one trainer every method shares (loop, AMP, checkpoints, resume, logging, DDP).

Names load on first use, so the `sparkct` command's parser imports no torch."""

from __future__ import annotations

import importlib

_EXPORTS = {"Trainer": "trainer", "TrainConfig": "config", "build_method": "trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sparkct.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sparkct.train.{mod}"), name)
