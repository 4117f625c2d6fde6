#!/usr/bin/env python
"""Run every sparkct kernel a few times (forward and backward) at one size: the program to put under
Nsight Compute, Nsight Systems or compute-sanitizer (recipes: docs/profiling.md).

    python scripts/run_kernels.py --device cuda                        # every op, the large sizes
    ncu -k regex:fwd_fast_kernel -c 2 --set full -o nce python scripts/run_kernels.py --device cuda --ops info_nce
    compute-sanitizer --tool memcheck python scripts/run_kernels.py --device cuda --size small

Each iteration of each op is an NVTX range (``run/<op>#<i>``) when SPARKCT_NVTX=1, and sparkct's own op
ranges (``sparkct.halo``, ...) sit inside it. The first iteration is a warm-up (kernels load, cuBLAS
initializes); skip it with ``ncu --launch-skip`` or NVTX filters. Sizes: "large" = what a GPU training
step runs (SimCLR 2N = 8192 x 128, a MoCo bank of 65,536 keys, SparK ResNet-50 stage 1 at batch 64);
"small" = seconds on a CPU or under compute-sanitizer.
"""

from __future__ import annotations

import argparse
import sys
import time

SIZES = {
    # info_nce: N pairs x D, bank K; sparse: batch, channels, grid (cells per side), cell size c, mask ratio;
    # prototype_ce: (student crops S, teacher crops T, images B, D, prototypes K)
    "small": dict(n=96, d=64, k=512, batch=2, channels=16, grid=4, cell=8, ratio=0.6, proto=(4, 2, 8, 64, 700)),
    "large": dict(
        n=4096, d=128, k=65536, batch=64, channels=256, grid=7, cell=8, ratio=0.6, proto=(10, 2, 1024, 256, 65536)
    ),
}
OPS = ("info_nce", "info_nce_bank", "cell_layout", "pack", "unpack", "halo", "im2col", "prototype_ce")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: " + ", ".join(OPS))
    p.add_argument("--size", choices=sorted(SIZES), default="large")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--iters", type=int, default=3, help="iterations per op (the first is a warm-up)")
    p.add_argument(
        "--impl",
        choices=("fast", "simple"),
        default="fast",
        help="the fast kernels, or the simple ones (the GPU tests' oracle)",
    )
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = sorted(set(ops) - set(OPS))
    if bad:
        p.error(f"unknown op(s) {', '.join(bad)}; choose from {', '.join(OPS)}")
    if args.iters < 1:
        p.error("--iters must be >= 1")

    import torch  # noqa: PLC0415 (lazy: argument errors come before torch loads)

    from sparkct import profiling  # noqa: PLC0415 (lazy: argument errors come before torch loads)
    from sparkct.device import resolve_device  # noqa: PLC0415 (lazy: argument errors come before torch loads)
    from sparkct.models.masking import cell_mask  # noqa: PLC0415 (lazy: argument errors come before torch loads)
    from sparkct.ops import info_nce, prototype_cross_entropy  # noqa: PLC0415 (lazy: see above)
    from sparkct.ops import sparse as S  # noqa: PLC0415 (lazy: argument errors come before torch loads)

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    sz = SIZES[args.size]
    gen = torch.Generator().manual_seed(0)
    prev_simple = S.simple_kernels(args.impl == "simple")

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    n, d, k = sz["n"], sz["d"], sz["k"]
    b, ch, g, c = sz["batch"], sz["channels"], sz["grid"], sz["cell"]
    mask = cell_mask(b, g, sz["ratio"], generator=gen, device=device)
    layout = S.cell_layout(mask)
    dense = torch.randn(b, ch, g * c, g * c, generator=gen).to(device=device, dtype=dtype)
    dense = dense.contiguous(memory_format=torch.channels_last).requires_grad_()
    tiles = S.pack(dense.detach(), layout).requires_grad_()
    small = S.pack(torch.nn.functional.avg_pool2d(dense.detach(), c // 2), layout).requires_grad_()  # c = 2
    z0, z1, bank = randn(n, d), randn(n, d), randn(k, d).detach()
    ps, pt, pb, pd, pk = sz["proto"]
    proto = [randn(ps, pb, pd), randn(pt, pb, pd).detach(), randn(pk, pd), randn(pk, pd).detach()]
    with torch.no_grad():
        for t in proto:
            t.copy_(torch.nn.functional.normalize(t, dim=-1))

    def run(op: str):
        if op == "info_nce":
            info_nce(z0, z1, 0.2, impl=args.impl).backward()
        elif op == "info_nce_bank":
            info_nce(z0, z1, 0.2, bank=bank, impl=args.impl).backward()
        elif op == "cell_layout":
            S.cell_layout(mask)
        elif op == "pack":
            S.pack(dense, layout).sum().backward()
        elif op == "unpack":
            S.unpack(tiles, layout).sum().backward()
        elif op == "halo":
            S.halo(tiles, layout, 1).sum().backward()
        elif op == "im2col":
            S.im2col(small, layout, 3, 1, 1).sum().backward()
        elif op == "prototype_ce":
            prototype_cross_entropy(*proto, None, 0.1, 0.04, impl=args.impl).backward()

    try:
        for op in ops:
            t0 = time.perf_counter()
            for i in range(args.iters):
                with profiling.range(f"run/{op}#{i}"):
                    run(op)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(
                f"{op:14s} {args.iters} x in {time.perf_counter() - t0:.3f} s ({args.size}, {args.dtype}, "
                f"{args.impl}, {device})"
            )
    finally:
        S.simple_kernels(prev_simple)
    return 0


if __name__ == "__main__":
    sys.exit(main())
