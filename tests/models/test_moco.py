"""MoCo v2: key encoder EMA (constant and cosine), the queue (the fused loss's bank, FIFO, keys of the
key encoder), the loss equals lightly's NT-Xent with a memory bank, chunked = unchunked gradients,
a plain loop lowers the loss without collapse, shuffled BN across 2 processes equals one process,
and a queue smaller than the batch is a clear error."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from sparkct.errors import UserError
from sparkct.models import get_method
from sparkct.models.moco import MoCo, MoCoConfig, shuffled_forward

from contrastive_helpers import FEATURES, grads_chunked_vs_unchunked, synthetic_hu, tiny_backbone, train

pytestmark = pytest.mark.usefixtures("one_thread")


def make(chunk=0, norm="group", **kw):
    torch.manual_seed(0)
    kw = {"queue_size": 32, **kw}
    return MoCo(
        tiny_backbone(norm=norm), MoCoConfig(chunk=chunk, proj_hidden_dim=32, proj_dim=8, **kw), feature_dim=FEATURES
    )


def test_registry_and_defaults():
    assert get_method("moco") is MoCo
    c = MoCoConfig()
    assert (c.queue_size, c.temperature, c.momentum, c.proj_dim) == (65536, 0.2, 0.999, 128)
    m = MoCo(tiny_backbone(), MoCoConfig(queue_size=64), feature_dim=FEATURES)
    assert not any(p.requires_grad for p in m.key_encoder.parameters())
    assert m.criterion.bank.shape == (64, 128)


def test_step_queue_and_ema():
    m = make(momentum=0.9, momentum_end=1.0)
    views = m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(0))
    bank = m.criterion.bank.clone()
    with torch.no_grad():
        keys = m.key_encoder(views[1])
    loss, _ = m.training_step(views, 0)
    q = m.projector(m.backbone(views[0]))
    # plain InfoNCE: each query's positive is its key, its negatives the queue as it was
    qn, kn = F.normalize(q, dim=1), F.normalize(keys, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ bank.t()], 1) / 0.2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)), rtol=1e-5, atol=1e-6)
    # FIFO: the normalized keys entered the queue at its start
    torch.testing.assert_close(m.criterion.bank[:8], F.normalize(keys, dim=1))
    torch.testing.assert_close(m.criterion.bank[8:], bank[8:])
    # EMA with the cosine schedule: momentum 0.9 at step 0
    ema = [p.detach().clone() for p in m.key_encoder.parameters()]
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.5)
    online = [p.detach().clone() for p in list(m.backbone.parameters()) + list(m.projector.parameters())]
    m.after_step(0, 10)
    for e, o, new in zip(ema, online, m.key_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * e + 0.1 * o)


def test_symmetric_loss_against_plain_reference():
    """--symmetric: (InfoNCE(q0, k1) + InfoNCE(q1, k0)) / 2, both against the queue before the step,
    each view through the query encoder on its own; then the second view's keys join the queue."""
    m = make(norm="batch", symmetric=True).double()
    views = [v.double() for v in m.transform(32, "lung")(synthetic_hu(8), torch.Generator().manual_seed(1))]
    ref = copy.deepcopy(m)
    bank = m.criterion.bank.clone()
    loss, _ = m.training_step(views, 0)
    loss.backward()
    with torch.no_grad():
        k0, k1 = ref.key_encoder(views[0]), ref.key_encoder(views[1])
    q0, q1 = (ref.projector(ref.backbone(v)) for v in views)

    def nce(q, k):
        qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ bank.t()], 1) / 0.2
        return F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))

    want = (nce(q0, k1) + nce(q1, k0)) / 2
    want.backward()
    # the fused op keeps its per-row log-sum-exp in float32, also for float64 input
    torch.testing.assert_close(loss, want, rtol=1e-7, atol=1e-9)
    grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) > 4
    for k, p in m.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(m.criterion.bank[:8], F.normalize(k1, dim=1))
    torch.testing.assert_close(m.criterion.bank[8:], bank[8:])
    assert int(m.criterion.bank_ptr) == 8
    # and it differs from the one-sided loss
    one = make(norm="batch").double()
    assert abs(float(one.training_step(views, 0)[0].detach()) - float(loss.detach())) > 1e-3


def test_symmetric_chunked_equals_unchunked():
    views = make().transform(32, "lung")(synthetic_hu(10), torch.Generator().manual_seed(2))
    l0, l1, g0, g1 = grads_chunked_vs_unchunked(lambda chunk: make(chunk, symmetric=True), views, chunk=4)
    assert l0 == pytest.approx(l1, rel=1e-12) and set(g0) == set(g1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12)


def test_chunked_equals_unchunked():
    views = make().transform(32, "lung")(synthetic_hu(10), torch.Generator().manual_seed(2))
    l0, l1, g0, g1 = grads_chunked_vs_unchunked(make, views, chunk=4)
    assert l0 == pytest.approx(l1, rel=1e-12) and len(g0) > 4 and set(g0) == set(g1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12)


def test_training_lowers_loss_without_collapse():
    losses, collapse = train(
        make(norm="batch", queue_size=16, momentum=0.9, temperature=0.2, augment="light"), steps=30
    )
    # from step 1: at step 0 the negatives are the random initial queue (an easy, low loss)
    assert sum(losses[-5:]) / 5 < sum(losses[1:6]) / 5 - 0.1
    assert min(collapse) > 0.2


def test_bad_input():
    m = make(queue_size=8)
    views = m.transform(32, "lung")(synthetic_hu(10), torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"queue \(8 keys\) is smaller than the global batch \(10\)"):
        m.training_step(views, 0)
    with pytest.raises(UserError, match="temperature"):
        MoCoConfig(temperature=-0.1).validate()
    with pytest.raises(UserError, match="momentum"):
        MoCoConfig(momentum=1.5).validate()
    with pytest.raises(UserError, match="queue size"):
        MoCoConfig(queue_size=0).validate()


# ---- shuffled BN: 2 CPU processes (gloo) ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        x = torch.randn(12, 4)
        rows = slice(0, 6) if rank == 0 else slice(6, 12)
        keys = shuffled_forward(enc, x[rows], torch.Generator().manual_seed(5))
        torch.save(keys, os.path.join(out, f"k{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shuffled_bn_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    keys = torch.cat([torch.load(tmp_path / f"k{r}.pt") for r in range(2)])
    # one process: the rows each rank embedded are the permuted halves; BN over each half
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(12, 4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    expected = torch.empty(12, 4)
    with torch.no_grad():
        expected[perm[:6]] = enc(x[perm[:6]])
        expected[perm[6:]] = enc(x[perm[6:]])
    torch.testing.assert_close(keys, expected)
    # and the shuffle matters: plain per-rank BN gives other keys
    with torch.no_grad():
        plain = torch.cat([enc(x[:6]), enc(x[6:])])
    assert not torch.allclose(keys, plain)


def test_symmetric_flag():
    from sparkct.train.cli import _method_parser

    p, _ = _method_parser("moco")
    assert p.parse_args(["--symmetric"]).symmetric is True
    assert p.parse_args([]).symmetric is False
    assert p.parse_args(["--symmetric", "false", "--channels-last", "false"]).channels_last is False
