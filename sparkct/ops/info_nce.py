"""Fused InfoNCE loss (NT-Xent as in SimCLR, or queries against a memory bank as in MoCo).

``info_nce(z0, z1, temperature, bank=None)`` equals lightly's ``NTXentLoss`` (value and gradients):

* without a bank: the 2N embeddings ``[z0; z1]`` are anchors; each anchor's positive is its other
  view, its negatives the other 2N - 2 embeddings; the loss is the mean over the 2N anchors;
* with a bank (K, D): anchors ``z0``, positives ``z1`` row-wise, negatives the bank rows; the loss
  is the mean over the N anchors.

All embeddings (bank rows included) are L2-normalized inside (``F.normalize``, eps 1e-12). The
kernels never form the (2N)^2 or N x K logits: a tiled forward keeps one log-sum-exp per row, and
the backward recomputes the tiles from it, so the extra memory is O(rows + tile) (plus
gradient-sized fp32 accumulators), not O(rows x cols).

Any magnitude: rows whose largest |x| lies outside [2^-49, 2^48) (fp32/bf16; fp64: 2^+-480) are
scaled by an exact power of two before their squares and dot products are formed, so 1e19 or
1e-30 embeddings (which overflow or underflow fp32 squares) give the normalized definition's loss
and gradients; ordinary rows compute exactly what they would without it (csrc/info_nce.h).

Temperature: any tau > 0 whose 1/tau the logits' dtype holds: tau >= 5.88e-39 (fp16/bf16/fp32 input),
>= 1e-300 (fp64); a smaller one is refused (check_temperature). The logits are ~1/tau and are formed
in fp32 (fp64 for fp64 input), so like any fp32 implementation the loss carries an absolute error of
~2^-24 / tau per logit; the backward reuses the forward's own rounded logits against its LSE, which
keeps the gradients as accurate as a naive fp32 cross-entropy down to tau = 1e-7
(tests/ops/test_info_nce.py). Where two logits of a row lie within ~2^-24 / tau of each other, fp32
cannot resolve them (naive fp32 cannot either); compute in float64 there.

Double backward (Hessian-vector products, gradient penalties): supported. The backward op has
autograd of its own that differentiates the plain-PyTorch definition twice, which forms the full
logits: O(rows x cols) memory at second order (first order stays O(rows)). A tensor temperature
that requires grad is refused (the kernels take it as a constant); sparkct.ops.reference.info_nce
differentiates in it.

``gather_distributed=True`` (torch.distributed initialized, world size > 1; ranks may hold
different N): every rank's embeddings serve as negatives. Each rank's loss is the mean over its own
2N anchors against all ranks' embeddings; the gather carries gradients (summed over ranks in the
backward), so the gradient a rank gets for its embeddings is that of the sum of all ranks' losses.
With equal N on every rank that is ``world_size`` times the gradient of the single-process loss on
the concatenated batch; DDP averages parameter gradients over ranks, which cancels that factor, so
DDP training sees exactly the gradients of the single-process loss on the global batch (the same
convention as lightly's ``gather_distributed``). With unequal N each rank's loss stays the mean over
its own anchors (a smaller last batch weighs as much as a full one, as DDP weighs ranks anyway).
"""

from __future__ import annotations

import math
import numbers

import torch

from sparkct._ext import check_device
from sparkct.distributed import gather_with_grad, is_distributed
from sparkct.ops import reference
from sparkct.profiling import ranged

__all__ = ["IMPLS", "check_temperature", "info_nce"]

#: kernel choice: "auto"/"fast" = the tiled kernels, "simple" = the plain per-element kernels
#: (the GPU test oracle; slow, for checking).
IMPLS = {"auto": 0, "fast": 0, "simple": 1}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The smallest temperature per dtype the logits are formed in (fp32; fp64 for fp64 input). The kernels take
# 1/tau in that dtype and a row's loss reaches 2/tau: below 2 / finfo(float32).max = 5.8775e-39 (rounded up
# here) fp32 overflows and the loss came back NaN (1e-39, 1e-40). fp64: 2 / finfo(float64).max = 1.1e-308
# would overflow the mean's float64 sum of the row losses, so 1e-300 leaves room for 10^7 rows and more.
_MIN_TEMPERATURE = {torch.float32: 5.88e-39, torch.float64: 1e-300}


def check_temperature(
    temperature, who: str = "info_nce", minimum: float | None = None, dtype: torch.dtype | None = None
) -> float:
    """`temperature` as a float, or a ValueError that names it (prefixed by `who`): a real number, or a
    one-element tensor that needs no gradient (the kernels keep the temperature fixed); finite; > 0, or
    >= `minimum` where one is given; and, for embeddings of `dtype`, not below the smallest temperature
    the kernels' logits hold in that dtype (fp32 for fp16/bf16/fp32)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"{who}: temperature must be a number, got a tensor of shape {tuple(temperature.shape)}")
        if temperature.requires_grad and torch.is_grad_enabled():
            # The kernels take temperature as a float: a gradient for it would silently be lost.
            raise ValueError(
                f"{who}: temperature is a tensor that requires grad, but the fused loss keeps a fixed "
                "temperature (it does not differentiate with respect to it); pass a float (or "
                "temperature.detach()), or use sparkct.ops.reference.info_nce for a learnable temperature"
            )
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"{who}: temperature must be a real number, got {temperature!r}")
    temperature = float(temperature)
    if minimum is None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{who}: temperature must be finite and > 0, got {temperature}")
    if minimum is not None and not (math.isfinite(temperature) and temperature >= minimum):
        raise ValueError(f"{who}: temperature must be finite and >= {minimum:g}, got {temperature}")
    if dtype is not None:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        if temperature < _MIN_TEMPERATURE[compute]:
            raise ValueError(
                f"{who}: temperature {temperature:g} is too small for {str(dtype)[6:]} embeddings: "
                f"the logits (±1/temperature) and the loss (up to 2/temperature) overflow "
                f"{str(compute)[6:]}; the smallest usable temperature is {_MIN_TEMPERATURE[compute]:g}"
            )
    return temperature


def _check(z0, z1, temperature, bank) -> float:
    for name, t in (("z0", z0), ("z1", z1)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"info_nce: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"info_nce: {name} must be 2-D (N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(
                f"info_nce: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
            )
    if z0.shape != z1.shape:
        raise ValueError(f"info_nce: z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if z0.dtype != z1.dtype:
        raise ValueError(f"info_nce: z0 and z1 must have the same dtype, got {z0.dtype} and {z1.dtype}")
    if z0.shape[0] == 0:
        raise ValueError("info_nce: empty batch (N = 0)")
    if z0.shape[1] == 0:
        raise ValueError("info_nce: empty embedding dimension (D = 0)")
    temperature = check_temperature(temperature, dtype=z0.dtype)
    if bank is not None:
        if not isinstance(bank, torch.Tensor):
            raise ValueError(f"info_nce: bank must be a torch.Tensor, got {type(bank).__name__}")
        if bank.dim() != 2 or bank.shape[1] != z0.shape[1]:
            raise ValueError(
                f"info_nce: bank must be 2-D (K, D) with D = {z0.shape[1]} like the embeddings, "
                f"got shape {tuple(bank.shape)}"
            )
        if bank.dtype != z0.dtype:
            raise ValueError(f"info_nce: bank dtype {bank.dtype} differs from the embeddings' {z0.dtype}")
    check_device("info_nce", z0, z1, bank)
    return temperature


def _allow_tf32() -> bool:
    # torch.set_float32_matmul_precision("high"/"medium") sets this flag too.
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _distributed(gather_distributed: bool, group=None) -> bool:
    return bool(gather_distributed) and is_distributed(group)


@ranged("sparkct.info_nce")
def info_nce(
    z0: torch.Tensor,
    z1: torch.Tensor,
    temperature: float = 0.5,
    bank: torch.Tensor | None = None,
    *,
    gather_distributed: bool = False,
    group=None,
    impl: str = "auto",
) -> torch.Tensor:
    """Fused InfoNCE loss, a scalar in z0's dtype (see the module docstring for the semantics).

    z0, z1: (N, D) embeddings of two views (float16/bfloat16/float32/float64; fp32 accumulation).
    temperature: > 0. bank: optional (K, D) negatives (MoCo); None for NT-Xent (SimCLR).
    gather_distributed: with torch.distributed initialized, use every rank's embeddings as negatives
    (NT-Xent only; `group` picks the process group). impl: "auto" (fast kernels) or "simple" (the
    plain per-element kernels used as a test oracle).
    """
    temperature = _check(z0, z1, temperature, bank)
    if impl not in IMPLS:
        raise ValueError(f"info_nce: impl must be one of {sorted(IMPLS)}, got {impl!r}")
    code = IMPLS[impl]
    tf32 = _allow_tf32()
    if bank is None and _distributed(gather_distributed, group):
        cols, offset = gather_with_grad(torch.cat([z0, z1], 0), group)  # offset: after the lower ranks' rows
        loss, _ = torch.ops.sparkct.info_nce(z0, z1, cols, None, temperature, offset, tf32, code)
        return loss
    loss, _ = torch.ops.sparkct.info_nce(z0, z1, None, bank, temperature, 0, tf32, code)
    return loss


# ---- fake (meta) kernels and autograd ------------------------------------------------------------


@torch.library.register_fake("sparkct::info_nce")
def _info_nce_fake(z0, z1, cols, bank, temperature, col_offset, allow_tf32, impl):
    rows = z0.shape[0] if bank is not None else 2 * z0.shape[0]
    lse_dtype = torch.float64 if z0.dtype == torch.float64 else torch.float32
    return z0.new_empty(()), z0.new_empty((rows,), dtype=lse_dtype)


@torch.library.register_fake("sparkct::info_nce_backward")
def _info_nce_backward_fake(grad, z0, z1, cols, bank, lse, temperature, col_offset, other_grad, allow_tf32, impl):
    other = bank if bank is not None else cols
    if other_grad and other is not None:
        g_other = torch.empty_like(other, memory_format=torch.contiguous_format)
    else:
        g_other = z0.new_empty((0,))
    return (
        torch.empty_like(z0, memory_format=torch.contiguous_format),
        torch.empty_like(z1, memory_format=torch.contiguous_format),
        g_other,
    )


def _setup_context(ctx, inputs, output):
    z0, z1, cols, bank, temperature, col_offset, allow_tf32, impl = inputs
    _, lse = output
    ctx.save_for_backward(z0, z1, cols, bank, lse)
    ctx.args = (temperature, col_offset, allow_tf32, impl)
    ctx.mark_non_differentiable(lse)


@ranged("sparkct.info_nce.backward")
def _backward(ctx, grad_loss, grad_lse):
    z0, z1, cols, bank, lse = ctx.saved_tensors
    temperature, col_offset, allow_tf32, impl = ctx.args
    need = ctx.needs_input_grad
    other_grad = bool((cols is not None and need[2]) or (bank is not None and need[3]))
    g0, g1, g_other = torch.ops.sparkct.info_nce_backward(
        grad_loss, z0, z1, cols, bank, lse, temperature, col_offset, other_grad, allow_tf32, impl
    )
    return (
        g0 if need[0] else None,
        g1 if need[1] else None,
        g_other if (cols is not None and other_grad) else None,
        g_other if (bank is not None and other_grad) else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("sparkct::info_nce", _backward, setup_context=_setup_context)


# ---- double backward ------------------------------------------------------------------------------
# info_nce_backward is differentiable too (Hessian-vector products, gradient penalties, MAML): its
# backward differentiates the plain-PyTorch definition (sparkct.ops.reference.info_nce) twice with
# torch.func, in fp32 (fp64 for fp64 inputs). That forms the full rows x cols logits, so second
# order costs O(rows x cols) memory where first order is O(rows); it composes with autograd, so
# third and higher orders work as well. The saved LSE is an intermediate of the forward (marked
# non-differentiable there): its dependence on the embeddings is part of this derivative, and a
# direct call of info_nce_backward with an `lse` that requires grad is refused.


def _reference_loss(z0, z1, other, bank_mode: bool, temperature: float, col_offset: int):
    if bank_mode:
        return reference.info_nce(z0, z1, temperature, bank=other)
    return reference.info_nce(z0, z1, temperature, cols=other, col_offset=col_offset)


def _bw_setup_context(ctx, inputs, output):
    grad, z0, z1, cols, bank, lse, temperature, col_offset, other_grad, allow_tf32, impl = inputs
    ctx.save_for_backward(grad, z0, z1, cols, bank)
    ctx.args = (temperature, col_offset, bool(other_grad))


@ranged("sparkct.info_nce.double_backward")
def _bw_backward(ctx, gg0, gg1, gg_other):
    if ctx.needs_input_grad[5]:
        raise ValueError(
            "info_nce_backward: lse requires grad, but the op is not differentiable with respect to "
            "lse (it is the forward's saved log-sum-exp); differentiate info_nce itself twice instead"
        )
    grad, z0, z1, cols, bank = ctx.saved_tensors
    temperature, col_offset, other_grad = ctx.args
    other = bank if bank is not None else cols
    acc = torch.float64 if z0.dtype == torch.float64 else torch.float32
    primals = [grad, z0, z1] + ([] if other is None else [other])
    cot = [gg0, gg1] + ([] if other is None else [gg_other if other_grad else None])
    cot = [
        torch.zeros_like(p, dtype=acc) if (c is None or c.numel() != p.numel()) else c.to(acc).reshape(p.shape)
        for c, p in zip(cot, primals[1:])
    ]

    def first_order(g, a0, a1, *o):
        def loss(b0, b1, *ob):
            return _reference_loss(b0, b1, ob[0] if ob else None, bank is not None, temperature, col_offset)

        _, vjp = torch.func.vjp(loss, a0, a1, *o)
        return vjp(g.reshape(()))

    _, vjp2 = torch.func.vjp(first_order, *(p.to(acc) for p in primals))
    d = [t.to(p.dtype) for t, p in zip(vjp2(tuple(cot)), primals)]
    need = ctx.needs_input_grad
    d_grad = d[0].reshape(grad.shape) if need[0] else None
    d_cols = d[3] if (cols is not None and need[3]) else None
    d_bank = d[3] if (bank is not None and need[4]) else None
    return (d_grad, d[1] if need[1] else None, d[2] if need[2] else None, d_cols, d_bank) + (None,) * 6


torch.library.register_autograd("sparkct::info_nce_backward", _bw_backward, setup_context=_bw_setup_context)
