"""`sparkct pretrain METHOD --arch vit_*`: every method that can train a ViT does (two steps on a small
cache), the ResNet-only ones (SparK's sparse CNN, the pretext tasks with a decoder on ResNet stages) refuse
in one line before anything is written, and `sparkct export` of a ViT run writes a timm state_dict with
the timm name and keyword arguments beside it that load it strictly."""

from __future__ import annotations

import csv
import json
import os

import pytest
import timm
import torch

from sparkct.cli import main
from sparkct.models.backbone import build_backbone

FLAGS = "--crop 32 --batch 4 --max-steps 2 --device cpu --progress false --tensorboard false --windows lung"
FLAGS += " --knn-every 0 --preview-every 1 --amp none"


def _labels(cache, path) -> str:
    from sparkct.data.cache import SliceCache

    patients = [str(p) for p in SliceCache(cache).patients]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "label"])
        w.writerows(zip(patients, ["no", "yes", "no"]))
    return str(path)


def _pretrain(method, cache, out, *more) -> int:
    return main(["pretrain", method, "--data", cache, "--out", str(out), *FLAGS.split(), *more])


@pytest.mark.parametrize("method", ["simclr", "moco", "swav", "byol", "rotation", "flip", "nextslice", "supervised"])
def test_method_trains_a_vit(method, small_cache, tmp_path):
    out = tmp_path / "run"
    more = ["--labels", _labels(small_cache, tmp_path / "labels.csv")] if method == "supervised" else []
    if method == "moco":
        more += ["--queue-size", "16"]
    if method == "swav":
        more += ["--prototypes", "10"]
    assert _pretrain(method, small_cache, out, "--arch", "vit_tiny_p8", *more) == 0
    assert os.listdir(out / "previews")  # the preview works for the ViT too
    sd = torch.load(out / "backbone.pt", weights_only=True)
    assert "cls_token" in sd and not any(k.startswith("head.") for k in sd)
    meta = json.load(open(out / "backbone.pt.json"))
    assert meta["arch"] == "vit_tiny_p8" and meta["timm_name"] == "vit_tiny_patch16_224"
    assert meta["timm_kwargs"]["in_chans"] == 1 and meta["timm_kwargs"]["img_size"] == 32


@pytest.mark.parametrize(
    "method,msg",
    [
        ("spark", "SparK is a sparse-CNN method"),
        ("denoise", "denoise puts SparK's light decoder on a ResNet's four feature stages"),
        ("inpaint", "inpaint puts SparK's light decoder on a ResNet's four feature stages"),
    ],
)
def test_resnet_only_methods_refuse_a_vit_in_one_line(method, msg, small_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(method, small_cache, out, "--arch", "vit_tiny") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and err[0].startswith(f"sparkct pretrain {method}: error:"), err
    if method == "spark":
        assert "MAE, is not in sparkct" in err[0]
    assert not out.exists()


def test_export_of_a_vit_run_loads_into_timm_strictly(small_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain("rotation", small_cache, run, "--arch", "vit_tiny_p8", "--windows", "lung,bone") == 0
    out = tmp_path / "vit.pt"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert f"{out}.json" in capsys.readouterr().out
    sd = torch.load(out, weights_only=True)
    meta = json.load(open(f"{out}.json"))
    assert meta["library"] == "timm" and meta["timm_kwargs"]["in_chans"] == 2
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(sd, strict=True)
    # the trainer's own export is the same weights, and sparkct loads both alike
    assert all(torch.equal(v, torch.load(run / "backbone.pt", weights_only=True)[k]) for k, v in sd.items())
    ours, _ = build_backbone("vit_tiny_p8", in_chans=2, weights=str(out), img_size=32)
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), model.eval()(x), atol=1e-6)


def test_resnet_export_records_its_arch_too(small_cache, tmp_path):
    run = tmp_path / "run"
    assert _pretrain("flip", small_cache, run, "--arch", "resnet18") == 0
    meta = json.load(open(run / "backbone.pt.json"))
    assert meta["arch"] == "resnet18" and meta["library"] == "torchvision" and meta["in_chans"] == 1


@pytest.mark.parametrize(
    "argv", [["pretrain", "simclr", "-h"], ["finetune", "-h"], ["experiment", "-h"], ["eval", "probe", "-h"]]
)
def test_help_lists_every_arch(argv, capsys):
    from sparkct.models.backbone import ARCHS

    with pytest.raises(SystemExit):
        main(argv)
    text = " ".join(capsys.readouterr().out.split())
    for arch in ARCHS:
        if arch.startswith("vit"):
            assert arch in text, (arch, argv)
    assert "resnet18" in text


DDP_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from ssl_runs import run
for name in ("simclr", "byol"):
    run(name, {cache!r}, {out!r} + '/' + name, double=True, arch="vit_tiny_p8")
"""


def test_a_vit_on_two_ranks_equals_one_process(small_cache, tmp_path):
    """SimCLR and BYOL with a ViT under DDP (gloo, float64, 3 steps): every ViT parameter is used (DDP's
    reducer would fail otherwise), the heads' BatchNorm is synchronized, and the weights end as one
    process's on the global batch."""
    import subprocess
    import sys

    from test_ddp import _free_port, rank_env

    from sparkct.train import checkpoint as C

    here = os.path.dirname(os.path.abspath(__file__))
    port, procs = _free_port(), []
    for world in (1, 2):
        for r in range(world):
            env = rank_env(world, r, port)
            code = DDP_SCRIPT.format(here=here, cache=small_cache, out=str(tmp_path / str(world)))
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    for name in ("simclr", "byol"):
        a, b = (C.load_checkpoint(str(tmp_path / w / name)) for w in ("1", "2"))
        assert a["step"] == b["step"] == 3 and b["config"]["world_size"] == 2
        assert "backbone.blocks.11.attn.qkv.weight" in a["model"]
        for k, va in a["model"].items():
            vb = b["model"][k]
            assert torch.allclose(va, vb, rtol=1e-7, atol=1e-9) if va.is_floating_point() else torch.equal(va, vb), k
