"""Shared fixtures for the CT data tests: a small synthetic DICOM tree and its prepared cache."""

from __future__ import annotations

import copy
import os

import pytest

SALT = "5a17" * 8  # a fixed salt, so that caches prepared in different tests compare equal


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return path


@pytest.fixture
def testdata():
    """testdata(name) -> path of one of the files that ship with pydicom (skips if absent)."""
    return _testdata


@pytest.fixture
def salt() -> str:
    return SALT


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    from sparkct.data.synthetic import synth

    d = str(tmp_path_factory.mktemp("synth"))
    synth(d, patients=4, seed=3, size=64, thickness=5.0, series_per_patient=(1, 2), p_finding=0.75)
    return d


@pytest.fixture(scope="session")
def cache_dir(synth_dir, tmp_path_factory) -> str:
    from sparkct.data import prepare

    d = str(tmp_path_factory.mktemp("cache"))
    prepare(synth_dir, d, progress=False, salt=SALT)
    return d


@pytest.fixture
def dicom_files():
    """dicom_files(root) -> sorted .dcm paths under root."""

    def find(root: str) -> list[str]:
        out = []
        for dp, _, fs in os.walk(root):
            out += [os.path.join(dp, f) for f in fs if f.endswith(".dcm")]
        return sorted(out)

    return find


class SimulatedCrash(RuntimeError):
    """What `faults.crash_after` makes the parent raise: a run dying mid-way."""


class Faults:
    """Fault injection for ``prepare``, through test seams only: the real functions are wrapped by
    monkeypatching, so production code carries no hooks."""

    SimulatedCrash = SimulatedCrash

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def crash_after(self, n_series: int) -> None:
        """The run dies (raises SimulatedCrash) once n series are written (workers=1: the series run
        in this process), before the index is."""
        from sparkct.data import preparing

        real = preparing._run_job
        done = [0]

        def run_job(job):
            rec = real(job)
            done[0] += 1
            if done[0] >= n_series:
                raise SimulatedCrash(f"simulated crash after {done[0]} series")
            return rec

        self.mp.setattr(preparing, "_run_job", run_job)

    def kill_worker(self, key: str, marker: str | None = None) -> None:
        """The worker process running series `key` dies at once (os._exit, like the OOM killer): every
        time, or only while the file `marker` does not exist (it is created first). Workers are forked
        from this process here (not from the fork server), so they carry the wrapper."""
        import multiprocessing as mp

        from sparkct.data import preparing, workers

        real = preparing._process_dicom

        def process(job, st):
            if job.key == key and (marker is None or not os.path.exists(marker)):
                if marker is not None:
                    open(marker, "w").close()
                os._exit(137)
            return real(job, st)

        self.mp.setattr(preparing, "_process_dicom", process)
        self.mp.setattr(workers, "mp_context", lambda: mp.get_context("fork"))

    @staticmethod
    def exit_after_slices_code(n_slices: int) -> str:
        """Python lines that make this process exit (os._exit(137): no clean-up, like a kill) once
        n_slices slices are written into shards (no resampling), for a subprocess to run before
        prepare()."""
        return (
            "import os\n"
            "from sparkct.data import dicom\n"
            "_real, _n = dicom.PixelReader.hu_int16, [0]\n"
            "def _hu_int16(self, *a, **k):\n"
            f"    if _n[0] >= {int(n_slices)}:\n"
            "        os._exit(137)\n"
            "    _n[0] += 1\n"
            "    return _real(self, *a, **k)\n"
            "dicom.PixelReader.hu_int16 = _hu_int16\n"
        )


@pytest.fixture
def faults(monkeypatch) -> Faults:
    return Faults(monkeypatch)


@pytest.fixture
def ct_series(testdata):
    """ct_series(folder, n, edit=None) -> paths of a new n-slice CT series made from pydicom's
    CT_small (128 x 128): slice k at z = 5 k with pixels + 10 k, file k named f"{k:03d}.dcm".
    edit(k, ds) may change slice k's data set before it is written."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import generate_uid

    def make(folder, n: int = 4, edit=None) -> list[str]:
        base = pydicom.dcmread(testdata("CT_small.dcm"))
        arr = base.pixel_array
        uid = generate_uid()
        os.makedirs(folder, exist_ok=True)
        paths = []
        for k in range(n):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
            ds.InstanceNumber = k + 1
            ds.PixelData = (arr + 10 * k).astype(arr.dtype).tobytes()
            if edit is not None:
                edit(k, ds)
            p = os.path.join(folder, f"{k:03d}.dcm")
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
        return paths

    return make
