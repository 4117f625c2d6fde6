"""sparkct.io: atomic writes land whole, leave no temporary behind, and get a normal file mode."""

from __future__ import annotations

import os
import stat

import pytest

from sparkct import io as sio


def test_atomic_write_gets_the_mode_a_plain_open_would(tmp_path):
    mask = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        sio.write_text_atomic(str(tmp_path / "atomic.txt"), "x")
        sio.write_json_atomic(str(tmp_path / "atomic.json"), {"a": 1})
    finally:
        os.umask(mask)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o644
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode) == want


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "f.txt"
    sio.write_text_atomic(str(p), "old")
    with pytest.raises(RuntimeError), sio.atomic_path(str(p)) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]
