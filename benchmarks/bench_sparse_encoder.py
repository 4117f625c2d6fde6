"""Sparse masked convolution (SparK): the packed-tile encoder against SparK's dense-masked encoder,
plain dense, and spconv.

Groups (one per configuration, implementations side by side):
  encoder-<arch>-<device>-r<ratio>   forward+backward of the whole encoder (features of every stage,
                                     summed into a loss): "dense" (plain torchvision, no mask: the
                                     compute the ideal is measured against), "spark" (SparK's way:
                                     dense layers, then mask; BN over visible rows), "sparse"
                                     (sparkct packed tiles). The sparse row carries the derived figures:
                                     speed-up and peak-memory ratio vs spark and vs dense, the ideal
                                     speed-up 1/visible-fraction, and the fraction of it reached.
  conv3x3-<device>-C<ch>-c<cell>     one 3x3 conv (fwd+bwd) at each ResNet scale, mask ratio 0.6:
                                     dense, sparkct sparse, spconv's submanifold conv on the visible pixels
                                     (sparkct/_peers.py).
  layers-<arch>-<device>             only with SPARKCT_BENCH_LAYERS=1: every stage of the encoder
                                     (stem, max-pool, each residual block) timed on its own, sparse vs
                                     spark, to see which layers eat the time. Also printable with
                                     `python benchmarks/bench_sparse_encoder.py --layers`.

Every encoder and conv3x3 case records `flops` (the algorithm's: dense and spark the whole map,
sparse the visible cells; `encoder_flops`, `conv3x3_work`), conv3x3 also `bytes_moved` (compulsory
traffic), so a roofline can place them (sparkct.perf.roofline); the encoder has no byte count (a
whole network's traffic depends on what stays in cache), only a fraction of the compute peak.

Targets (checked by reading the figures, not asserted): CPU resnet18 batch 16 224x224 fp32 mask 0.6:
sparse >= 1.8x faster than spark, peak memory <= 0.6x. CUDA resnet50 batch 128 224x224 bf16
channels-last mask 0.6: >= 1.8x faster than spark (ideal 2.5x), peak memory <= 0.6x, >= 3x faster
than spconv.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch

from sparkct.models.masking import cell_mask
from sparkct.models.spark import reference as SR
from sparkct.nn import SparseEncoder
from sparkct.ops import sparse as S

import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file)
BENCH = {
    "suite": "kernels",
    "pairs": [
        # packed-tile sparse encoder vs SparK's dense-masked encoder and the plain dense one
        {
            "case": {"test": "test_encoder", "impl": "sparse"},
            "base": {"impl": "spark"},
            "label": "spark",
            "memory": True,
        },
        {
            "case": {"test": "test_encoder", "impl": "sparse"},
            "base": {"impl": "dense"},
            "label": "dense",
            "memory": True,
        },
        # one sparse 3x3 conv vs dense-then-mask and spconv's submanifold conv
        {
            "case": {"test": "test_conv3x3", "impl": "sparse"},
            "base": {"impl": "dense"},
            "label": "dense",
            "memory": True,
        },
        {"case": {"test": "test_conv3x3", "impl": "sparse"}, "base": {"impl": "spconv"}, "label": "spconv"},
    ],
    "default": [
        ("test_encoder", "*-0.6-cpu"),  # dense, spark, sparse
        ("test_conv3x3", "*-64-8-fwd-cpu"),  # halo tiles, with spconv
        ("test_conv3x3", "*-512-1-fwdbwd-cpu"),  # gather-GEMM cells
    ],
    "quick": [
        ("test_conv3x3", "*-64-8-fwd-cpu"),  # dense, sparse, spconv
        ("test_encoder", "*-0.6-cuda"),
        ("test_conv3x3", "*-64-8-fw*-cuda"),
    ],
}

CONFIGS = {
    "cpu": dict(arch="resnet18", batch=16, size=224, dtype=torch.float32, channels_last=False),
    "cuda": dict(arch="resnet50", batch=128, size=224, dtype=torch.bfloat16, channels_last=True),
}
RATIOS = [0.4, 0.6, 0.75, 0.9]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
ROUNDS = {"cpu": 5, "cuda": 20}

_MEDIANS: dict[str, dict[str, dict]] = {}  # group -> impl -> extra_info, for the derived ratios


def make_mask(batch: int, grid: int, ratio: float, device, seed: int = 0) -> torch.Tensor:
    """SparK's masking: the same number of visible cells in every sample, at random places."""
    return cell_mask(batch, grid, ratio, generator=torch.Generator().manual_seed(seed), device=device)


def build(device: str, cfg: dict, seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = getattr(torchvision.models, cfg["arch"])().to(device=device, dtype=cfg["dtype"], memory_format=fmt)
    model.train()
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device, dtype=cfg["dtype"])
    return model, x.contiguous(memory_format=fmt)


def dense_features(model, x):
    m = model
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    feats = []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        h = layer(h)
        feats.append(h)
    return feats


def step(impl: str, model, x, mask, enc=None):
    """One forward+backward of the encoder; the loss sums every stage's features."""

    def fn():
        model.zero_grad(set_to_none=True)
        if impl == "dense":
            feats = dense_features(model, x)
        elif impl == "spark":
            feats = SR.spark_dense_masked_features(model, x, mask)
        else:
            feats = enc(x, mask, packed=True)
        loss = sum(f.float().sum() for f in feats)
        loss.backward()
        return loss.detach()

    return fn


_DENSE_FLOPS: dict[tuple, int] = {}


def dense_encoder_flops(arch: str, batch: int, size: int) -> int:
    """FLOPs of one forward+backward of the dense encoder (convolutions, as torch's FlopCounterMode
    counts them: 2 per multiply-add; BatchNorm, ReLU and adds are not counted), on meta tensors."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    key = (arch, batch, size)
    if key not in _DENSE_FLOPS:
        with torch.device("meta"):
            model = getattr(torchvision.models, arch)().train()
            x = torch.empty(batch, 3, size, size)
        with FlopCounterMode(display=False) as fc:
            sum(f.float().sum() for f in dense_features(model, x)).backward()
        _DENSE_FLOPS[key] = int(fc.get_total_flops())
    return _DENSE_FLOPS[key]


def encoder_flops(impl: str, arch: str, batch: int, size: int, visible: float) -> int:
    """The FLOPs each implementation's algorithm performs: dense and SparK's dense-masked way run every
    convolution on the whole map; the sparse encoder runs each on the visible cells only (every conv
    output of a visible cell, none of a masked one), so visible fraction x the dense count exactly."""
    dense = dense_encoder_flops(arch, batch, size)
    return int(round(dense * visible)) if impl == "sparse" else dense


def _derive(group: str, impl: str, extra: dict, visible: float) -> None:
    runs = _MEDIANS.setdefault(group, {})
    runs[impl] = extra
    if impl != "sparse":
        return
    ideal = 1.0 / visible
    extra["ideal_speedup"] = round(ideal, 3)
    for base in ("spark", "dense"):
        if base in runs:
            sp = runs[base]["median_s"] / extra["median_s"]
            extra[f"speedup_vs_{base}"] = round(sp, 3)
            extra[f"fraction_of_ideal_vs_{base}"] = round(sp / ideal, 3)
            if runs[base]["peak_bytes"] > 0:
                extra[f"peak_ratio_vs_{base}"] = round(extra["peak_bytes"] / runs[base]["peak_bytes"], 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("impl", ["dense", "spark", "sparse"])  # in this order: sparse derives its ratios
def test_encoder(benchmark, device, ratio, impl):
    cfg = CONFIGS[device]
    model, x = build(device, cfg)
    grid = cfg["size"] // 32
    mask = make_mask(cfg["batch"], grid, ratio, device)
    visible = mask.float().mean().item()
    enc = SparseEncoder.from_dense(model) if impl == "sparse" else None
    fn = step(impl, model, x, mask, enc)
    if impl == "sparse":  # correctness before timing: same loss as SparK's way on this batch
        ref = step("spark", copy.deepcopy(model), x, mask)()
        got = fn()
        tol = 1e-3 if cfg["dtype"] == torch.float32 else 5e-2
        assert abs(got.item() - ref.item()) <= tol * max(1.0, abs(ref.item())), (got.item(), ref.item())
    group = f"encoder-{cfg['arch']}-{device}-r{ratio}"
    benchmark.group = group
    extra = benchkit.run(
        benchmark,
        fn,
        device,
        rounds=ROUNDS[device],
        impl=impl,
        arch=cfg["arch"],
        batch=cfg["batch"],
        size=cfg["size"],
        dtype=str(cfg["dtype"]).replace("torch.", ""),
        channels_last=cfg["channels_last"],
        mask_ratio=ratio,
        visible_fraction=round(visible, 4),
        flops=encoder_flops(impl, cfg["arch"], cfg["batch"], cfg["size"], visible),
    )
    _derive(group, impl, extra, visible)
    benchmark.extra_info.update(extra)
    benchkit.DERIVED[-1].update(extra)  # the end-of-run table row was copied before the ratios existed


# ---- one 3x3 conv: sparkct vs dense vs spconv ------------------------------------------------

CONV_SHAPES = {
    "cpu": [(64, 8), (128, 4), (256, 2), (512, 1)],  # resnet18 3x3 convs: channels, cell
    "cuda": [(64, 8), (128, 4), (256, 2), (512, 1)],
}  # resnet50 3x3 convs (bottleneck width)


def conv3x3_work(pixels: int, ch: int, elt: int, backward: bool) -> dict:
    """flops and bytes_moved of a C -> C 3x3 conv computing `pixels` output pixels (dense: all of
    them; sparse and spconv: the visible ones, every tap counted, masked neighbours read as zeros).
    FLOPs: 2 * 9 C^2 per output pixel, x3 with the backward (input and weight gradients). Bytes, the
    compulsory traffic: forward reads x and w and writes y; backward reads dy, x, w, writes dx, dw."""
    act, w = pixels * ch * elt, 9 * ch * ch * elt
    flops = 2 * 9 * ch * ch * pixels
    if backward:
        return {"flops": 3 * flops, "bytes_moved": 5 * act + 3 * w}
    return {"flops": flops, "bytes_moved": 2 * act + w}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("ch,cell", [(64, 8), (128, 4), (256, 2), (512, 1)])
@pytest.mark.parametrize("impl", ["dense", "sparse", "spconv"])
def test_conv3x3(benchmark, device, mode, ch, cell, impl):
    cfg = CONFIGS[device]
    dtype = torch.float16 if device == "cuda" else torch.float32  # spconv has no bf16 kernels
    B, grid, ratio = cfg["batch"], 7, 0.6
    mask = make_mask(B, grid, ratio, device)
    layout = S.cell_layout(mask)
    H = grid * cell
    x = torch.randn(B, ch, H, H, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(ch, ch, 3, 3, device=device, dtype=dtype) * (2.0 / (9 * ch)) ** 0.5
    pix = mask.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    bwd = mode == "fwdbwd"
    pixels = B * H * H if impl == "dense" else int(pix.sum().item())
    info = dict(
        impl=impl,
        mode=mode,
        channels=ch,
        cell=cell,
        batch=B,
        mask_ratio=ratio,
        dtype=str(dtype).replace("torch.", ""),
        **conv3x3_work(pixels, ch, x.element_size(), bwd),
    )

    def finish(y):
        if bwd:
            y.backward(torch.ones_like(y))
        return y

    if impl == "dense":
        xd = x.requires_grad_(bwd)
        wd = w.clone().requires_grad_(bwd)

        def fn():
            return finish(torch.nn.functional.conv2d(xd, wd, None, 1, 1) * pix[:, None])
    elif impl == "sparse":
        xp = S.pack(x, layout).requires_grad_(bwd)
        ws = w.clone().requires_grad_(bwd)

        def fn():
            return finish(S.sparse_conv2d(xp, layout, ws, None, 1, 1))
    else:
        pytest.importorskip("spconv.pytorch")
        from sparkct._peers import SpconvSubMConv

        if device == "cpu" and bwd:
            pytest.skip("spconv 2.3.8's backward calls into CUDA even for CPU tensors")
        warnings.filterwarnings("ignore", category=UserWarning)
        idx = pix.nonzero().int()
        feats = x.permute(0, 2, 3, 1)[pix].contiguous().requires_grad_(bwd)
        peer = SpconvSubMConv(w, idx, (H, H), B)
        info["spconv_module"] = peer.kind
        if device == "cpu":
            info["spconv_threads"] = 1  # its CPU rule book is wrong with more (sparkct/_peers.py)
        # correctness before timing
        with torch.no_grad():
            ref = S.unpack(S.sparse_conv2d(S.pack(x, layout), layout, w, None, 1, 1), layout)
            ref = ref.permute(0, 2, 3, 1)[pix]
            out = peer(feats)
        ok = torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        if not ok:
            pytest.fail(f"spconv ({peer.kind}) disagrees with sparkct's sparse conv; not timing it")

        def fn():
            return finish(peer(feats))

    group = f"conv3x3-{device}-{mode}-C{ch}-c{cell}"
    benchmark.group = group
    if not bwd:
        with torch.no_grad():
            extra = benchkit.run(benchmark, fn, device, rounds=ROUNDS[device], **info)
    else:
        extra = benchkit.run(benchmark, fn, device, rounds=ROUNDS[device], **info)
    runs = _MEDIANS.setdefault(group, {})
    runs[impl] = extra
    if impl == "spconv" and "sparse" in runs:
        extra["sparse_speedup_vs_spconv"] = round(extra["median_s"] / runs["sparse"]["median_s"], 3)
    if impl == "sparse" and "dense" in runs:
        extra["speedup_vs_dense"] = round(runs["dense"]["median_s"] / extra["median_s"], 3)
        extra["ideal_speedup"] = round(1.0 / mask.float().mean().item(), 3)
    benchmark.extra_info.update(extra)
    benchkit.DERIVED[-1].update(extra)


# ---- per-layer breakdown ---------------------------------------------------------------------


def _stages(model):
    """(name, module) of every stage the encoder runs: stem, max-pool, each residual block."""
    out = [("stem", torch.nn.Sequential(model.conv1, model.bn1, model.relu)), ("maxpool", model.maxpool)]
    for n in ("layer1", "layer2", "layer3", "layer4"):
        out += [(f"{n}.{i}", blk) for i, blk in enumerate(getattr(model, n))]
    return out


def layer_breakdown(device: str = "cpu", ratio: float = 0.6, rounds: int = 5, cfg: dict | None = None):
    """Time every stage on its own (forward+backward, its actual input), sparse vs spark.
    Returns rows (stage, spark_s, sparse_s, speedup)."""
    import time

    cfg = cfg or CONFIGS[device]
    model, x = build(device, cfg)
    mask = make_mask(cfg["batch"], cfg["size"] // 32, ratio, device)
    layout = S.cell_layout(mask)
    enc = SparseEncoder.from_dense(model)
    masker = SR.SparKMasker(mask)
    stages = _stages(model)
    # inputs of every stage, both ways, from one forward
    with torch.no_grad():
        sp_in, dn_in = [], []
        hs = S.pack(x, layout, channels_last=True)
        hd = x * masker.active_ex(x.shape[2], x.shape[3])
        for name, mod in stages:
            sp_in.append(hs)
            dn_in.append(hd)
            if name == "stem":
                hs = enc.relu(enc.bn1(enc._conv(model.conv1, hs, layout)))
                hd = model.relu(SR._spark_module(model.bn1, SR._spark_module(model.conv1, hd, masker), masker))
            else:
                hs = enc._run(mod, hs, layout)
                hd = SR._spark_module(mod, hd, masker)

    def timed(f):
        for _ in range(2):
            f()
        ts = []
        for _ in range(rounds):
            benchkit.sync(device)
            t0 = time.perf_counter()
            f()
            benchkit.sync(device)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    rows = []
    for (name, mod), a, b in zip(stages, sp_in, dn_in):

        def sparse_fn(a=a, name=name, mod=mod):
            a = a.detach().requires_grad_(True)
            if name == "stem":
                y = enc.relu(enc.bn1(enc._conv(model.conv1, a, layout)))
            else:
                y = enc._run(mod, a, layout)
            y.float().sum().backward()

        def spark_fn(b=b, name=name, mod=mod):
            b = b.detach().requires_grad_(True)
            if name == "stem":
                y = model.relu(SR._spark_module(model.bn1, SR._spark_module(model.conv1, b, masker), masker))
            else:
                y = SR._spark_module(mod, b, masker)
            y.float().sum().backward()

        t_sp, t_dn = timed(sparse_fn), timed(spark_fn)
        rows.append((name, t_dn, t_sp, t_dn / t_sp))
    return rows


@pytest.mark.skipif(os.environ.get("SPARKCT_BENCH_LAYERS", "") != "1", reason="set SPARKCT_BENCH_LAYERS=1")
@pytest.mark.parametrize("device", DEVICES)
def test_layer_breakdown(benchmark, device):
    rows = layer_breakdown(device)
    cfg = CONFIGS[device]
    benchmark.group = f"layers-{cfg['arch']}-{device}"
    info = {f"{name}_speedup": round(sp, 3) for name, _, _, sp in rows}
    info.update({f"{name}_sparse_ms": round(t * 1e3, 2) for name, _, t, _ in rows})
    info.update({f"{name}_spark_ms": round(t * 1e3, 2) for name, t, _, _ in rows})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    benchkit.DERIVED.append({"name": benchmark.name, "group": benchmark.group, **info})


if __name__ == "__main__":  # python benchmarks/bench_sparse_encoder.py --layers [cpu|cuda] [ratio]
    if "--layers" in sys.argv:
        args = [a for a in sys.argv[1:] if a != "--layers"]
        dev = args[0] if args else "cpu"
        r = float(args[1]) if len(args) > 1 else 0.6
        rows = layer_breakdown(dev, r)
        total_dn, total_sp = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"{'stage':10s} {'spark ms':>9s} {'sparse ms':>9s} {'speed-up':>8s}  share of sparse time")
        for name, a, b, s in rows:
            print(f"{name:10s} {a * 1e3:9.1f} {b * 1e3:9.1f} {s:8.2f}  {b / total_sp:6.1%}")
        print(f"{'total':10s} {total_dn * 1e3:9.1f} {total_sp * 1e3:9.1f} {total_dn / total_sp:8.2f}")
