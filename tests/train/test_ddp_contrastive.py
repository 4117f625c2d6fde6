"""SimCLR, MoCo v2, SwAV, BYOL and DINO through the trainer on 2 CPU processes (gloo) end where one process on
the same global batches ends (float64, 3 steps): weights, BatchNorm statistics, EMA key / target
encoders, MoCo's queue of keys, SwAV's feature queue, and the logged loss.

What makes them equal: every sample is augmented alike on any number of ranks (the loader hands each
rank its rows of the global batch's draw); BatchNorm is synchronized over the ranks, the heads' too
(SimCLR's and BYOL's global BN; for MoCo's key encoder this replaces shuffled BN, which is then
skipped); SimCLR's negatives and MoCo's enqueued keys are gathered from every rank; SwAV's Sinkhorn
sums over the ranks and each rank scores its share of the (global) feature queue; the EMA updates
run on every rank from the same DDP-averaged weights; DINO's centre averages the teacher's scores over
the ranks and its Sinkhorn-Knopp option sums over them (all-reduce)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import torch
from test_ddp import _free_port, rank_env

from sparkct.train import checkpoint as C

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("simclr", "moco", "swav", "byol", "dino", "dino-sinkhorn")
#: method variants: "method-variant" -> the method's options
VARIANTS = {"dino-sinkhorn": {"centering": "sinkhorn"}}

SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from ssl_runs import run
for name in {methods!r}:
    run(name.split('-')[0], {cache!r}, {out!r} + '/' + name, double=True, method_kw={variants!r}.get(name))
"""


def _launch(cache, out, world):
    """Start `world` processes running every method (they are waited for by _wait)."""
    code = SCRIPT.format(here=HERE, cache=cache, out=str(out), methods=METHODS, variants=VARIANTS)
    port = _free_port()
    procs = []
    for r in range(world):
        env = rank_env(world, r, port)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _wait(procs):
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err


def _losses(run_dir):
    return [float(r["loss"]) for r in csv.DictReader(open(os.path.join(run_dir, "metrics.csv")))]


def test_contrastive_methods_on_two_ranks_equal_one_process(small_cache, tmp_path):
    _wait(_launch(small_cache, tmp_path / "one", 1) + _launch(small_cache, tmp_path / "two", 2))
    for name in METHODS:
        a = C.load_checkpoint(str(tmp_path / "one" / name))
        b = C.load_checkpoint(str(tmp_path / "two" / name))
        assert a["step"] == b["step"] == 3 and b["config"]["world_size"] == 2
        # SwAV's Sinkhorn runs in float32 by design, so its codes (and through them the weights) differ in
        # the float32 rounding of sums taken in another order. (With augmentations drawn per rank, as the
        # loader did before, the largest differences were 0.13 (SimCLR) to 0.82 (SwAV's queue).)
        atol = 1e-7 if name == "swav" else 1e-9
        for k, va in a["model"].items():
            vb = b["model"][k]
            if va.is_floating_point():
                assert torch.allclose(va, vb, rtol=1e-7, atol=atol), (name, k, float((va - vb).abs().max()))
            else:
                assert torch.equal(va, vb), (name, k)
        la, lb = _losses(tmp_path / "one" / name), _losses(tmp_path / "two" / name)  # logged in float32
        assert len(la) == 3 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-6 * max(map(abs, la)), (name, la, lb)
        # the runs did what they claim: EMA copies moved off the online weights, queues filled
        m = a["model"]
        if name in ("moco", "byol"):
            ema = "key_encoder.ema.0.conv1.weight" if name == "moco" else "target.ema.0.conv1.weight"
            assert not torch.equal(m[ema], m["backbone.conv1.weight"]), name
        if name == "moco":
            assert int(m["criterion.bank_ptr"]) == (3 * 8) % 16
        if name == "swav":
            assert int(m["queue.0.count"]) == 16
        if name.startswith("dino"):  # the teacher moved off the student; the centre (all-reduced) is in use
            assert not torch.equal(m["teacher.backbone.conv1.weight"], m["backbone.conv1.weight"])
            assert (m["center"].abs().sum() > 0) == (name == "dino")
