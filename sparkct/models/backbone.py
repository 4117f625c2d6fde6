"""The one backbone builder: a torchvision ResNet / ResNeXt / wide ResNet, or a timm Vision Transformer,
without its classifier.

``build_backbone("resnet50", in_chans=1)`` -> (model, feature_dim). Two families:

* ResNets (``resnet18`` ... ``wide_resnet101_2``): the model keeps torchvision's module names (conv1, bn1,
  layer1..4) and its ``fc`` is an ``nn.Identity``, so its state_dict is the backbone export format: it loads
  with ``strict=True`` into ``torchvision.models.resnet50()`` whose ``fc`` was replaced by Identity.
* ViTs (``vit_tiny``, ``vit_small``, ``vit_base`` with 16-pixel patches; ``vit_tiny_p8``, ``vit_small_p8``,
  ``vit_base_p8`` with 8-pixel patches for small CT crops): a plain timm ``VisionTransformer`` made by
  ``timm.create_model(name, num_classes=0, in_chans=..., img_size=..., dynamic_img_size=True,
  dynamic_img_pad=True)``; ``forward(x)`` is the final-norm CLS token (B, D), the ViT's counterpart of a
  ResNet's pooled feature. Position embeddings are made for ``img_size`` (the training crop) and
  interpolated on the fly for other input sizes (a side not divisible by the patch is zero-padded on the
  right/bottom, timm's ``dynamic_img_pad``); weights made at another size or patch are resampled when loaded
  (timm's ``resample_abs_pos_embed`` / ``resample_patch_embed``). :func:`timm_spec` gives the
  ``timm.create_model`` name and keyword arguments that rebuild a ViT state_dict exactly (recorded beside
  every export).

Weights files (:func:`load_backbone_state`): a plain state_dict, a sparkct export, the usual wrappers
(``state_dict``, ``model``, ``backbone``, DINO's ``teacher``; prefixes ``module.``, ``backbone.``,
``encoder.``), and for ViTs also the published DINOv2 format (``DinoVisionTransformer``: ``mask_token``,
``register_tokens``, chunked ``blocks.C.N.``; SwiGLU-FFN giants are not supported).
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, cast

import torch
import torch.nn as nn

from sparkct.errors import UserError

__all__ = [
    "ARCHS",
    "RESNET_ARCHS",
    "VIT_ARCHS",
    "arch_family",
    "is_vit",
    "timm_spec",
    "build_backbone",
    "check_fits",
    "feature_dim",
    "adapt_in_chans",
    "load_backbone_state",
    "backbone_state",
]

RESNET_ARCHS = (
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
#: sparkct's ViT names -> (timm model name, the timm keyword arguments that differ from that name's)
VIT_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_tiny_p8": ("vit_tiny_patch16_224", {"patch_size": 8}),  # timm has no tiny/8: the tiny widths, patch 8
    "vit_small_p8": ("vit_small_patch8_224", {}),
    "vit_base_p8": ("vit_base_patch8_224", {}),
}
ARCHS = RESNET_ARCHS + tuple(VIT_ARCHS)
#: a ViT's input size when none is given (the timm models' own)
VIT_IMG_SIZE = 224


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return arch


def arch_family(arch: str) -> str:
    """'resnet' (torchvision ResNets, ResNeXts, wide ResNets) or 'vit' (timm Vision Transformers)."""
    return "vit" if check_arch(arch) in VIT_ARCHS else "resnet"


def is_vit(model: nn.Module) -> bool:
    """Whether `model` is a timm VisionTransformer (a ViT backbone of :func:`build_backbone`)."""
    if "timm" not in sys.modules:  # no timm imported: no timm model exists (and none is imported here)
        return False
    from timm.models.vision_transformer import VisionTransformer  # noqa: PLC0415

    return isinstance(model, VisionTransformer)


def _stem(model: nn.Module) -> nn.Conv2d:
    """The conv that reads the image: a ResNet's conv1, a ViT's patch embedding."""
    return cast(nn.Conv2d, cast(nn.Module, model.patch_embed).proj if is_vit(model) else model.conv1)


def feature_dim(model: nn.Module) -> int:
    """The size of the backbone's output: a ResNet's pooled layer4 channels, a ViT's CLS-token width."""
    if is_vit(model):
        return int(cast(Any, model).num_features)
    last = cast(nn.Sequential, model.layer4)[-1]
    return cast(nn.BatchNorm2d, last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def adapt_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Give the stem conv (a ResNet's conv1, a ViT's patch_embed.proj) `in_chans` input channels (CT: one
    per HU window). A 3-channel stem's weights are summed over channels for 1 channel or tiled and
    rescaled otherwise (timm's rule), so pretrained RGB weights stay meaningful."""
    if not isinstance(in_chans, int) or in_chans < 1:
        raise UserError(f"in_chans must be a positive integer, got {in_chans!r}")
    old = _stem(model)
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
        if old.bias is not None and new.bias is not None:  # a ViT's patch embedding has one
            new.bias.copy_(old.bias)
    if is_vit(model):
        cast(Any, model).patch_embed.proj = new
    else:
        model.conv1 = new
    return model


def build_backbone(
    arch: str = "resnet50",
    *,
    in_chans: int = 3,
    weights: str | None = None,
    zero_init_residual: bool = False,
    img_size: int | None = None,
) -> tuple[nn.Module, int]:
    """(model, feature_dim): `arch` with random init (or the weights file `weights`: a backbone export, a
    full torchvision / timm checkpoint, the wrappers and formats of :func:`load_backbone_state`),
    `in_chans` input channels, no classifier. `img_size` (ViTs only; default 224): the input size the
    position embeddings are made for (other sizes are interpolated); `zero_init_residual`: ResNets only."""
    if arch_family(arch) == "vit":
        return _build_vit(arch, in_chans=in_chans, weights=weights, img_size=img_size)
    import torchvision  # noqa: PLC0415 (lazy: `pretrain METHOD -h` imports no torchvision)

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


def _vit_structure(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The timm keyword arguments a ViT state_dict's own tensors decide: layer scale (``ls1.gamma``) and
    register tokens (kept, as timm converts DINOv2's, with position embeddings for the patches only)."""
    kw: dict[str, Any] = {}
    if any(k.endswith(".ls1.gamma") for k in state):
        kw["init_values"] = 1e-5  # DINOv2's (the loaded gammas replace it)
    reg = state.get("reg_token")
    if reg is not None and reg.dim() == 3 and reg.shape[1] > 0:
        kw["reg_tokens"] = int(reg.shape[1])
        kw["no_embed_class"] = True
    return kw


def timm_spec(arch: str, state: dict[str, torch.Tensor] | None = None, **overrides: Any) -> tuple[str, dict]:
    """(timm model name, keyword arguments) with which ``timm.create_model(name, **kwargs)`` builds the ViT
    `arch` whose state_dict is `state` (its input channels, patch and image size and structure read from
    the tensors), so that ``load_state_dict(state, strict=True)`` accepts it. Without `state`: the
    defaults, updated by `overrides`."""
    if arch_family(arch) != "vit":
        raise ValueError(f"{arch} is not a timm ViT")
    name, kw = VIT_ARCHS[arch]
    kw = {
        "pretrained": False,
        "num_classes": 0,
        "in_chans": 3,
        "img_size": VIT_IMG_SIZE,
        **kw,
        "dynamic_img_size": True,
        "dynamic_img_pad": True,
    }
    if state is not None:
        proj = state.get("patch_embed.proj.weight")
        pos = state.get("pos_embed")
        if proj is not None and proj.dim() == 4:
            kw["in_chans"] = int(proj.shape[1])
            kw["patch_size"] = int(proj.shape[-1])
        kw.update(_vit_structure(state))
        if pos is not None and pos.dim() == 3:
            grid = math.isqrt(max(int(pos.shape[1]) - (0 if kw.get("no_embed_class") else 1), 0))
            kw["img_size"] = grid * int(kw.get("patch_size", 16))
    kw.update(overrides)
    return name, kw


def _build_vit(arch: str, *, in_chans: int, weights: str | None, img_size: int | None) -> tuple[nn.Module, int]:
    import timm  # noqa: PLC0415 (lazy: the CLI's parsers import no timm)
    from timm.layers import resample_abs_pos_embed, resample_patch_embed  # noqa: PLC0415

    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise UserError(f"img_size must be a positive integer, got {img_size!r}")
    state = load_backbone_state(weights) if weights is not None else None
    name, kw = timm_spec(arch, img_size=img_size or VIT_IMG_SIZE)
    if state is not None:
        kw.update(_vit_structure(state))
        proj = state.get("patch_embed.proj.weight")
        if proj is not None and proj.dim() == 4:
            kw["in_chans"] = int(proj.shape[1])  # the file's channels first, then adapted to in_chans
    model = timm.create_model(name, **kw)
    if state is not None:
        own = model.state_dict()
        proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
        want = own["patch_embed.proj.weight"]
        if proj is not None and proj.dim() == 4 and proj.shape[-2:] != want.shape[-2:]:
            # weights made with another patch size (DINOv2's 14): FlexiViT's resize of the kernel, as timm
            state["patch_embed.proj.weight"] = resample_patch_embed(proj.float(), list(want.shape[-2:])).to(proj)
        if pos is not None and pos.dim() == 3 and pos.shape != own["pos_embed"].shape:
            prefix = 0 if kw.get("no_embed_class") else 1
            old = math.isqrt(max(int(pos.shape[1]) - prefix, 0))
            if old * old + prefix == pos.shape[1] and pos.shape[2] == own["pos_embed"].shape[2]:
                grid = list(cast(Any, model).patch_embed.grid_size)
                state["pos_embed"] = resample_abs_pos_embed(
                    pos.float(), new_size=grid, old_size=[old, old], num_prefix_tokens=prefix
                ).to(pos)
        check_fits(model, state, f"{weights}: not weights of this {arch} backbone")
        model.load_state_dict(state, strict=True)
    adapt_in_chans(model, in_chans)
    return model, feature_dim(model)


#: wrappers published checkpoints put the state_dict under, in the order they are looked for
_WRAPPERS = ("backbone", "teacher", "state_dict", "model")


def load_backbone_state(path: str) -> dict[str, torch.Tensor]:
    """A backbone state_dict from `path`, loaded without unpickling code: a plain torchvision / timm
    state_dict or a sparkct export, or one wrapped under ``backbone``, ``teacher`` (DINO's checkpoints),
    ``state_dict`` or ``model``. The prefixes ``module.`` / ``backbone.`` / ``encoder.`` are dropped (where
    keys under ``backbone.`` sit beside others, those others are heads and are dropped), and so are the
    classifiers (``fc.*``, ``head.*``). DINOv2's published ViT format becomes timm's: ``mask_token``
    dropped, chunked ``blocks.C.N.`` -> ``blocks.N.``, ``register_tokens`` -> ``reg_token`` with the CLS
    position folded into ``cls_token`` (timm's conversion)."""
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated or empty file, not a torch file at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: not a loadable weights file ({type(e).__name__}: {first})") from None
    for wrap in _WRAPPERS:  # published checkpoints wrap the state_dict under one of these
        if isinstance(obj, dict) and isinstance(obj.get(wrap), dict):
            obj = obj[wrap]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state_dict (name -> tensor)")
    keys = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in keys) and not all(k.startswith("backbone.") for k in keys):
        keys = {k: v for k, v in keys.items() if k.startswith("backbone.")}  # e.g. DINO: backbone + head
    out = {}
    for k, v in keys.items():
        for pre in ("module.", "backbone.", "encoder."):
            if k.startswith(pre):
                k = k[len(pre) :]
        if not k.startswith(("fc.", "head.")):
            out[k] = v
    return _from_dinov2(out)


def _from_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2's DinoVisionTransformer keys as timm's VisionTransformer's (other state_dicts unchanged)."""
    if "mask_token" not in state and "register_tokens" not in state:
        if not any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state):
            return state
    state = dict(state)
    state.pop("mask_token", None)
    reg = state.pop("register_tokens", None)
    if reg is not None and "pos_embed" in state and "cls_token" in state:
        # DINOv2 adds pos_embed to [CLS, patches] and then inserts the registers: as timm's no_embed_class
        # model (position embeddings for the patches only) with the CLS position folded into cls_token
        pos = state.pop("pos_embed")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
        state["reg_token"] = reg
    # block chunks (FSDP): blocks.<chunk>.<global index>.* -> blocks.<global index>.*
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


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
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(("fc.", "head."))
    }
