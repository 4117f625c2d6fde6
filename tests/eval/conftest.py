"""Fixtures for the evaluation tests: a small prepared cache with balanced patient-level labels,
tiny MedMNIST-style .npz files and image folders written by the tests themselves."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

SALT = "e7a1" * 8
N_PATIENTS = 12

#: `sparkct experiment` settings small enough for a CPU test: each test module names what it varies
TINY_EXPERIMENT = dict(
    fractions="1",
    seeds="0",
    crop=32,
    windows="lung",
    pretrain_epochs=1,
    pretrain_batch=8,
    finetune_steps=2,
    finetune_batch=8,
    freeze_steps=1,
    ramp_steps=1,
    eval_every=1,
    split="0.34,0.33,0.33",
    resamples=20,
    device="cpu",
    amp="none",
)


def write_ct_patients(root: str, n_patients: int = N_PATIENTS, *, size: int = 32, slices: int = 4, seed: int = 0):
    """NIfTI CT of `n_patients` patients (a folder each, one or two series), 'nodule' patients with a
    bright disc in every slice. Returns {patient folder: label}."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 <= 1
    labels = {}
    for p in range(n_patients):
        y = p % 2
        d = os.path.join(root, f"patient{p:02d}")
        os.makedirs(d, exist_ok=True)
        for s in range(1 + (p % 3 == 0)):
            vol = np.full((size, size, slices), -1000.0, np.float32)
            for k in range(slices):
                sl = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, (size, size))
                if y:
                    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
                    sl[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 8) ** 2] = 400.0
                vol[:, :, k] = sl.T
            nib.save(
                nib.Nifti1Image(vol.astype(np.int16), np.diag([1.0, 1.0, 5.0, 1.0])),
                os.path.join(d, f"series{s}.nii.gz"),
            )
        labels[f"patient{p:02d}"] = y
    return labels


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> dict:
    """{'cache', 'patients' (pseudonym -> 0/1), 'patient_labels' (CSV path: patient, label as
    clear/nodule), 'series_labels' (CSV: series_key, label)}: 12 NIfTI patients (a folder each,
    patient_from='dir'), 32x32 slices, half of them with a bright 'nodule' in every slice."""
    from sparkct.data import SliceCache, prepare
    from sparkct.data._util import salted_hash

    root = tmp_path_factory.mktemp("evalcache")
    src, dst = str(root / "nifti"), str(root / "cache")
    folders = write_ct_patients(src)
    prepare(src, dst, progress=False, salt=SALT, patient_from="dir")
    c = SliceCache(dst)
    labels = {salted_hash(SALT, "file:" + f): y for f, y in folders.items()}
    assert set(labels) == set(map(str, c.patients))
    patients = [[p, "nodule" if y else "clear"] for p, y in labels.items()]
    path = _write_csv(root / "patients.csv", ["patient", "label"], patients)
    series = [[c.series["key"][s], labels[str(c.patients[c.series["patient_index"][s]])]] for s in range(c.n_series)]
    spath = _write_csv(root / "series.csv", ["series_key", "label"], series)
    return {"cache": dst, "patients": labels, "patient_labels": path, "series_labels": spath}


@pytest.fixture
def finetune_flags() -> list[str]:
    """`sparkct finetune` flags for a CPU run of seconds; each test adds its epochs and what it checks."""
    flags = "--crop 32 --batch 8 --device cpu --progress false --tensorboard false --preview-every 0 --amp none"
    return [*flags.split(), "--resamples", "50"]


@pytest.fixture(scope="session")
def tiny_experiment(eval_cache):
    """tiny_experiment(out, *settings, **more) -> the log lines: `run_experiment` on eval_cache with its
    patient labels and TINY_EXPERIMENT's settings, then each dict of `settings` and `more` added or
    replacing them in turn (a module's own settings, then one test's)."""
    from sparkct.eval.config import ExperimentConfig
    from sparkct.eval.experiment import run_experiment

    def run(out, *settings: dict, **more) -> list[str]:
        kw = {"data": eval_cache["cache"], "labels": eval_cache["patient_labels"], **TINY_EXPERIMENT}
        for d in (*settings, more):
            kw.update(d)
        lines: list[str] = []
        run_experiment(ExperimentConfig(out=str(out), **kw), log=lines.append)
        return lines

    return run


@pytest.fixture
def write_csv():
    """write_csv(path, header, rows) -> path."""
    return _write_csv


def _write_csv(path, header, rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def write_npz():
    """write_npz(path, n=(train, val, test), k=classes, size, seed, rgb) -> path."""
    return _write_npz


def _write_npz(path, n=(60, 20, 20), k=3, size=16, seed=0, rgb=False):
    """A tiny MedMNIST-style .npz whose class shows as image brightness."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in zip(("train", "val", "test"), n):
        y = np.arange(m) % k
        x = rng.integers(0, 60, size=(m, size, size)) + (y * 60)[:, None, None]
        x = x.astype(np.uint8)
        if rgb:
            x = np.repeat(x[..., None], 3, -1)
        arrays[f"{split}_images"] = x
        arrays[f"{split}_labels"] = y[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return str(path)
