"""Where a run's slices come from: a prepared cache, a DICOM/NIfTI folder prepared on first use, or the
built-in synthetic chest CT, synthesized and prepared once.

    cache = resolve_data(None, "runs/spark", synth_patients=24, synth_size=256, synth_slices=40)

Prepared data lives in ``data/`` inside the run folder: a run owns what it synthesized or prepared, and
unrelated runs that share a parent folder never read or replace each other's data. Runs that should
share a dataset are given it prepared (``--data CACHE``, as ``sparkct experiment`` does). In a
distributed run rank 0 does the work and every rank waits for it.
"""

from __future__ import annotations

import os
import shutil
import sys

from sparkct import distributed as D
from sparkct import io as sio
from sparkct.data.preparing import prepare
from sparkct.data.synthetic import synth
from sparkct.errors import UserError

__all__ = ["resolve_data", "builtin_source"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def builtin_source(run_dir: str) -> str:
    """Where the built-in synthetic CT of a run in `run_dir` is synthesized (with its labels.csv and
    slice_labels.csv)."""
    return os.path.join(os.path.abspath(run_dir), "data", "synth")


def resolve_data(
    data: str | None, run_dir: str, *, synth_patients: int, synth_size: int, synth_slices: int, log=_log
) -> str:
    """The prepared cache a run in `run_dir` reads: `data` if it is one; a DICOM/NIfTI folder prepared
    (resumable) into ``run_dir/data/``; or, when `data` is None, the built-in synthetic chest CT
    (`synth_patients` patients of `synth_slices` slices of `synth_size` pixels), synthesized and prepared
    once. Messages go to `log` (rank 0 only); a missing or unusable `data` raises UserError."""
    root = os.path.join(os.path.abspath(run_dir), "data")
    if data is None:
        src = builtin_source(run_dir)
        want = {"seed": 0, "patients": synth_patients, "size": synth_size, "slices": synth_slices}
        marker = os.path.join(src, "synth.json")
        have = sio.read_json(marker) if os.path.isfile(marker) else None
        if have is None or any(have.get(k) != v for k, v in want.items()):
            if D.is_main():
                log(
                    f"synthesizing {synth_patients} patients of chest CT ({synth_size}x{synth_size}, "
                    f"{synth_slices} slices per series) into {src}"
                )
                shutil.rmtree(src, ignore_errors=True)
                synth(src, patients=synth_patients, seed=0, size=synth_size, slices=synth_slices)
            D.barrier()
        cache = os.path.join(root, f"cache-synth-{synth_patients}-{synth_size}-{synth_slices}")
    else:
        if not os.path.exists(data):
            raise UserError(f"--data {data}: no such file or folder")
        if os.path.isfile(os.path.join(data, "cache.json")):
            return data
        if not os.path.isdir(data):
            raise UserError(f"--data {data}: expected a prepared cache or a DICOM/NIfTI folder")
        parts = [n for n in ("index.npz", "shards") if os.path.exists(os.path.join(data, n))]
        if parts:  # a damaged cache, not a source to prepare (that would find no CT and say only that)
            raise UserError(
                f"--data {data}: not a prepared cache: cache.json is missing (the folder has {' and '.join(parts)}); "
                "prepare it again with `sparkct data prepare SRC DST` into a new folder"
            )
        src = data
        cache = os.path.join(root, "cache-" + (os.path.basename(os.path.normpath(data)) or "data"))
    if D.is_main():
        if not os.path.isfile(os.path.join(cache, "report.json")) or data is not None:
            log(f"preparing the slice cache {cache} from {src} (resumable)")
        rep = prepare(src, cache, progress=False)
        if rep.slices == 0:
            raise UserError(
                f"{src}: no usable CT slices found ({rep.summary().splitlines()[0]}); --data takes a prepared "
                "cache (a folder with cache.json) or a folder of DICOM/NIfTI files"
            )
    D.barrier()
    return cache
