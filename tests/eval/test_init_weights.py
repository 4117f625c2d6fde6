"""`sparkct experiment --init-weights NAME=PATH`: a row whose backbone starts from a local weights file, in
every key format published ResNet weights come in; files that do not fit the --arch backbone and missing
files refused in one line before anything is written; the row fine-tuned, probed and compared with random
init like a pretrained method; the file's contents in every run's settings hash."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision

from sparkct.cli import main
from sparkct.eval.config import ExperimentConfig
from sparkct.eval.experiment import _check_outside_weights
from sparkct.models.backbone import build_backbone
from sparkct.train.checkpoint import export_backbone

PROBE = "layer4.1.conv2.weight"  # a deep weight: it matches the file's only when the file was loaded


def _torchvision_state(arch="resnet18", seed=0) -> dict:
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None).state_dict()


def _timm_state(seed=0) -> dict:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False).state_dict()


def _sparkct_export(path, seed=0) -> dict:
    torch.manual_seed(seed)
    model, _ = build_backbone("resnet18", in_chans=1)  # a backbone pretrained on one CT window
    return export_backbone(model, str(path))


FORMATS = {
    "torchvision": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 90},
    "model": lambda sd: {"model": sd, "epoch": 90},
    "module.": lambda sd: {"module." + k: v for k, v in sd.items()},
    "backbone.": lambda sd: {"backbone." + k: v for k, v in sd.items()},
    "encoder.": lambda sd: {"encoder." + k: v for k, v in sd.items()},
    # a method's whole model (a sparkct checkpoint's "model", a SimCLR module): the backbone beside its heads
    "backbone. + heads": lambda sd: {
        "model": {**{"backbone." + k: v for k, v in sd.items()}, "projector.layers.0.weight": torch.zeros(2, 2)}
    },
}


@pytest.mark.parametrize("fmt", [*FORMATS, "timm", "sparkct export"])
def test_each_key_format_loads_into_the_backbone(fmt, eval_cache, tmp_path):
    path = tmp_path / "w.pth"
    if fmt == "sparkct export":
        sd = _sparkct_export(path)
    else:
        sd = _timm_state() if fmt == "timm" else _torchvision_state()
        torch.save(FORMATS.get(fmt, FORMATS["torchvision"])(sd), path)
    cfg = ExperimentConfig(data=eval_cache["cache"], methods="random", windows="lung", init_weights=[f"w={path}"])
    assert _check_outside_weights(cfg) == {"w": str(path)}
    model, _ = build_backbone("resnet18", in_chans=1, weights=str(path))
    assert torch.equal(model.state_dict()[PROBE], sd[PROBE])


def _cli(eval_cache, out, *args) -> int:
    return main(
        ["experiment", "--data", eval_cache["cache"], "--labels", eval_cache["patient_labels"], "--out", str(out)]
        + ["--methods", "random,rotation", "--crop", "32", "--windows", "lung", "--device", "cpu", *args]
    )


@pytest.mark.parametrize(
    "case,msg",
    [
        ("resnet34", "not weights of this resnet18 backbone: unexpected"),
        ("missing", "no such file"),
        ("random", "'random' is already a row of --methods"),
        ("rotation", "'rotation' is already a row of --methods"),
        ("twice", "'w' is given twice"),
        ("bad name", "NAME must be a simple identifier"),
        ("no name", "expected NAME=PATH"),
    ],
)
def test_bad_init_weights_are_one_line_errors_before_anything_is_written(case, msg, eval_cache, tmp_path, capsys):
    good, other = tmp_path / "good.pth", tmp_path / "resnet34.pth"
    torch.save(_torchvision_state(), good)
    torch.save(_torchvision_state("resnet34"), other)
    given = {
        "resnet34": [f"w={other}"],
        "missing": [f"w={tmp_path / 'nope.pth'}"],
        "random": [f"random={good}"],
        "rotation": [f"rotation={good}"],
        "twice": [f"w={good}", f"w={other}"],
        "bad name": [f"image-net={good}"],
        "no name": [str(good)],
    }[case]
    out = tmp_path / "exp"
    code = _cli(eval_cache, out, *(a for g in given for a in ("--init-weights", g)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0] and err[0].startswith("sparkct experiment: error:"), err
    if case in ("resnet34", "missing"):
        assert str(other if case == "resnet34" else tmp_path / "nope.pth") in err[0]
    if case == "resnet34":  # the first keys resnet18 lacks are named
        assert "layer1.2.conv1.weight" in err[0]
    assert not out.exists()


def test_an_outside_weights_row_runs_like_a_method_and_its_file_is_in_the_hash(tiny_experiment, tmp_path):
    """`--methods random --init-weights imagenet=FILE`: no pretraining; the row is fine-tuned and probed on
    the same patients and compared with random init; other contents in the same file make new runs."""
    w = tmp_path / "imagenet.pth"
    torch.save({"state_dict": _torchvision_state(seed=1)}, w)
    out = tmp_path / "exp"
    settings = dict(methods="random", init_weights=[f"imagenet={w}"])
    log = tiny_experiment(out, settings)
    assert not os.path.exists(os.path.join(out, "pretrain"))
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    cells = {(c["method"], c.get("protocol", "finetune")) for c in res["cells"]}
    assert cells == {(m, p) for m in ("random", "imagenet") for p in ("finetune", "linear")}
    comps = [c for c in res["comparisons"] if c["method"] == "imagenet"]
    assert {c.get("protocol", "finetune") for c in comps} == {"finetune", "linear"}
    assert all(c["baseline"] == "random" and c["p_bootstrap"] is not None for c in comps)
    sha = res["config"]["outside_weights"]["imagenet"]["sha1"]
    assert res["config"]["outside_weights"]["imagenet"]["path"] == str(w)
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert f"imagenet = {w} (sha1 {sha})" in md and "| imagenet" in md
    assert any("imagenet" in s for s in log)

    # the same path, other weights: the row's runs are made again, the old ones listed stale; random's skipped
    torch.save({"state_dict": _torchvision_state(seed=2)}, w)
    log = tiny_experiment(out, settings)
    assert sum("finished earlier: skipped" in s for s in log) == 2
    with open(os.path.join(out, "results.json")) as f:
        res2 = json.load(f)
    assert res2["config"]["outside_weights"]["imagenet"]["sha1"] != sha
    stale = res2["stale_runs"]
    assert len(stale) == 2 and all(s["method"] == "imagenet" and s["stale"] == "init contents differ" for s in stale)

    # the same contents under another path: named as what differs
    moved = tmp_path / "imagenet-v2.pth"
    os.replace(w, moved)
    tiny_experiment(out, settings, init_weights=[f"imagenet={moved}"])
    with open(os.path.join(out, "results.json")) as f:
        stale = json.load(f)["stale_runs"]
    assert sum(s["stale"] == "weights file imagenet.pth (now imagenet-v2.pth)" for s in stale) == 2, stale
