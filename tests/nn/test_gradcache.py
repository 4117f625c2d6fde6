"""Gradient caching: the chunked step's parameter gradients equal the unchunked step's (float64, a
model without batch statistics), dropout replays identically in the re-run, BatchNorm behaves as
per-chunk BN (gradients and running statistics), and tuple outputs (embedding + logits) work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparkct.nn import InfoNCELoss, chunked, grad_cache
from sparkct.nn.gradcache import chunks

pytestmark = pytest.mark.usefixtures("one_thread")


def encoder(dropout=0.0, norm="group"):
    torch.manual_seed(1)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    layers += [nn.GroupNorm(2, 4)] if norm == "group" else [nn.BatchNorm2d(4)]
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)]
    return nn.Sequential(*layers).double()


def views(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]


def simclr_loss(outs):
    return InfoNCELoss(0.3)(outs[0], outs[1]), None


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_chunked_equals_unchunked_float64():
    x = views()
    ref = encoder()
    loss_ref, _ = simclr_loss([ref(v) for v in x])
    loss_ref.backward()
    for chunk in (1, 5, 12, 64):
        m = encoder()
        loss, outs, _ = grad_cache(m, x, simclr_loss, torch.autograd.backward, chunk)
        torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-12, atol=1e-12)
        for a, b in zip(grads(m), grads(ref)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(outs[0], ref(x[0]).detach(), rtol=1e-12, atol=1e-12)


def test_dropout_replays_identically():
    x = views()
    chunk = 5
    torch.manual_seed(7)
    ref = encoder(dropout=0.5)
    torch.manual_seed(7)
    # reference: the same chunked forwards in the same order, kept in one autograd graph
    outs = [torch.cat([ref(c) for c in chunks(v, chunk)]) for v in x]
    after_ref = torch.rand(3)
    simclr_loss(outs)[0].backward()
    m = encoder(dropout=0.5)
    torch.manual_seed(7)
    grad_cache(m, x, simclr_loss, torch.autograd.backward, chunk)
    for a, b in zip(grads(m), grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the global RNG ends where one forward pass leaves it
    torch.testing.assert_close(torch.rand(3), after_ref)


def test_batchnorm_is_per_chunk_and_running_stats_update_once_per_chunk():
    x = views()
    chunk = 4
    ref = encoder(norm="batch")
    outs = [torch.cat([ref(c) for c in chunks(v, chunk)]) for v in x]
    simclr_loss(outs)[0].backward()
    m = encoder(norm="batch")
    grad_cache(m, x, simclr_loss, torch.autograd.backward, chunk, module=m)
    for a, b in zip(grads(m), grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(m.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)
    assert int(m[1].num_batches_tracked) == 2 * 3  # 2 views x 3 chunks, not twice that


def test_tuple_outputs_and_trainer_style_backward():
    """encode returns (embedding, logits); the backward callable may scale (loss scaling)."""
    torch.manual_seed(0)
    body = encoder()
    cls = nn.Linear(6, 3).double()
    x = views()
    y = torch.tensor([0, 1, 2, -1] * 3)

    def encode(v):
        z = body(v)
        return z, cls(z)

    def loss_fn(outs):
        (z0, l0), (z1, _) = outs
        return InfoNCELoss(0.3)(z0, z1) + 0.5 * nn.functional.cross_entropy(l0, y, ignore_index=-1), None

    ref_loss, _ = loss_fn([encode(v) for v in x])
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in (*body.parameters(), *cls.parameters())]
    for p in (*body.parameters(), *cls.parameters()):
        p.grad = None

    def scaled_backward(tensors, grad_tensors):
        torch.autograd.backward(tensors, [g * 4.0 for g in grad_tensors])

    grad_cache(encode, x, loss_fn, scaled_backward, 5)
    for p, g in zip((*body.parameters(), *cls.parameters()), ref_grads):
        torch.testing.assert_close(p.grad / 4.0, g, rtol=1e-10, atol=1e-12)


def test_chunks_are_near_equal():
    x = torch.arange(10)
    assert [len(c) for c in chunks(x, 3)] == [3, 3, 2, 2]
    assert [len(c) for c in chunks(x, 5)] == [5, 5]
    assert [len(c) for c in chunks(x, 10)] == [10] and [len(c) for c in chunks(x, 0)] == [10]
    torch.testing.assert_close(torch.cat(chunks(x, 4)), x)


def test_chunked_no_grad_embedding_and_bad_chunk():
    m = encoder()
    x = views()[0]
    out = chunked(m, x, 5)
    assert not out.requires_grad
    torch.testing.assert_close(out, m(x).detach())
    with pytest.raises(ValueError, match="chunk"):
        grad_cache(m, [x], simclr_loss, torch.autograd.backward, 0)
