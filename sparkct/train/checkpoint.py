"""The one checkpoint format.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with ``torch.save``
to a temporary file and renamed into place (sparkct.io), and read with ``torch.load(weights_only=True)``:
loading never unpickles code. The configs travel as a JSON string. Files in a run folder:

    checkpoints/step-0000100.ckpt   every ckpt_every steps (the last `keep` are kept)
    last.ckpt                       hard link to the newest step checkpoint
    best.ckpt                       hard link to the checkpoint with the best "monitor" value (if any)
    backbone.pt                     the backbone export: a torchvision state_dict (no classifier)
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import sys
from typing import cast

import numpy as np
import torch

from sparkct import io as sio
from sparkct.errors import UserError
from sparkct.models.backbone import arch_family, backbone_state, timm_spec

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest",
    "find_latest",
    "candidates",
    "remove_partial",
    "rng_state",
    "set_rng_state",
    "link_atomic",
    "prune",
    "export_backbone",
]

FORMAT = "sparkct-checkpoint-1"
# what resuming and exporting read from a checkpoint (Trainer.save writes them all); a crafted or damaged
# dict without them is refused on loading, not met as a KeyError later
_REQUIRED = {"config": str, "model": dict, "optimizer": dict, "step": int, "rng": dict}
_STEP_RE = re.compile(r"step-(\d+)\.ckpt$")
# the temporaries of an interrupted write into a run folder: sio.atomic_path's ``.<name>.<random>.tmp``
# and link_atomic's ``<name>.<pid>.lnk.tmp``; only the names a run writes, so nothing else there is touched
_RUN_FILES = r"(last\.ckpt|best\.ckpt|backbone\.pt|metrics\.csv|metrics\.jsonl|config\.json|summary\.json)"
_PARTIAL_RE = {
    "checkpoints": re.compile(r"^\.step-\d+\.ckpt\.[^.]+\.tmp$"),
    ".": re.compile(rf"^(\.{_RUN_FILES}\.[^.]+\.tmp|{_RUN_FILES}\.\d+\.lnk\.tmp)$"),
}


def rng_state() -> dict:
    # legacy=True (the default) gives the MT19937 tuple; numpy's stub types the no-argument call as a dict
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    st = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    np.random.set_state(
        (
            "MT19937",
            st["numpy_keys"].numpy().astype(np.uint32),
            st["numpy_pos"],
            st["numpy_gauss"][0],
            st["numpy_gauss"][1],
        )
    )
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def link_atomic(src: str, dst: str) -> None:
    """Make dst name the same file as src, replacing dst atomically (a hard link; a copy where links fail)."""
    tmp = f"{dst}.{os.getpid()}.lnk.tmp"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        with sio.atomic_path(dst) as t:
            shutil.copyfile(src, t)
    sio.fsync_dir(os.path.dirname(os.path.abspath(dst)))


def save_checkpoint(run_dir: str, state: dict, step: int, keep: int) -> str:
    """Write checkpoints/step-N.ckpt atomically, point last.ckpt at it, drop all but the newest `keep`."""
    d = os.path.join(run_dir, "checkpoints")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step-{step:07d}.ckpt")
    state = dict(state, format=FORMAT)
    with sio.atomic_path(path) as tmp:
        torch.save(state, tmp)
    link_atomic(path, os.path.join(run_dir, "last.ckpt"))
    prune(d, keep)
    return path


def prune(ckpt_dir: str, keep: int) -> None:
    files = sorted(
        (int(m.group(1)), p) for p in glob.glob(os.path.join(ckpt_dir, "step-*.ckpt")) if (m := _STEP_RE.search(p))
    )
    for _, p in files[:-keep] if keep > 0 else []:
        try:
            os.unlink(p)
        except OSError:
            pass


def candidates(run_dir: str) -> list[str]:
    """A run folder's checkpoints, the one to resume first: last.ckpt, then the step checkpoints newest first."""
    last = os.path.join(run_dir, "last.ckpt")
    files = sorted(
        (int(m.group(1)), p)
        for p in glob.glob(os.path.join(run_dir, "checkpoints", "step-*.ckpt"))
        if (m := _STEP_RE.search(p))
    )
    return ([last] if os.path.isfile(last) else []) + [p for _, p in reversed(files)]


def find_latest(run_dir: str) -> str | None:
    """last.ckpt of a run folder, else its newest step checkpoint, else None."""
    found = candidates(run_dir)
    return found[0] if found else None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def load_latest(run_dir: str, map_location="cpu", log=_stderr) -> dict:
    """The newest checkpoint of a run folder that loads (last.ckpt first): a zero-byte or corrupt file (a
    kill during a copy, a full disk) is skipped with one log line; a UserError if none loads."""
    found = candidates(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no checkpoint in this run folder (last.ckpt or checkpoints/step-*.ckpt)")
    first: UserError | None = None
    tried: set[tuple[int, int]] = set()
    for i, path in enumerate(found):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in tried:  # last.ckpt is a hard link to one of the step files
            continue
        tried.add((st.st_dev, st.st_ino))
        try:
            return load_checkpoint(path, map_location)
        except UserError as e:
            first = first or e
            if i + 1 < len(found):
                log(f"skipped {e}; trying an older checkpoint")
    raise first if first is not None else UserError(f"{run_dir}: no checkpoint in this run folder")


def remove_partial(run_dir: str) -> tuple[int, int]:
    """Remove the temporaries that a kill during a write left in a run folder (checkpoints and the run's
    own files, by the atomic writers' name patterns); returns (files, bytes)."""
    n = size = 0
    for sub, pattern in _PARTIAL_RE.items():
        d = os.path.join(run_dir, sub)
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            p = os.path.join(d, name)
            if pattern.match(name) and os.path.isfile(p) and not os.path.islink(p):
                try:
                    b = os.path.getsize(p)
                    os.unlink(p)
                except OSError:
                    continue
                n, size = n + 1, size + b
    return n, size


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A sparkct checkpoint, loaded without unpickling code; a UserError for anything else."""
    if os.path.isdir(path):
        return load_latest(path, map_location)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickled code, truncated or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable sparkct checkpoint ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not a sparkct checkpoint (format {got!r}, expected {FORMAT!r})")
    missing = [k for k, t in _REQUIRED.items() if not isinstance(state.get(k), t)]
    if missing:
        raise UserError(f"{path}: a damaged sparkct checkpoint (no valid {', '.join(missing)})")
    try:
        config = json.loads(state["config"])
    except ValueError:
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("train", {}), dict):
        raise UserError(f"{path}: a damaged sparkct checkpoint (its config is not a JSON object)")
    state["config"] = config
    state["path"] = path
    return state


def export_metadata(arch: str, sd: dict) -> dict:
    """What rebuilds the exported backbone `sd` of `arch` (the sidecar ``OUT.json`` of an export): for a
    ViT the ``timm.create_model`` name and keyword arguments (``load_state_dict(sd, strict=True)`` accepts
    the export), for a ResNet the torchvision constructor with ``fc`` = ``nn.Identity()``."""
    meta: dict = {"format": "sparkct-backbone", "arch": arch, "tensors": len(sd)}
    if arch_family(arch) == "vit":
        name, kwargs = timm_spec(arch, sd)
        meta.update(library="timm", timm_name=name, timm_kwargs=kwargs)
        meta["load"] = f"timm.create_model({name!r}, **timm_kwargs).load_state_dict(sd, strict=True)"
    else:
        stem = sd.get("conv1.weight")
        meta.update(library="torchvision", in_chans=int(stem.shape[1]) if stem is not None else None)
        meta["load"] = (
            f"torchvision.models.{arch}() with fc = nn.Identity() (and conv1 with in_chans input channels)"
            ".load_state_dict(sd, strict=True)"
        )
    return meta


def export_backbone(state_or_model, out: str, arch: str | None = None) -> dict:
    """Write the backbone export (torchvision / timm state_dict minus the classifier) atomically; returns
    it. With `arch` (a checkpoint's own is used otherwise), also ``OUT.json``: :func:`export_metadata`."""
    if isinstance(state_or_model, dict):
        sd = {
            k[len("backbone.") :]: v.detach().cpu().contiguous()
            for k, v in state_or_model["model"].items()
            if k.startswith("backbone.") and not k.startswith(("backbone.fc.", "backbone.head."))
        }
        if not sd:
            raise UserError("the checkpoint holds no backbone weights")
    else:
        sd = backbone_state(state_or_model)
    if arch is None and isinstance(state_or_model, dict):
        cfg = state_or_model.get("config")
        arch = cfg.get("train", {}).get("arch") if isinstance(cfg, dict) else None
    with sio.atomic_path(out) as tmp:
        torch.save(sd, tmp)
    if arch is not None:
        sio.write_json_atomic(out + ".json", export_metadata(arch, sd))
    return sd
