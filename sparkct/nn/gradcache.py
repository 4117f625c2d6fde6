"""Batches larger than memory: gradient caching (chunked embedding recomputation; Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

A contrastive loss couples every embedding of the global batch, but the encoder's activations need
not all be alive at once:

1. embed every input in chunks of at most `chunk` rows (near-equal parts) without autograd (only the
   embeddings are kept);
2. compute the loss on the whole batch of embeddings (detached leaves) and its gradient with
   respect to them (``torch.autograd.grad``; parameter-free: everything with parameters belongs in
   `encode`);
3. re-run each chunk with autograd and back-propagate the cached embedding gradients into the
   parameters through the trainer's ``backward(tensors, grad_tensors)`` (see
   :mod:`sparkct.models.base`), which applies loss scaling and accumulation.

The parameter gradients equal those of the unchunked step whenever the encoder treats rows
independently (no batch statistics): checked in float64 in tests/nn/test_gradcache.py. Peak
activation memory is that of one chunk.

BatchNorm: each chunk is normalized with its own statistics, in both passes alike, so the result is
exactly the step of per-device BN under DDP with one device per chunk (the loss still sees the
whole batch). Running statistics are updated once per chunk (by the re-run only: buffers are
restored after the no-grad pass), as they would be on per-chunk devices.

Randomness inside `encode` (dropout, stochastic depth): the CPU RNG state (and the CUDA RNG state of
the inputs' device) is saved before each chunk of the first pass and restored for its re-run, so the
re-run draws the same masks; the global RNG ends where one pass leaves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["grad_cache", "chunked", "chunks"]

Outputs = Tensor | tuple[Tensor, ...]


def _as_tuple(out: Outputs) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def chunks(x: Tensor, chunk: int) -> list[Tensor]:
    """x split along dim 0 into ceil(N / chunk) near-equal parts of at most `chunk` rows (no tiny last
    chunk: BatchNorm wants more than one row), or [x] for chunk <= 0."""
    n = x.shape[0]
    if chunk <= 0 or n <= chunk:
        return [x]
    return list(torch.tensor_split(x, -(-n // chunk), dim=0))


@torch.no_grad()
def chunked(encode: Callable[[Tensor], Outputs], x: Tensor, chunk: int) -> Outputs:
    """`encode(x)` computed in chunks of `chunk` rows without autograd (0: at once)."""
    outs = [_as_tuple(encode(c)) for c in chunks(x, chunk)]
    cat = tuple(torch.cat(parts, 0) for parts in zip(*outs))
    return cat if len(cat) > 1 else cat[0]


def grad_cache(
    encode: Callable[[Tensor], Outputs],
    inputs: Sequence[Tensor],
    loss_fn: Callable[[list[Outputs]], tuple[Tensor, Any]],
    backward: Callable,
    chunk: int,
    *,
    module: nn.Module | Sequence[nn.Module] | None = None,
) -> tuple[Tensor, list[Outputs], Any]:
    """One step of gradient caching.

    Args:
        encode: rows -> embeddings (a tensor, or a tuple of tensors, each with the input's rows), with
            every parameter that should get a gradient.
        inputs: the batch's inputs (e.g. the views), each split into chunks of `chunk` rows.
        loss_fn: ``loss_fn(outputs) -> (loss, extra)``, outputs being one entry per input (``encode``'s
            structure over all rows); must use no parameters.
        backward: ``backward(tensors, grad_tensors)`` (the trainer's; ``torch.autograd.backward``
            outside a trainer).
        chunk: rows per forward (> 0).
        module: the module(s) whose buffers `encode` updates (BatchNorm running statistics); they
            are restored after the no-grad pass so that only the re-run updates them.

    Returns:
        (the loss, detached; the outputs, detached; ``extra`` from loss_fn).
    """
    if chunk < 1:
        raise ValueError(f"grad_cache: chunk must be >= 1, got {chunk}")
    mods = [] if module is None else [module] if isinstance(module, nn.Module) else list(module)
    buffers = [b for m in mods for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    parts: list[list[tuple[Tensor, ...]]] = []
    states: list[list[Any]] = []
    with torch.no_grad():
        for x in inputs:
            outs, rng = [], []
            for c in chunks(x, chunk):
                rng.append(_rng_state(c.device))
                outs.append(_as_tuple(encode(c)))
            parts.append(outs)
            states.append(rng)
    with torch.no_grad():
        for b, v in zip(buffers, saved):
            b.copy_(v)
    leaves = [
        tuple(torch.cat(p, 0).detach().requires_grad_(p[0].is_floating_point()) for p in zip(*outs)) for outs in parts
    ]
    structured = [t if len(t) > 1 else t[0] for t in leaves]
    loss, extra = loss_fn(structured)
    flat = [t for tup in leaves for t in tup if t.requires_grad]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    grad_of = {id(t): g for t, g in zip(flat, grads)}
    for x, outs, rng, tup in zip(inputs, parts, states, leaves):
        offset = 0
        for c, _out0, (cpu_state, cuda_state) in zip(chunks(x, chunk), outs, rng):
            n = c.shape[0]
            devices = [c.device] if cuda_state is not None else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, c.device)
                out = _as_tuple(encode(c))
            ts, gs = [], []
            for o, leaf in zip(out, tup):
                g = grad_of.get(id(leaf))
                if g is not None and o.requires_grad:
                    ts.append(o)
                    gs.append(g[offset : offset + n])
            if ts:
                backward(ts, gs)
            offset += n
    detached = [tuple(t.detach() for t in tup) for tup in leaves]
    return loss.detach(), [t if len(t) > 1 else t[0] for t in detached], extra
