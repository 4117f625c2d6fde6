"""``InfoNCELoss``: a drop-in for lightly's ``NTXentLoss`` on the fused InfoNCE kernels."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparkct.distributed import all_gather_rows
from sparkct.ops.info_nce import _distributed, check_temperature, info_nce
from sparkct.profiling import ranged

__all__ = ["InfoNCELoss"]


class InfoNCELoss(nn.Module):
    """Contrastive cross-entropy (NT-Xent) loss, the same constructor and ``forward(out0, out1)``
    as lightly's ``NTXentLoss``, with the same values and gradients.

    Args:
        temperature: logits are cosine similarities / temperature (>= ``MIN_TEMPERATURE``, 1e-8 as
            lightly's ``NTXentLoss``).
        memory_bank_size: 0 (no bank: SimCLR, the other 2N - 2 embeddings of the batch are the
            negatives), or ``(K, D)`` (MoCo: a FIFO bank of K normalized keys of dimension D is the
            set of negatives; initialized at construction with ``normalize(randn(K, D))``, drawing
            from the global RNG exactly like lightly). A bare ``K > 0`` is also accepted (lightly
            1.6 rejects it): the bank is then drawn the same way at the first forward, with D taken
            from that batch.
        gather_distributed: without a bank, every rank's embeddings serve as negatives (needs
            torch.distributed initialized; ranks may hold different batch sizes); with a bank, the
            keys of every rank are enqueued. Gradient convention: see :mod:`sparkct.ops.info_nce`
            (DDP's gradient averaging gives the gradients of the single-process loss on the global
            batch).
        persistent_bank: keep the bank and its pointer in ``state_dict`` (a checkpoint then resumes
            with the same negatives; MoCo's queue); False as in lightly.

    Bank mode follows lightly: the loss uses the bank as it was before this call; afterwards, if
    ``out0.requires_grad``, the normalized ``out1`` is enqueued (detached) at ``bank_ptr``; a batch
    that reaches the end of the bank fills it up to the end, its remaining rows are dropped, and
    the pointer wraps to 0. ``bank`` and ``bank_ptr`` are non-persistent buffers, as in lightly, unless
    ``persistent_bank``.
    """

    #: the smallest temperature accepted (lightly's bound)
    MIN_TEMPERATURE = 1e-8
    bank: torch.Tensor  # buffers (registered in __init__)
    bank_ptr: torch.Tensor

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int | Sequence[int] = 0,
        gather_distributed: bool = False,
        persistent_bank: bool = False,
    ):
        super().__init__()
        # the op's check of its argument, run here at construction, with lightly's bound
        self.temperature = check_temperature(temperature, "InfoNCELoss", minimum=self.MIN_TEMPERATURE)
        if gather_distributed and not dist.is_available():
            raise ValueError("InfoNCELoss: gather_distributed is True but torch.distributed is not available")
        self.gather_distributed = bool(gather_distributed)
        bad = ValueError(
            f"InfoNCELoss: illegal memory_bank_size {memory_bank_size!r} (a "
            f"{type(memory_bank_size).__name__}): expected an int 0 (no bank), K, or a pair (K, D) "
            "of ints with K, D >= 0"
        )
        if isinstance(memory_bank_size, numbers.Integral) and not isinstance(memory_bank_size, bool):
            size: tuple[int, ...] = (int(memory_bank_size),)
        elif isinstance(memory_bank_size, Sequence) and not isinstance(memory_bank_size, str):
            size = tuple(memory_bank_size)
        else:
            raise bad
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size) or len(size) not in (
            1,
            2,
        ):
            raise bad
        size = tuple(int(s) for s in size)
        if any(s < 0 for s in size) or (len(size) == 2 and size[1] == 0 and size[0] > 0):
            raise bad
        self.memory_bank_size = size
        if persistent_bank and len(size) != 2 and size[0] > 0:
            raise ValueError("InfoNCELoss: persistent_bank needs memory_bank_size=(K, D) (the shape it is saved with)")
        self.register_buffer(
            "bank", torch.empty(size if len(size) == 2 else (0,), dtype=torch.float), persistent=persistent_bank
        )
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=persistent_bank)
        if len(size) == 2 and size[0] > 0:
            self._init_bank(size)

    @property
    def uses_bank(self) -> bool:
        return self.memory_bank_size[0] > 0

    @torch.no_grad()
    def _init_bank(self, size) -> None:
        bank = torch.randn(size).to(self.bank)  # the global CPU RNG, like lightly
        self.bank = F.normalize(bank, dim=-1)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=self.bank_ptr.device)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        if _distributed(self.gather_distributed):
            keys = all_gather_rows(keys)
        size = self.bank.shape[0]
        ptr = int(self.bank_ptr)
        b = keys.shape[0]
        if ptr + b >= size:
            self.bank[ptr:] = keys[: size - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + b] = keys
            self.bank_ptr[0] = ptr + b

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Put `keys` (N, D) into the bank (normalized; every rank's with gather_distributed)."""
        if self.bank.dim() != 2:
            raise ValueError("InfoNCELoss.enqueue: no bank yet (construct with memory_bank_size=(K, D))")
        self._enqueue(F.normalize(keys.detach(), dim=1).to(self.bank.dtype))

    @ranged("loss/InfoNCELoss")
    def forward(self, out0: torch.Tensor, out1: torch.Tensor, enqueue: bool | None = None) -> torch.Tensor:
        """The loss; with a bank, `enqueue` (default: whether out0 requires grad, as lightly) puts the
        normalized out1 into the bank after computing it."""
        if (
            isinstance(out0, torch.Tensor)
            and isinstance(out1, torch.Tensor)
            and out0.dtype != out1.dtype
            and out0.is_floating_point()
            and out1.is_floating_point()
        ):
            # e.g. one projection computed under autocast and one not: compute in the wider type
            common = torch.promote_types(out0.dtype, out1.dtype)
            out0, out1 = out0.to(common), out1.to(common)
        if not self.uses_bank:
            return info_nce(out0, out1, self.temperature, gather_distributed=self.gather_distributed)
        if self.bank.dim() != 2:  # a bare K: draw the bank now that D is known
            if not isinstance(out1, torch.Tensor) or out1.dim() != 2:
                raise ValueError("InfoNCELoss: out1 must be a 2-D (N, D) tensor")
            self._init_bank((self.memory_bank_size[0], out1.shape[1]))
        # The bank as it is now (a copy: the update below must not touch what the backward reads).
        negatives = self.bank.detach().to(device=out0.device, dtype=out0.dtype, copy=True)
        loss = info_nce(out0, out1, self.temperature, bank=negatives)
        if out0.requires_grad if enqueue is None else enqueue:
            self._enqueue(F.normalize(out1.detach(), dim=1))
        return loss

    def extra_repr(self) -> str:
        size = self.memory_bank_size if len(self.memory_bank_size) == 2 else self.memory_bank_size[0]
        return f"temperature={self.temperature}, memory_bank_size={size}, gather_distributed={self.gather_distributed}"
