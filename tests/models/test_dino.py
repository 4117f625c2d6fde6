"""DINO against plain float64 re-implementations of the published code's semantics (DINO's main_dino.py
DINOLoss, DINOHead, utils.cosine_scheduler / clip_gradients / cancel_gradients_last_layer; DINOv2's
sinkhorn_knopp_teacher, iBOTPatchLoss.forward_masked and KoLeoLoss): values and gradients, the teacher
getting no gradient, the schedules and the EMA, the frozen last layer, the options' errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from sparkct.errors import UserError
from sparkct.models import BUILTIN_DATA_OPTIONS, get_method
from sparkct.models.dino import DINO, DINOConfig
from sparkct.nn.dino import (
    DINOHead,
    center_update,
    ibot_patch_loss,
    koleo_loss,
    prototype_cross_entropy,
    sinkhorn_bias,
    teacher_momentum,
    teacher_temperature,
)
from sparkct.train.optim import clip_per_parameter_

from contrastive_helpers import synthetic_hu

SMALL = dict(prototypes=64, proj_hidden_dim=32, proj_dim=16, n_local=2, local_crop=16)


# --- the published code's semantics, in float64 -----------------------------------------------------
def ref_dino_loss(student_output, teacher_output, center, ncrops, teacher_temp, student_temp=0.1):
    """main_dino.py's DINOLoss.forward on head outputs (logits): student (ncrops * B, K), teacher (2 B, K)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, n = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


def ref_update_center(center, teacher_output, momentum=0.9):
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return center * momentum + batch_center * (1 - momentum)


def ref_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


def ref_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    Q = torch.exp(teacher_output / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def ref_koleo(x, eps=1e-8):
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, idx = torch.max(dots, dim=1)
    distances = nn.PairwiseDistance(2, eps=1e-8)(x, x[idx])
    return -torch.log(distances + eps).mean()


def ref_ibot_masked(t_probs, s_logits, masks_flat, student_temp=0.1):
    loss = torch.sum(t_probs * F.log_softmax(s_logits / student_temp, dim=-1), dim=-1)
    # (DINOv2 divides by the int count: float32 weights; float64 here)
    w = (1 / masks_flat.sum(-1).double().clamp(min=1.0)).unsqueeze(-1).expand_as(masks_flat)[masks_flat]
    return -(loss * w).sum() / masks_flat.shape[0]


def _resnet():
    bb = ResNet(BasicBlock, [1, 1, 1, 1])
    bb.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    bb.fc = nn.Identity()
    return bb


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, dynamic_img_size=True)


def _views(method, n=6, crop=32, seed=0):
    return [
        v.double() for v in method.transform(crop, "lung")(synthetic_hu(n, 48), torch.Generator().manual_seed(seed))
    ]


# --- the loss function --------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_prototype_cross_entropy_equals_dino_loss(with_bias):
    g = torch.Generator().manual_seed(0)
    S, B, D, K = 5, 4, 8, 11
    s = F.normalize(torch.randn(S, B, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(2, B, D, generator=g, dtype=torch.float64), dim=-1)
    ws = torch.randn(K, D, generator=g, dtype=torch.float64).requires_grad_()
    wt = torch.randn(K, D, generator=g, dtype=torch.float64).requires_grad_()
    center = torch.randn(K, generator=g, dtype=torch.float64) if with_bias else torch.zeros(K, dtype=torch.float64)
    tau = 0.055
    got = prototype_cross_entropy(s, t, ws, wt, -center / tau if with_bias else None, 0.1, tau)
    want = ref_dino_loss((s @ ws.t()).reshape(S * B, K), (t @ wt.t()).reshape(2 * B, K), center, S, tau)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    gs, gw = torch.autograd.grad(got, (s, ws), retain_graph=True)
    rs, rw = torch.autograd.grad(want, (s, ws))
    assert torch.allclose(gs, rs, rtol=1e-10, atol=1e-14) and torch.allclose(gw, rw, rtol=1e-10, atol=1e-14)
    got.backward()
    assert wt.grad is None  # the teacher side gets no gradient


def test_prototype_cross_entropy_without_skip_and_bad_shapes():
    g = torch.Generator().manual_seed(1)
    s, t = (
        torch.randn(3, 2, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 4, generator=g, dtype=torch.float64),
    )
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    pt = F.softmax(t @ w.t() / 0.04, -1)
    ls = F.log_softmax(s @ w.t() / 0.1, -1)
    want = torch.stack([-(pt[i] * ls[j]).sum(-1).mean() for i in range(2) for j in range(3)]).mean()
    assert torch.allclose(prototype_cross_entropy(s, t, w, w, None, 0.1, 0.04, skip_same=False), want, rtol=1e-12)
    with pytest.raises(ValueError):
        prototype_cross_entropy(s, t[:, :1], w, w, None, 0.1, 0.04)
    with pytest.raises(ValueError):
        prototype_cross_entropy(s[:1], t[:1], w, w, None, 0.1, 0.04)  # one crop: no pair


def test_center_update_equals_dino():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    w = torch.randn(7, 6, generator=g, dtype=torch.float64)
    c = torch.randn(7, generator=g, dtype=torch.float64)
    want = ref_update_center(c[None], (t @ w.t()).reshape(6, 7))[0]
    center_update(c, t, w, 0.9)
    assert torch.allclose(c, want, rtol=1e-12, atol=1e-14)


def test_schedules_equal_dino():
    temps = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(100 - 30) * 0.07))  # DINOLoss's schedule
    assert [teacher_temperature(e, 0.04, 0.07, 30) for e in range(100)] == pytest.approx(list(temps), abs=1e-15)
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07
    moms = ref_cosine_scheduler(0.996, 1, 3, 7)
    assert [teacher_momentum(i, 21, 0.996) for i in range(21)] == pytest.approx(list(moms), abs=1e-15)


def test_head_is_dinos():
    h = DINOHead(12, 40, 24, 8)
    assert [type(m) for m in h.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert not h.last_layer.weight_g.requires_grad and torch.equal(h.last_layer.weight_g, torch.ones(40, 1))
    assert torch.allclose(h.weight().norm(dim=1), torch.ones(40))
    x = torch.randn(5, 12)
    z = h(x)
    assert torch.allclose(z.norm(dim=1), torch.ones(5))
    # torch's weight_norm (DINO's) gives the same last layer
    lin = nn.Linear(8, 40, bias=False)
    lin.weight.data.copy_(h.last_layer.weight_v.data)
    wn = torch.nn.utils.weight_norm(lin)
    wn.weight_g.data.fill_(1)
    assert torch.allclose(wn(z), h.logits(x), atol=1e-6)
    assert DINOHead(12, 40, 24, 8, norm_last_layer=False).last_layer.weight_g.requires_grad
    assert nn.BatchNorm1d in [type(m) for m in DINOHead(12, 40, 24, 8, use_bn=True).mlp]


# --- the method's step against DINO's loop ------------------------------------------------------------
def test_step_equals_dino_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    m = DINO(_resnet(), DINOConfig(**SMALL)).double()
    views = _views(m)
    B = views[0].shape[0]
    # DINO's loop on the same weights: MultiCropWrapper (backbone per resolution, head on all outputs)
    T = m.teacher
    center0 = m.center.clone()
    with torch.no_grad():
        t_out = T.head.logits(T.backbone(torch.cat(views[:2])))
    s_feats = torch.cat([m.backbone(torch.cat(views[:2])), m.backbone(torch.cat(views[2:]))])
    s_out = m.dino_head.logits(s_feats)
    want = ref_dino_loss(s_out, t_out, center0[None], len(views), 0.04)
    want_grads = torch.autograd.grad(want, [p for p in m.parameters() if p.requires_grad])

    m.zero_grad()
    loss, logs = m.training_step(views, 0)
    assert torch.allclose(loss, want, rtol=1e-10)
    loss.backward()
    got = [p.grad for p in m.parameters() if p.requires_grad]
    for a, b in zip(got, want_grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert torch.allclose(m.center, ref_update_center(center0[None], t_out)[0], rtol=1e-12)
    # the collapse signals: the teacher's entropy and KL(teacher || student) = loss - entropy
    pt = F.softmax((t_out - center0) / 0.04, -1)
    h = -(pt * pt.log()).sum(-1).mean()
    assert float(logs["teacher_entropy"]) == pytest.approx(float(h), rel=1e-5)
    kl = torch.stack(
        [
            (
                pt[i * B : (i + 1) * B]
                * (pt[i * B : (i + 1) * B].log() - F.log_softmax(s_out[j * B : (j + 1) * B] / 0.1, -1))
            )
            .sum(-1)
            .mean()
            for i in range(2)
            for j in range(len(views))
            if i != j
        ]
    ).mean()
    assert float(logs["kl_teacher_student"]) == pytest.approx(float(kl.detach()), rel=1e-5)
    assert 0 < logs["collapse"] and m.loss_reference(8) == math.log(64)


def test_ema_and_last_layer_freezing():
    torch.manual_seed(0)
    m = DINO(_resnet(), DINOConfig(**SMALL, momentum=0.9)).double()
    for p in m.parameters():
        if p.requires_grad:
            p.data.add_(0.1)  # the student moves away from the teacher
    before = [p.clone() for p in m.teacher.parameters()]
    student = list(m.student[0].parameters())
    m.after_step(3, 10)
    mom = 1 + 0.5 * (0.9 - 1) * (1 + math.cos(math.pi * 3 / 10))
    for t0, t1, s in zip(before, m.teacher.parameters(), student):
        assert torch.allclose(t1, mom * t0 + (1 - mom) * s, rtol=1e-12, atol=1e-15)
    # the last layer: no gradient during the first epoch (freeze_last_layer = 1), then free
    loss, _ = m.training_step(_views(m), 0)
    loss.backward()
    m.on_before_optimizer_step(0)
    assert m.dino_head.last_layer.weight_v.grad is None and m.dino_head.mlp[0].weight.grad is not None
    assert m.plot_marks() == []
    m.on_epoch_end(0)
    m.zero_grad()
    loss, _ = m.training_step(_views(m), 5)
    loss.backward()
    m.on_before_optimizer_step(5)
    assert m.dino_head.last_layer.weight_v.grad is not None
    assert m.plot_marks() == [(4, "last layer unfrozen")]  # steps_done after after_step(3)


def test_clip_per_parameter_equals_dinos_clip_gradients():
    g = torch.Generator().manual_seed(3)
    ps = [nn.Parameter(torch.zeros(5, 3, dtype=torch.float64)) for _ in range(3)]
    for p, s in zip(ps, (0.1, 2.0, 10.0)):
        p.grad = torch.randn(5, 3, generator=g, dtype=torch.float64) * s
    want = []
    for p in ps:  # DINO's utils.clip_gradients
        n = p.grad.norm(2)
        coef = 3.0 / (n + 1e-6)
        want.append(p.grad * coef if coef < 1 else p.grad.clone())
    total = float(torch.stack([p.grad.norm() for p in ps]).norm())
    assert clip_per_parameter_(ps, 3.0) == pytest.approx(total)
    for p, w in zip(ps, want):
        assert torch.allclose(p.grad, w, rtol=1e-12)
    assert DINO.clip_per_parameter and DINO.defaults["clip_grad"] == 3.0


# --- DINOv2's options --------------------------------------------------------------------------------
def test_sinkhorn_bias_equals_dinov2():
    g = torch.Generator().manual_seed(4)
    t = F.normalize(torch.randn(2, 5, 6, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    q = ref_sinkhorn((t @ w.t()).reshape(10, 9), 0.05)
    bias = sinkhorn_bias(t, w, 0.05)
    assert torch.allclose(F.softmax((t @ w.t()).reshape(10, 9) / 0.05 + bias, -1), q, rtol=1e-10, atol=1e-14)
    # and the loss with it is the cross-entropy against those codes
    s = F.normalize(torch.randn(3, 5, 6, generator=g, dtype=torch.float64), dim=-1)
    ls = F.log_softmax(s @ w.t() / 0.1, -1)
    qs = q.view(2, 5, 9)
    want = torch.stack([-(qs[i] * ls[j]).sum(-1).mean() for i in range(2) for j in range(3) if i != j]).mean()
    assert torch.allclose(prototype_cross_entropy(s, t, w, w, bias, 0.1, 0.05), want, rtol=1e-10)


def test_no_rows_leave_the_centre_and_give_no_scaling():
    # iBOT with no masked patch (a few patches and a low ratio): nothing to average, no NaN
    c = torch.ones(4, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)
    center_update(c, torch.zeros(0, 3, dtype=torch.float64), w, 0.9)
    assert torch.equal(c, torch.ones(4, dtype=torch.float64))
    assert torch.equal(
        sinkhorn_bias(torch.zeros(0, 3, dtype=torch.float64), w, 0.05), torch.zeros(4, dtype=torch.float64)
    )


def test_koleo_equals_dinov2():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    got, want = koleo_loss(x), ref_koleo(x)
    assert torch.allclose(got, want, rtol=1e-12)
    assert torch.allclose(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], rtol=1e-10)


def test_ibot_patch_loss_equals_dinov2():
    g = torch.Generator().manual_seed(6)
    n_img, P, D, K = 4, 6, 5, 8
    masks = torch.rand(n_img, P, generator=g) < 0.4
    masks[2] = False  # an unmasked image counts in the mean
    M = int(masks.sum())
    s = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    t = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    w = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    c = torch.randn(K, generator=g, dtype=torch.float64)
    image = torch.arange(n_img).repeat_interleave(P)[masks.view(-1)]
    got = ibot_patch_loss(s, t, image, n_img, w, w, -c / 0.04, 0.1, 0.04)
    pt = F.softmax((t @ w.detach().t() - c) / 0.04, -1)
    want = ref_ibot_masked(pt, s @ w.t(), masks)
    assert torch.allclose(got, want, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(got, (s, w)), torch.autograd.grad(want, (s, w))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_vit_with_ibot_koleo_sinkhorn():
    torch.manual_seed(0)
    cfg = DINOConfig(**SMALL, ibot_weight=1.0, koleo_weight=0.1, centering="sinkhorn")
    m = DINO(_vit(), cfg).double()
    views = _views(m, n=4)
    loss, logs = m.training_step(views, 0)
    assert {"dino", "ibot", "koleo", "teacher_entropy", "kl_teacher_student"} <= logs.keys()
    assert torch.allclose(loss, logs["dino"] + logs["ibot"] + 0.1 * logs["koleo"], rtol=1e-12)
    loss.backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    # the masks: a function of (seed, step) alone; half of the 8 global crops masked, 10-50 % of 4 patches
    a, b = m.masks(7, 4, 16, "cpu"), m.masks(7, 4, 16, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, m.masks(8, 4, 16, "cpu"))
    assert int((a.sum(1) > 0).sum()) == 4 and int(a.sum(1).max()) <= 8
    # the unmasked tokens path is the ViT's own forward
    x = views[0]
    cls, patches = m.tokens(m.backbone, x, None)
    assert torch.allclose(cls, m.backbone(x), atol=1e-12) and patches.shape == (4, 4, 192)
    # KoLeo against DINOv2 on the student's CLS of each global crop
    f = torch.cat([m.backbone(views[0]), m.backbone(views[1])])
    assert m.vit and torch.isfinite(ref_koleo(f[:4]) + ref_koleo(f[4:]))


def test_ibot_with_a_resnet_and_bad_options_are_user_errors():
    with pytest.raises(UserError, match="ViT"):
        DINO(_resnet(), DINOConfig(**SMALL, ibot_weight=1.0))
    for bad in (
        dict(centering="mean"),
        dict(teacher_temp=0),
        dict(momentum=1.5),
        dict(prototypes=0),
        dict(chunk=4),
        dict(ibot_weight=-1.0),
        dict(mask_probability=0.0),
        dict(global_scale=(0.5, 0.2)),
    ):
        with pytest.raises(UserError):
            DINOConfig(**{**SMALL, **bad}).validate()


def test_registered_with_published_defaults():
    assert get_method("dino") is DINO
    c = DINOConfig()
    assert (c.prototypes, c.proj_hidden_dim, c.proj_dim, c.head_layers, c.norm_last_layer) == (
        65536,
        2048,
        256,
        3,
        True,
    )
    assert (c.momentum, c.teacher_temp, c.warmup_teacher_temp, c.warmup_teacher_temp_epochs) == (0.996, 0.07, 0.04, 30)
    assert (c.student_temp, c.center_momentum, c.freeze_last_layer, c.n_local) == (0.1, 0.9, 1, 8)
    assert (c.ibot_weight, c.koleo_weight, c.centering) == (0.0, 0.0, "centre")
    d = DINO.defaults
    assert (d["optimizer"], d["base_lr"], d["weight_decay"], d["weight_decay_end"], d["warmup_epochs"]) == (
        "adamw",
        5e-4,
        0.04,
        0.4,
        10.0,
    )
    assert BUILTIN_DATA_OPTIONS["dino.prototypes"] < c.prototypes
    m = DINO(_resnet(), DINOConfig(**SMALL))
    tf = m.transform(64, "lung")
    views = tf(synthetic_hu(2, 80), torch.Generator().manual_seed(0))
    assert [v.shape[-1] for v in views] == [64, 64, 16, 16]


def test_ibot_masks_of_a_rank_are_its_rows_of_the_global_draw(monkeypatch):
    """Under DDP each rank takes its rows of the masks drawn for the global batch (crop-major), so two
    ranks mask what one process masks."""
    import sparkct.models.dino as D

    m = DINO(_vit(), DINOConfig(**SMALL, ibot_weight=1.0))
    whole = m.masks(3, 6, 16, "cpu").view(2, 6, 16)
    monkeypatch.setattr(D, "row_counts", lambda n, device: [4, 2])
    for r, (lo, hi) in enumerate(((0, 4), (4, 6))):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        part = m.masks(3, hi - lo, 16, "cpu").view(2, hi - lo, 16)
        assert torch.equal(part, whole[:, lo:hi])
