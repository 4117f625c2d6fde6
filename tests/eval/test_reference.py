"""sparkct.eval.reference: the blob detector's lung mask and scores (a bright disc in a lung raises a
slice's score, one outside the lungs does not), and its AUC with patient-bootstrap CIs on a cache task."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparkct.errors import UserError
from sparkct.eval.data import load_task
from sparkct.eval.reference import NAME, blob_reference, blob_scores, blob_sigmas, lung_mask

SIZE = 32
YY, XX = np.mgrid[:SIZE, :SIZE]


def _disc(cy, cx, r):
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r**2


def _chest(rng, nodule=None, bone=None):
    """A HU slice: air, a 40 HU body, two -850 HU lungs; a 40 HU disc (cy, cx, r) `nodule`, a 600 HU
    disc `bone`; noise."""
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[((YY - 16) / 13) ** 2 + ((XX - 16) / 15) ** 2 <= 1] = 40.0
    for cx in (9.5, 22.5):
        hu[((YY - 15) / 8) ** 2 + ((XX - cx) / 4.5) ** 2 <= 1] = -850.0
    if nodule is not None:
        hu[_disc(*nodule)] = 40.0
    if bone is not None:
        hu[_disc(*bone)] = 600.0
    return hu + rng.normal(0, 10, hu.shape)


class _Slices:
    """The dataset interface blob_scores reads: len and hu(items) (B, 1, H, W) int16."""

    def __init__(self, slices):
        self.x = torch.from_numpy(np.stack(slices).astype(np.int16))[:, None]

    def __len__(self):
        return len(self.x)

    def hu(self, items):
        return self.x[np.asarray(items)]


def test_lung_mask_holds_the_lungs_and_their_nodules_not_the_air_around_the_body():
    hu = _chest(np.random.default_rng(0), nodule=(15, 9.5, 2))
    m = lung_mask(hu, erode=0)
    assert not m[0].any() and not m[:, 0].any()  # the air around the body is not lung
    assert m[15, 9] and m[15, 22]  # both lungs, the nodule's centre included (a filled hole)
    assert not m[16, 16] and not m[3, 16]  # the mediastinum, the body wall
    assert lung_mask(hu, erode=1).sum() < m.sum()


def test_a_bright_disc_in_a_lung_scores_higher_than_none_or_one_outside_the_lungs():
    rng = np.random.default_rng(1)
    plain = [_chest(rng) for _ in range(3)]
    nodule = [_chest(rng, nodule=(15, 9.5, 2)) for _ in range(3)]
    outside = [_chest(rng, bone=(27, 16, 2)) for _ in range(3)]  # in the body below the lungs
    s = blob_scores(_Slices(plain + nodule + outside), crop=SIZE, sigmas=blob_sigmas(1.0, (3, 6)))
    assert s[3:6].min() > s[:3].max() + 100  # a 40 HU disc in -850 HU lung responds by hundreds of HU
    assert s[6:].max() < s[3:6].min()
    # a slice's score is its own, whatever its neighbours in the batch
    alone = [blob_scores(_Slices([x]), crop=SIZE, sigmas=blob_sigmas(1.0, (3, 6)))[0] for x in plain + nodule]
    np.testing.assert_allclose(alone, s[:6], rtol=1e-9)
    # no lung at all: the lowest score of the others
    body = np.where(((YY - 16) / 13) ** 2 + ((XX - 16) / 15) ** 2 <= 1, 40.0, -1000.0)
    s2 = blob_scores(_Slices([body, *plain]), crop=SIZE, sigmas=[1.4])
    assert s2[0] == s2[1:].min() and np.isfinite(s2).all()


def test_blob_sigmas_match_the_diameters_at_the_pixel_size():
    s = blob_sigmas(2.0, (8, 16), n=2)
    np.testing.assert_allclose(s, [4 / np.sqrt(2) / 2, 8 / np.sqrt(2) / 2], atol=1e-3)
    assert blob_sigmas(10.0, (4, 30)).min() == 0.75  # none below 0.75 px


def _write_patients(root, n=12, slices=3):
    """NIfTI chests (1 mm pixels), odd patients with a nodule in every slice; {folder: label}."""
    import nibabel as nib

    rng = np.random.default_rng(2)
    labels = {}
    for p in range(n):
        y = p % 2
        vol = np.stack(
            [_chest(rng, nodule=(15 + rng.integers(-3, 4), 9.5, 2) if y else None) for _ in range(slices)], -1
        )
        d = os.path.join(root, f"patient{p:02d}")
        os.makedirs(d)
        img = nib.Nifti1Image(np.transpose(vol, (1, 0, 2)).astype(np.int16), np.diag([1.0, 1.0, 5.0, 1.0]))
        nib.save(img, os.path.join(d, "series.nii.gz"))
        labels[f"patient{p:02d}"] = y
    return labels


def test_blob_reference_on_a_cache_task(tmp_path, write_npz):
    import csv

    from sparkct.data import SliceCache, prepare
    from sparkct.data._util import salted_hash

    salt = "ab12" * 8
    labels = _write_patients(str(tmp_path / "nifti"))
    prepare(str(tmp_path / "nifti"), str(tmp_path / "cache"), progress=False, salt=salt, patient_from="dir")
    assert len(SliceCache(str(tmp_path / "cache"))) == 36
    path = str(tmp_path / "labels.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "label"])
        for folder, y in labels.items():
            w.writerow([salted_hash(salt, "file:" + folder), y])
    task = load_task(str(tmp_path / "cache"), path, split=(0.34, 0.33, 0.33))
    ref = blob_reference(task, crop=SIZE, diameters_mm=(3, 6), n_resamples=100)
    assert ref["name"] == NAME and ref["pixel_mm"] == pytest.approx(1.0)
    assert ref["pixel_size"].startswith("median of the cache")
    for split in ("val", "test"):
        r = ref[split]
        assert r["unit"] == "patient" and r["n_units"] == r["n_patients"] == len(
            np.unique(getattr(task, split).patients)
        )
        assert r["auc"]["value"] == 1.0 and r["auc"]["low"] <= 1.0  # the nodules are the only bright spots in the lungs
    with pytest.raises(UserError, match="two classes of CT"):
        blob_reference(load_task(write_npz(tmp_path / "s.npz", k=2)), crop=SIZE)
