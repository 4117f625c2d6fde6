"""The method contract: what a pretraining (or fine-tuning) method is to the trainer, and the
monitor every method may log (:func:`collapse_indicator`).

It lives with the models (not with the trainer) so that layers run one way: a method knows no
trainer; ``sparkct.train`` drives any :class:`Method` through this contract alone.

A method is a small ``nn.Module`` (one file in ``sparkct/models/``, reusable parts in ``sparkct/nn/``)
with a config dataclass; the trainer (``sparkct.train.Trainer``) owns everything else: the loop, AMP,
channels-last, accumulation, clipping, optimizers and schedules, checkpoints and resume, logging,
previews, DDP. The trainer calls, per optimizer step:

    batch = next(loader)                      # built by the method's transform()
    loss, logs = method.training_step(batch, step)
    ... backward, clip, optimizer step ...
    method.after_step(step, total_steps)      # EMA, queues, prototype freezing

and, every ``preview_every`` steps, ``method.preview(batch)`` for the PNG grid; at the end of every
epoch ``method.on_epoch_end(epoch)``; and ``method.validate(step)`` (evaluation) at the end of every
epoch, or, where the method sets ``validate_every`` to N > 0, after every N-th optimizer step and the
last instead. A ``"monitor"`` entry (higher = better) in what either returns makes the trainer keep
``best.ckpt``.

Methods whose step must run its own backward (gradient caching: embeddings in chunks without
autograd, then each chunk again with autograd) set ``manual_backward = True``; the trainer then
calls ``training_step(batch, step, backward=bw)`` where ``bw(tensors, grad_tensors=None)`` back-
propagates with the trainer's loss scaling and accumulation applied (a scalar loss, or tensors with
the gradients of the loss with respect to them), and the returned loss is only logged.

Randomness inside a step (SparK's masks, say) must be a function of (seed, step, sample) so that a
resumed run and a DDP run draw what one uninterrupted process draws: use ``self.step_generator(step)``
for the global batch and ``sparkct.distributed`` rank/world to take this rank's rows.

:func:`collapse_indicator`: ``std(normalize(z), over the batch).mean() * sqrt(dim)``. About 1 for
embeddings spread over the sphere (each coordinate of a uniform unit vector has std 1/sqrt(dim)), 0 when
every sample maps to the same point (collapse). SimSiam's diagnostic; the contrastive methods log it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Method", "MethodConfig", "collapse_indicator"]


@dataclass
class MethodConfig:
    """Base of every method's config. Each field becomes a ``sparkct pretrain METHOD --flag`` (underscores
    -> dashes), with the field's default and its ``metadata={"help": ...}``; ``validate`` raises
    :class:`sparkct.errors.UserError` for bad values before any work starts."""

    def validate(self) -> None:
        pass


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and ``config_class`` and implement the methods below.

    Attributes:
        backbone: the torchvision ResNet (``fc`` = Identity) or timm ViT (``num_classes=0``) of
            ``sparkct.models.backbone.build_backbone``: ``backbone(x)`` -> (B, feature_dim); it is exported
            (``sparkct.models.backbone.backbone_state``) and fine-tuned later.
        config: the method's config (an instance of ``config_class``).
    """

    name: str = "method"
    config_class: type[MethodConfig] = MethodConfig
    manual_backward: bool = False
    #: with a labels file the loader yields (x, targets); methods that use targets (the hybrid objective)
    #: get the pair, the others x alone (the trainer's online probe uses the targets either way)
    accepts_targets: bool = False
    #: the method trains on labels alone (supervised pretraining): the trainer refuses to start without a
    #: labels file (on the built-in data it uses the built-in slice labels), keeps only labelled slices
    #: and calls :meth:`set_classes`
    needs_labels: bool = False
    seed: int = 0  # set by the trainer from its config
    #: why the method needs a ResNet backbone (one line), or "" when any backbone of
    #: ``sparkct.models.backbone`` will do; such a method refuses a ViT with it, and ``sparkct experiment``
    #: checks it against --arch before anything is written
    resnet_only: str = ""
    #: optimizer steps between the trainer's calls of validate (and after the last step); 0: at epoch ends
    validate_every: int = 0
    micro: int = 0  # the accumulation micro-batch of the current step, set by the trainer
    #: the trainer's --clip-grad clips each parameter tensor's gradient norm on its own (DINO's
    #: ``clip_gradients``) instead of the global norm
    clip_per_parameter: bool = False
    #: the method's preferred optimizer settings; ``None`` fields of TrainConfig take these
    defaults: dict = {
        "optimizer": "adamw",
        "base_lr": 1e-3,
        "weight_decay": 0.05,
        "weight_decay_end": None,
        "warmup_epochs": 1.0,
        "betas": (0.9, 0.999),
        "clip_grad": 0.0,  # 0: no clipping
    }

    def __init__(self, backbone: nn.Module, config: MethodConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.config_class()

    def check_run(self, batch: int) -> None:
        """Raise sparkct.errors.UserError before any work when this method cannot run with `batch` images
        per step (the global micro-batch: all ranks, one accumulation step), e.g. SimCLR with one image."""

    def check_input(self, crop: int, windows) -> None:
        """Raise sparkct.errors.UserError before any work when this method cannot train on `crop` x `crop`
        inputs with `windows` (e.g. SparK: a mask ratio that hides no cell of the crop's grid). The trainer
        calls it in its set-up, before the data is resolved or anything is written."""

    def set_classes(self, classes: list) -> None:
        """The class names of the labels file (class index = position), given by the trainer before the
        optimizer is made and a checkpoint restored: a method with a classifier head sizes it here."""

    # --- data ---------------------------------------------------------------------------------------
    def transform(self, crop: int, windows) -> Callable[..., Any]:
        """The batch transform for ``sparkct.data.SliceLoader``: ``(hu (B, 1, H, W) int16, generator) ->
        batch`` (a tensor, a list of views, ...), applied on the loader's device. `crop` and `windows`
        come from the trainer config (windows = the input channels)."""
        raise NotImplementedError

    def pairs(self, dataset):
        """None (the loader yields single slices), or a :class:`sparkct.data.SlicePairs` over `dataset`:
        the loader then yields pairs of slices of a series (next-slice prediction; see
        ``sparkct.data.SliceLoader``), and ``transform`` gets HU (B, 2, H, W) and returns (xa, xb).
        Raise :class:`sparkct.errors.UserError` here when the data cannot give the pairs."""
        return None

    def forward(self, batch: Any, step: int, **kwargs):
        # DDP calls forward(); routing it to training_step lets DDP's gradient hooks see the whole step
        return self.training_step(batch, step, **kwargs)

    # --- the step -----------------------------------------------------------------------------------
    def training_step(self, batch: Any, step: int) -> tuple[Tensor, dict[str, float | Tensor]]:
        """(scalar loss to minimize, scalars to log). Runs under the trainer's autocast."""
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (EMA/momentum updates, queues, prototype normalization)."""

    def on_before_optimizer_step(self, step: int) -> None:
        """Called after backward and before clipping/stepping (e.g. zero the gradients of frozen
        prototypes)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Scalars to log after each epoch; key "monitor" (higher is better) selects ``best.ckpt``."""
        return {}

    def validate(self, step: int) -> dict[str, float]:
        """Validation scalars after optimizer step `step` (at epoch ends, or every ``validate_every``
        steps and after the last); key "monitor" (higher is better) selects ``best.ckpt``."""
        return {}

    def step_generator(self, step: int, stream: int = 0) -> torch.Generator:
        """A CPU generator that depends only on (seed, step, accumulation micro-batch, stream): the same
        draws after a resume and on every rank, different ones for each micro-batch of a step."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 257 + self.micro) * 65_537 + stream)

    # --- optimizer ----------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names of parameters (as in ``named_parameters()``) exempt from weight decay beyond the
        trainer's rule (biases and every 1-D parameter: norms). E.g. SparK's mask tokens."""
        return set()

    # --- what a person looks at ---------------------------------------------------------------------
    def loss_reference(self, batch: int) -> float | None:
        """The loss of a model whose predictions carry no information (uniform similarities for
        InfoNCE-type losses, chance for pretext classification) with `batch` images per step (the
        global micro-batch), drawn as a line on loss.png; None where there is no such value."""
        return None

    def plot_marks(self) -> list[tuple[int, str]]:
        """(step, label) marks for loss.png: schedule events a reader should see (e.g. unfreezing)."""
        return []

    @torch.no_grad()
    def preview(self, batch: Any) -> dict[str, Tensor] | None:
        """Rows of images for the preview PNG, name -> (B, C, H, W) in [0, 1] (e.g. SparK: input, masked
        input, reconstruction). None: no preview."""
        return None


@torch.no_grad()
def collapse_indicator(z: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalized rows of z (N, D), times sqrt(D) (needs N >= 2)."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"collapse_indicator: expected embeddings (N >= 2, D), got {tuple(z.shape)}")
    zn = F.normalize(z.detach().float(), dim=1)
    return float(zn.std(dim=0).mean() * math.sqrt(z.shape[1]))
