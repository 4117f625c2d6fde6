"""The SparK method: masks, loss on masked cells only, sparse = dense-masked = SparK's published forward
(one training step in float64), the loss falling, the transform, the preview, bad configs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sparkct import distributed as dist_utils
from sparkct.errors import UserError
from sparkct.models import METHODS, get_method
from sparkct.models.backbone import build_backbone
from sparkct.models.masking import cell_mask
from sparkct.models.spark.model import SparK, SparKConfig, cell_normalize, masked_cell_loss
from sparkct.models.spark.reference import spark_published_loss


def make(arch="resnet18", in_chans=3, width=32, seed=0, **cfg):
    torch.manual_seed(seed)
    bb, _ = build_backbone(arch, in_chans=in_chans)
    return SparK(bb, SparKConfig(decoder_width=width, **cfg))


def rand_mask(B, grid, ratio=0.6, seed=0):
    return cell_mask(B, grid, ratio, generator=torch.Generator().manual_seed(seed))


def lin(x, y):
    return max(1e-300, x.double().norm().item(), y.double().norm().item())


def rel(a, b):
    return (a.double() - b.double()).norm().item() / lin(a, b)


# ---- masks ---------------------------------------------------------------------------------------


def test_training_step_masks_come_from_the_step_generator():
    m = make()
    m.seed = 5
    a = m.draw_mask(6, (2, 3), step=11, device="cpu")
    assert a.shape == (6, 2, 3) and a.sum((1, 2)).tolist() == [round(6 * 0.4)] * 6
    assert torch.equal(a, m.draw_mask(6, (2, 3), step=11, device="cpu"))  # a resume draws the same
    assert torch.equal(a, cell_mask(6, (2, 3), 0.6, generator=m.step_generator(11)))
    assert not torch.equal(a, m.draw_mask(6, (2, 3), step=12, device="cpu"))
    m.seed = 6
    assert not torch.equal(a, m.draw_mask(6, (2, 3), step=11, device="cpu"))


def test_each_rank_takes_its_rows_of_the_global_draw(monkeypatch):
    m = make()
    full = m.draw_mask(9, (3, 3), step=4, device="cpu")
    monkeypatch.setattr(dist_utils, "world_size", lambda group=None: 3)
    parts = []
    for r in range(3):  # the loader: equal contiguous shares of each global batch, in rank order
        monkeypatch.setattr(dist_utils, "rank", lambda group=None, r=r: r)
        parts.append(m.draw_mask(3, (3, 3), step=4, device="cpu"))
    assert torch.equal(torch.cat(parts), full)


def test_training_step_uses_the_drawn_mask():
    m = make(in_chans=1).double()
    x = torch.rand(3, 1, 64, 64, dtype=torch.float64)
    ref = copy.deepcopy(m)
    loss, logs = m.training_step(x, 7)
    assert torch.allclose(loss, ref.reconstruction_loss(x, ref.draw_mask(3, (2, 2), 7, "cpu")), rtol=0, atol=1e-13)
    # forward(batch, step) is the training step (what DDP calls); the next accumulation micro-batch of the
    # same step (the trainer sets method.micro) draws other masks
    m2 = copy.deepcopy(ref)
    assert torch.equal(m2(x, 7)[0], loss)
    m2.micro = 1
    assert not torch.equal(m2(x, 7)[0], loss)
    m2.micro = 0
    assert torch.equal(m2(x, 8)[0], ref.reconstruction_loss(x, ref.draw_mask(3, (2, 2), 8, "cpu")))


# ---- the loss ------------------------------------------------------------------------------------


def loop_loss(rec, target, mask):
    """Per-cell, per-channel normalization and the masked mean written out cell by cell."""
    B, C, H, W = target.shape
    errs = []
    for b in range(B):
        for i in range(H // 32):
            for j in range(W // 32):
                if mask[b, i, j]:
                    continue
                t = target[b, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32].reshape(C, -1)
                t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6).sqrt()
                r = rec[b, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32].reshape(C, -1)
                errs.append(((r - t) ** 2).mean())
    return torch.stack(errs).mean()


def test_loss_is_the_masked_mean_of_per_cell_normalized_errors():
    torch.manual_seed(0)
    rec = torch.randn(3, 2, 64, 96, dtype=torch.float64)
    tgt = torch.rand(3, 2, 64, 96, dtype=torch.float64)
    mask = rand_mask(3, (2, 3))
    assert torch.allclose(masked_cell_loss(rec, tgt, mask), loop_loss(rec, tgt, mask), rtol=1e-12, atol=0)
    # channels-last inputs (views, no copies) give the same
    cl = torch.channels_last
    assert torch.allclose(
        masked_cell_loss(rec.contiguous(memory_format=cl), tgt.contiguous(memory_format=cl), mask),
        loop_loss(rec, tgt, mask),
        rtol=1e-12,
        atol=0,
    )
    # every cell and channel is normalized on its own: a positive affine map per cell/channel changes nothing
    a = torch.rand(3, 2, 2, 1, 3, 1, dtype=torch.float64) * 5 + 0.5
    b = torch.randn(3, 2, 2, 1, 3, 1, dtype=torch.float64)
    tgt2 = (tgt.view(3, 2, 2, 32, 3, 32) * a + b).view_as(tgt)
    n1, _, _ = cell_normalize(tgt)
    n2, _, _ = cell_normalize(tgt2)
    assert torch.allclose(n1, n2, atol=1e-4)


def test_loss_only_on_masked_cells():
    torch.manual_seed(0)
    rec = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    tgt = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    loss = masked_cell_loss(rec, tgt, mask)
    (g,) = torch.autograd.grad(loss, rec)
    vis = mask.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None].expand_as(rec)
    assert torch.all(g[vis] == 0) and torch.all(g[~vis] != 0)
    # changing the target (or the prediction) in a visible cell does not change the loss ...
    t2 = tgt.clone()
    t2[0, :, :32, :32] = torch.rand(3, 32, 32, dtype=torch.float64)
    r2 = rec.detach().clone()
    r2[1, :, 32:, :32] += 3.0
    assert masked_cell_loss(rec, t2, mask).item() == loss.item()
    assert masked_cell_loss(r2, tgt, mask).item() == loss.item()
    # ... changing it in a masked cell does
    t3 = tgt.clone()
    t3[0, 1, :32, 32:] = torch.rand(32, 32, dtype=torch.float64)
    assert abs(masked_cell_loss(rec, t3, mask).item() - loss.item()) > 1e-6
    # no masked cell at all (mask ratio 0): zero loss, not NaN
    assert masked_cell_loss(rec, tgt, torch.ones_like(mask)).item() == 0.0


@pytest.mark.parametrize("encoder", ["sparse", "dense-masked"])
def test_model_never_sees_masked_pixels(encoder):
    m = make(in_chans=2, encoder=encoder).double()
    x = torch.rand(2, 2, 64, 96, dtype=torch.float64)
    mask = rand_mask(2, (2, 3))
    rec = m.reconstruct(x, mask)
    x2 = x.clone()
    x2[~mask.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None].expand_as(x)] = 0.5
    assert torch.equal(m.reconstruct(x2, mask), rec)  # the encoder reads visible cells only
    # but the masked cells are the targets
    assert m.reconstruction_loss(x2, mask).item() != m.reconstruction_loss(x, mask).item()


def test_loss_fp32_under_autocast():
    m = make(in_chans=1)
    x = torch.rand(2, 1, 64, 64)
    mask = rand_mask(2, (2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.reconstruction_loss(x, mask)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in m.mask_tokens)
    assert abs(loss.item() - m.reconstruction_loss(x, mask).item()) < 0.05  # bf16 compute, same loss to bf16 accuracy


# ---- SparK's semantics ---------------------------------------------------------------------------


def one_step(model, x, step, published=False):
    """Loss, gradients and buffers (BN running statistics) after one training step's backward."""
    model.train()
    if published:
        loss = spark_published_loss(
            model, x, model.draw_mask(x.shape[0], (x.shape[2] // 32, x.shape[3] // 32), step, x.device)
        )
    else:
        loss, _ = model.training_step(x, step)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    return loss.detach(), grads, bufs


@pytest.mark.parametrize(
    "arch,in_chans,B,H,W,ratio",
    [
        ("resnet18", 3, 3, 64, 96, 0.6),
        ("resnet18", 1, 2, 96, 64, 0.75),
        ("resnet50", 2, 2, 64, 64, 0.5),
    ],
)
def test_sparse_step_equals_dense_masked_and_published_float64(arch, in_chans, B, H, W, ratio):
    base = make(arch, in_chans=in_chans, width=32, mask_ratio=ratio).double()
    base.seed = 3
    x = torch.rand(B, in_chans, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = {}
    for name in ("sparse", "dense-masked", "published"):
        m = copy.deepcopy(base)
        m.config.encoder = "sparse" if name == "sparse" else "dense-masked"
        runs[name] = one_step(m, x, step=2, published=name == "published")
    loss0, g0, b0 = runs["sparse"]
    assert len(g0) == len(list(base.parameters()))
    assert all(g0[f"mask_tokens.{i}"].abs().sum() > 0 for i in range(4))  # every token is trained
    for name in ("dense-masked", "published"):
        loss, g, b = runs[name]
        assert abs(loss.item() - loss0.item()) <= 1e-12 * abs(loss0.item()), name
        for k in g0:
            assert rel(g[k], g0[k]) < 1e-10, (name, k)
        for k in b0:
            assert rel(b[k], b0[k]) < 1e-10, (name, k)


def test_channels_last_model_gives_the_same_step():
    base = make(in_chans=3).double()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    l0, g0, _ = one_step(copy.deepcopy(base), x, 0)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    l1, g1, _ = one_step(cl, x.contiguous(memory_format=torch.channels_last), 0)
    assert abs(l0.item() - l1.item()) < 1e-12
    assert max(rel(g0[k], g1[k]) for k in g0) < 1e-10


# ---- training ------------------------------------------------------------------------------------


def synthetic_ct(n=4, size=64, windows=("lung", "mediastinum")):
    """Windowed slices of the synthetic chest CT (HU rendered at `size`), (n, C, size, size)."""
    from sparkct.data.synthetic import make_acquisition, make_patient, render_slice
    from sparkct.data.windows import apply_windows

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        p = make_patient(0, i)
        acq = make_acquisition(rng, p, size, None)
        hu, _ = render_slice(p, acq, p.height * (0.45 + 0.1 * i / n), rng)
        out.append(torch.as_tensor(apply_windows(hu, list(windows))))
    return torch.stack(out).float()


def test_loss_falls_with_adamw():
    x = synthetic_ct(2)
    x = torch.cat([x, x.flip(-1)])  # 4 samples from 2 rendered slices (rendering costs ~0.5 s a slice)
    m = make(in_chans=2, width=64)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for step in range(24):
        loss, _ = m.training_step(x, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.85 * first, losses  # measured: ~1.0 -> ~0.7


# ---- data, preview, optimizer groups -------------------------------------------------------------


def test_transform_is_sparks_crop_and_flip_without_intensity_changes():
    m = make(in_chans=2)
    t = m.transform(64, ["lung", "bone"])
    assert t.scale == (0.67, 1.0) and t.hflip == 0.5 and t.vflip == 0 and t.p_rotate == 0
    hu = torch.full((3, 1, 90, 110), 40, dtype=torch.int16)
    out = t(hu, torch.Generator().manual_seed(0))
    assert out.shape == (3, 2, 64, 64) and out.dtype == torch.float32
    # a uniform slice comes out as exactly its window values: no intensity, noise, blur or gamma
    lung, bone = (-600.0, 1500.0), (400.0, 1800.0)
    want = torch.tensor([(40 - (c - w / 2)) / w for c, w in (lung, bone)]).view(1, 2, 1, 1)
    assert torch.allclose(out, want.expand_as(out), atol=1e-6)
    hu = torch.randint(-1000, 1000, (4, 1, 80, 80), dtype=torch.int16)
    a = t(hu, torch.Generator().manual_seed(1))
    assert torch.equal(a, t(hu, torch.Generator().manual_seed(1)))
    assert a.min() >= 0 and a.max() <= 1
    # crop and windows are checked once, in the trainer's set-up (`pretrain spark --crop 100` in test_cli)
    with pytest.raises(UserError, match="multiple of 32"):
        m.check_input(100, ["lung", "bone"])
    with pytest.raises(UserError, match="window"):
        m.check_input(64, ["lung"])
    m.check_input = None  # type: ignore[method-assign]  # not called again here
    m.transform(64, ["lung", "bone"])


def test_preview_rows():
    m = make(in_chans=1).double()
    x = torch.rand(2, 1, 64, 96, dtype=torch.float64)
    mask = rand_mask(2, (2, 3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rows = m.preview(x, mask)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # running stats untouched
    assert set(rows) == {"input", "masked", "reconstruction"}
    vis = mask.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None]
    for v in rows.values():
        assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1
    assert torch.equal(rows["input"], x)
    assert torch.equal(rows["masked"], x * vis)
    assert torch.equal(rows["reconstruction"][vis], x[vis])
    # SparK's visualization: the prediction de-normalized with each masked cell's own mean and std
    _, _, rec = spark_published_loss(copy.deepcopy(m), x, mask, vis=True)
    assert torch.allclose(rows["reconstruction"], rec.clamp(0, 1), atol=1e-10)
    # without a mask: the same fixed one every time
    a, b = m.preview(x), m.preview(x)
    assert torch.equal(a["masked"], b["masked"])


def test_no_weight_decay_names_the_mask_tokens():
    m = make()
    names = dict(m.named_parameters())
    nwd = m.no_weight_decay()
    assert nwd == {f"mask_tokens.{i}" for i in range(4)} and nwd <= set(names)
    assert all(names[k].shape == (1, c, 1, 1) for k, c in zip(sorted(nwd), (512, 256, 128, 64)))


def test_structure_as_published():
    m = make("resnet50", width=768)
    assert [p.kernel_size for p in m.densify_projs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [(p.in_channels, p.out_channels) for p in m.densify_projs] == [
        (2048, 768),
        (1024, 384),
        (512, 192),
        (256, 96),
    ]
    assert [n.num_features for n in m.densify_norms] == [2048, 1024, 512, 256]
    tok = torch.cat([t.flatten() for t in m.mask_tokens])
    assert tok.abs().max() <= 0.02 and 0.005 < tok.std() < 0.02  # trunc-normal std 0.02 cut at +-0.02
    # resnet18 with width 512: SparK uses no projection where the widths already agree
    assert isinstance(make(width=512).densify_projs[0], torch.nn.Identity)
    # the backbone's weights are stored once (the sparse encoder is not a registered submodule)
    keys = list(m.state_dict())
    assert not any(k.startswith("encoder.") for k in keys) and "backbone.conv1.weight" in keys


# ---- config and registry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("mask_ratio", 1.0, "mask ratio"),
        ("mask_ratio", -0.1, "mask ratio"),
        ("mask_ratio", float("nan"), "mask ratio"),
        ("mask_ratio", "lots", "mask ratio"),
        ("encoder", "dense", "encoder"),
        ("decoder_width", 100, "decoder width"),
        ("decoder_width", 0, "decoder width"),
        ("decoder_width", True, "decoder width"),
        ("crop_scale", (0.0, 1.0), "crop scale"),
        ("crop_scale", (0.9, 0.5), "crop scale"),
        ("crop_scale", "x", "crop scale"),
        ("hflip", 1.5, "hflip"),
        ("hflip", "yes", "hflip"),
    ],
)
def test_bad_config_raises_user_error(field, value, match):
    cfg = SparKConfig(**{field: value})
    with pytest.raises(UserError, match=match):
        cfg.validate()
    bb, _ = build_backbone("resnet18")
    with pytest.raises(UserError, match=match):
        SparK(bb, SparKConfig(**{field: value}))


def test_config_defaults_and_help():
    from dataclasses import fields

    cfg = SparKConfig()
    cfg.validate()
    assert (cfg.mask_ratio, cfg.encoder, cfg.decoder_width, cfg.crop_scale, cfg.hflip) == (
        0.6,
        "sparse",
        768,
        (0.67, 1.0),
        0.5,
    )
    assert all(f.metadata.get("help") for f in fields(cfg))
    c2 = SparKConfig(crop_scale="0.5,1")  # as a command line gives it
    c2.validate()
    assert c2.crop_scale == (0.5, 1.0)


def test_registry():
    assert METHODS["spark"] == "sparkct.models.spark.model:SparK"
    assert get_method("spark") is SparK and SparK.name == "spark"
    for _name, target in METHODS.items():
        assert ":" in target
    with pytest.raises(UserError, match="unknown method 'mae'.*spark"):
        get_method("mae")


def test_config_from_command_line_flags():
    import argparse

    from sparkct.cliargs import add_dataclass_args, dataclass_from_args

    p = argparse.ArgumentParser()
    add_dataclass_args(p, SparKConfig)
    cfg = dataclass_from_args(
        SparKConfig,
        p.parse_args(
            ["--mask-ratio", "0.75", "--encoder", "dense-masked", "--decoder-width", "512", "--crop-scale", "0.5,1"]
        ),
    )
    cfg.validate()
    assert (cfg.mask_ratio, cfg.encoder, cfg.decoder_width, cfg.crop_scale) == (0.75, "dense-masked", 512, (0.5, 1.0))
