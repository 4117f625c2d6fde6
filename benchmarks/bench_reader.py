"""The loader's read path alone (issue 21): random 224x224 int16 slices from the shards of a prepared
cache, as SliceLoader reads them (one grouped read per batch, in 1, 2 or 4 reader threads; on a GPU
machine pinned, as device='cuda' does), no transform. In slices/s for the one process.

- warm: the shards are in the page cache (a cache smaller than RAM, read before);
- cold: each round first drops the shards' pages (posix_fadvise DONTNEED, this cache's files only), so
  every read goes to the disk (here: the machine's local virtual disk);
- run8: runs of 8 neighbouring slices (SliceLoader's run_length=8) instead of single random slices.
What a GPU needs: a SparK ResNet-50 step at the GPU target of 1,500 img/s reads 1,500 slices/s
(docs/scale.md has each method's figure).

Run: .venv/bin/python -m pytest -q benchmarks/bench_reader.py   (about a minute; 200 MB of shards)
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file)
BENCH = {
    "suite": "scale",
    "pairs": [
        {
            "case": {"test": "test_read_slices", "mode": "cold"},
            "base": {"test": "test_read_slices", "mode": "warm"},
            "label": "page-cache",
        },
    ],
    "default": [
        ("test_read_slices", "warm-t1"),
        ("test_read_slices", "warm-t2"),
        ("test_read_slices", "warm-t4"),
        ("test_read_slices", "cold-t1"),
        ("test_read_slices", "cold-t2"),
        ("test_read_slices", "cold-t4"),
        ("test_read_slices", "cold-run8-t2"),
    ],
    "quick": [("test_read_slices", "warm-t2"), ("test_read_slices", "cold-t2")],
}

SERIES, PER_SERIES, SIZE = 20, 100, 224  # 2,000 slices, 200 MB
BATCH, BATCHES = 64, 24


@pytest.fixture(scope="module")
def cache224(tmp_path_factory):
    """A cache as `sparkct data prepare` lays it out (index.npz, one shard per series), random HU."""
    from sparkct.data.cache import FORMAT, VERSION, shard_rel
    from sparkct.data.preparing import write_index

    root = str(tmp_path_factory.mktemp("reader"))
    rng = np.random.default_rng(0)
    recs = []
    for s in range(SERIES):
        key = f"{s:040x}"
        p = os.path.join(root, shard_rel(key))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        np.save(p, rng.integers(-1024, 2000, (PER_SERIES, SIZE, SIZE), dtype=np.int16))
        recs.append(
            {
                "key": key,
                "series_uid": f"1.2.{s}",
                "patient": f"p{s}",
                "n_slices": PER_SERIES,
                "shape": [PER_SERIES, SIZE, SIZE],
                "spacing": [1.25, 0.7, 0.7],
                "z": [1.25 * i for i in range(PER_SERIES)],
                "instance": list(range(1, PER_SERIES + 1)),
            }
        )
    write_index(root, recs)
    import json

    with open(os.path.join(root, "cache.json"), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "settings": {}}, f)
    return root


def _drop_pages(root: str) -> None:
    for d, _, fs in os.walk(os.path.join(root, "shards")):
        for f in fs:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (a shard just written) are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _read_only(hu, generator=None):
    return hu


def _read_pinned(hu, generator=None):  # in the reader threads, as SliceLoader(device='cuda') pins
    return hu.pin_memory()


@pytest.mark.benchmark(group="scale-reader-224")
@pytest.mark.parametrize("threads", [1, 2, 4], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("mode", ["warm", "cold", "cold-run8"])
def test_read_slices(benchmark, cache224, mode, threads):
    from sparkct.data.datasets import CTSliceDataset, SliceLoader

    ds = CTSliceDataset(cache224)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs = iter(range(10**6))
    ld = SliceLoader(
        ds,
        BATCH,
        transform=_read_only,
        workers=threads,
        device="cpu",
        tune_malloc=False,
        run_length=8 if mode.endswith("run8") else 1,
    )
    pin = device == "cuda"
    ld.transform = _read_pinned if pin else _read_only
    # correctness before timing: a batch is the slices the order names
    ld.set_epoch(0)
    first = next(iter(ld))
    np.testing.assert_array_equal(first[:, 0].numpy(), ds.cache.read(ld.order(0)[:BATCH]))

    def run():
        if mode.startswith("cold"):
            _drop_pages(cache224)
        ld.set_epoch(next(epochs))
        n = 0
        for b, x in enumerate(ld):
            n += len(x)
            if b + 1 == BATCHES:
                break
        return n

    if mode == "warm":
        run()  # into the page cache
    extra = benchkit.run(
        benchmark,
        run,
        "cpu",
        rounds=5,
        warmup=0,
        slices=BATCH * BATCHES,
        batch=BATCH,
        threads=threads,
        mode=mode,
        pinned=pin,
        slice_bytes=SIZE * SIZE * 2,
    )
    rate = BATCH * BATCHES / extra["median_s"]
    info = {"slices_per_s": round(rate, 1), "mb_per_s": round(rate * SIZE * SIZE * 2 / 1e6, 1)}
    benchmark.extra_info.update(info)
    benchkit.DERIVED[-1].update(info)
