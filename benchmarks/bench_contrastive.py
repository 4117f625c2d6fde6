"""Contrastive and clustering methods (sparkct.models: SimCLR, MoCo v2, SwAV, BYOL): one training step
(forward + backward, no optimizer) per method, images/s and peak extra memory; the fused InfoNCE loss
vs the naive one (full logits, sparkct.ops.reference.info_nce) for SimCLR and MoCo; chunked (gradient
caching, ``--chunk``) vs unchunked.

Groups:
  method-<device>-<method>-...      per method: loss=fused|naive (SimCLR, MoCo), chunk=0|C
  simclr-chunk-cpu-...              the CPU target: SimCLR, resnet18, 96x96, global batch 1,024, chunks
                                    of 128 vs unchunked. Target (read from the table, not asserted):
                                    peak memory <= 0.25x the unchunked step's, time <= 1.4x.
  cuda (marked): SimCLR resnet50 224 bf16, global batch 16,384 chunked on one GPU beside the
                 unchunked step at the largest batch that fits; MoCo v2 with a 65,536 queue at batch
                 256 (target >= 2,000 images/s).
Derived: images_per_s (images = global batch; each has 2 views, SwAV 2 + 6 crops), mem_vs_unchunked,
time_vs_unchunked, speedup_vs_naive.

Images are synthetic windowed crops (uniform noise in [0, 1]: the step's cost does not depend on
the content). Every case checks its loss is finite before timing.
"""

from __future__ import annotations

import pytest
import torch

from sparkct.models import get_method
from sparkct.models.backbone import build_backbone
from sparkct.nn import InfoNCELoss
from sparkct.ops import reference as ref

import benchkit

# sparkct bench's declaration (sparkct/perf/registry.py; read without importing this file)
BENCH = {
    "suite": "train",
    "pairs": [  # fused vs naive loss, chunked (gradient caching) vs unchunked
        {
            "case": {"test": "test_method_step", "loss": "fused"},
            "base": {"loss": "naive"},
            "label": "naive",
            "memory": True,
        },
        {
            "case": {"test": "test_method_step", "loss": "fused"},
            "base": {"chunk": 0},
            "label": "unchunked",
            "memory": True,
        },
        {"case": {"test": "test_simclr_chunked_cpu"}, "base": {"chunk": 0}, "label": "unchunked", "memory": True},
    ],
    "default": [("test_method_step", "cpu-simclr-*")],  # naive, fused, chunked
    "quick": [
        ("test_method_step", "cpu-simclr-*-chunk0"),  # naive vs fused loss
        ("test_moco_queue_cuda", ""),
    ],
}

_RESULTS: dict[tuple, dict] = {}


class NaiveInfoNCE(InfoNCELoss):
    """InfoNCELoss's semantics through the naive reference (every logit materialized)."""

    def forward(self, out0, out1):
        if not self.uses_bank:
            return ref.info_nce(out0, out1, self.temperature)
        negatives = self.bank.detach().to(device=out0.device, dtype=out0.dtype, copy=True)
        loss = ref.info_nce(out0, out1, self.temperature, bank=negatives)
        if out0.requires_grad:
            self._enqueue(torch.nn.functional.normalize(out1.detach(), dim=1))
        return loss


def build(name, arch, device, *, chunk=0, loss="fused", **kw):
    torch.manual_seed(0)
    backbone, _ = build_backbone(arch, in_chans=1)
    cls = get_method(name)
    m = cls(backbone, cls.config_class(chunk=chunk, **kw)).to(device)
    if loss == "naive":
        old = m.criterion
        m.criterion = NaiveInfoNCE(old.temperature, memory_bank_size=tuple(old.bank.shape) if old.uses_bank else 0)
        if old.uses_bank:
            m.criterion.bank.copy_(old.bank)
        m.criterion.to(device)
    return m.train()


def views_for(m, batch, crop, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    if m.name == "swav":
        local = max(8, round(crop * 96 / 224))
        shapes = [crop] * m.config.n_global + [local] * m.config.n_local
    else:
        shapes = [crop, crop]
    return [torch.rand(batch, 1, s, s, generator=g).to(device) for s in shapes]


def step_fn(m, views, device, amp=None):
    def fn():
        m.zero_grad(set_to_none=True)
        ctx = torch.autocast(device, dtype=amp) if amp is not None else torch.autocast(device, enabled=False)
        with ctx:
            loss, _ = m.training_step(views, 0)
        if not m.manual_backward:
            loss.backward()
        return loss.detach()

    return fn


def _record(benchmark, key, extra, base_key=None, naive_key=None):
    _RESULTS[key] = extra
    derived = {"images_per_s": round(extra["batch"] / extra["median_s"], 2)}
    base = _RESULTS.get(base_key) if base_key else None
    if base is not None and base is not extra:
        derived["time_vs_unchunked"] = round(extra["median_s"] / base["median_s"], 3)
        if base["peak_bytes"] > 0:
            derived["mem_vs_unchunked"] = round(extra["peak_bytes"] / base["peak_bytes"], 4)
    naive = _RESULTS.get(naive_key) if naive_key else None
    if naive is not None and naive is not extra:
        derived["speedup_vs_naive"] = round(naive["median_s"] / extra["median_s"], 3)
        if naive["peak_bytes"] > 0:
            derived["mem_vs_naive"] = round(extra["peak_bytes"] / naive["peak_bytes"], 4)
    benchmark.extra_info.update(derived)
    benchkit.DERIVED[-1].update(derived)


def _run(benchmark, m, views, device, rounds, amp=None, **info):
    fn = step_fn(m, views, device, amp)
    loss = fn()
    assert torch.isfinite(loss), f"{m.name}: loss {loss}"
    return benchkit.run(benchmark, fn, device, rounds=rounds, warmup=0, batch=views[0].shape[0], **info)


# ---- per method, CPU-sized ---------------------------------------------------------------------------

_METHOD_KW = {
    "simclr": {},
    "moco": {"queue_size": 4096},
    "swav": {"prototypes": 500, "freeze_prototypes": 0},
    "byol": {},
}
_CPU = dict(arch="resnet18", batch=64, crop=64, chunk=16)


def _method_cases():
    out = []
    for name in ("simclr", "moco", "swav", "byol"):
        variants = [("fused", 0), ("fused", _CPU["chunk"])]
        if name in ("simclr", "moco"):
            variants.insert(0, ("naive", 0))
        for loss, chunk in variants:
            out.append(pytest.param("cpu", name, loss, chunk, id=f"cpu-{name}-{loss}-chunk{chunk}"))
    return out


@pytest.mark.parametrize("device,name,loss,chunk", _method_cases())
def test_method_step(benchmark, device, name, loss, chunk):
    a, b, crop = _CPU["arch"], _CPU["batch"], _CPU["crop"]
    benchmark.group = f"method-{device}-{name}-{a}-{crop}px-batch{b}"
    m = build(name, a, device, chunk=chunk, loss=loss if name in ("simclr", "moco") else "fused", **_METHOD_KW[name])
    views = views_for(m, b, crop, device)
    extra = _run(benchmark, m, views, device, rounds=3, method=name, loss=loss, chunk=chunk, arch=a, crop=crop)
    key = (device, name, loss, chunk)
    _record(benchmark, key, extra, base_key=(device, name, "fused", 0), naive_key=(device, name, "naive", 0))


# ---- the CPU target: SimCLR resnet18 96x96, global batch 1024, chunks of 128 --------------------------


@pytest.mark.parametrize("chunk", [0, 128], ids=["unchunked", "chunk128"])
def test_simclr_chunked_cpu(benchmark, chunk):
    benchmark.group = "simclr-chunk-cpu-resnet18-96px-batch1024"
    m = build("simclr", "resnet18", "cpu", chunk=chunk)
    views = views_for(m, 1024, 96, "cpu")
    extra = _run(benchmark, m, views, "cpu", rounds=1, method="simclr", chunk=chunk, arch="resnet18", crop=96)
    _record(benchmark, ("cpu-1024", chunk), extra, base_key=("cpu-1024", 0))


# ---- CUDA --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["unchunked-largest", "chunked-16384"])
def test_simclr_resnet50_cuda(benchmark, case):
    benchmark.group = "simclr-cuda-resnet50-224-bf16"
    if case == "chunked-16384":
        m = build("simclr", "resnet50", "cuda", chunk=512).to(memory_format=torch.channels_last)
        views = views_for(m, 16384, 224, "cuda")
        extra = _run(
            benchmark,
            m,
            views,
            "cuda",
            rounds=2,
            amp=torch.bfloat16,
            method="simclr",
            chunk=512,
            arch="resnet50",
            crop=224,
        )
        _record(benchmark, ("cuda-r50", case), extra, base_key=("cuda-r50", "unchunked-largest"))
        return
    m = build("simclr", "resnet50", "cuda").to(memory_format=torch.channels_last)
    for batch in (2048, 1024, 512, 256):
        try:
            views = views_for(m, batch, 224, "cuda")
            extra = _run(
                benchmark,
                m,
                views,
                "cuda",
                rounds=5,
                amp=torch.bfloat16,
                method="simclr",
                chunk=0,
                arch="resnet50",
                crop=224,
            )
            _record(benchmark, ("cuda-r50", case), extra)
            return
        except torch.OutOfMemoryError:
            views = None
            torch.cuda.empty_cache()
    pytest.skip("no batch >= 256 fits unchunked")


@pytest.mark.cuda
def test_moco_queue_cuda(benchmark):
    benchmark.group = "moco-cuda-resnet50-224-bf16-queue65536-batch256"
    m = build("moco", "resnet50", "cuda", queue_size=65536).to(memory_format=torch.channels_last)
    views = views_for(m, 256, 224, "cuda")
    extra = _run(benchmark, m, views, "cuda", rounds=10, amp=torch.bfloat16, method="moco", arch="resnet50", crop=224)
    _record(benchmark, ("cuda-moco",), extra)
