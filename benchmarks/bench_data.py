"""CT data throughput: `sparkct data prepare` and the cached slice loader.

- prepare: uncompressed 512x512 synthetic CT (written by `sparkct data synth`, so in the page cache)
  into a fresh cache per round; slices/s per worker, without and with resampling to 224x224.
  Baseline / ideal: pydicom alone reading the same files (header + pixel decode), which prepare
  cannot beat since it does that work plus HU conversion and the int16 shard write.
- loader: 224x224 crops with three HU windows from a 256x256 cache, with the default pretraining
  augmentation, with crop + flip only, and the evaluation resize; ideal: the batched shard reads
  alone (int16, no transform).
Targets (issue 4): prepare >= 150 slices/s per worker; loader >= 3,000 slices/s on 2 cores.

Run: .venv/bin/python -m pytest -q benchmarks/bench_data.py  (about a minute)
"""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest
import torch

import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file)
BENCH = {
    "suite": "data",
    "pairs": [  # prepare vs pydicom's decode alone (the ideal), each loader transform vs the bare shard reads
        {
            "case": {"test": "test_prepare_throughput"},
            "base": {"test": "test_pydicom_decode_baseline"},
            "label": "pydicom-decode",
        },
        {
            "case": {"test": "test_loader_throughput"},
            "base": {"test": "test_loader_throughput", "mode": "read-only"},
            "label": "read-only",
        },
    ],
    "default": [
        ("test_pydicom_decode_baseline", ""),
        ("test_prepare_throughput", "j1"),
        ("test_loader_throughput", "read-only"),
        ("test_loader_throughput", "default-augment"),
    ],
    "quick": [
        ("test_pydicom_decode_baseline", ""),
        ("test_prepare_throughput", "j1"),
        ("test_loader_throughput", "read-only"),
        ("test_loader_throughput", "eval-resize"),
    ],
}

pytest.importorskip("pydicom")

PREPARE_SLICES = 120  # 2 series x 60 slices of 512x512
LOADER_BATCHES = 24


@pytest.fixture(scope="module")
def dicom512(tmp_path_factory):
    from sparkct.data.synthetic import synth

    d = str(tmp_path_factory.mktemp("synth512"))
    synth(
        d,
        patients=2,
        seed=0,
        size=512,
        thickness=2.5,
        series_per_patient=(1, 1),
        slices=PREPARE_SLICES // 2,
        localizer=False,
    )
    return d


@pytest.fixture(scope="module")
def cache256(tmp_path_factory):
    from sparkct.data import prepare
    from sparkct.data.synthetic import synth

    src = str(tmp_path_factory.mktemp("synth256"))
    synth(src, patients=4, seed=1, size=256, thickness=2.5, series_per_patient=(1, 1), slices=100, localizer=False)
    dst = str(tmp_path_factory.mktemp("cache256"))
    prepare(src, dst, progress=False)
    return dst


def _fresh(root: str):
    counter = itertools.count()

    def make() -> str:
        d = os.path.join(root, f"run{next(counter)}")
        shutil.rmtree(d, ignore_errors=True)
        return d

    return make


@pytest.mark.benchmark(group="data-prepare-512")
def test_pydicom_decode_baseline(benchmark, dicom512):
    import pydicom

    files = [os.path.join(dp, f) for dp, _, fs in os.walk(dicom512) for f in fs if f.endswith(".dcm")]
    assert len(files) == PREPARE_SLICES

    def run():
        for f in files:
            _ = pydicom.dcmread(f).pixel_array  # decodes the pixels

    extra = benchkit.run(benchmark, run, "cpu", rounds=3, slices=len(files), workers=1, size=512)
    extra["slices_per_s"] = round(len(files) / extra["median_s"], 1)
    benchmark.extra_info["slices_per_s"] = extra["slices_per_s"]
    benchkit.DERIVED[-1]["slices_per_s"] = extra["slices_per_s"]


@pytest.mark.benchmark(group="data-prepare-512")
@pytest.mark.parametrize("workers,resample", [(1, False), (1, True), (2, False)], ids=["j1", "j1-resample224", "j2"])
def test_prepare_throughput(benchmark, dicom512, tmp_path, workers, resample):
    from sparkct.data import SliceCache, prepare

    make = _fresh(str(tmp_path))
    kw = dict(spacing=1.6, size=224) if resample else {}
    secs = []

    def run():
        dst = make()
        rep = prepare(dicom512, dst, progress=False, workers=workers, **kw)
        assert rep.slices_written == PREPARE_SLICES and rep.series_failed == 0
        secs.append(rep.prepare_seconds)
        return rep

    extra = benchkit.run(
        benchmark,
        run,
        "cpu",
        rounds=3,
        slices=PREPARE_SLICES,
        workers=workers,
        resample="1.6mm/224" if resample else "none",
    )
    c = SliceCache(os.path.join(str(tmp_path), "run0"))
    assert len(c) == PREPARE_SLICES and c.uniform_shape == ((224, 224) if resample else (512, 512))
    rate = PREPARE_SLICES / extra["median_s"]
    # the series phase alone (no walk/scan/index; for -j it excludes the workers' start-up too)
    series_rate = PREPARE_SLICES / float(np.median(secs))
    info = {
        "slices_per_s": round(rate, 1),
        "slices_per_s_per_worker": round(rate / workers, 1),
        "series_phase_slices_per_s": round(series_rate, 1),
        "target_per_worker": 150,
        "meets_target": rate / workers >= 150,
    }
    benchmark.extra_info.update(info)
    benchkit.DERIVED[-1].update(info)


def _loader_run(ds, transform, batch, workers=0):
    from sparkct.data.datasets import SliceLoader

    ld = SliceLoader(ds, batch, transform=transform, seed=0, workers=workers)
    epochs = itertools.count()

    def run():
        n = 0
        while n < LOADER_BATCHES * batch:
            ld.set_epoch(next(epochs))
            for x in ld:
                n += len(x)
                if n >= LOADER_BATCHES * batch:
                    break
        return n

    return run


@pytest.mark.benchmark(group="data-loader-224")
@pytest.mark.parametrize("mode", ["read-only", "eval-resize", "crop-flip", "default-augment"])
def test_loader_throughput(benchmark, cache256, mode):
    from sparkct.data.augment import CTAugment, CTResize
    from sparkct.data.datasets import CTSliceDataset

    batch = 64
    ds = CTSliceDataset(cache256)
    assert ds.cache.uniform_shape == (256, 256) and len(ds) >= 256
    transform = {
        "read-only": lambda hu, g=None: hu,
        "eval-resize": CTResize(224),
        "crop-flip": CTAugment(224, p_rotate=0, p_hu=0, p_intensity=0, p_gamma=0, p_noise=0, p_blur=0),
        "default-augment": CTAugment(224),
    }[mode]
    run = _loader_run(ds, transform, batch)
    # correctness before timing
    from sparkct.data.datasets import SliceLoader

    x = next(iter(SliceLoader(ds, 8, transform=transform)))
    if mode != "read-only":
        assert x.shape == (8, 3, 224, 224) and 0 <= float(x.min()) and float(x.max()) <= 1
    n = LOADER_BATCHES * batch
    extra = benchkit.run(benchmark, run, "cpu", rounds=3, slices=n, batch=batch, out="224x224x3", src="256x256")
    rate = n / extra["median_s"]
    info = {
        "slices_per_s": round(rate, 1),
        "target": 3000,
        "meets_target": rate >= 3000 or mode == "read-only",
        "torch_threads": torch.get_num_threads(),
    }
    benchmark.extra_info.update(info)
    benchkit.DERIVED[-1].update(info)


@pytest.mark.benchmark(group="data-loader-224")
def test_loader_threads(benchmark, cache256):
    """The default augmentation with two loader threads and one intra-op thread each."""
    from sparkct.data.augment import CTAugment
    from sparkct.data.datasets import CTSliceDataset

    batch = 64
    ds = CTSliceDataset(cache256)
    run = _loader_run(ds, CTAugment(224), batch, workers=2)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = LOADER_BATCHES * batch
        extra = benchkit.run(benchmark, run, "cpu", rounds=3, slices=n, batch=batch, workers=2)
    finally:
        torch.set_num_threads(prev)
    info = {"slices_per_s": round(n / extra["median_s"], 1), "target": 3000, "torch_threads": 1}
    benchmark.extra_info.update(info)
    benchkit.DERIVED[-1].update(info)


@pytest.mark.cuda
@pytest.mark.benchmark(group="data-loader-224-cuda")
def test_loader_gpu_augment(benchmark, cache256):
    from sparkct.data.augment import CTAugment
    from sparkct.data.datasets import CTSliceDataset, SliceLoader

    batch = 256
    ds = CTSliceDataset(cache256)
    ld = SliceLoader(ds, batch, transform=CTAugment(224), device="cuda", workers=2)

    def run_gpu():
        n = 0
        for x in ld:
            n += len(x)
        torch.cuda.synchronize()
        return n

    n = len(ld) * batch
    extra = benchkit.run(benchmark, run_gpu, "cuda", rounds=3, slices=n, batch=batch)
    info = {"slices_per_s": round(n / extra["median_s"], 1)}
    benchmark.extra_info.update(info)
    benchkit.DERIVED[-1].update(info)
