"""SparK's own encoder semantics, the model-level oracle: "dense conv, then mask" on a torchvision ResNet.

Every conv / pool runs densely and its output's masked cells are zeroed; BatchNorm normalizes the
visible positions only (SparK's encoder.py). ``sparkct.nn.SparseEncoder`` must equal it; the
``--encoder dense-masked`` option of SparK pretraining runs it (the baseline of the benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SparKMasker", "spark_conv", "spark_bn", "spark_dense_masked_features", "spark_published_loss"]


class SparKMasker:
    """SparK's helper (its encoder.py `_get_active_ex_or_ii`): the cell mask expanded to a feature
    map's resolution, recomputed at every layer as SparK does."""

    def __init__(self, mask):
        self.mask = mask  # (B, GH, GW) bool

    def active_ex(self, H, W):
        gh, gw = self.mask.shape[1:]
        return self.mask.repeat_interleave(H // gh, 1).repeat_interleave(W // gw, 2).unsqueeze(1)

    def active_ii(self, H, W):
        return self.active_ex(H, W).squeeze(1).nonzero(as_tuple=True)


def spark_conv(module, x, masker):
    """SparK's SparseConv2d / SparseMaxPooling: the dense layer, then zero the masked cells (in place)."""
    y = module(x)
    y *= masker.active_ex(y.shape[2], y.shape[3])
    return y


def spark_bn(bn, x, masker):
    """SparK's SparseBatchNorm2d: normalize the visible positions only (statistics and running-stat
    update over them, as its BatchNorm1d on the (N_visible, C) rows), zeros elsewhere. Returns the
    (B, C, H, W) view of a channels-last buffer, as SparK's permute does."""
    ii = masker.active_ii(x.shape[2], x.shape[3])
    bhwc = x.permute(0, 2, 3, 1)
    nc = bhwc[ii]
    nc = bn(nc[:, :, None, None])[:, :, 0, 0]  # BatchNorm2d on (N, C, 1, 1) == BatchNorm1d on (N, C)
    out = torch.zeros_like(bhwc)
    out[ii] = nc
    return out.permute(0, 3, 1, 2)


def _spark_module(m, x, masker):
    from torchvision.models.resnet import BasicBlock, Bottleneck  # noqa: PLC0415 (lazy: `-h` imports no torchvision)

    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return spark_conv(m, x, masker)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return spark_bn(m, x, masker)
    if isinstance(m, (nn.ReLU, nn.Identity)):
        return m(x)
    if isinstance(m, nn.Sequential):
        for sub in m:
            x = _spark_module(sub, x, masker)
        return x
    if isinstance(m, BasicBlock):
        identity = x if m.downsample is None else _spark_module(m.downsample, x, masker)
        out = m.relu(_spark_module(m.bn1, _spark_module(m.conv1, x, masker), masker))
        out = _spark_module(m.bn2, _spark_module(m.conv2, out, masker), masker)
        out += identity
        return m.relu(out)
    if isinstance(m, Bottleneck):
        identity = x if m.downsample is None else _spark_module(m.downsample, x, masker)
        out = m.relu(_spark_module(m.bn1, _spark_module(m.conv1, x, masker), masker))
        out = m.relu(_spark_module(m.bn2, _spark_module(m.conv2, out, masker), masker))
        out = _spark_module(m.bn3, _spark_module(m.conv3, out, masker), masker)
        out += identity
        return m.relu(out)
    raise TypeError(f"SparK dense-masked reference: unsupported module {type(m).__name__}")


def spark_dense_masked_features(model, x, mask, stem=False):
    """SparK's encoder forward on a torchvision ResNet ("dense conv, then mask"): the input is masked,
    every conv / pool runs densely and its output's masked cells are zeroed, BatchNorm normalizes the
    visible positions only. Returns the dense feature maps of layer1..layer4 (strides 4, 8, 16, 32),
    preceded by the stride-2 stem output if stem=True. Uses (and trains) the model's own modules."""
    masker = SparKMasker(mask)
    x = x * masker.active_ex(x.shape[2], x.shape[3])
    x = _spark_module(model.conv1, x, masker)
    x = model.relu(_spark_module(model.bn1, x, masker))
    feats = [x] if stem else []
    x = _spark_module(model.maxpool, x, masker)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = _spark_module(getattr(model, name), x, masker)
        feats.append(x)
    return feats


def spark_published_loss(model, x, mask, vis=False):
    """The whole SparK forward written as SparK's pretrain/spark.py writes it, on the modules of a
    ``sparkct.models.spark.SparK`` (its backbone, densify layers, mask tokens, decoder blocks): the
    input masked, SparK's dense-masked encoder, densify with ``torch.where`` over expanded masks, the
    decoder's ``x = x + to_dec[i]`` loop, targets ``patchify``-ed with einsum. One change, the one
    sparkct makes: the per-cell target mean/variance are taken per channel (HU window), not over the
    cell's channels together. It is the oracle of the model tests and "SparK's published way" in the
    benchmarks. With ``vis`` returns SparK's visualization triple (input, masked input, reconstruction
    pasted into the masked cells) instead of the loss."""
    p = 32
    B, C, H, W = x.shape
    h, w = H // p, W // p
    active_b1ff = mask.view(B, 1, h, w)
    active_b1hw = active_b1ff.repeat_interleave(p, 2).repeat_interleave(p, 3)
    masked_bchw = x * active_b1hw
    fea = spark_dense_masked_features(model.backbone, masked_bchw, mask)
    fea.reverse()
    masker = SparKMasker(mask)
    cur_active = active_b1ff
    to_dec = []
    for i, bcff in enumerate(fea):
        bcff = spark_bn(model.densify_norms[i], bcff, masker)
        tokens = model.mask_tokens[i].expand_as(bcff)
        bcff = torch.where(cur_active.expand_as(bcff), bcff, tokens)
        to_dec.append(model.densify_projs[i](bcff))
        cur_active = cur_active.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    dec = model.decoder
    y = 0
    for i, blk in enumerate(dec.dec):
        if i < len(to_dec):
            y = y + to_dec[i]
        y = blk(y)
    rec_bchw = dec.proj(y)

    def patchify(bchw):  # (B, L, p*p, C): per-channel statistics need the channel axis kept apart
        t = bchw.reshape(B, C, h, p, w, p)
        return torch.einsum("bchpwq->bhwpqc", t).reshape(B, h * w, p * p, C)

    inp, rec = patchify(x), patchify(rec_bchw)
    mean = inp.mean(dim=2, keepdim=True)
    var = (inp.var(dim=2, keepdim=True) + 1e-6) ** 0.5
    inp = (inp - mean) / var
    l2_loss = ((rec - inp) ** 2).mean(dim=(2, 3))  # (B, L)
    non_active = active_b1ff.logical_not().int().view(B, -1)
    if vis:
        rec = rec * var + mean
        rec = torch.einsum("bhwpqc->bchpwq", rec.reshape(B, h, w, p, p, C)).reshape(B, C, H, W)
        return x, masked_bchw, torch.where(active_b1hw, x, rec)
    return l2_loss.mul_(non_active).sum() / (non_active.sum() + 1e-8)
