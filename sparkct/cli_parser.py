"""The argparse parser class of every ``sparkct`` (sub)command: descriptions as written, defaults shown.

A leaf below every layer, so that a command module next to the code it drives (``sparkct.train.cli``,
say) builds its parsers without importing the top-level ``sparkct.cli`` (layers run one way)."""
from __future__ import annotations

import argparse

__all__ = ["Parser"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, defaults shown."""


class Parser(argparse.ArgumentParser):
    """Every sparkct (sub)parser: defaults in the help. Subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
