"""The largest batch (2N rows) each InfoNCE implementation runs forward+backward at on one device.

    python benchmarks/info_nce_max_rows.py --device cuda --dtype bf16 --dim 128 \
        --impls fused naive lightly --out max_rows.json

For each implementation: double 2N from --start until it runs out of device memory (or one step
takes longer than --time-limit seconds, or --max-rows is reached), then bisect between the last
size that ran and the first that did not, down to --resolution (a fraction of 2N). Prints a table
and writes JSON (atomically: a crash loses nothing already written). The fused op's memory is
O(rows x D), so it is usually limited by time (its cost is O((2N)^2 D)), not memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_loss(impl: str, tau: float):
    if impl == "fused":
        from sparkct.ops import info_nce

        return lambda a, b: info_nce(a, b, tau)
    if impl == "naive":
        from sparkct.ops import reference

        return lambda a, b: reference.info_nce(a, b, tau)
    if impl == "lightly":
        from lightly.loss import NTXentLoss

        return NTXentLoss(tau)
    raise SystemExit(f"unknown implementation {impl!r} (fused, naive, lightly)")


def try_once(loss_fn, n2: int, dim: int, dtype, device) -> dict:
    """One forward+backward at 2N = n2: {'ok': bool, 'seconds', 'peak_mib'} or the failure."""
    n = n2 // 2
    z0 = z1 = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        z0 = torch.randn(n, dim, device=device, dtype=dtype, requires_grad=True)
        z1 = torch.randn(n, dim, device=device, dtype=dtype, requires_grad=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = loss_fn(z0, z1)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        out = {"ok": bool(torch.isfinite(loss).item()), "seconds": round(secs, 4)}
        if device.type == "cuda":
            out["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        if not out["ok"]:
            out["error"] = "non-finite loss"
        return out
    except torch.OutOfMemoryError:
        return {"ok": False, "error": "out of memory"}
    except RuntimeError as e:  # e.g. CPU allocation failures, int32 index limits in a library
        return {"ok": False, "error": str(e).splitlines()[0][:200]}
    finally:
        del z0, z1
        if device.type == "cuda":
            torch.cuda.empty_cache()


def search(impl: str, args, device, dtype) -> dict:
    loss_fn = make_loss(impl, args.tau)
    steps, good, bad, why = [], None, None, "max-rows reached"
    n2 = args.start
    while n2 <= args.max_rows:
        r = try_once(loss_fn, n2, args.dim, dtype, device)
        steps.append({"n2": n2, **r})
        print(f"  {impl:8s} 2N={n2:>9d}: {r}", flush=True)
        if not r["ok"]:
            bad, why = n2, r["error"]
            break
        good = n2
        if r["seconds"] > args.time_limit:
            why = f"time limit ({r['seconds']:.1f} s > {args.time_limit} s)"
            break
        n2 *= 2
    if good is not None and bad is not None:  # bisect in multiples of 2 rows
        lo, hi = good, bad
        while hi - lo > max(2, int(lo * args.resolution)):
            mid = (lo + hi) // 4 * 2
            r = try_once(loss_fn, mid, args.dim, dtype, device)
            steps.append({"n2": mid, **r})
            print(f"  {impl:8s} 2N={mid:>9d}: {r}", flush=True)
            if r["ok"] and r["seconds"] <= args.time_limit:
                lo = mid
            else:
                hi = mid
        good = lo
    return {"impl": impl, "largest_2N": good, "stopped_by": why, "steps": steps}


def write_json_atomic(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".max_rows.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--impls", nargs="+", default=["fused", "naive", "lightly"])
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--max-rows", type=int, default=1 << 22)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per step before stopping")
    p.add_argument("--resolution", type=float, default=0.05, help="bisection stops at this fraction of 2N")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.start < 2 or args.start % 2:
        p.error("--start must be an even number >= 2")
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "dim": args.dim,
        "results": [],
    }
    for impl in args.impls:
        info["results"].append(search(impl, args, device, dtype))
        if args.out:
            write_json_atomic(args.out, info)
    print(f"\nlargest 2N, forward+backward, {info['device']}, {args.dtype}, D={args.dim}:")
    for r in info["results"]:
        print(f"  {r['impl']:8s} {r['largest_2N']!s:>9s}  (stopped by: {r['stopped_by']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
