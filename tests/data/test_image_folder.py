"""Image-folder CT sets (PNG/JPEG, one folder per class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparkct.data.datasets import patient_split
from sparkct.data.images import ImageFolderSlices


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("covid", "normal"):
        for p in range(4):
            d = tmp_path / cls / f"patient{p}"
            d.mkdir(parents=True)
            for s in range(3):
                arr = rng.integers(0, 255, size=(40, 50), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"s{s}.png")
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(tmp_path / "normal" / "rgb.jpg")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(tmp_path / "normal" / "deep.png")
    return tmp_path


def test_items_and_classes(folder):
    ds = ImageFolderSlices(str(folder), size=32)
    assert ds.classes == ["covid", "normal"] and len(ds) == 26
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y == 0
    deep = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("deep.png"))
    assert torch.allclose(ds[deep][0], torch.ones(3, 32, 32))
    one = ImageFolderSlices(str(folder), size=None, channels=1)
    assert one[0][0].shape == (1, 40, 50)


def test_patient_groups_for_splits(folder):
    ds = ImageFolderSlices(str(folder), size=16)
    # slices of one patient folder form one group; the two loose files are groups of their own
    assert len(ds.patient_names) == 8 + 2
    sp = patient_split(ds, (0.5, 0.5), names=("a", "b"), seed=0)
    ga, gb = set(ds.patients[sp["a"]]), set(ds.patients[sp["b"]])
    assert not (ga & gb) and len(sp["a"]) + len(sp["b"]) == len(ds)
    by_regex = ImageFolderSlices(str(folder), size=16, group=r"patient(\d)")
    assert len(by_regex.patient_names) == 4 + 2  # the same patient number in both classes is one group


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderSlices(str(tmp_path / "none"))
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSlices(str(tmp_path))
