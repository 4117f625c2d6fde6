"""Batched CT augmentations: shapes, determinism, values of each transform, devices."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sparkct.data.augment import CTAugment, CTResize, MultiCrop, TwoViews, affine_grid, gaussian_blur, gaussian_kernels
from sparkct.data.windows import apply_windows

OFF = dict(p_rotate=0, p_hu=0, p_intensity=0, p_gamma=0, p_noise=0, p_blur=0, hflip=0)


def phantom(b=4, h=48, w=40, seed=0) -> torch.Tensor:
    """int16 HU slices with structure (so that geometry errors show)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = -800 + 12.0 * xx + 5.0 * yy + 300 * ((xx - w / 3) ** 2 + (yy - h / 2) ** 2 < 40).float()
    noise = torch.randn(b, 1, h, w, generator=g) * 30
    return (base[None, None] + noise + torch.arange(b).view(b, 1, 1, 1) * 40).round().to(torch.int16)


def test_affine_grid_equals_torch():
    th = torch.randn(6, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(
        affine_grid(th, (7, 9)), F.affine_grid(th.float(), (6, 1, 7, 9), align_corners=False), atol=1e-5, rtol=0
    )


def test_shapes_range_and_determinism():
    hu = phantom()
    aug = CTAugment(32)
    a = aug(hu, torch.Generator().manual_seed(5))
    b = aug(hu, torch.Generator().manual_seed(5))
    c = aug(hu, torch.Generator().manual_seed(6))
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert CTAugment((24, 16), windows="lung")(hu).shape == (4, 1, 24, 16)
    assert CTAugment(16)(hu[0, 0]).shape == (1, 3, 16, 16)  # (H, W) input


def test_multicrop_and_two_views():
    hu = phantom()
    views = MultiCrop(global_size=32, local_size=12, n_global=2, n_local=3)(hu, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 12, 12)] * 3
    assert not torch.equal(views[0], views[1])
    v1, v2 = TwoViews(20)(hu)
    assert v1.shape == v2.shape == (4, 3, 20, 20)


def test_resize_is_windowing_at_the_same_size_and_resizes_otherwise():
    hu = phantom()
    torch.testing.assert_close(CTResize((48, 40))(hu), apply_windows(hu), atol=1e-6, rtol=0)
    out = CTResize(24, windows="lung")(hu)
    ref = F.interpolate(hu.float(), size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, apply_windows(ref, "lung"), atol=1e-5, rtol=0)


def test_crop_and_grid_paths_agree():
    hu = phantom(6)
    a_c = CTAugment(30, geometry="crop", p_rotate=0.5, rotate=20, p_noise=0, p_blur=0)
    a_g = CTAugment(30, geometry="grid", p_rotate=0.5, rotate=20, p_noise=0, p_blur=0)
    p = a_c.sample(6, (48, 40), torch.Generator().manual_seed(2))
    yc, yg = a_c.apply(hu, p), a_g.apply(hu, p)
    # identical bilinear weights inside the crop; at its outer half pixel the crop path clamps to
    # the box while grid_sample blends in the neighbouring pixel
    torch.testing.assert_close(yc[..., 2:-2, 2:-2], yg[..., 2:-2, 2:-2], atol=1e-4, rtol=0)


def test_full_crop_flip_equals_flipped_windows():
    hu = phantom()
    aug = CTAugment((48, 40), scale=(1, 1), ratio=(40 / 48, 40 / 48), **{**OFF, "hflip": 1.0}, vflip=1.0)
    torch.testing.assert_close(aug(hu), apply_windows(hu).flip(-1).flip(-2), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_is_rot90():
    hu = phantom(2, 32, 32)
    aug = CTAugment(32, scale=(1, 1), ratio=(1, 1), geometry="grid", **OFF)
    p = aug.sample(2, (32, 32), torch.Generator().manual_seed(0))
    p = dataclasses.replace(p, angle=torch.full((2,), math.pi / 2, dtype=torch.float64))
    out = aug.apply(hu, p)
    # output pixel (row i, col j) reads input (col, row) = R(angle) (j, i) about the centre: for +90
    # degrees the input's bottom edge comes out on the right, torch.rot90 with k=1
    torch.testing.assert_close(out, apply_windows(torch.rot90(hu, 1, dims=(-2, -1))), atol=1e-4, rtol=0)


def test_hu_shift_scale_and_intensity_are_exact():
    hu = phantom()
    aug = CTAugment((48, 40), scale=(1, 1), ratio=(40 / 48, 40 / 48), **OFF)
    p = aug.sample(4, (48, 40), torch.Generator().manual_seed(0))
    p = dataclasses.replace(
        p,
        hu_shift=torch.tensor([0.0, 100.0, -50.0, 10.0], dtype=torch.float64),
        hu_scale=torch.tensor([1.0, 1.0, 1.1, 0.9], dtype=torch.float64),
    )
    x = hu.float() * p.hu_scale.view(-1, 1, 1, 1).float() + p.hu_shift.view(-1, 1, 1, 1).float()
    torch.testing.assert_close(aug.apply(hu, p), apply_windows(x), atol=1e-4, rtol=0)
    p2 = dataclasses.replace(
        p,
        hu_shift=torch.zeros(4, dtype=torch.float64),
        hu_scale=torch.ones(4, dtype=torch.float64),
        contrast=torch.tensor([1.0, 1.2, 0.8, 1.0], dtype=torch.float64),
        brightness=torch.tensor([0.0, 0.05, -0.1, 0.2], dtype=torch.float64),
    )
    w = torch.tensor([1500.0, 350.0, 1800.0]).view(1, 3, 1, 1)
    c = torch.tensor([-600.0, 50.0, 400.0]).view(1, 3, 1, 1)
    pre = (hu.float() - (c - w / 2)) / w
    want = (pre * p2.contrast.view(-1, 1, 1, 1).float() + p2.brightness.view(-1, 1, 1, 1).float()).clamp(0, 1)
    torch.testing.assert_close(aug.apply(hu, p2), want, atol=1e-4, rtol=0)


def test_gamma_applies_to_the_drawn_subset():
    hu = phantom()
    aug = CTAugment((48, 40), scale=(1, 1), ratio=(40 / 48, 40 / 48), **OFF)
    p = aug.sample(4, (48, 40), torch.Generator().manual_seed(0))
    gam = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    out = aug.apply(hu, dataclasses.replace(p, gamma=gam))
    # (atol: values near 0 shift by ~1e-8 through the fused window, which sqrt turns into ~1e-4)
    torch.testing.assert_close(out, apply_windows(hu) ** gam.view(-1, 1, 1, 1).float(), atol=2e-4, rtol=0)
    # probabilities: p_gamma=0.5 touches about half the samples
    a = CTAugment(8, p_gamma=0.5)
    g = a.sample(4000, (16, 16), torch.Generator().manual_seed(1)).gamma
    assert 0.45 < (g != 1).float().mean() < 0.55
    assert g.min() >= 0.7 - 1e-9 and g.max() <= 1.5 + 1e-9


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_noise_has_the_drawn_sigma_in_hu(dev):
    hu = torch.zeros(6, 1, 64, 64, dtype=torch.int16)
    wide = [(0.0, 20000.0)]  # linear over the range the noise covers: window = (hu + 10000) / 20000
    aug = CTAugment(64, windows=wide, scale=(1, 1), ratio=(1, 1), **{**OFF, "p_noise": 1.0}, noise=(10, 40))
    g = torch.Generator().manual_seed(3)
    p = aug.sample(6, (64, 64), g)
    out = aug.apply(hu.to(dev), p, g).cpu()
    hu_noise = out * 20000 - 10000
    est = hu_noise.flatten(1).std(1)
    torch.testing.assert_close(est.double(), p.noise_sigma, rtol=0.08, atol=0.5)
    assert abs(float(hu_noise.mean())) < 1.0
    # neighbouring pixels are uncorrelated
    n = hu_noise[:, 0]
    r = (n[:, :, 1:] * n[:, :, :-1]).mean() / (n * n).mean()
    assert abs(float(r)) < 0.05


def test_blur():
    k = gaussian_kernels(torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(k.sum(1), torch.ones(2))
    x = torch.zeros(2, 1, 31, 31)
    x[:, :, 15, 15] = 1.0
    y = gaussian_blur(x, torch.tensor([1.0, 2.5]))
    torch.testing.assert_close(y.sum((1, 2, 3)), torch.ones(2), atol=1e-4, rtol=0)
    var = [(y[i, 0].sum(0) * (torch.arange(31) - 15.0) ** 2).sum() for i in range(2)]
    torch.testing.assert_close(torch.stack(var), torch.tensor([1.0, 6.25]), rtol=0.05, atol=0)
    const = torch.full((1, 1, 10, 10), 7.0)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([1.5])), const)


def test_rotated_corners_read_air():
    hu = torch.full((1, 1, 32, 32), 500, dtype=torch.int16)
    aug = CTAugment(32, windows=[(0.0, 4000.0)], scale=(1, 1), ratio=(1, 1), **OFF)
    p = dataclasses.replace(aug.sample(1, (32, 32)), angle=torch.tensor([math.pi / 4], dtype=torch.float64))
    out = aug.apply(hu, p) * 4000 - 2000
    assert abs(float(out[0, 0, 0, 0]) + 1024) < 1 and abs(float(out[0, 0, 16, 16]) - 500) < 1


def test_validation():
    with pytest.raises(ValueError):
        CTAugment(0)
    with pytest.raises(ValueError, match="scale"):
        CTAugment(8, scale=(0.5, 2))
    with pytest.raises(ValueError, match="probability"):
        CTAugment(8, p_noise=2)
    with pytest.raises(ValueError, match="geometry"):
        CTAugment(8, geometry="fast")
    with pytest.raises(ValueError):
        CTAugment(8)(torch.zeros(2, 3, 8, 8))
    aug = CTAugment(8)
    with pytest.raises(ValueError, match="parameters"):
        aug.apply(phantom(), aug.sample(2, (48, 40)))


def test_device_agnostic(device):
    """The same seed gives the same crops on every device (noise off: its draw is per device)."""
    hu = phantom(4)
    aug = CTAugment(24, geometry="grid", p_noise=0, p_rotate=0.5, p_blur=0.5, p_gamma=0.5)
    cpu = aug(hu, torch.Generator().manual_seed(9))
    dev = aug(hu.to(device), torch.Generator().manual_seed(9))
    assert dev.device.type == device
    torch.testing.assert_close(dev.cpu(), cpu, atol=1e-4, rtol=1e-4)
