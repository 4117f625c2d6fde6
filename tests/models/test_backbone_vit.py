"""timm ViT backbones in the one builder: every ViT arch is a plain timm VisionTransformer giving (B, D) CLS
features at any input size; the stem adapts to the CT windows as a ResNet's does; weights made at another
size or patch are resampled; every accepted key format (timm, sparkct export, wrappers, DINO's teacher,
DINOv2's published format with and without registers, chunked blocks) loads exactly; files that do not
fit are one-line errors naming the keys."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from sparkct.errors import UserError
from sparkct.models.backbone import (
    ARCHS,
    VIT_ARCHS,
    adapt_in_chans,
    arch_family,
    backbone_state,
    build_backbone,
    check_arch,
    feature_dim,
    is_vit,
    timm_spec,
)
from sparkct.train.checkpoint import export_backbone

DEEP = "blocks.11.attn.qkv.weight"  # a deep weight: it matches the file's only when the file was loaded
WIDTH = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}


@pytest.mark.parametrize("arch", list(VIT_ARCHS))
def test_each_vit_arch_is_a_timm_vit_with_cls_features_at_any_size(arch):
    torch.manual_seed(0)
    model, dim = build_backbone(arch, in_chans=1, img_size=32)
    assert type(model) is VisionTransformer and is_vit(model) and arch_family(arch) == "vit" and arch in ARCHS
    assert dim == feature_dim(model) == WIDTH[arch.removesuffix("_p8")]
    assert model.patch_embed.proj.kernel_size == ((8, 8) if arch.endswith("_p8") else (16, 16))
    model.eval()
    for size in ((32, 32), (64, 48), (40, 40)):  # the built size, another, one not divisible by 16
        assert model(torch.randn(2, 1, *size)).shape == (2, dim)
    # the CLS token after the final norm, as timm's forward_features gives it
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(model(x), model.forward_features(x)[:, 0], atol=1e-6)


def test_resnet_family_is_unchanged():
    assert arch_family("resnet18") == "resnet"
    model, dim = build_backbone("resnet18", in_chans=1)
    assert not is_vit(model) and dim == 512 == feature_dim(model)
    with pytest.raises(UserError, match="unknown arch 'vit_huge'.*vit_tiny_p8"):
        check_arch("vit_huge")


def test_stem_adaptation_sums_for_one_channel_and_tiles_otherwise():
    torch.manual_seed(0)
    rgb, _ = build_backbone("vit_tiny", in_chans=3, img_size=32)
    rgb.eval()
    one = adapt_in_chans(timm_copy(rgb), 1)
    x = torch.randn(2, 1, 32, 32)
    # summed weights: a grey image in 1 channel gives what it gives repeated over RGB
    assert torch.allclose(one(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5)
    two = adapt_in_chans(timm_copy(rgb), 2)
    w = rgb.patch_embed.proj.weight
    assert torch.allclose(two.patch_embed.proj.weight, w.repeat(1, 1, 1, 1)[:, :2] * 1.5)
    assert torch.equal(two.patch_embed.proj.bias, rgb.patch_embed.proj.bias)  # the bias is kept


def timm_copy(model):
    m = timm.create_model("vit_tiny_patch16_224", **{**timm_spec("vit_tiny", backbone_state(model))[1]})
    m.load_state_dict(backbone_state(model), strict=True)
    return m.eval()


def _timm_state(arch="vit_tiny_p8", seed=0, **kw) -> dict:
    torch.manual_seed(seed)
    name, spec = timm_spec(arch, num_classes=10, **kw)  # a classifier head, as published weights have
    return timm.create_model(name, **spec).state_dict()


FORMATS = {
    "timm": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 90},
    "model": lambda sd: {"model": sd},
    "module.": lambda sd: {"module." + k: v for k, v in sd.items()},
    "backbone.": lambda sd: {"backbone." + k: v for k, v in sd.items()},
    # DINO's checkpoint: teacher = backbone.* + its projection head; student under module.
    "dino teacher": lambda sd: {
        "teacher": {**{"backbone." + k: v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(8, 192)},
        "student": {"module.backbone." + k: v * 0 for k, v in sd.items()},
        "epoch": 100,
    },
    "dino student": lambda sd: {
        **{"module.backbone." + k: v for k, v in sd.items()},
        "module.head.last_layer.weight_g": torch.zeros(1, 1),
    },
}


@pytest.mark.parametrize("fmt", [*FORMATS, "sparkct export"])
def test_each_key_format_loads_into_the_vit(fmt, tmp_path):
    path = tmp_path / "w.pth"
    if fmt == "sparkct export":
        torch.manual_seed(0)
        model, _ = build_backbone("vit_tiny_p8", in_chans=1, img_size=32)
        sd = export_backbone(model, str(path), arch="vit_tiny_p8")
    else:
        sd = _timm_state()
        assert "head.weight" in sd
        torch.save(FORMATS[fmt](sd), path)
    model, _ = build_backbone("vit_tiny_p8", in_chans=1, weights=str(path), img_size=32)
    got = model.state_dict()
    assert torch.equal(got[DEEP], sd[DEEP]) and torch.equal(got["norm.weight"], sd["norm.weight"])
    assert model.patch_embed.proj.in_channels == 1


def test_weights_made_at_another_size_get_resampled_position_embeddings(tmp_path):
    torch.manual_seed(0)
    big, _ = build_backbone("vit_tiny_p8", in_chans=1, img_size=64)  # 8 x 8 patches + CLS
    path = tmp_path / "big.pt"
    export_backbone(big, str(path), arch="vit_tiny_p8")
    small, _ = build_backbone("vit_tiny_p8", in_chans=1, weights=str(path), img_size=32)  # 4 x 4
    assert small.pos_embed.shape == (1, 17, 192)
    want = resample_abs_pos_embed(big.pos_embed.detach(), new_size=[4, 4], old_size=[8, 8], num_prefix_tokens=1)
    assert torch.allclose(small.pos_embed, want) and torch.equal(small.cls_token, big.cls_token)
    # the same inputs give what the big model gives with its on-the-fly interpolation
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(small.eval()(x), big.eval()(x), atol=1e-5)


def _as_dinov2(sd: dict, *, registers: int = 0, chunks: int = 0) -> dict:
    """A timm ViT state_dict (class token in pos_embed, layer scale) in DINOv2's published key format."""
    out = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    out["mask_token"] = torch.randn(1, sd["cls_token"].shape[-1])
    if registers:
        out["register_tokens"] = torch.randn(1, registers, sd["cls_token"].shape[-1])
    if chunks:  # BlockChunk: blocks.<chunk>.<global index>.
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        size = depth // chunks
        out = {
            (f"blocks.{int(k.split('.')[1]) // size}.{k.split('.', 1)[1]}" if k.startswith("blocks.") else k): v
            for k, v in out.items()
        }
    return out


def _dinov2_forward(src, x, reg):
    """DINOv2's DinoVisionTransformer forward (prepare_tokens_with_masks, blocks, norm, CLS) on the weights
    of `src` (a timm ViT whose pos_embed covers the CLS token): registers go in after the CLS token, once
    the position embeddings are added."""
    t = src.patch_embed(x)
    t = t.flatten(1, 2) if t.dim() == 4 else t
    t = torch.cat([src.cls_token.expand(len(x), -1, -1), t], 1) + src.pos_embed
    if reg is not None:
        t = torch.cat([t[:, :1], reg.expand(len(x), -1, -1), t[:, 1:]], 1)
    for blk in src.blocks:
        t = blk(t)
    return src.norm(t)[:, 0]


@pytest.mark.parametrize("registers,chunks", [(0, 0), (4, 0), (0, 4), (4, 2)])
def test_dinov2_format_loads_and_computes_what_dinov2_computes(registers, chunks, tmp_path):
    torch.manual_seed(0)
    name, kw = timm_spec("vit_tiny", img_size=32, in_chans=3, init_values=1e-5, dynamic_img_size=False)
    src = timm.create_model(name, **kw).eval()
    with torch.no_grad():
        for n, p in src.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.5)  # layer scale far from its init: loaded, not made
    state = _as_dinov2(src.state_dict(), registers=registers, chunks=chunks)
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    model, _ = build_backbone("vit_tiny", in_chans=3, weights=str(path), img_size=32)
    model.eval()
    assert type(model) is VisionTransformer and model.num_reg_tokens == registers
    assert torch.equal(model.blocks[7].ls1.gamma, src.blocks[7].ls1.gamma)
    x = torch.randn(2, 3, 32, 32)
    reg = state.get("register_tokens")
    with torch.no_grad():
        assert torch.allclose(model(x), _dinov2_forward(src, x, reg), atol=1e-5)
    # and the loaded model exports and rebuilds as recorded
    sd = backbone_state(model)
    name2, kw2 = timm_spec("vit_tiny", sd)
    timm.create_model(name2, **kw2).load_state_dict(sd, strict=True)


def test_published_dinov2_geometry_is_resampled(tmp_path):
    """DINOv2's ViT-S/14 at 518 px (37 x 37 patches): patch kernel resized to 16 (FlexiViT, as timm does) and
    position embeddings interpolated to the crop's grid."""
    torch.manual_seed(0)
    src = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=2
    ).state_dict()  # 2 blocks keep the test small; vit_small's 12 come from the file's missing keys below
    state = _as_dinov2(src)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        build_backbone("vit_small", in_chans=1, weights=str(path), img_size=64)
    msg = str(e.value)
    assert "\n" not in msg and "not weights of this vit_small backbone: missing" in msg and "blocks.2." in msg
    assert "shape mismatch" not in msg  # patch kernel and position embeddings were resampled
    # a full-depth file of the same geometry loads
    full = _as_dinov2(timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0).state_dict())
    torch.save(full, path)
    model, _ = build_backbone("vit_small", in_chans=1, weights=str(path), img_size=64)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 384) and model.patch_embed.proj.weight.shape == (384, 1, 16, 16)
    want = resample_patch_embed(full["patch_embed.proj.weight"], [16, 16]).sum(1, keepdim=True)
    assert torch.allclose(model.patch_embed.proj.weight, want, atol=1e-6)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 384)


@pytest.mark.parametrize(
    "what,msg",
    [
        ("vit_small", "shape mismatch"),
        ("resnet18", "unexpected"),
    ],
)
def test_a_file_that_does_not_fit_is_one_line_naming_keys(what, msg, tmp_path):
    path = tmp_path / f"{what}.pth"
    if what == "resnet18":
        torch.save(build_backbone("resnet18")[0].state_dict(), path)
    else:
        torch.save(_timm_state("vit_small", img_size=32), path)
    with pytest.raises(UserError) as e:
        build_backbone("vit_tiny", in_chans=1, weights=str(path), img_size=32)
    text = str(e.value)
    assert "\n" not in text and f"{path}: not weights of this vit_tiny backbone" in text and msg in text
    assert ("cls_token" in text) if what == "vit_small" else ("conv1.weight" in text)
