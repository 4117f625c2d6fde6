"""Where a run's data goes: inside its own run folder, never beside it."""

from __future__ import annotations

import os

from sparkct.data import resolve_data
from sparkct.data.cache import SliceCache

KW = {"synth_patients": 2, "synth_size": 64, "synth_slices": 4}


def test_builtin_data_is_made_inside_the_run_folder(tmp_path):
    run = tmp_path / "runs" / "a"
    cache = resolve_data(None, str(run), **KW, log=lambda m: None)
    assert os.path.commonpath([cache, str(run)]) == str(run)
    assert len(SliceCache(cache)) > 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["a"]  # nothing beside the run folder
    # the same run folder reuses it (resume); another run folder makes its own
    assert resolve_data(None, str(run), **KW, log=lambda m: None) == cache
    other = resolve_data(None, str(tmp_path / "runs" / "b"), **KW, log=lambda m: None)
    assert other != cache and other.startswith(str(tmp_path / "runs" / "b"))


def test_a_dicom_folder_is_prepared_inside_the_run_folder(synth_dir, tmp_path):
    run = tmp_path / "runs" / "a"
    cache = resolve_data(synth_dir, str(run), **KW, log=lambda m: None)
    assert cache == os.path.join(str(run), "data", "cache-" + os.path.basename(synth_dir))
    assert len(SliceCache(cache)) > 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["a"]


def test_a_prepared_cache_is_used_where_it_is(cache_dir, tmp_path):
    assert resolve_data(cache_dir, str(tmp_path / "run"), **KW) == cache_dir
    assert not (tmp_path / "run").exists()
