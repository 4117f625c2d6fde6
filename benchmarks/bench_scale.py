"""The scale model (issue 21): what one rank pays for a cache of 10^6, 10^7 and 10^8 slices.

A synthetic cache (benchmarks/scale_model.py: index.npz as `sparkct data prepare` writes it, shards
hard-linked to a few sparse files, so 10^8 slices take ~2.2 GB of disk, all of it index) is opened in
a fresh process, as rank 0 of 8 with a global batch of 256, and measured there: start-up (open the
cache + build the dataset and loader), resident memory after it (RSS, anonymous and file-backed
apart), the time to draw one epoch's order, the first batch, and the peak. The timed figure is the
whole fresh process (import torch included).
Targets (issue 21): <= 100 MB resident for the index and loader at 10^8 slices, start-up <= 5 s.

Run: .venv/bin/python -m pytest -q benchmarks/bench_scale.py   (10^6 and 10^7; 10^8 with --bench-full,
about a minute and 2.2 GB of free disk)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import scale_model

import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file)
BENCH = {
    "suite": "scale",
    "pairs": [],
    "default": [("test_rank_startup", "1e6"), ("test_rank_startup", "1e7")],
    "quick": [("test_rank_startup", "1e6")],
}

SIZES = {"1e6": 10**6, "1e7": 10**7, "1e8": 10**8}
TARGET_RSS_MIB = 100
TARGET_STARTUP_S = 5.0


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    made: dict[str, str] = {}

    def get(size: str) -> str:
        if size not in made:
            for k in list(made):  # one synthetic cache on disk at a time
                shutil.rmtree(made.pop(k), ignore_errors=True)
            root = str(tmp_path_factory.mktemp(f"scale{size}"))
            info = scale_model.synth(root, SIZES[size])
            made[size] = root
            with open(os.path.join(root, "synth.json"), "w") as f:
                json.dump(info, f)
        return made[size]

    yield get
    for root in made.values():
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.benchmark(group="scale-rank-startup")
@pytest.mark.parametrize("size", list(SIZES))
def test_rank_startup(benchmark, caches, size):
    root = caches(size)
    with open(os.path.join(root, "synth.json")) as f:
        synth = json.load(f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale_model.py")
    results = []

    def run():
        r = subprocess.run(
            [sys.executable, script, "measure", root, "--world", "8", "--batch", "256"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=True,
        )
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    m = results[-1]
    assert m["slices"] == SIZES[size] and m["batch_shape"] == [32, 3, 224, 224]
    info = {
        "params": {"slices": SIZES[size], "series": synth["series"], "world": 8, "batch": 256},
        "index_mib": round(synth["index_bytes"] / 2**20, 1),
        **{k: v for k, v in m.items() if k not in ("order_first", "batch_shape")},
        "target_rss_mib": TARGET_RSS_MIB,
        "target_startup_s": TARGET_STARTUP_S,
        "meets_target": m["rss_open_mib"] <= TARGET_RSS_MIB and m["startup_s"] <= TARGET_STARTUP_S,
        "device": "cpu (one rank, fresh process)",
    }
    benchmark.extra_info.update(info)
    benchkit.DERIVED.append({"name": benchmark.name, "group": benchmark.group, **info})
