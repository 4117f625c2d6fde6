"""The fine-tuning config (no torch here: ``sparkct finetune -h`` stays instant)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from sparkct.errors import UserError

__all__ = ["FinetuneConfig"]


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class FinetuneConfig:
    """The fine-tuning method's options (each a ``sparkct finetune`` flag); the trainer's own options
    (epochs, batch, lr, ...) are in :class:`sparkct.train.config.TrainConfig`."""

    linear_probe: bool = _h("keep the backbone frozen throughout (linear probing)", default=False)
    freeze_epochs: float = _h("epochs with the backbone frozen (only the head learns) before it is unfrozen",
                              default=10.0)
    ramp_epochs: float = _h("epochs over which the backbone's lr rises from --backbone-lr-start x lr to lr",
                            default=10.0)
    backbone_lr_start: float = _h("backbone lr, as a fraction of the lr, when it is unfrozen", default=0.1)
    label_smoothing: float = _h("cross-entropy label smoothing", default=0.0)
    eval_batch: int = _h("batch size for validation and testing", default=128)

    def validate(self) -> None:
        for name in ("freeze_epochs", "ramp_epochs"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise UserError(f"--{name.replace('_', '-')} must be finite and >= 0, got {v}")
        if not 0 < self.backbone_lr_start <= 1:
            raise UserError(f"--backbone-lr-start must be in (0, 1], got {self.backbone_lr_start}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.eval_batch < 1:
            raise UserError(f"--eval-batch must be >= 1, got {self.eval_batch}")
