"""ViT backbones in evaluation: fine-tuning at another crop than the weights were made at (position
embeddings interpolated), the probe's embeddings, and `sparkct experiment --arch vit_* --init-weights`
end to end with a pretraining method, random init and an outside weights file in DINO's checkpoint format."""

from __future__ import annotations

import json
import os

import timm
import torch
from timm.layers import resample_abs_pos_embed

from sparkct.cli import main
from sparkct.models.backbone import build_backbone, timm_spec
from sparkct.train.checkpoint import export_backbone


def test_a_vit_made_at_one_size_fine_tunes_at_another(tmp_path, write_npz, finetune_flags):
    data = write_npz(tmp_path / "organs.npz", n=(24, 12, 12), k=3, size=20)
    torch.manual_seed(3)
    model, _ = build_backbone("vit_tiny_p8", in_chans=1, img_size=32)  # 4 x 4 patches
    w = tmp_path / "vit32.pt"
    export_backbone(model, str(w), arch="vit_tiny_p8")
    out = tmp_path / "ft"
    argv = ["finetune", "--data", data, "--out", str(out), "--epochs", "1", "--freeze-epochs", "0"]
    # no --arch: the export's vit32.pt.json names it
    argv += ["--ramp-epochs", "0", "--init", str(w), *finetune_flags, "--crop", "64"]
    assert main(argv) == 0
    res = json.load(open(out / "result.json"))
    assert res["init"]["kind"] == "file" and res["train"]["arch"] == "vit_tiny_p8" and res["train"]["crop"] == 64
    tested = torch.load(out / "tested.pt", weights_only=True)
    pos = tested["backbone.pos_embed"]
    assert pos.shape == (1, 1 + 8 * 8, 192)  # made for 64 px, not the file's 32
    start = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[8, 8], old_size=[4, 4])
    assert 0 < (pos - start).abs().max() < 0.05  # started from the interpolated embeddings, then trained


def test_probe_embeds_with_a_vit(tmp_path):
    from sparkct.data import prepare
    from sparkct.data.synthetic import synth

    src, cache = str(tmp_path / "synth"), str(tmp_path / "cache")
    synth(src, patients=6, seed=2, size=32, slices=2, series_per_patient=(1, 1), localizer=False)
    prepare(src, cache, progress=False, salt="ab" * 16)
    out = tmp_path / "probe"
    argv = ["eval", "probe", "--init", "random", "--arch", "vit_tiny_p8", "--data", cache, "--out", str(out)]
    assert main([*argv, "--crop", "32", "--split", "0.5,0.5", "--resamples", "20", "--device", "cpu"]) == 0
    res = json.loads((out / "probe.json").read_text())
    assert res["feature_dim"] == 192 and res["init"]["arch"] == "vit_tiny_p8"


def test_experiment_with_a_vit_random_a_method_and_outside_weights(tiny_experiment, tmp_path):
    """`sparkct experiment --arch vit_tiny_p8 --methods random,rotation --init-weights imagenet=FILE`, the
    file a DINO checkpoint (teacher backbone + head) made at timm's 224 px with 3 channels."""
    torch.manual_seed(1)
    name, kw = timm_spec("vit_tiny_p8")
    sd = timm.create_model(name, **kw).state_dict()
    w = tmp_path / "dino.pth"
    teacher = {**{"backbone." + k: v for k, v in sd.items()}, "head.last_layer.weight": torch.zeros(4, 192)}
    torch.save({"teacher": teacher, "epoch": 100}, w)
    out = tmp_path / "exp"
    log = tiny_experiment(out, dict(arch="vit_tiny_p8", methods="random,rotation", init_weights=[f"imagenet={w}"]))
    assert log
    res = json.load(open(out / "results.json"))
    cells = {(c["method"], c.get("protocol", "finetune")) for c in res["cells"]}
    assert cells == {(m, p) for m in ("random", "rotation", "imagenet") for p in ("finetune", "linear")}
    (pre,) = os.listdir(out / "pretrain")
    meta = json.load(open(out / "pretrain" / pre / "backbone.pt.json"))
    assert meta["arch"] == "vit_tiny_p8" and meta["timm_kwargs"]["img_size"] == 32
    # the imagenet row's fine-tuning started from the file: its deep weights moved little from the file's
    runs = [
        os.path.join(d, "tested.pt")
        for d, _, fs in os.walk(out / "finetune")
        if "tested.pt" in fs and "imagenet" in d and "linear" in d
    ]
    assert runs, os.listdir(out / "finetune")
    tested = torch.load(runs[0], weights_only=True)
    assert torch.equal(tested["backbone.blocks.11.attn.qkv.weight"], sd["blocks.11.attn.qkv.weight"])


def test_outside_weights_that_do_not_fit_the_vit_are_one_line(eval_cache, tmp_path, capsys):
    w = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18")[0].state_dict(), w)
    out = tmp_path / "exp"
    argv = ["experiment", "--data", eval_cache["cache"], "--labels", eval_cache["patient_labels"], "--out", str(out)]
    argv += ["--methods", "random", "--arch", "vit_tiny", "--crop", "32", "--windows", "lung", "--device", "cpu"]
    assert main([*argv, "--init-weights", f"imagenet={w}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-weights imagenet:" in err[0] and "not weights of this vit_tiny backbone" in err[0]
    assert "missing" in err[0] and "cls_token" in err[0] and not out.exists()


def test_experiment_refuses_a_resnet_only_method_with_a_vit_before_anything_is_written(eval_cache, tmp_path, capsys):
    out = tmp_path / "exp"
    argv = ["experiment", "--data", eval_cache["cache"], "--labels", eval_cache["patient_labels"], "--out", str(out)]
    argv += ["--methods", "random,rotation,spark", "--arch", "vit_tiny_p8", "--crop", "32", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--methods spark with --arch vit_tiny_p8: SparK is a sparse-CNN method" in err[0], err
    assert not out.exists()


def test_experiment_random_dino_and_imagenet_weights_on_a_vit_tiny(tiny_experiment, tmp_path):
    """Issue 20's three-way comparison in one command: `sparkct experiment --methods random,dino --arch vit_tiny
    --init-weights imagenet=FILE`, FILE a timm ViT-Tiny state_dict at timm's 224 px with 3 channels (its
    classifier included, as timm publishes it). DINO pretrains on the fused prototype loss and exports a
    timm ViT; all three rows are fine-tuned and tested alike."""
    torch.manual_seed(2)
    name, kw = timm_spec("vit_tiny")
    sd = timm.create_model(name, num_classes=1000).state_dict()
    w = tmp_path / "vit_tiny_imagenet.pth"
    torch.save(sd, w)
    out = tmp_path / "exp"
    small = ["dino.prototypes=64", "dino.n_local=2", "dino.proj_hidden_dim=64", "dino.proj_dim=32"]
    tiny_experiment(
        out,
        dict(arch="vit_tiny", methods="random,dino", init_weights=[f"imagenet={w}"], set=small, protocols="finetune"),
    )
    res = json.load(open(out / "results.json"))
    assert {c["method"] for c in res["cells"]} == {"random", "dino", "imagenet"}
    report = (out / "results.md").read_text()
    assert "only the head learning, then trained at" in report and "BatchNorm" not in report  # a ViT has none
    (pre,) = os.listdir(out / "pretrain")
    run = out / "pretrain" / pre
    meta = json.load(open(run / "backbone.pt.json"))
    assert meta["arch"] == "vit_tiny"
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(torch.load(run / "backbone.pt", weights_only=True), strict=True)
    with open(run / "metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert {"teacher_entropy", "kl_teacher_student", "dino"} <= set(header)
