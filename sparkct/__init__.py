"""sparkct: fast self-supervised pretraining on CT.

Kernels (``sparkct.ops``, ``torch.ops.sparkct``), modules (``sparkct.nn``), CT data (``sparkct.data``).
Submodules load on first use, so ``import sparkct`` stays cheap and the data tools work without the
compiled extension.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "nn", "data", "models", "train", "eval", "cli")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"sparkct.{name}")
    raise AttributeError(f"module 'sparkct' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
