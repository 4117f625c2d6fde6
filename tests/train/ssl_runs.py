"""Trainer runs of the contrastive / clustering methods at test size (a torchvision ResNet with one
BasicBlock per stage, i.e. resnet18 at half depth, on 32x32 crops; narrow heads, short queues), shared
by the DDP and resume tests; `double` computes in float64 (exact comparisons between runs that sum in
different orders)."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn

from sparkct.models import get_method
from sparkct.train.trainer import Trainer

#: per method: config fields that make a few steps exercise the method's state (queues filling and
#: in use, prototypes frozen then free, momentum schedules)
METHOD_KW = {
    "simclr": dict(proj_hidden_dim=32, proj_dim=16, temperature=0.2),
    "moco": dict(proj_hidden_dim=32, proj_dim=16, queue_size=16, momentum=0.9, momentum_end=0.99),
    "swav": dict(
        proj_hidden_dim=32,
        proj_dim=16,
        prototypes=10,
        n_local=2,
        local_crop=16,
        queue_size=16,
        queue_start_epoch=0,
        freeze_prototypes=2,
    ),
    "byol": dict(proj_hidden_dim=32, proj_dim=16, momentum=0.9),
    "spark": dict(decoder_width=32),  # a narrow decoder (published: 768); run it with crop=64 (2x2 cells)
    "dino": dict(
        proj_hidden_dim=32,
        proj_dim=16,
        prototypes=40,
        n_local=2,
        local_crop=16,
        momentum=0.9,
        warmup_teacher_temp_epochs=2,
        freeze_last_layer=1,
    ),
}


def _as_double(method) -> None:
    """float64 weights and views (the loader's views are float32)."""
    method.double()
    step = method.training_step

    def training_step(batch, s, **kw):
        if not hasattr(method, "split_batch"):  # SparK: one batch of slices
            return step(batch.double(), s, **kw)
        views, targets = method.split_batch(batch)
        views = [v.double() for v in views]
        return step(views if targets is None else (views, targets), s, **kw)

    method.training_step = training_step
    if not hasattr(method, "split_batch"):  # SparK previews its reconstruction of the last batch
        preview = method.preview
        method.preview = lambda batch, *a, **kw: preview(batch.double(), *a, **kw)


def _kill_node_hook(method) -> None:
    """SSL_KILL_NODE_AFTER=STEP:NODE: on torchrun's node NODE (GROUP_RANK), every rank SIGKILLs its launcher
    and then itself right after optimizer step STEP (1-based): a node lost mid-run."""
    spec = os.environ.get("SSL_KILL_NODE_AFTER")
    if not spec:
        return
    at, node = (int(v) for v in spec.split(":"))
    if int(os.environ.get("GROUP_RANK", "-1")) != node:
        return
    after = method.after_step

    def after_step(step, total):
        after(step, total)
        if step + 1 == at:
            os.kill(os.getppid(), signal.SIGKILL)  # this node's torchrun
            os.kill(os.getpid(), signal.SIGKILL)

    method.after_step = after_step


def run(
    name: str,
    cache: str,
    out: str,
    *,
    double: bool = False,
    method_kw: dict | None = None,
    resume: bool | str = False,
    arch: str | None = None,
    **train_kw,
):
    from test_trainer import cfg_for

    kw = dict(max_steps=3, epochs=1, lr=0.05, batch=8, crop=32, ckpt_every=100, preview_every=0)
    kw.update(train_kw)
    cfg = cfg_for(cache, out, **kw)
    mcfg = get_method(name).config_class(**{**METHOD_KW[name], **(method_kw or {})})
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(cfg.seed)
    if arch is not None:  # a sparkct backbone (a timm ViT, say) instead of the half-depth ResNet
        from sparkct.models.backbone import build_backbone

        backbone, _ = build_backbone(arch, in_chans=1, img_size=cfg.crop)
    else:
        backbone = ResNet(BasicBlock, [1, 1, 1, 1])
        backbone.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # one HU window
        backbone.fc = nn.Identity()
    method = get_method(name)(backbone, mcfg)
    if double:
        _as_double(method)
    _kill_node_hook(method)
    return Trainer(method, cfg, method_name=name, resume=resume).fit()
