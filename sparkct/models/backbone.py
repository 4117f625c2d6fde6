"""The one backbone builder: a torchvision ResNet / ResNeXt / wide ResNet without its classifier.

``build_backbone("resnet50", in_chans=1)`` -> (model, feature_dim). The model keeps torchvision's
module names (conv1, bn1, layer1..4) and its ``fc`` is an ``nn.Identity``, so its state_dict minus
nothing is the backbone export format: it loads with ``strict=True`` into
``torchvision.models.resnet50()`` whose ``fc`` was replaced by Identity (see :func:`load_backbone`).
"""

from __future__ import annotations

import os
from typing import cast

import torch
import torch.nn as nn

from sparkct.errors import UserError

__all__ = [
    "ARCHS",
    "build_backbone",
    "check_fits",
    "feature_dim",
    "adapt_in_chans",
    "load_backbone_state",
    "backbone_state",
]

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return arch


def feature_dim(model: nn.Module) -> int:
    """Channels of layer4's output (the pooled feature size)."""
    last = cast(nn.Sequential, model.layer4)[-1]
    return cast(nn.BatchNorm2d, last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def adapt_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Give the stem conv `in_chans` input channels (CT: one per HU window). A 3-channel stem's weights
    are summed over channels for 1 channel or tiled and rescaled otherwise (timm's rule), so
    pretrained RGB weights stay meaningful."""
    if not isinstance(in_chans, int) or in_chans < 1:
        raise UserError(f"in_chans must be a positive integer, got {in_chans!r}")
    old = cast(nn.Conv2d, model.conv1)
    if old.in_channels == in_chans:
        return model
    # torch types these as tuple[int, ...]; a Conv2d's are 2-tuples
    k, s, p = (cast(tuple[int, int], t) for t in (old.kernel_size, old.stride, old.padding))
    new = nn.Conv2d(in_chans, old.out_channels, k, s, p, bias=old.bias is not None)
    with torch.no_grad():
        w = old.weight
        if in_chans == 1:
            new.weight.copy_(w.sum(1, keepdim=True))
        else:
            reps = -(-in_chans // w.shape[1])
            new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans))
    model.conv1 = new
    return model


def build_backbone(
    arch: str = "resnet50", *, in_chans: int = 3, weights: str | None = None, zero_init_residual: bool = False
) -> tuple[nn.Module, int]:
    """(model, feature_dim): torchvision `arch` with random init (or the state_dict file `weights`,
    a backbone export or a full torchvision checkpoint), `in_chans` input channels, ``fc`` = Identity."""
    import torchvision  # noqa: PLC0415 (lazy: `pretrain METHOD -h` imports no torchvision)

    check_arch(arch)
    model = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    model.fc = nn.Identity()
    if weights is not None:
        state = load_backbone_state(weights)
        conv1 = state.get("conv1.weight")
        if conv1 is not None and conv1.shape[1] != model.conv1.in_channels:
            adapt_in_chans(model, int(conv1.shape[1]))
        check_fits(model, state, f"{weights}: not weights of this {arch} backbone")
        model.load_state_dict(state, strict=False)
    adapt_in_chans(model, in_chans)
    return model, feature_dim(model)


def load_backbone_state(path: str) -> dict[str, torch.Tensor]:
    """A torchvision (or timm: the same names) ResNet state_dict from `path`, loaded without unpickling
    code: a plain state_dict, a backbone export, or one wrapped under ``backbone``, ``state_dict`` or
    ``model``; ``fc.*`` and the prefixes ``module.`` / ``backbone.`` / ``encoder.`` are dropped."""
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated or empty file, not a torch file at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: not a loadable weights file ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and "backbone" in obj and isinstance(obj["backbone"], dict):
        obj = obj["backbone"]
    else:  # published checkpoints wrap the state_dict under one of these
        for wrap in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(wrap), dict):
                obj = obj[wrap]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state_dict (name -> tensor)")
    out = {}
    for k, v in obj.items():
        for pre in ("module.", "backbone.", "encoder."):
            if k.startswith(pre):
                k = k[len(pre) :]
        if not k.startswith("fc."):
            out[k] = v
    return out


def check_fits(model: nn.Module, state: dict, what: str, then: str = "") -> None:
    """A one-line UserError, `what`: the first missing, unexpected and wrong-shaped keys, `then`, when
    `state` does not load into `model` strictly (instead of load_state_dict's multi-line RuntimeError)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    parts = [
        f"{name} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    if parts:
        raise UserError(f"{what}: " + "; ".join(parts) + then)


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The export: the backbone's state_dict on the CPU, contiguous, no classifier."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
