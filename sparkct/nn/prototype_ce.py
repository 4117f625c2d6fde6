"""``PrototypeCrossEntropyLoss``: DINO's teacher-student cross-entropy over K prototypes, on the fused
kernels of :mod:`sparkct.ops.prototype_ce` (the (crops x batch) x K logits are never formed)."""

from __future__ import annotations

import torch
from torch import nn

from sparkct.ops.info_nce import check_temperature
from sparkct.ops.prototype_ce import prototype_cross_entropy

__all__ = ["PrototypeCrossEntropyLoss"]


class PrototypeCrossEntropyLoss(nn.Module):
    """Mean over (teacher crop i, student crop j) pairs of the batch-mean cross-entropy between
    ``softmax(teacher[i] @ w_teacher.T / teacher_temp + teacher_bias)`` and
    ``log_softmax(student[j] @ w_student.T / student_temp)``; the pairs i == j skipped when
    ``skip_same`` (DINO: the teacher sees the first T = 2 global crops). Defaults are DINO's
    (student_temp 0.1, teacher_temp 0.04, the temperature at the end of its warm-up from 0.04 to 0.07
    being a per-call override).

    ``forward(student (S, B, D), teacher (T, B, D), w_student (K, D), w_teacher (K, D),
    teacher_bias=None, *, teacher_temp=None, return_stats=False)``: gradients reach ``student`` and
    ``w_student`` only. DINO centering: ``teacher_bias = -center / teacher_temp``; DINOv2's
    Sinkhorn-Knopp: ``teacher_bias = sparkct.ops.prototype_sinkhorn(teacher.flatten(0, 1), w_teacher,
    teacher_temp)``. ``return_stats`` adds {"teacher_entropy", "kl"} (DINO's collapse signals).
    """

    def __init__(self, student_temp: float = 0.1, teacher_temp: float = 0.04, skip_same: bool = True):
        super().__init__()
        self.student_temp = check_temperature(student_temp, "PrototypeCrossEntropyLoss: student")
        self.teacher_temp = check_temperature(teacher_temp, "PrototypeCrossEntropyLoss: teacher")
        self.skip_same = bool(skip_same)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        w_student: torch.Tensor,
        w_teacher: torch.Tensor,
        teacher_bias: torch.Tensor | None = None,
        *,
        teacher_temp: float | None = None,
        return_stats: bool = False,
    ):
        return prototype_cross_entropy(
            student,
            teacher,
            w_student,
            w_teacher,
            teacher_bias,
            self.student_temp,
            self.teacher_temp if teacher_temp is None else teacher_temp,
            self.skip_same,
            return_stats=return_stats,
        )

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}, teacher_temp={self.teacher_temp}, skip_same={self.skip_same}"
