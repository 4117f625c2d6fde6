"""Resume is bit-identical for SimCLR, MoCo v2, SwAV, BYOL and DINO (a ResNet; a ViT with iBOT, KoLeo and
Sinkhorn) on the CPU: 6 steps straight equal 3 steps,
then a fresh run resumed from that checkpoint for 3 more: weights, EMA key / target encoders, MoCo's
queue and its pointer, SwAV's feature queue (filled from epoch 1 = step 3, used from step 5) and its
prototype freezing (steps 0-3), the optimizer state and the logged losses. The checkpoint sits at an
epoch boundary, where on_epoch_end's state (SwAV's epoch count, which starts the queue) must be in it."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from sparkct.train import checkpoint as C

from ssl_runs import run

RESUME_KW = {
    "simclr": {},
    "moco": dict(momentum=0.9, momentum_end=0.99),  # a cosine schedule over the 6 steps; queue of 16 wraps
    "swav": dict(queue_start_epoch=1, freeze_prototypes=4),
    "byol": dict(momentum=0.9, momentum_end=1.0),
    # the last layer frozen in epoch 1 (steps 0-2), the teacher temperature warming up over 2 epochs
    "dino": dict(freeze_last_layer=1, warmup_teacher_temp_epochs=2),
    "dino-sinkhorn": dict(centering="sinkhorn"),
    # a ViT with every DINOv2 option: iBOT's masks and mask token, KoLeo, Sinkhorn over CLS and patch tokens
    "dino-vit": dict(ibot_weight=1.0, koleo_weight=0.1, centering="sinkhorn", mask_probability=1.0),
}
#: runs on a sparkct backbone instead of the half-depth ResNet
RESUME_ARCH = {"dino-vit": "vit_tiny_p8"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(run_dir, start):
    return [r["loss"] for r in csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))) if int(r["step"]) > start]


@pytest.mark.parametrize("name", sorted(RESUME_KW))
def test_resume_is_bit_identical(name, small_cache, tmp_path):
    kw = dict(max_steps=6, epochs=2, ckpt_every=3, keep=5, method_kw=RESUME_KW[name])
    straight = tmp_path / "straight"
    method = name.split("-")[0]  # "dino-sinkhorn": DINO with an option
    arch = RESUME_ARCH.get(name)
    run(method, small_cache, str(straight), arch=arch, **kw)
    mid = str(straight / "checkpoints" / "step-0000003.ckpt")
    run(method, small_cache, str(tmp_path / "resumed"), resume=mid, arch=arch, **kw)
    a, b = C.load_checkpoint(str(straight)), C.load_checkpoint(str(tmp_path / "resumed"))
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert _losses(straight, 3) == _losses(tmp_path / "resumed", 3)
    assert (straight / "previews" / "latest.png").is_file()  # the method's preview() at the end of the run
    m = a["model"]
    if name == "moco":  # the queue is in the checkpoint and wrapped around
        assert int(m["criterion.bank_ptr"]) == (6 * 8) % 16
    if name == "swav":  # the queue started with epoch 1 and was in use at step 5
        assert int(m["epoch"]) == 2 and int(m["queue.0.count"]) == 16
        row6 = next(r for r in csv.DictReader(open(straight / "metrics.csv")) if r["step"] == "6")
        assert float(row6["queue_used"]) == 1
    if name == "dino":  # the epoch count (temperature, freezing) and the unfreezing step are in it
        assert int(m["epoch"]) == 2 and int(m["unfreeze_step"]) == 3 and m["center"].abs().sum() > 0
        rows = list(csv.DictReader(open(straight / "metrics.csv")))
        assert {"teacher_entropy", "kl_teacher_student", "collapse", "teacher_temp"} <= rows[-1].keys()
    if name == "dino-vit":  # iBOT's and KoLeo's terms were computed and logged at every step
        rows = list(csv.DictReader(open(straight / "metrics.csv")))
        assert all(float(r["ibot"]) > 0 and r["koleo"] != "" for r in rows if r.get("step") and r.get("ibot"))
        assert "mask_token" in m and len([r for r in rows if r.get("ibot")]) >= 6
