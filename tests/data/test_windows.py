"""HU windows as channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkct.data.windows import WINDOWS, Windows, apply_windows, resolve_windows, window_names


def test_presets_and_resolution():
    assert set(WINDOWS) >= {"lung", "mediastinum", "bone", "brain", "abdomen"}
    assert resolve_windows("lung") == [WINDOWS["lung"]]
    assert resolve_windows("lung, bone") == [WINDOWS["lung"], WINDOWS["bone"]]
    assert resolve_windows((40, 400)) == [(40.0, 400.0)]
    assert resolve_windows(["brain", (0, 100)]) == [WINDOWS["brain"], (0.0, 100.0)]
    assert window_names([WINDOWS["lung"], (1, 2)]) == ["lung", "1/2"]
    with pytest.raises(ValueError, match="unknown window"):
        resolve_windows("liver")
    with pytest.raises(ValueError, match="width"):
        resolve_windows([(0, 0)])


def test_values():
    hu = torch.tensor([[-1350.0, -600.0, 150.0, 1000.0]]).view(1, 1, 1, 4)
    lung = apply_windows(hu, "lung")
    np.testing.assert_allclose(lung.flatten().numpy(), [0.0, 0.5, 1.0, 1.0], atol=1e-6)
    brain = apply_windows(torch.tensor([[0.0, 40.0, 60.0]]), "brain")  # (H, W) -> (C, H, W)
    np.testing.assert_allclose(brain.flatten().numpy(), [0.0, 0.5, 0.75], atol=1e-6)
    assert brain.shape == (1, 1, 3)


@pytest.mark.parametrize("shape,expect", [((7, 9), (3, 7, 9)), ((2, 7, 9), (2, 3, 7, 9)), ((2, 1, 7, 9), (2, 3, 7, 9))])
def test_shapes_dtypes_and_numpy_agree(shape, expect):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1100, 2000, size=shape).astype(np.int16)
    t = apply_windows(torch.from_numpy(hu))
    n = apply_windows(hu)
    assert t.shape == expect and n.shape == expect and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), n, atol=1e-6)
    assert 0 <= t.min() and t.max() <= 1
    # channel c is window c alone
    for c, name in enumerate(("lung", "mediastinum", "bone")):
        np.testing.assert_allclose(t[..., c, :, :].numpy(), apply_windows(hu, name)[..., 0, :, :], atol=1e-6)
    w = Windows("lung,bone")
    assert w.channels == 2 and w(torch.from_numpy(hu)).shape[-3] == 2


def test_bad_shape():
    with pytest.raises(ValueError):
        apply_windows(torch.zeros(2, 3, 4, 4))


def test_device(device):
    hu = torch.randint(-1000, 1000, (2, 1, 8, 8), dtype=torch.int16)
    out = apply_windows(hu.to(device))
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), apply_windows(hu))


def test_center_width_strings():
    # the documented C/W form (--windows help, window_names' output), alone or mixed with presets
    assert resolve_windows("40/400") == [(40.0, 400.0)]
    assert resolve_windows("lung, -600/1500 ,1e2/50.5") == [WINDOWS["lung"], (-600.0, 1500.0), (100.0, 50.5)]
    assert resolve_windows(["bone", "50/350"]) == [WINDOWS["bone"], WINDOWS["mediastinum"]]
    assert resolve_windows(window_names([(12.5, 80)])) == [(12.5, 80.0)]  # window_names' form reads back
    for bad, msg in [
        ("40/0", "width must be > 0"),
        ("40/-5", "width must be > 0"),
        ("a/400", "C/W"),
        ("40/400/1", "C/W"),
        ("nan/400", "C/W"),
        ("40/inf", "C/W"),
    ]:
        with pytest.raises(ValueError, match=msg):
            resolve_windows(bad)
