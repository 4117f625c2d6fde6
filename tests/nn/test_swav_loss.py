"""SwAV: Sinkhorn-Knopp codes (marginals, fp32, vs lightly's sinkhorn and a plain reference), the
swapped prediction on a hand-computed case, SwAVLoss vs lightly's SwaVLoss (with and without a
queue), and the codes over the global batch with 2 CPU processes equal one process's."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from sparkct.nn import SwAVLoss, sinkhorn


def scores(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    p = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    return z @ p.t()


def reference_sinkhorn(s, iterations=3, eps=0.05):
    """SwAV's distributed_sinkhorn on one process, float64."""
    Q = torch.exp(s.double() / eps).t()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def test_sinkhorn_marginals_and_reference():
    s = scores(64, 10)
    q = sinkhorn(s, iterations=3, epsilon=0.05)
    assert q.dtype == torch.float32 and q.shape == (64, 10) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64))  # each sample's code sums to 1
    torch.testing.assert_close(q.double(), reference_sinkhorn(s), rtol=1e-4, atol=1e-6)
    # prototype totals approach the equipartition B / K as the iterations go on
    spread = [float((sinkhorn(s, iterations=it).sum(0) - 6.4).abs().max()) for it in (1, 3, 30, 300)]
    assert spread[0] > spread[1] > spread[2] > spread[3] and spread[3] < 1e-3


def test_sinkhorn_matches_lightly_and_is_fp32_under_half():
    swav_loss = pytest.importorskip("lightly.loss.swav_loss")
    s = scores(32, 7, seed=1)
    torch.testing.assert_close(sinkhorn(s), swav_loss.sinkhorn(s.clone()), rtol=1e-4, atol=1e-6)
    # fp16 / bf16 scores: exp(1 / 0.05) overflows fp16; the codes are still finite, computed in fp32
    for dt in (torch.float16, torch.bfloat16):
        q = sinkhorn(s.to(dt))
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q, sinkhorn(s.to(dt).float()))


def test_sinkhorn_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        sinkhorn(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(2, 3), epsilon=0)


def test_swapped_prediction_hand_computed():
    # Two samples, two prototypes, symmetric scores [[a, b], [b, a]]: Sinkhorn leaves the rows of
    # exp(s / eps) alone up to normalization, so the codes are softmax(s / eps) row-wise.
    eps, T = 0.5, 1.0
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    qs = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]  # softmax([1, 0] / 0.5)
    qt = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax([0.5, 0] / 0.5)
    ls = [1 - math.log(math.e + 1), -math.log(math.e + 1)]  # log softmax([1, 0] / T)
    lt = [0.5 - math.log(math.exp(0.5) + 1), -math.log(math.exp(0.5) + 1)]
    # crop 0's codes predicted by crop 1, crop 1's by crop 0, each a cross-entropy; averaged
    expected = 0.5 * (-(qs[0] * lt[0] + qs[1] * lt[1]) - (qt[0] * ls[0] + qt[1] * ls[1]))
    loss = SwAVLoss(temperature=T, sinkhorn_epsilon=eps)([s, t])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(sinkhorn(s, epsilon=eps)[0], torch.tensor(qs))


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_matches_lightly(with_queue):
    swav_loss = pytest.importorskip("lightly.loss.swav_loss")
    high = [scores(16, 12, seed=i).requires_grad_() for i in range(2)]
    low = [scores(16, 12, seed=10 + i).requires_grad_() for i in range(4)]
    queue = [scores(32, 12, seed=20 + i) for i in range(2)] if with_queue else None
    ours = SwAVLoss()(high, low, queue)
    g_ours = torch.autograd.grad(ours, high + low)
    theirs = swav_loss.SwaVLoss()(high, low, queue)
    g_theirs = torch.autograd.grad(theirs.sum(), high + low)
    assert ours.shape == ()
    torch.testing.assert_close(ours, theirs.reshape(()), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_swav_loss_bad_input():
    with pytest.raises(ValueError, match="2 crops"):
        SwAVLoss()([scores(4, 3)])
    with pytest.raises(ValueError, match="queue"):
        SwAVLoss()([scores(4, 3), scores(4, 3)], [], [scores(4, 3)])
    with pytest.raises(ValueError, match="temperature"):
        SwAVLoss(temperature=0)


# ---- the global batch under DDP: 2 CPU processes (gloo) --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        s = scores(24, 9, seed=3)
        rows = slice(0, 10) if rank == 0 else slice(10, 24)  # uneven shares of the global batch
        q = sinkhorn(s[rows], gather_distributed=True)
        torch.save(q, os.path.join(out, f"q{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_global_batch_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    q = torch.cat([torch.load(tmp_path / f"q{r}.pt") for r in range(2)])
    torch.testing.assert_close(q, sinkhorn(scores(24, 9, seed=3)), rtol=1e-5, atol=1e-7)
