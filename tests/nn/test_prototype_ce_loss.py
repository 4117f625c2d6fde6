"""sparkct.nn.PrototypeCrossEntropyLoss: DINO's loss as its official form (log_softmax per student crop,
a softmax-centred teacher, the same-view pairs skipped) on the fused op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkct.nn import PrototypeCrossEntropyLoss


def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """DINO's DINOLoss.forward on per-crop logits (S, B, K) and (T, B, K), written from its description."""
    s = student_out / student_temp
    t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach()
    total, n = 0, 0
    for iq, q in enumerate(t):
        for v in range(len(s)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_matches_dino_loss_with_centering_and_override_temperature():
    g = torch.Generator().manual_seed(0)
    S, T, B, D, K = 6, 2, 4, 16, 300
    st = F.normalize(torch.randn(S, B, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    te = F.normalize(torch.randn(T, B, D, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    wt = w.detach().clone()
    center = 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    loss_fn = PrototypeCrossEntropyLoss()
    tt = 0.05  # mid warm-up
    got, stats = loss_fn(st, te, w, wt, -center / tt, teacher_temp=tt, return_stats=True)
    want = dino_loss(st @ w.t(), te @ wt.t(), center, 0.1, tt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(got, [st, w])
    g2 = torch.autograd.grad(want, [st, w])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    assert set(stats) == {"teacher_entropy", "kl"} and stats["kl"] >= 0


def test_bad_temperature_is_named():
    with pytest.raises(ValueError, match="PrototypeCrossEntropyLoss: student"):
        PrototypeCrossEntropyLoss(student_temp=0)
    assert "skip_same=True" in repr(PrototypeCrossEntropyLoss())
