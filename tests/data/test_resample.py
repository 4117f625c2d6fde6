"""In-plane resampling: geometry, exactness on linear images, CPU/GPU agreement."""

from __future__ import annotations

import numpy as np
import pytest

from sparkct.data.resample import backend, gpu_available, output_geometry, resample_slices


def ramp(n=3, h=40, w=50, spacing=(0.8, 0.6)):
    """HU that are linear in patient millimetres: f = 3 y + 2 x + slice offset."""
    y = (np.arange(h) - (h - 1) / 2) * spacing[0]
    x = (np.arange(w) - (w - 1) / 2) * spacing[1]
    img = 3 * y[:, None] + 2 * x[None, :]
    return np.stack([img + 100 * k for k in range(n)]).astype(np.float32)


def test_geometry_rules():
    assert output_geometry((512, 512), (0.7, 0.7), None, None) == ((512, 512), (0.7, 0.7), (1.0, 1.0))
    (h, w), sp, step = output_geometry((512, 400), (0.7, 0.7), 1.4, None)
    assert (h, w) == (256, 200) and sp == (1.4, 1.4) and step == pytest.approx((2.0, 2.0))
    (h, w), sp, step = output_geometry((512, 512), (0.7, 0.7), None, 256)
    assert (h, w) == (256, 256) and sp == pytest.approx((1.4, 1.4))
    assert output_geometry((512, 512), (0.7, 0.7), 1.0, 224)[0] == (224, 224)
    with pytest.raises(ValueError, match="PixelSpacing"):
        output_geometry((10, 10), None, 1.0, None)
    with pytest.raises(ValueError):
        output_geometry((10, 10), (1.0, 1.0), -1.0, None)


def test_no_op_returns_input():
    a = ramp()
    out, sp = resample_slices(a, (0.8, 0.6), device="cpu")
    assert out is a and sp == (0.8, 0.6)


@pytest.mark.parametrize("spacing,size", [(0.5, None), (1.1, None), (0.7, 30), (None, 33)])
def test_linear_images_stay_exact_at_the_centred_grid(spacing, size):
    src_sp = (0.8, 0.6)
    a = ramp(spacing=src_sp)
    out, sp = resample_slices(a, src_sp, spacing=spacing, size=size, antialias=False, cval=-1e6, device="cpu")
    n, h, w = out.shape
    y = (np.arange(h) - (h - 1) / 2) * sp[0]
    x = (np.arange(w) - (w - 1) / 2) * sp[1]
    want = np.stack([3 * y[:, None] + 2 * x[None, :] + 100 * k for k in range(n)])
    inside = out > -1e5  # points that map inside the source grid
    assert inside.mean() > 0.3
    np.testing.assert_allclose(out[inside], want[inside], atol=2e-3)


def test_padding_reads_cval_and_downsampling_antialiases():
    a = np.zeros((1, 20, 20), np.float32)
    out, _ = resample_slices(a, (1.0, 1.0), spacing=1.0, size=40, cval=-1024, device="cpu")
    assert out.shape == (1, 40, 40) and out[0, 0, 0] == -1024 and out[0, 20, 20] == 0
    checker = (np.indices((63, 63)).sum(0) % 2 * 1000).astype(np.float32)[None]
    aa, _ = resample_slices(checker, (1.0, 1.0), spacing=3.0, antialias=True, device="cpu")
    raw, _ = resample_slices(checker, (1.0, 1.0), spacing=3.0, antialias=False, device="cpu")
    assert aa[0, 3:-3, 3:-3].std() < 0.2 * raw[0, 3:-3, 3:-3].std()


def test_backend_choice():
    xp, ndi, name = backend("cpu")
    assert xp is np and name == "cpu"
    with pytest.raises(ValueError):
        backend("tpu")
    if not gpu_available():
        with pytest.raises(RuntimeError, match="cupy"):
            backend("cuda")


@pytest.mark.cuda
def test_gpu_matches_cpu():
    if not gpu_available():
        pytest.skip("needs cupy and a CUDA GPU")
    rng = np.random.default_rng(0)
    a = rng.normal(0, 300, size=(4, 96, 80)).astype(np.float32)
    for kw in (dict(spacing=1.3), dict(spacing=0.55, size=64), dict(size=50)):
        cpu, sp1 = resample_slices(a, (0.7, 0.75), device="cpu", **kw)
        gpu, sp2 = resample_slices(a, (0.7, 0.75), device="cuda", **kw)
        assert isinstance(gpu, np.ndarray) and sp1 == sp2
        np.testing.assert_allclose(gpu, cpu, atol=1e-2, rtol=1e-4)
