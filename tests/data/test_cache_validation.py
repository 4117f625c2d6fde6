"""Damaged caches are named when they are opened (one-line UserError naming the file and what is wrong), and a
shard damaged while a run reads is named with its series."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from sparkct.data import resolve_data
from sparkct.data.cache import SliceCache, shard_rel
from sparkct.errors import UserError

KW = {"synth_patients": 2, "synth_size": 64, "synth_slices": 4}


@pytest.fixture
def cache(cache_dir, tmp_path):
    """A private copy of the session's cache, to damage."""
    d = tmp_path / "cache"
    shutil.copytree(cache_dir, d)
    return str(d)


def _shard(c: SliceCache, s: int = 0) -> str:
    return os.path.join(c.root, shard_rel(str(c.series["key"][s])))


def _one_line_error(path, match):
    with pytest.raises(UserError, match=match) as e:
        SliceCache(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_an_intact_cache_opens(cache):
    assert len(SliceCache(cache)) > 0


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b"", "not a readable slice index"),
        (lambda b: os.urandom(4096), r"not a readable slice index \(not an npz archive\)"),
        (lambda b: b[: len(b) // 2], "not a readable slice index"),
    ],
    ids=["empty", "random", "truncated"],
)
def test_a_damaged_index_is_named(cache, damage, match):
    p = os.path.join(cache, "index.npz")
    with open(p, "rb") as f:
        b = f.read()
    with open(p, "wb") as f:
        f.write(damage(b))
    msg = _one_line_error(cache, match)
    assert p in msg and "pickle" not in msg


def test_an_index_without_a_key_names_the_key(cache):
    p = os.path.join(cache, "index.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files if k != "slice.z"}
    np.savez(p, **arrays)
    assert p in _one_line_error(cache, r"no 'slice.z' array")


@pytest.mark.parametrize(
    "key, change, match",
    [
        ("series.n", lambda a: a + 1, "slices"),  # more rows than the slice table holds
        ("slice.z", lambda a: a[:-1], r"'slice.z' has \d+ rows"),
        ("series.shape", lambda a: a[:, 0], r"'series.shape' is not \(series, 2\)"),
        ("slice.series", lambda a: a.astype(str), "tables of the wrong type"),
    ],
)
def test_an_index_whose_tables_disagree_is_refused(cache, key, change, match):
    p = os.path.join(cache, "index.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[key] = change(arrays[key])
    np.savez(p, **arrays)
    _one_line_error(cache, match)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"], ids=["empty", "broken", "not-a-manifest"])
def test_an_unreadable_cache_json_is_named(cache, content):
    with open(os.path.join(cache, "cache.json"), "w") as f:
        f.write(content)
    assert "cache.json" in _one_line_error(cache, "cache.json")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p, a: open(p, "wb").close(), "the file is empty"),
        (lambda p, a: open(p, "wb").write(os.urandom(5000)), "not an .npy array"),
        (lambda p, a: open(p, "r+b").truncate(os.path.getsize(p) - 100), "truncated"),
        (lambda p, a: np.save(p, a[:-1]), "the index expects int16"),  # rows missing
        (lambda p, a: np.save(p, a[:, :-2]), "the index expects int16"),  # wrong size
        (lambda p, a: np.save(p, a.astype(np.float32)), "the index expects int16"),
        (lambda p, a: os.unlink(p), "missing"),
    ],
    ids=["zero-byte", "random", "truncated", "rows-missing", "wrong-size", "wrong-dtype", "missing"],
)
def test_a_damaged_shard_is_named_with_its_series_when_the_cache_opens(cache, damage, match):
    c = SliceCache(cache)
    last = c.n_series - 1
    p, uid = _shard(c, last), str(c.series["series_uid"][last])
    a = np.load(p)
    damage(p, a)
    msg = _one_line_error(cache, match)
    assert p in msg and uid in msg


def test_a_shard_damaged_while_a_run_reads_is_named(cache):
    c = SliceCache(cache)
    s = int(c.slice_series[-1])
    p, uid = _shard(c, s), str(c.series["series_uid"][s])
    with open(p, "wb") as f:
        f.write(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="cannot be read") as e:
        c.read([len(c) - 1])
    assert p in str(e.value) and uid in str(e.value)
    np.save(p, np.zeros((1, 4, 4), np.int16))
    with pytest.raises(UserError, match="the index expects int16") as e:
        c[len(c) - 1]
    assert uid in str(e.value)


def test_a_cache_folder_without_cache_json_is_not_prepared_again(cache, tmp_path):
    os.unlink(os.path.join(cache, "cache.json"))
    run = tmp_path / "runs" / "run"
    with pytest.raises(UserError, match=r"not a prepared cache: cache.json is missing \(the folder has index.npz"):
        resolve_data(cache, str(run), **KW)
    assert not (tmp_path / "runs").exists()  # nothing written
    _one_line_error(cache, "no cache.json")


def test_a_folder_without_ct_says_what_data_takes(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="cache.json.*DICOM/NIfTI"):
        resolve_data(str(src), str(tmp_path / "run"), **KW)


def test_the_cache_json_check_runs_before_the_index(cache):
    with open(os.path.join(cache, "cache.json"), "w") as f:
        json.dump({"format": "something else"}, f)
    _one_line_error(cache, "not the manifest")


def test_pretrain_on_a_damaged_cache_stops_in_one_line_before_writing(cache, tmp_path, capsys):
    from sparkct.cli import main

    c = SliceCache(cache)
    open(_shard(c, 0), "wb").close()
    out = tmp_path / "run"
    argv = ["pretrain", "spark", "--data", cache, "--out", str(out), "--crop", "64", "--max-steps", "1"]
    assert main([*argv, "--device", "cpu", "--batch", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and _shard(c, 0) in err and "the file is empty" in err
    assert not (out / "config.json").exists()
