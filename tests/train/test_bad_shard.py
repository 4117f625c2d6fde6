"""A shard that fails while a run reads it stops the run with one line naming the shard and its series; the
last checkpoint stays as it was."""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from sparkct.errors import UserError
from sparkct.train import checkpoint as C
from sparkct.train.trainer import Trainer, build_method

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_shard_that_fails_mid_run_is_named_and_the_checkpoint_kept(small_cache, tmp_path):
    from test_trainer import cfg_for
    from tiny_method import TinyConfig

    cache = str(tmp_path / "cache")
    shutil.copytree(small_cache, cache)
    out = tmp_path / "run"
    cfg = cfg_for(cache, out, preview_every=0)
    t = Trainer(build_method("tiny", cfg, TinyConfig()), cfg, method_name="tiny", log=lambda m: None)
    state = t.setup()
    t.build_data()  # the cache opens intact: its shards are checked here
    t.build_optimization()
    t.restore(state)
    t.open_run()
    t.save()
    before = os.path.getsize(out / "last.ckpt")
    shards = sorted(glob.glob(os.path.join(cache, "shards", "*", "*.npy")))
    for p in shards:  # damaged after the check: every batch meets one
        with open(p, "r+b") as f:
            f.truncate(40)
    with pytest.raises(UserError, match=r"shards/.*\.npy \(series .+\): cannot be read") as e:
        t.run_epoch(0)
    assert "\n" not in str(e.value) and any(p in str(e.value) for p in shards)
    assert os.path.getsize(out / "last.ckpt") == before
    assert C.load_checkpoint(str(out / "last.ckpt"))["step"] == 0
