"""sparkct.nn.InfoNCELoss as a drop-in for lightly's NTXentLoss: values, gradients and the
memory bank (init, FIFO update) step by step, and gather_distributed across 2 CPU processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from sparkct.nn import InfoNCELoss
from sparkct.ops import reference as ref

lightly_loss = pytest.importorskip("lightly.loss")
NTXentLoss = lightly_loss.NTXentLoss


def step(loss_fn, a, b, *, grad=True):
    a = a.detach().clone().requires_grad_(grad)
    b = b.detach().clone().requires_grad_(grad)
    loss = loss_fn(a, b)
    if not grad:
        return loss.detach(), None, None
    loss.backward()
    return loss.detach(), a.grad, b.grad


def assert_same_step(ours, theirs, atol=1e-5):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=atol)
    for g, w in zip(ours[1:], theirs[1:]):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.07, 0.5])
@pytest.mark.parametrize("n,d", [(1, 16), (8, 32), (100, 128), (3, 2048)])
def test_matches_ntxent_without_bank(device, n, d, tau):
    gen = torch.Generator().manual_seed(n * d)
    a, b = (torch.randn(n, d, generator=gen).to(device) for _ in range(2))
    assert_same_step(step(InfoNCELoss(tau), a, b), step(NTXentLoss(tau), a, b))


@pytest.mark.parametrize("bank_size", [(50, 16), (64, 16), 50])
def test_bank_matches_lightly_over_steps(bank_size):
    """Same seed -> same random bank; then per step the same loss and gradients (against the bank
    before the step) and the same FIFO update: 50 = 3 x 15 + 5, so the 4th batch fills the last
    5 slots, drops its other 10 rows and wraps the pointer; 64 is filled exactly by ... + 4;
    a bare int (accepted by us, drawn at the first forward) matches lightly's (50, 16)."""
    k = bank_size if isinstance(bank_size, int) else bank_size[0]
    torch.manual_seed(5)
    theirs = NTXentLoss(0.1, memory_bank_size=(k, 16))
    torch.manual_seed(5)
    ours = InfoNCELoss(0.1, memory_bank_size=bank_size)
    gen = torch.Generator().manual_seed(11)
    for i in range(9):
        a, b = (torch.randn(15, 16, generator=gen) for _ in range(2))
        assert_same_step(step(ours, a, b), step(theirs, a, b))
        torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, rtol=0, atol=1e-7)
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr), i
    # a step without gradients (evaluation) leaves the bank alone, as in lightly
    before = ours.bank.clone()
    a, b = (torch.randn(15, 16, generator=gen) for _ in range(2))
    assert_same_step(step(ours, a, b, grad=False), step(theirs, a, b, grad=False))
    assert torch.equal(ours.bank, before)


def test_bank_rows_are_the_negatives():
    """The MoCo form: against the reference with the bank as it was before the call."""
    torch.manual_seed(0)
    loss_fn = InfoNCELoss(0.2, memory_bank_size=(40, 8))
    bank = loss_fn.bank.clone()
    a, b = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8)
    torch.testing.assert_close(loss_fn(a, b), ref.info_nce(a, b, 0.2, bank), rtol=1e-6, atol=1e-6)
    assert not torch.equal(loss_fn.bank, bank)  # out0 requires grad: out1 was enqueued
    torch.testing.assert_close(loss_fn.bank[:6], torch.nn.functional.normalize(b, dim=1))


def test_bank_buffers_follow_the_module_and_stay_out_of_state_dict():
    loss_fn = InfoNCELoss(memory_bank_size=(32, 8))
    assert loss_fn.state_dict() == {}  # non-persistent, as lightly's
    loss_fn = loss_fn.to(torch.float64)
    a, b = torch.randn(4, 8, dtype=torch.float64, requires_grad=True), torch.randn(4, 8, dtype=torch.float64)
    assert loss_fn(a, b).dtype == torch.float64
    assert "memory_bank_size=(32, 8)" in repr(loss_fn)


def test_bf16_bank_mode_against_fp32():
    torch.manual_seed(3)
    loss_fn = InfoNCELoss(0.2, memory_bank_size=(64, 32))
    bank = loss_fn.bank.clone()
    a, b = torch.randn(10, 32), torch.randn(10, 32)
    got = loss_fn(a.bfloat16(), b.bfloat16())
    want = ref.info_nce(a.bfloat16().float(), b.bfloat16().float(), 0.2, bank.bfloat16().float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=0)


def test_mixed_precision_views_are_promoted():
    a, b = torch.randn(6, 16), torch.randn(6, 16)
    got = InfoNCELoss(0.3)(a, b.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, InfoNCELoss(0.3)(a, b.bfloat16().float()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": 1e-9}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"memory_bank_size": -1}, "memory_bank_size"),
        ({"memory_bank_size": (10, 8, 2)}, "memory_bank_size"),
        ({"memory_bank_size": (10, -8)}, "memory_bank_size"),
        ({"memory_bank_size": (10, 0)}, "memory_bank_size"),
        ({"memory_bank_size": True}, "memory_bank_size"),
        ({"memory_bank_size": 16.0}, r"illegal memory_bank_size 16.0 \(a float\)"),
        ({"memory_bank_size": (16.0, 8)}, "memory_bank_size"),
        ({"memory_bank_size": "16"}, "memory_bank_size"),
        ({"memory_bank_size": None}, "memory_bank_size"),
        ({"temperature": torch.tensor(0.5, requires_grad=True)}, "fixed temperature"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfoNCELoss(**kwargs)


def test_numpy_integer_bank_size():
    import numpy as np

    assert InfoNCELoss(memory_bank_size=(np.int64(16), np.int32(8))).bank.shape == (16, 8)


def test_bad_forward_names_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        InfoNCELoss()(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="bank must be 2-D"):
        InfoNCELoss(memory_bank_size=(16, 8))(torch.randn(4, 9), torch.randn(4, 9))
    with pytest.raises(ValueError, match="2-D"):
        InfoNCELoss(memory_bank_size=16)(torch.randn(4, 9, 1), torch.randn(4, 9, 1))


# ---- gather_distributed: 2 CPU processes (gloo) ---------------------------------------------------

WORLD, N, D_IN, D, TAU = 2, 6, 12, 16, 0.3


def _global_batch():
    gen = torch.Generator().manual_seed(42)
    x0, x1 = torch.randn(WORLD * N, D_IN, generator=gen), torch.randn(WORLD * N, D_IN, generator=gen)
    model = torch.nn.Linear(D_IN, D)
    with torch.no_grad():
        model.weight.copy_(torch.randn(D, D_IN, generator=gen))
        model.bias.copy_(torch.randn(D, generator=gen))
    return x0, x1, model


def _dist_worker(rank, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x0, x1, model = _global_batch()
        sl = slice(rank * N, (rank + 1) * N)
        res = {}
        # embeddings: ours and lightly's, same local shard
        with torch.no_grad():
            e0, e1 = model(x0[sl]), model(x1[sl])
        for name, fn in (
            ("ours", InfoNCELoss(TAU, gather_distributed=True)),
            ("lightly", NTXentLoss(TAU, gather_distributed=True)),
        ):
            a, b = e0.clone().requires_grad_(True), e1.clone().requires_grad_(True)
            loss = fn(a, b)
            loss.backward()
            res[name] = (loss.detach(), a.grad, b.grad)
        # a DDP model: parameter gradients averaged over ranks
        ddp = DDP(model)
        loss = InfoNCELoss(TAU, gather_distributed=True)(ddp(x0[sl]), ddp(x1[sl]))
        loss.backward()
        res["ddp"] = (loss.detach(), model.weight.grad.clone(), model.bias.grad.clone())
        # bank mode: every rank's keys are enqueued, as in lightly
        torch.manual_seed(1)
        ours = InfoNCELoss(TAU, memory_bank_size=(20, D), gather_distributed=True)
        torch.manual_seed(1)
        theirs = NTXentLoss(TAU, memory_bank_size=(20, D), gather_distributed=True)
        bank_steps = []
        for i in range(3):
            a0, a1 = e0 + i, e1 - i
            la = ours(a0.clone().requires_grad_(True), a1)
            lb = theirs(a0.clone().requires_grad_(True), a1)
            bank_steps.append((la.detach(), lb.detach(), ours.bank.clone(), theirs.memory_bank.bank.clone()))
        res["bank"] = bank_steps
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_gather_distributed_two_processes(tmp_path):
    """Rank r holds rows [r N, (r+1) N) of a global batch of WORLD * N pairs. Precisely:
    - each rank's loss is the mean over its own 2N anchors against all 2 WORLD N embeddings, so the
      mean of the ranks' losses equals the single-process loss on the global batch;
    - the gradient a rank gets for its embeddings is WORLD times the single-process gradient of
      those rows (the gather's backward sums every rank's loss gradient);
    - with DDP (which averages parameter gradients over ranks) the parameter gradients equal the
      single-process ones exactly;
    - all of it equals lightly's NTXentLoss(gather_distributed=True), bank mode included."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x0, x1, model = _global_batch()
    with torch.no_grad():
        E0, E1 = model(x0), model(x1)
    a, b = E0.clone().requires_grad_(True), E1.clone().requires_grad_(True)
    full = InfoNCELoss(TAU)(a, b)
    full.backward()
    torch.testing.assert_close(full, NTXentLoss(TAU)(E0, E1), rtol=1e-5, atol=1e-6)

    losses = torch.stack([r["ours"][0] for r in res])
    torch.testing.assert_close(losses.mean(), full.detach(), rtol=1e-5, atol=1e-6)
    for rank, r in enumerate(res):
        sl = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(r["ours"][1], WORLD * a.grad[sl], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["ours"][2], WORLD * b.grad[sl], rtol=1e-5, atol=1e-7)
        for mine, theirs in zip(r["ours"], r["lightly"]):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)

    m = model
    m.zero_grad()
    InfoNCELoss(TAU)(m(x0), m(x1)).backward()
    for r in res:
        torch.testing.assert_close(r["ddp"][1], m.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["ddp"][2], m.bias.grad, rtol=1e-5, atol=1e-6)

    for r in res:
        for la, lb, bank_a, bank_b in r["bank"]:
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bank_a, bank_b, rtol=0, atol=1e-7)
    torch.testing.assert_close(res[0]["bank"][-1][2], res[1]["bank"][-1][2], rtol=0, atol=0)


UNEVEN = (3, 5)  # rows per rank: the last batch of an epoch rarely splits evenly


def _uneven_worker(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        gen = torch.Generator().manual_seed(7)
        E0, E1 = torch.randn(sum(UNEVEN), D, generator=gen), torch.randn(sum(UNEVEN), D, generator=gen)
        lo = sum(UNEVEN[:rank])
        sl = slice(lo, lo + UNEVEN[rank])
        a, b = E0[sl].clone().requires_grad_(True), E1[sl].clone().requires_grad_(True)
        loss = InfoNCELoss(TAU, gather_distributed=True)(a, b)
        loss.backward()
        # bank mode: every rank's keys, whatever their count, enqueued in rank order
        bank = InfoNCELoss(TAU, memory_bank_size=(20, D), gather_distributed=True)
        bank(a.detach().clone().requires_grad_(True), b.detach())
        torch.save(
            {"loss": loss.detach(), "g0": a.grad, "g1": b.grad, "bank": bank.bank.clone(), "ptr": int(bank.bank_ptr)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_gather_distributed_uneven_batches(tmp_path):
    """Ranks with 3 and 5 pairs: each rank's loss is the mean over its own anchors against all 16
    embeddings, and its embedding gradients are those of the sum of both ranks' losses (the
    gather's backward sums them), computed here in one process with the reference."""
    import torch.multiprocessing as mp

    mp.spawn(_uneven_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    gen = torch.Generator().manual_seed(7)
    E0, E1 = torch.randn(sum(UNEVEN), D, generator=gen), torch.randn(sum(UNEVEN), D, generator=gen)
    a, b = E0.clone().requires_grad_(True), E1.clone().requires_grad_(True)
    bounds = [(sum(UNEVEN[:r]), sum(UNEVEN[: r + 1])) for r in range(WORLD)]
    cols = torch.cat([torch.cat([a[lo:hi], b[lo:hi]]) for lo, hi in bounds])  # rank order, [z0; z1] each
    losses = [ref.info_nce(a[lo:hi], b[lo:hi], TAU, cols=cols, col_offset=2 * lo) for lo, hi in bounds]
    torch.stack(losses).sum().backward()
    keys = torch.nn.functional.normalize(E1, dim=1)
    for r, (lo, hi) in enumerate(bounds):
        torch.testing.assert_close(res[r]["loss"], losses[r].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[r]["g0"], a.grad[lo:hi], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res[r]["g1"], b.grad[lo:hi], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res[r]["bank"][: sum(UNEVEN)], keys, rtol=0, atol=1e-7)
        assert res[r]["ptr"] == sum(UNEVEN)
