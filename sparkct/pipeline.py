"""The main job until the pretraining experiment exists: the whole data -> kernel path on real
(or the built-in synthetic) CT, checked against the references and timed.

1. data: synthesize DICOM chest CT (``sparkct data synth``) unless a DICOM tree is given, then
   prepare the slice cache (``sparkct data prepare``; resumable, so a re-run reuses both);
2. SparK step: batches from the cache through CT augmentation, a random cell mask, and the sparse
   encoder (``sparkct.nn.SparseEncoder`` on a torchvision ResNet), forward + backward; the first
   batch is compared with SparK's dense-masked encoder (``sparkct.ops.reference``: features, input
   gradient, parameter gradients); both are timed;
3. contrastive step: two augmented views of each batch through the dense ResNet and a projection
   head, the fused InfoNCE loss (``sparkct.nn.InfoNCELoss``) against the naive PyTorch form
   (value and gradients), both timed.

Nothing is trained (no optimizer step): this measures and checks the pieces a pretraining step is
made of. The report goes to ``<workdir>/report.json`` (written atomically) and the terminal.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["PipelineConfig", "run_pipeline"]


@dataclass
class PipelineConfig:
    workdir: str = "runs/main"
    dicom: str | None = None       # a DICOM tree to use instead of synthesizing one
    patients: int = 6              # synthetic patients
    size: int = 256                # synthetic slice size (rows = columns)
    slices: int | None = 40        # synthetic slices per series (None: the whole chest)
    arch: str = "resnet18"
    batch: int = 16
    crop: int = 224
    mask_ratio: float = 0.6
    steps: int = 3
    temperature: float = 0.2
    proj_dim: int = 128
    seed: int = 0
    device: str = "cpu"
    workers: int = 1               # prepare worker processes


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _data(cfg: PipelineConfig, log) -> tuple[str, dict]:
    from sparkct.data import prepare, synth

    os.makedirs(cfg.workdir, exist_ok=True)
    info: dict = {}
    if cfg.dicom is None:
        src = os.path.join(cfg.workdir, "synth")
        marker = os.path.join(src, "synth.json")
        want = {"seed": cfg.seed, "patients": cfg.patients, "size": cfg.size, "slices": cfg.slices}
        have = None
        if os.path.exists(marker):
            with open(marker) as f:
                have = json.load(f)
        if have is None or any(have.get(k) != v for k, v in want.items()):
            log(f"synthesizing {cfg.patients} patients of chest CT ({cfg.size}x{cfg.size}) into {src}")
            rep = synth(src, patients=cfg.patients, seed=cfg.seed, size=cfg.size, slices=cfg.slices)
            log("  " + rep.summary())
            info["synth_seconds"] = round(rep.seconds, 2)
        else:
            log(f"reusing synthetic CT in {src}")
    else:
        src = cfg.dicom
    cache = os.path.join(cfg.workdir, "cache")
    log(f"preparing the slice cache {cache} (resumable)")
    rep = prepare(src, cache, workers=cfg.workers, progress=False)
    log("  " + rep.summary().replace("\n", "\n  "))
    info.update(source=src if cfg.dicom else "synthetic", cache=cache, series=rep.series,
                slices=rep.slices, series_failed=rep.series_failed)
    return cache, info


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    import torchvision

    from sparkct.data import CTAugment, CTSliceDataset, SliceLoader, TwoViews
    from sparkct.nn import InfoNCELoss, SparseEncoder
    from sparkct.ops import reference
    from sparkct.models.spark import reference as spark_reference

    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.crop % 32:
        raise ValueError(f"crop must be a multiple of 32 (SparK's cell grid), got {cfg.crop}")
    if cfg.steps < 1 or cfg.batch < 2:
        raise ValueError("need steps >= 1 and batch >= 2")
    device = torch.device(cfg.device)
    t_start = time.perf_counter()
    cache, data_info = _data(cfg, log)

    ds = CTSliceDataset(cache)
    if len(ds) < cfg.batch:
        raise ValueError(f"the cache has {len(ds)} slices, fewer than one batch of {cfg.batch}")
    torch.manual_seed(cfg.seed)
    model = getattr(torchvision.models, cfg.arch)(weights=None).to(device)
    reference_model = copy.deepcopy(model)     # SparK's way, on identical weights and BN state
    enc = SparseEncoder.from_dense(model)
    grid = cfg.crop // 32
    gen = torch.Generator().manual_seed(cfg.seed)

    # ---- SparK: sparse encoder vs SparK's dense-masked encoder --------------------------------
    log(f"SparK step: {cfg.arch}, batch {cfg.batch}, {cfg.crop}x{cfg.crop}, mask ratio {cfg.mask_ratio}, "
        f"{cfg.steps} steps on {device}")
    loader = SliceLoader(ds, cfg.batch, transform=CTAugment(cfg.crop), seed=cfg.seed, device=device)
    t_sparse, t_dense, check = [], [], {}
    it = iter(loader)
    for step in range(cfg.steps + 1):              # step 0 warms up and is the correctness check
        try:
            x = next(it)
        except StopIteration:
            it = iter(loader)
            x = next(it)
        keep = torch.rand(cfg.batch, grid, grid, generator=gen) >= cfg.mask_ratio
        keep[keep.flatten(1).sum(1) == 0, grid // 2, grid // 2] = True   # SparK keeps >= 1 cell
        keep = keep.to(device)
        xs = x.clone().requires_grad_(True)
        xd = x.clone().requires_grad_(True)

        def sparse_step():
            feats = enc(xs, keep)
            sum(f.float().square().mean() for f in feats).backward()
            return feats

        def dense_step():
            feats = spark_reference.spark_dense_masked_features(reference_model, xd, keep)
            sum(f.float().square().mean() for f in feats).backward()
            return feats

        model.zero_grad(set_to_none=True)
        reference_model.zero_grad(set_to_none=True)
        fs, ts = _timed(sparse_step, device)
        fd, td = _timed(dense_step, device)
        if step == 0:
            pd = dict(reference_model.named_parameters())
            check = {
                "features_rel_err": max(_rel_err(a, b) for a, b in zip(fs, fd)),
                "input_grad_rel_err": _rel_err(xs.grad, xd.grad),
                "param_grad_rel_err": max(_rel_err(p.grad, pd[n].grad) for n, p in model.named_parameters()
                                          if p.grad is not None),
            }
        else:
            t_sparse.append(ts)
            t_dense.append(td)
    visible = float(keep.float().mean())
    spark = {
        "arch": cfg.arch, "batch": cfg.batch, "crop": cfg.crop, "mask_ratio": cfg.mask_ratio,
        "sparse_fwd_bwd_s": _median(t_sparse), "dense_masked_fwd_bwd_s": _median(t_dense),
        "speedup_vs_dense_masked": _median(t_dense) / _median(t_sparse),
        "ideal_speedup": 1.0 / max(visible, 1e-9), **check,
    }
    log(f"  sparse {spark['sparse_fwd_bwd_s'] * 1e3:.0f} ms vs SparK dense-masked "
        f"{spark['dense_masked_fwd_bwd_s'] * 1e3:.0f} ms per fwd+bwd: {spark['speedup_vs_dense_masked']:.2f}x "
        f"(ideal ~{1 / (1 - cfg.mask_ratio):.2f}x); first batch vs SparK: features {check['features_rel_err']:.1e}, "
        f"input grad {check['input_grad_rel_err']:.1e}, param grads {check['param_grad_rel_err']:.1e} (rel.)")

    # ---- contrastive: fused InfoNCE vs the naive form ------------------------------------------
    log(f"contrastive step: two views, {cfg.arch} + projection ({cfg.proj_dim}), InfoNCE (T={cfg.temperature})")
    backbone = getattr(torchvision.models, cfg.arch)(weights=None).to(device)
    feat_dim = backbone.fc.in_features
    backbone.fc = torch.nn.Identity()
    head = torch.nn.Sequential(torch.nn.Linear(feat_dim, feat_dim), torch.nn.ReLU(),
                               torch.nn.Linear(feat_dim, cfg.proj_dim)).to(device)
    fused = InfoNCELoss(cfg.temperature)
    views_loader = SliceLoader(ds, cfg.batch, transform=TwoViews(cfg.crop), seed=cfg.seed + 1, device=device)
    v0, v1 = next(iter(views_loader))
    with torch.no_grad():
        z = head(backbone(torch.cat([v0, v1])))
    z0, z1 = z[:cfg.batch], z[cfg.batch:]
    a0, a1 = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    b0, b1 = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    lf = fused(a0, a1)
    lf.backward()
    ln = reference.info_nce(b0, b1, cfg.temperature)
    ln.backward()
    t_f, t_n = [], []
    for _ in range(max(cfg.steps, 3)):
        _, t = _timed(lambda: fused(a0, a1).backward(), device)
        t_f.append(t)
        _, t = _timed(lambda: reference.info_nce(b0, b1, cfg.temperature).backward(), device)
        t_n.append(t)
    _, t_bb = _timed(lambda: head(backbone(torch.cat([v0, v1]))).square().mean().backward(), device)
    contrastive = {
        "embeddings": 2 * cfg.batch, "dim": cfg.proj_dim, "loss": lf.item(),
        "loss_rel_err": abs(lf.item() - ln.item()) / abs(ln.item()),
        "grad_rel_err": max(_rel_err(a0.grad, b0.grad), _rel_err(a1.grad, b1.grad)),
        "fused_loss_fwd_bwd_s": _median(t_f), "naive_loss_fwd_bwd_s": _median(t_n),
        "backbone_fwd_bwd_s": t_bb,
    }
    log(f"  loss {contrastive['loss']:.4f} (fused vs naive: {contrastive['loss_rel_err']:.1e} rel., grads "
        f"{contrastive['grad_rel_err']:.1e}); loss fwd+bwd {contrastive['fused_loss_fwd_bwd_s'] * 1e3:.2f} ms "
        f"fused vs {contrastive['naive_loss_fwd_bwd_s'] * 1e3:.2f} ms naive; backbone+head "
        f"{t_bb * 1e3:.0f} ms")

    from sparkct import _ext
    from sparkct import io as sio

    report = {
        "config": asdict(cfg), "data": data_info, "spark": spark, "contrastive": contrastive,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "sparkct_cuda": _ext.cuda_version()},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    ok = (check["features_rel_err"] < 1e-3 and check["input_grad_rel_err"] < 1e-2
          and contrastive["loss_rel_err"] < 1e-4 and contrastive["grad_rel_err"] < 1e-3)
    report["checks_passed"] = ok
    path = os.path.join(cfg.workdir, "report.json")
    sio.write_json_atomic(path, report)
    log(f"{'all checks passed' if ok else 'CHECKS FAILED'}; report: {path} ({report['seconds']:.0f} s)")
    return report
