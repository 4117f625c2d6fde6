"""SparK pretraining: one whole training step (forward, backward, LAMB step) and its split.

Groups:
  spark-split-<device>   the step of the sparse model cut into its parts, each forward+backward on its
                         own (time and peak memory): "encoder" (the masked backbone), "decoder" (densify +
                         light decoder), "loss" (per-cell normalized masked MSE), "optimizer" (LAMB, betas
                         0.9/0.95, via sparkct.train.optim); and the dense-masked model's encoder and
                         densify + decoder (its densify is SparK's gather/scatter BatchNorm).
  spark-step-<device>    the whole step: "published" (SparK's own way: dense-masked encoder, NCHW model
                         and input, its forward as written, fp32), "dense-masked" and "sparse" (sparkct's
                         model: channels-last, AMP where the device has it). The sparse row carries the
                         derived figures: images/s, speed-ups over dense-masked and published, the Amdahl
                         bound of a sparse encoder from the split, (encoder_dense_masked + rest) /
                         (encoder_sparse + rest) with rest = decoder + loss + optimizer of the sparse model,
                         the fraction of that bound reached (above 1 where the dense-masked model's own
                         densify costs more than the sparse one's), and the encoder's peak-memory ratio.

Sizes: CPU resnet50, batch 8, 224x224, mask 0.6, fp32 (targets: step speed-up >= 90 % of the bound,
>= 1.3x SparK's published way, encoder peak memory <= 0.6x the dense-masked encoder's). CUDA resnet50,
batch 128, bf16, channels-last (targets: >= 1.15x dense-masked, >= 2x published in fp32, >= 1500
images/s). Figures are read, not asserted; correctness (the three losses agree) is checked before timing.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparkct.models.backbone import build_backbone
from sparkct.models.masking import cell_mask
from sparkct.models.spark.model import SparK, SparKConfig, masked_cell_loss
from sparkct.models.spark.reference import spark_published_loss
from sparkct.train.optim import build_optimizer

import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file). No default
# entries: the default run keeps every case; none of the CPU cases is quick (resnet50 at 224 on CPU).
BENCH = {
    "suite": "train",
    "pairs": [  # sparkct's sparse model vs its dense-masked model and SparK's published way
        {
            "case": {"test": "test_step", "name": "sparse"},
            "base": {"name": "dense-masked"},
            "label": "dense-masked",
            "memory": True,
        },
        {
            "case": {"test": "test_step", "name": "sparse"},
            "base": {"name": "published"},
            "label": "published",
            "memory": True,
        },
        {
            "case": {"test": "test_split", "encoder": "sparse"},
            "base": {"encoder": "dense-masked"},
            "label": "dense-masked",
            "memory": True,
        },
    ],
    "quick": [("test_step", "*-cuda")],
}

CONFIGS = {
    "cpu": dict(arch="resnet50", batch=8, size=224, ratio=0.6, amp=None, rounds=2, warmup=0),
    "cuda": dict(arch="resnet50", batch=128, size=224, ratio=0.6, amp=torch.bfloat16, rounds=10, warmup=2),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# As the trainer's CPU loader does (SliceLoader(tune_malloc=True)): freed blocks are reused instead of
# returned to the OS, so a step's activations do not page-fault afresh every step (same for every variant).
from sparkct.data.datasets import tune_malloc  # noqa: E402

tune_malloc()
PARTS = ("encoder", "decoder", "loss", "optimizer")

_SPLIT: dict[str, dict[str, dict]] = {}  # device -> "<encoder>/<part>" -> extra_info
_STEP: dict[str, dict[str, dict]] = {}  # device -> variant -> extra_info
_CACHE: dict[str, tuple] = {}  # device -> (base model, batch, mask)
_PARTS: dict[tuple, dict] = {}  # (device, encoder) -> part -> fn
_REF: dict[str, float] = {}  # device -> SparK's published loss on the batch (the correctness check)


def setup(device: str):
    """The base model (built once per device), a batch in [0, 1] and its mask."""
    if device not in _CACHE:
        cfg = CONFIGS[device]
        torch.manual_seed(0)
        bb, _ = build_backbone(cfg["arch"], in_chans=3)
        base = SparK(bb, SparKConfig(mask_ratio=cfg["ratio"]))
        B, S = cfg["batch"], cfg["size"]
        x = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(1)).to(device)
        mask = cell_mask(B, S // 32, cfg["ratio"], generator=torch.Generator().manual_seed(2), device=device)
        _CACHE[device] = (base, x, mask)
    return _CACHE[device]


def variant(device: str, name: str):
    """(model, input, optimizer, autocast context factory) of one way of running the step."""
    base, x, _ = setup(device)
    cfg = CONFIGS[device]
    m = copy.deepcopy(base).to(device)
    m.config.encoder = "sparse" if name == "sparse" else "dense-masked"
    published = name == "published"
    if not published:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    m.train()
    opt = build_optimizer(m, "lamb", 1e-4, 0.04, betas=(0.9, 0.95), no_decay=m.no_weight_decay())
    amp = None if published else cfg["amp"]

    def autocast():
        return torch.autocast(device, dtype=amp) if amp is not None else torch.autocast(device, enabled=False)

    return m, x, opt, autocast


def step_fn(device: str, name: str):
    m, x, opt, autocast = variant(device, name)
    mask = setup(device)[2]

    def loss_of():
        if name == "published":
            return spark_published_loss(m, x, mask)
        return m.reconstruction_loss(x, mask)

    def fn():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_of()
        loss.backward()
        opt.step()
        return loss.detach()

    with torch.no_grad():  # correctness before timing: every variant computes the same loss
        with autocast():
            got = loss_of().item()
        ref = _REF.get(device)
        if ref is None:
            ref = _REF[device] = spark_published_loss(
                copy.deepcopy(setup(device)[0]).to(device), *setup(device)[1:]
            ).item()
    tol = 1e-4 if CONFIGS[device]["amp"] is None or name == "published" else 3e-2
    assert abs(got - ref) <= tol * abs(ref), (name, got, ref)
    return fn


def split_fns(device: str, encoder: str):
    """Each part of the step run on its own, fed the detached outputs (and random gradients of the right
    shapes) of the part before it."""
    m, x, opt, autocast = variant(device, encoder)
    mask = setup(device)[2]
    with autocast():
        feats, tables = m.encode(x, mask)
        gfeats = [torch.randn_like(f) for f in feats]
        fd = [f.detach().requires_grad_() for f in feats]
        rec = m.decoder(m.densify(fd, tables))
    grec = torch.randn_like(rec)
    rd = rec.detach().requires_grad_()
    del feats, rec
    for p in m.parameters():  # the parts below accumulate into these; the optimizer part steps on them
        p.grad = torch.zeros_like(p)

    def enc():
        with autocast():
            f, _ = m.encode(x, mask)
        torch.autograd.backward(f, gfeats)

    def dec():
        with autocast():
            r = m.decoder(m.densify(fd, tables))
        r.backward(grec)

    def loss():
        with autocast():
            v = masked_cell_loss(rd, x, mask)
        v.backward()

    def optim():
        opt.step()

    return {"encoder": enc, "decoder": dec, "loss": loss, "optimizer": optim}


def _info(device: str, **kw) -> dict:
    cfg = CONFIGS[device]
    return dict(
        arch=cfg["arch"],
        batch=cfg["batch"],
        size=cfg["size"],
        mask_ratio=cfg["ratio"],
        dtype="bf16" if cfg["amp"] is not None else "fp32",
        **kw,
    )


# the dense-masked model's loss and optimizer are the sparse model's work: its encoder and its densify (SparK's
# gather/scatter BatchNorm, torch.where) + decoder are timed
SPLITS = [("dense-masked", "encoder"), ("dense-masked", "decoder")] + [("sparse", p) for p in PARTS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoder,part", SPLITS)
def test_split(benchmark, device, encoder, part):
    cfg = CONFIGS[device]
    key = (device, encoder)
    fns = _PARTS.get(key)
    if fns is None:
        fns = _PARTS[key] = split_fns(device, encoder)
    benchmark.group = f"spark-split-{device}"
    extra = benchkit.run(
        benchmark,
        fns[part],
        device,
        rounds=cfg["rounds"],
        warmup=cfg["warmup"],
        **_info(device, encoder=encoder, part=part, channels_last=True),
    )
    _SPLIT.setdefault(device, {})[f"{encoder}/{part}"] = extra
    if (encoder, part) == [sp for sp in SPLITS if sp[0] == encoder][-1]:
        del _PARTS[key]  # free this model before the next one is built


def _derive(device: str, extra: dict) -> None:
    cfg = CONFIGS[device]
    extra["images_per_s"] = round(cfg["batch"] / extra["median_s"], 2)
    steps = _STEP.get(device, {})
    for base in ("dense-masked", "published"):
        if base in steps:
            extra[f"speedup_vs_{base}"] = round(steps[base]["median_s"] / extra["median_s"], 3)
            if steps[base]["peak_bytes"] > 0:
                extra[f"peak_ratio_vs_{base}"] = round(extra["peak_bytes"] / steps[base]["peak_bytes"], 3)
    split = _SPLIT.get(device, {})
    if all(f"{e}/{p}" in split for e, p in SPLITS):
        t = {k: v["median_s"] for k, v in split.items()}
        rest = sum(t[f"sparse/{p}"] for p in PARTS[1:])
        bound = (t["dense-masked/encoder"] + rest) / (t["sparse/encoder"] + rest)
        extra["split_sparse_s"] = {p: round(t[f"sparse/{p}"], 4) for p in PARTS}
        extra["split_dense_masked_s"] = {p: round(t[f"dense-masked/{p}"], 4) for p in ("encoder", "decoder")}
        extra["encoder_share_of_step"] = round(t["sparse/encoder"] / (t["sparse/encoder"] + rest), 3)
        extra["amdahl_bound"] = round(bound, 3)
        if "speedup_vs_dense-masked" in extra:
            extra["fraction_of_bound"] = round(extra["speedup_vs_dense-masked"] / bound, 3)
        pe, pd = split["sparse/encoder"]["peak_bytes"], split["dense-masked/encoder"]["peak_bytes"]
        if pd > 0:
            extra["encoder_peak_ratio"] = round(pe / pd, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["published", "dense-masked", "sparse"])  # sparse last: it derives the ratios
def test_step(benchmark, device, name):
    cfg = CONFIGS[device]
    fn = step_fn(device, name)
    benchmark.group = f"spark-step-{device}"
    extra = benchkit.run(
        benchmark,
        fn,
        device,
        rounds=cfg["rounds"],
        warmup=cfg["warmup"],
        **_info(
            device,
            variant=name,
            channels_last=name != "published",
            amp=str(cfg["amp"]).replace("torch.", "") if name != "published" else "none",
        ),
    )
    _STEP.setdefault(device, {})[name] = extra
    if name == "sparse":
        _derive(device, extra)
        benchmark.extra_info.update(extra)
        benchkit.DERIVED[-1].update(extra)
