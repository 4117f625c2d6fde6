"""Shared fixtures for the CT data tests: a small synthetic DICOM tree and its prepared cache."""
from __future__ import annotations

import os

import pytest

SALT = "5a17" * 8  # a fixed salt, so that caches prepared in different tests compare equal


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return path


@pytest.fixture
def testdata():
    """testdata(name) -> path of one of the files that ship with pydicom (skips if absent)."""
    return _testdata


@pytest.fixture
def salt() -> str:
    return SALT


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    from sparkct.data.synthetic import synth
    d = str(tmp_path_factory.mktemp("synth"))
    synth(d, patients=4, seed=3, size=64, thickness=5.0, series_per_patient=(1, 2), p_finding=0.75)
    return d


@pytest.fixture(scope="session")
def cache_dir(synth_dir, tmp_path_factory) -> str:
    from sparkct.data.cache import prepare
    d = str(tmp_path_factory.mktemp("cache"))
    prepare(synth_dir, d, progress=False, salt=SALT)
    return d


@pytest.fixture
def dicom_files():
    """dicom_files(root) -> sorted .dcm paths under root."""
    def find(root: str) -> list[str]:
        out = []
        for dp, _, fs in os.walk(root):
            out += [os.path.join(dp, f) for f in fs if f.endswith(".dcm")]
        return sorted(out)
    return find
