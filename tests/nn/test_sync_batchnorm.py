"""GlobalBatchNorm2d / GlobalBatchNorm1d over 2 gloo processes equal BatchNorm2d / BatchNorm1d on the
concatenated batch (float64: output, input and parameter gradients, running statistics), also inside the
SparseEncoder on packed visible cells and in a projection head converted by convert_sync_batchnorm."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    import copy

    import torch.distributed as dist
    import torchvision

    from sparkct.models.masking import cell_mask
    from sparkct.nn import SparseEncoder
    from sparkct.nn.sync_batchnorm import GlobalBatchNorm2d, convert_sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
        w = torch.randn(8, 3, 5, 5, dtype=torch.float64)
        bn = GlobalBatchNorm2d(3).double()
        ref = copy.deepcopy(torch.nn.BatchNorm2d(3).double())
        lo, hi = 4 * rank, 4 * rank + 4
        xl = x[lo:hi].clone().requires_grad_(True)
        yl = bn(xl)
        (yl * w[lo:hi]).sum().backward()
        for p in (bn.weight, bn.bias):
            dist.all_reduce(p.grad)  # what DDP does (then /world; here the losses are summed, not averaged)
        xr = x.clone().requires_grad_(True)
        y = ref(xr)
        (y * w).sum().backward()
        res = {"y": float((yl.detach() - y.detach()[lo:hi]).abs().max())}
        res["x_grad"] = float((xl.grad - xr.grad[lo:hi]).abs().max())
        res["w_grad"] = float((bn.weight.grad - ref.weight.grad).abs().max())
        res["b_grad"] = float((bn.bias.grad - ref.bias.grad).abs().max())
        res["running"] = float(
            max((bn.running_mean - ref.running_mean).abs().max(), (bn.running_var - ref.running_var).abs().max())
        )

        # the sparse encoder with synchronized BN on packed tiles vs one process on the whole batch
        torch.manual_seed(1)
        model = torchvision.models.resnet18().double()
        single = copy.deepcopy(model)
        enc = SparseEncoder.from_dense(convert_sync_batchnorm(model))
        enc1 = SparseEncoder.from_dense(single)
        xs = torch.randn(4, 3, 64, 64, dtype=torch.float64)
        mask = cell_mask(4, 2, 0.5, generator=torch.Generator().manual_seed(3))
        f_local = enc(xs[2 * rank : 2 * rank + 2], mask[2 * rank : 2 * rank + 2])
        f_all = enc1(xs, mask)
        res["enc"] = max(float((a - b[2 * rank : 2 * rank + 2]).abs().max()) for a, b in zip(f_local, f_all))
        res["enc_running"] = float((model.layer4[1].bn2.running_var - single.layer4[1].bn2.running_var).abs().max())

        # a projection head's BatchNorm1d on (N, C) rows, converted
        torch.manual_seed(2)
        head = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU()).double()
        head1 = copy.deepcopy(head)
        convert_sync_batchnorm(head)
        assert type(head[1]).__name__ == "GlobalBatchNorm1d"
        z = torch.randn(8, 6, dtype=torch.float64)
        wz = torch.randn(8, 5, dtype=torch.float64)
        (head(z[lo:hi]) * wz[lo:hi]).sum().backward()
        (head1(z) * wz).sum().backward()
        dist.all_reduce(head[0].weight.grad)
        res["head_grad"] = float((head[0].weight.grad - head1[0].weight.grad).abs().max())
        res["head_running"] = float((head[1].running_var - head1[1].running_var).abs().max())
        out[rank] = res
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_equals_batchnorm_on_the_global_batch():
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_worker, args=(_port(), out), nprocs=2)
        res = dict(out)
    for rank in (0, 1):
        for k, v in res[rank].items():
            assert v < 1e-10, (rank, k, v)
