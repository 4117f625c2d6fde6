"""Two "nodes" on this machine (issue 21): two ``torchrun --nnodes 2 --nproc-per-node 2`` launchers with
--node-rank 0 and 1, static rendezvous on 127.0.0.1 (gloo), train SparK and SimCLR a few steps in float64
and end where one process on the same global batches ends; only rank 0 writes the run folder; a node
killed mid-run (its launcher and ranks) is resumed from the last checkpoint by starting both nodes again;
a node that never comes is a clear error after a short timeout, on the launcher's side and on the
trainer's. About two minutes on 2 cores."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_ddp import _free_port

from sparkct.train import checkpoint as C

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {"spark": dict(crop=64), "simclr": {}}

SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from ssl_runs import run
for name, kw in {methods!r}.items():
    run(name, {cache!r}, {out!r} + '/' + name, double=True, **kw)
"""


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, **extra}


def _torchrun(script: str, node: int, port: int, rdzv_timeout: int = 120, nnodes: int = 2, **env) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        "--nproc-per-node=2",
        f"--node-rank={node}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--rdzv-backend=static",
        f"--rdzv-conf=timeout={rdzv_timeout}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        script,
    ]
    return subprocess.Popen(
        cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _losses(run_dir):
    return [float(r["loss"]) for r in csv.DictReader(open(os.path.join(run_dir, "metrics.csv")))]


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_two_nodes_of_two_ranks_equal_one_process(small_cache, tmp_path):
    script = str(tmp_path / "train.py")
    with open(script, "w") as f:
        f.write(SCRIPT.format(here=HERE, cache=small_cache, out=str(tmp_path / "nodes"), methods=METHODS))
    port = _free_port()
    nodes = [_torchrun(script, node, port) for node in (0, 1)]
    with open(str(tmp_path / "one.py"), "w") as f:
        f.write(SCRIPT.format(here=HERE, cache=small_cache, out=str(tmp_path / "one"), methods=METHODS))
    single = subprocess.run(
        [sys.executable, str(tmp_path / "one.py")], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 0, single.stderr[-3000:]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for name in METHODS:
        a = C.load_checkpoint(str(tmp_path / "one" / name))
        b = C.load_checkpoint(str(tmp_path / "nodes" / name))
        assert a["step"] == b["step"] == 3 and b["config"]["world_size"] == 4
        for k, va in a["model"].items():
            vb = b["model"][k]
            if va.is_floating_point():
                assert torch.allclose(va, vb, rtol=1e-7, atol=1e-9), (name, k, float((va - vb).abs().max()))
            else:
                assert torch.equal(va, vb), (name, k)
        la, lb = _losses(tmp_path / "one" / name), _losses(tmp_path / "nodes" / name)
        assert len(la) == 3 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-6 * max(map(abs, la)), (name, la, lb)
        # rank 0 alone wrote: the 4-rank run folder holds exactly the files of the one-process run
        assert _files(tmp_path / "nodes" / name) == _files(tmp_path / "one" / name), name


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from ssl_runs import run
run('simclr', {cache!r}, {out!r}, double=True, max_steps=6, epochs=2, ckpt_every=3, keep=5, resume={resume!r})
"""


def test_a_killed_node_resumes_from_the_last_checkpoint(small_cache, tmp_path):
    """Node 1's launcher and ranks are SIGKILLed after step 5 (checkpoint at step 3): node 0's ranks fail
    at their next collective and its launcher exits; both nodes started again with resume end where one
    uninterrupted process ends."""

    def script(name: str, out: str, resume: bool) -> str:
        path = str(tmp_path / f"{name}.py")
        with open(path, "w") as f:
            f.write(RESUME_SCRIPT.format(here=HERE, cache=small_cache, out=out, resume=resume))
        return path

    straight, nodes_out = str(tmp_path / "straight"), str(tmp_path / "nodes")
    r = subprocess.run(
        [sys.executable, script("straight", straight, False)], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    first = script("first", nodes_out, False)
    port = _free_port()
    launched = [_torchrun(first, node, port, SSL_KILL_NODE_AFTER="5:1", SPARKCT_DIST_TIMEOUT="60") for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=600) for p in launched]
    finally:
        for p in launched:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # whatever of the killed node's session is left
    assert launched[1].returncode == -signal.SIGKILL, outs[1][1][-3000:]
    assert launched[0].returncode not in (0, None), outs[0][1][-3000:]  # its ranks lost their peers
    assert C.load_checkpoint(nodes_out)["step"] == 3
    again = script("again", nodes_out, True)
    port = _free_port()
    relaunched = [_torchrun(again, node, port) for node in (0, 1)]
    for p in relaunched:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = C.load_checkpoint(straight), C.load_checkpoint(nodes_out)
    assert a["step"] == b["step"] == 6 and b["config"]["world_size"] == 4
    for k, va in a["model"].items():
        vb = b["model"][k]
        if va.is_floating_point():
            assert torch.allclose(va, vb, rtol=1e-7, atol=1e-9), (k, float((va - vb).abs().max()))
        else:
            assert torch.equal(va, vb), k
    la, lb = _losses(straight), _losses(nodes_out)
    assert len(la) == len(lb) == 6 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-6 * max(map(abs, la))


def test_a_node_that_never_comes_is_a_clear_error(tmp_path):
    """torchrun's static rendezvous on node 0 gives up after --rdzv-conf timeout when node 1 never starts."""
    script = str(tmp_path / "noop.py")
    with open(script, "w") as f:
        f.write("print('started')\n")
    t0 = time.monotonic()
    p = _torchrun(script, 0, _free_port(), rdzv_timeout=5)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "started" not in out
    assert time.monotonic() - t0 < 90
    assert "1/2 clients joined" in err or "Timed out" in err, err[-2000:]


def test_a_rank_whose_peers_never_join_gets_a_user_error(small_cache, tmp_path):
    """Ranks started by hand (or by a launcher on one node only) fail in SPARKCT_DIST_TIMEOUT with one line."""
    code = (
        f"import sys; sys.path.insert(0, {HERE!r})\n"
        "from sparkct.errors import UserError\n"
        "from ssl_runs import run\n"
        "try:\n"
        f"    run('simclr', {small_cache!r}, {str(tmp_path / 'run')!r})\n"
        "except UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    env = _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["SPARKCT_DIST_TIMEOUT"] = "3"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "USERERROR rank 0 of 2: the other ranks did not join within 3 s at 127.0.0.1:" in r.stdout, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("raw", ["0", "soon"])
def test_a_bad_dist_timeout_is_named(monkeypatch, raw):
    from sparkct.errors import UserError
    from sparkct.train.trainer import _init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SPARKCT_DIST_TIMEOUT", raw)
    with pytest.raises(UserError, match="SPARKCT_DIST_TIMEOUT must be seconds > 0"):
        _init_distributed("cpu")
