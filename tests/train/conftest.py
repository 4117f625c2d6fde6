"""Fixtures for the trainer tests: a small prepared cache and the tiny test method registered."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory) -> str:
    """Synthetic DICOM of 3 patients (with labels.csv / slice_labels.csv)."""
    from sparkct.data.synthetic import synth

    src = str(tmp_path_factory.mktemp("train-synth"))
    synth(src, patients=3, seed=5, size=64, slices=8, series_per_patient=(1, 1), localizer=False)
    return src


@pytest.fixture(scope="session")
def small_cache(small_synth, tmp_path_factory) -> str:
    from sparkct.data import prepare

    dst = str(tmp_path_factory.mktemp("train-cache"))
    prepare(small_synth, dst, progress=False)
    return dst


@pytest.fixture(autouse=True)
def tiny_registered(monkeypatch):
    from sparkct import models

    if HERE not in sys.path:
        monkeypatch.syspath_prepend(HERE)
    monkeypatch.setitem(models.METHODS, "tiny", "tiny_method:Tiny")
