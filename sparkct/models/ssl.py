"""The shared base of the contrastive and clustering (SSL) methods (SimCLR, MoCo v2, SwAV, BYOL):
:class:`SSLConfig` and :class:`SSLMethod`, with the hybrid objective, gradient caching, the view
transforms, and the step's bookkeeping.

Hybrid objective. ``loss = ssl + hybrid_weight * supervised``: a linear classifier on the backbone's
pooled features of the global views is trained with cross-entropy on the labelled slices of the
batch. How labels reach the batch:

1. a labels CSV over some slices (the format of :class:`sparkct.data.CTLabelledDataset`: a
   ``series_uid`` column, optionally ``instance_number`` / ``slice_index`` / ``z_mm`` for per-slice
   labels, and a label column) is mapped onto the training dataset by
   :func:`sparkct.data.label_slices`, which returns a copy of the dataset with a ``targets`` array:
   the class index of each labelled slice, -1 for every other slice (none is dropped);
2. :class:`sparkct.data.SliceLoader` yields ``(views, targets)`` for a dataset with ``targets``;
3. the method's step takes ``(views, targets)`` (or bare views: no supervised term), and the
   cross-entropy averages over the rows with a target >= 0 (0 when the batch has none); under DDP
   each rank averages its own labelled rows.

``num_classes`` (a config field) is the number of classes (``len(classes)`` from
:func:`sparkct.data.label_slices`; the trainer sets it from ``--labels``); ``hybrid_weight`` > 0
needs it. The detached backbone features and targets of every step are left in
``method.last_features`` / ``method.last_targets`` for the trainer's online linear probe.

Gradient caching. ``chunk`` > 0 embeds the views in chunks of that many rows
(:func:`sparkct.nn.grad_cache`): the method then sets ``manual_backward`` and back-propagates itself
through the trainer's ``backward`` callable; the returned loss is only logged.

Transforms. Each method's views come from :class:`sparkct.data.CTAugment`; its keyword arguments
come from named presets (:data:`AUGMENTS`) joined with ``+`` (later ones override earlier ones), e.g.
``--augment strong+no-rotate``; each method has its own default and may vary per view (BYOL's
asymmetric blur).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparkct.data.augment import CTAugment, MultiCrop
from sparkct.errors import UserError
from sparkct.models.backbone import feature_dim as backbone_feature_dim
from sparkct.models.base import Method, MethodConfig, collapse_indicator
from sparkct.nn.gradcache import grad_cache

__all__ = ["AUGMENTS", "augment_kwargs", "Views", "SSLConfig", "SSLMethod"]

#: CTAugment keyword presets for the views, composable with "+"
AUGMENTS: dict[str, dict[str, Any]] = {
    # CTAugment's defaults: mild crops, HU calibration, window jitter, some gamma / noise / blur
    "ct": {},
    # SimCLR-strength: crops down to 8 % of the slice, strong window (contrast/brightness) jitter as
    # SimCLR's colour jitter, blur on half the views, more noise and rotations
    "strong": dict(
        scale=(0.08, 1.0),
        contrast=(0.6, 1.4),
        brightness=(-0.15, 0.15),
        p_intensity=0.8,
        gamma=(0.6, 1.6),
        p_gamma=0.3,
        noise=(0.0, 40.0),
        p_noise=0.3,
        blur=(0.1, 2.0),
        p_blur=0.5,
        p_rotate=0.3,
    ),
    # MoCo v2's crop range (0.2 - 1) with the strong intensity jitter
    "moco": dict(
        scale=(0.2, 1.0),
        contrast=(0.6, 1.4),
        brightness=(-0.15, 0.15),
        p_intensity=0.8,
        gamma=(0.6, 1.6),
        p_gamma=0.3,
        noise=(0.0, 40.0),
        p_noise=0.3,
        blur=(0.1, 2.0),
        p_blur=0.5,
        p_rotate=0.3,
    ),
    "light": dict(scale=(0.5, 1.0), p_intensity=0.3, p_gamma=0.0, p_noise=0.1, p_blur=0.0, p_rotate=0.1),
    "no-rotate": dict(p_rotate=0.0),
    "no-noise": dict(p_noise=0.0),
    "no-blur": dict(p_blur=0.0),
    "no-intensity": dict(p_intensity=0.0, p_gamma=0.0, p_hu=0.0),
    "vflip": dict(vflip=0.5),
}


def augment_kwargs(spec: str) -> dict[str, Any]:
    """CTAugment keyword arguments of a preset name or names joined with '+'."""
    out: dict[str, Any] = {}
    for name in (s.strip() for s in str(spec).split("+")):
        if name not in AUGMENTS:
            raise UserError(
                f"unknown augmentation preset {name!r}; choose from {', '.join(AUGMENTS)} (join several with '+')"
            )
        out.update(AUGMENTS[name])
    return out


class Views(MultiCrop):
    """A list of views of the same batch, one per CTAugment (each its own crop size and settings).
    Like MultiCrop, it takes the batch's generator and ``rows`` (:class:`sparkct.data.SliceLoader`
    then augments a sample alike on any number of ranks)."""

    def __init__(self, augments: Sequence[CTAugment]):
        if not augments:
            raise ValueError("Views needs at least one augmentation")
        self.augments = list(augments)
        self.n_global, self.n_local = len(self.augments), 0

    def __call__(
        self, hu: Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> list[Tensor]:
        return [aug(hu, generator, rows) for aug in self.augments]

    def __repr__(self) -> str:
        return "Views(" + ", ".join(repr(a) for a in self.augments) + ")"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _integer(v, name: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UserError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


@dataclass
class SSLConfig(MethodConfig):
    """Fields every contrastive / clustering method has (besides its own)."""

    chunk: int = field(
        default=0,
        metadata={
            "help": "gradient caching: embed the batch in chunks of this many images (no autograd), then re-run "
            "each chunk with autograd; same gradients, memory of one chunk (0: whole batch at once)"
        },
    )
    hybrid_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight lambda of the supervised cross-entropy on labelled slices: loss = ssl + lambda * ce "
            "(needs --labels; 0: self-supervised only)"
        },
    )
    num_classes: int = field(
        default=0, metadata={"help": "classes of the supervised head (set from the labels file; 0: none)"}
    )
    proj_hidden_dim: int = field(
        default=0,
        metadata={
            "help": "projector (and BYOL's predictor) hidden width (0: the published width for ResNet-50 - 2048, "
            "BYOL 4096 - scaled by the backbone's feature dim / 2048)"
        },
    )
    proj_dim: int = field(default=128, metadata={"help": "projector output width (the embedding the loss sees)"})
    augment: str = field(
        default="strong",
        metadata={"help": "CTAugment presets of the views, joined with '+' (see sparkct.models.ssl.AUGMENTS)"},
    )

    def validate(self) -> None:
        _integer(self.chunk, "chunk")
        _integer(self.proj_hidden_dim, "projector hidden width")
        _integer(self.proj_dim, "projector output width", 1)
        augment_kwargs(self.augment)
        w = _number(self.hybrid_weight, "hybrid weight")
        _check(w >= 0, f"hybrid weight must be >= 0, got {w}")
        _integer(self.num_classes, "num_classes")
        _check(
            w == 0 or self.num_classes >= 2,
            "--hybrid-weight > 0 needs labels with at least 2 classes (--labels labels.csv)",
        )

    def validate_temperature(self, t, name: str = "temperature", minimum: float | None = None) -> None:
        """The user's `t` (``--NAME``): > 0, and >= `minimum` (the loss's bound) where one is given."""
        v = _number(t, name)
        _check(v > 0, f"{name} must be > 0, got {t!r}")
        if minimum is not None:
            _check(v >= minimum, f"{name} must be >= {minimum:g}, got {t!r}")

    def validate_momentum(self, *values) -> None:
        for v in values:
            v = _number(v, "momentum")
            _check(0.0 <= v <= 1.0, f"momentum must be in [0, 1], got {v}")


class SSLMethod(Method):
    """Base of the contrastive / clustering methods. Subclasses implement :meth:`objective` (the
    self-supervised loss from the embeddings of the grad-carrying views) and, where the defaults do not
    fit, :meth:`embed` (a view's rows -> ``(embedding, backbone features)``, every parameter that gets a
    gradient inside; default: ``self.projector`` on the backbone's features), :meth:`views_transform`
    (default: two views of ``config.augment``) and :meth:`prepare` (no-grad work before the step: key /
    target encoders, prototype normalization). The base adds the hybrid term, gradient caching and the
    logs (``ssl``, ``supervised``, ``collapse``)."""

    config_class = SSLConfig
    config: SSLConfig
    #: set by each subclass (the default :meth:`embed` runs it on the backbone's features)
    projector: nn.Module
    accepts_targets = True  # the trainer passes (views, targets) when a labels file is given
    #: how many leading views are "global" (full-size crops): the supervised term and the probe use them
    n_global = 2
    #: consecutive views of one shape go through the backbone in one call (BatchNorm over them together)
    joint_views = True
    #: :meth:`head` runs once over the features of every view (SwAV's code: its projection head's
    #: BatchNorm sees all crops together); otherwise once per backbone call. Under ``--chunk`` the head,
    #: like the backbone, sees one chunk at a time.
    joint_head = False

    def __init__(self, backbone: nn.Module, config: SSLConfig | None = None, *, feature_dim: int | None = None):
        super().__init__(backbone, config)
        self.config.validate()
        if feature_dim is None:
            try:
                feature_dim = backbone_feature_dim(backbone)
            except AttributeError:
                raise ValueError("pass feature_dim= for a backbone that is not a torchvision ResNet") from None
        self.feature_dim = int(feature_dim)
        self.manual_backward = self.config.chunk > 0
        c = self.config
        self.classifier = nn.Linear(self.feature_dim, c.num_classes) if c.hybrid_weight > 0 else None
        self.last_features: Tensor | None = None
        self.last_targets: Tensor | None = None

    # --- subclass interface -------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """The backbone's pooled features of a batch of views."""
        return self.backbone(x).flatten(1)

    def head(self, f: Tensor) -> Tensor:
        """The embedding the loss sees, from backbone features (default: ``self.projector``)."""
        return self.projector(f)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(:meth:`head` of the features, the backbone's pooled features)."""
        f = self.features(x)
        return self.head(f), f

    def objective(self, outs: list[Tensor], state: Any, step: int) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def grad_views(self, views: list[Tensor]) -> list[Tensor]:
        """The views that go through :meth:`embed` with autograd (default: all)."""
        return views

    def collapse_embedding(self, out: Tensor) -> Tensor:
        """The embedding the collapse indicator watches, from :meth:`embed`'s first output."""
        return out

    def prepare(self, views: list[Tensor], step: int) -> Any:
        """No-grad work before the step; its result reaches :meth:`objective` as `state`."""
        return None

    def views_transform(self, crop: int, windows) -> Views:
        """Default: two views from the config's augment presets."""
        aug = self.augment(crop, windows, self.config.augment)
        return Views([aug, aug])

    # --- data ---------------------------------------------------------------------------------------
    def transform(self, crop: int, windows) -> Callable[..., Any]:
        _check(
            isinstance(crop, int) and not isinstance(crop, bool) and crop >= 8,
            f"crop size must be an integer >= 8 pixels, got {crop!r}",
        )
        try:
            return self.views_transform(crop, windows)
        except ValueError as e:
            if isinstance(e, UserError):
                raise
            raise UserError(str(e)) from None

    def augment(self, size: int, windows, spec: str, **override) -> CTAugment:
        return CTAugment(size, windows=windows, **{**augment_kwargs(spec), **override})

    @staticmethod
    def split_batch(batch) -> tuple[list[Tensor], Tensor | None]:
        """(views, targets or None) of a loader's batch: views, or (views, targets)."""
        if (
            isinstance(batch, tuple)
            and len(batch) == 2
            and isinstance(batch[1], Tensor)
            and batch[1].dim() == 1
            and isinstance(batch[0], (list, tuple))
        ):
            return list(batch[0]), batch[1]
        if isinstance(batch, Tensor):
            raise ValueError("expected a list of views (the method's transform makes them), got one tensor")
        return list(batch), None

    # --- the step -----------------------------------------------------------------------------------
    def _groups(self, views: list[Tensor]) -> list[tuple[Tensor, int]]:
        """Consecutive views of one shape concatenated (one backbone call per resolution, BatchNorm over
        them together, as SimCLR and SwAV do)."""
        groups: list[list[Tensor]] = []
        for v in views:
            if groups and self.joint_views and groups[-1][0].shape == v.shape:
                groups[-1].append(v)
            else:
                groups.append([v])
        return [(torch.cat(g, 0) if len(g) > 1 else g[0], len(g)) for g in groups]

    def _outputs(self, out: Tensor, feats: Tensor) -> tuple[Tensor, ...]:
        if self.classifier is None:
            return out, feats
        return out, feats, self.classifier(feats)

    def _embed_all(self, x: Tensor) -> tuple[Tensor, ...]:
        return self._outputs(*self.embed(x))

    def _embed_groups(self, xs: list[Tensor]) -> list[tuple[Tensor, ...]]:
        """:meth:`_embed_all` of each backbone call's input; with :attr:`joint_head`, the backbone per
        call and the head once over all their features."""
        if not self.joint_head or len(xs) < 2:
            return [self._embed_all(x) for x in xs]
        feats = [self.features(x) for x in xs]
        outs = self.head(torch.cat(feats)).split([f.shape[0] for f in feats])
        return [self._outputs(o, f) for o, f in zip(outs, feats)]

    def supervised_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy over the rows with a target >= 0 (0 when there are none)."""
        t = targets.to(logits.device).long()
        keep = t >= 0
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[keep].float(), t[keep])

    def training_step(self, batch: Any, step: int, backward: Callable | None = None) -> tuple[Tensor, dict[str, Any]]:
        views, targets = self.split_batch(batch)
        state = self.prepare(views, step)
        inputs = self.grad_views(views)
        groups = self._groups(inputs)
        sizes = [g.shape[0] // n for g, n in groups]
        n_global = min(self.n_global, len(inputs))

        def loss_fn(
            group_outs: Sequence[Tensor | tuple[Tensor, ...]],
        ) -> tuple[Tensor, tuple[list[tuple[Tensor, ...]], dict[str, Any]]]:
            per_view: list[tuple[Tensor, ...]] = []
            for (_g, n), outs, size in zip(groups, group_outs, sizes):
                outs = outs if isinstance(outs, tuple) else (outs,)
                split = [o.split(size, 0) for o in outs]
                per_view += [tuple(s[i] for s in split) for i in range(n)]
            ssl, logs = self.objective([o[0] for o in per_view], state, step)
            loss = ssl
            logs = dict(logs)
            logs["ssl"] = ssl.detach()
            if self.classifier is not None and targets is not None:
                # n_global >= 1 terms: a tensor (sum's start 0 makes mypy see Tensor | int)
                sup = cast(Tensor, sum(self.supervised_loss(o[2], targets) for o in per_view[:n_global])) / n_global
                loss = ssl + self.config.hybrid_weight * sup
                logs["supervised"] = sup.detach()
            return loss, (per_view, logs)

        if self.config.chunk > 0:
            bw = backward if backward is not None else torch.autograd.backward
            loss, _, (per_view, logs) = grad_cache(
                self._embed_all,
                [g for g, _ in groups],
                loss_fn,
                bw,
                self.config.chunk,
                module=self._embedding_modules(),
            )
        else:
            loss, (per_view, logs) = loss_fn(self._embed_groups([g for g, _ in groups]))
        emb = self.collapse_embedding(per_view[0][0].detach())
        if emb.shape[0] >= 2:
            logs["collapse"] = collapse_indicator(emb)
        self.last_features = per_view[0][1].detach()
        self.last_targets = targets
        return loss, logs

    # --- what a person looks at ---------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, batch: Any, shown: int = 8, search: int = 32) -> dict[str, Tensor] | None:
        """Rows for the preview PNG (the trainer calls this in eval mode): the global views of the first
        `shown` slices side by side (and the first local crop, enlarged), then what the backbone's pooled
        features (the exported representation, cosine similarity) match among the first `search` slices
        of the batch: for each slice, the view 2 nearest to its view 1 (its own view 2 when the features
        are invariant to the augmentations; the row's name counts how often that holds, beside the 1/n of
        a random match) and its nearest other slice (which slices the representation groups together).
        One no-grad forward of `search` x 2 images."""
        views, _ = self.split_batch(batch)
        n_global = min(self.n_global, len(views))
        k = min(shown, views[0].shape[0])
        rows = {f"view {i + 1}": v[:k] for i, v in enumerate(views[:n_global])}
        size = tuple(views[0].shape[-2:])
        if len(views) > n_global and tuple(views[n_global].shape[-2:]) != size:
            local = views[n_global]
            rows[f"local crop ({local.shape[-1]} px)"] = F.interpolate(local[:k], size=size, mode="nearest")
        n = min(search, views[0].shape[0])
        if n_global < 2 or n < 2:
            return rows
        dtype = next(self.backbone.parameters()).dtype
        a, b = (F.normalize(self.backbone(v[:n].to(dtype)).flatten(1).float(), dim=1) for v in views[:2])
        nearest = (a @ b.t()).argmax(1)
        own = int((nearest == torch.arange(n, device=nearest.device)).sum())
        rows[f"nearest view 2 ({own}/{n} own, chance 1/{n})"] = views[1][nearest[:k]]
        other = a @ a.t()
        other.fill_diagonal_(-float("inf"))
        rows["nearest other slice"] = views[0][other.argmax(1)[:k]]
        return rows

    def _embedding_modules(self) -> list[nn.Module]:
        """Modules whose buffers :meth:`embed` updates (restored after the no-grad pass of gradient
        caching): all but the loss modules (whose queues are updated once, by the loss)."""
        return [m for name, m in self.named_children() if name not in self._loss_modules]

    _loss_modules: tuple[str, ...] = ("criterion", "queue")
