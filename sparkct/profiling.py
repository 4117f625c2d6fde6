"""Named ranges around sparkct's ops and the trainer's phases, for torch.profiler and Nsight Systems.

    from sparkct import profiling
    with profiling.range("step/backward"):      # a block
        ...
    @profiling.ranged("sparkct.halo")           # a function
    def halo(...): ...

A range is emitted only while something listens, so the handles cost nothing worth measuring when
nobody profiles (one check of two booleans per call; docs/profiling.md has the figure):

* a torch.profiler / ``torch.autograd.profiler`` session is recording (``sparkct profile``, your own
  ``torch.profiler.profile``, or ``torch.autograd.profiler.emit_nvtx``): the range is a
  ``torch.profiler.record_function``, so it shows in the Chrome/Perfetto trace and in
  ``key_averages()`` on CPU and CUDA alike; under ``emit_nvtx`` torch turns it into an NVTX range too;
* ``SPARKCT_NVTX=1`` in the environment (or :func:`set_nvtx`): the range is a plain NVTX range
  (``torch.cuda.nvtx``), for ``nsys profile --trace=cuda,nvtx`` without torch's profiler overhead.
  Under ``emit_nvtx`` leave SPARKCT_NVTX unset, or each sparkct range appears twice.

Names: ``sparkct.<op>`` (the Python face of an op: checks + kernel), ``sparkct.<op>.backward``,
``sparkct.<Module>`` (nn modules), ``loss/<name>`` (a method's loss), and the trainer's phases
(:data:`PHASES`). torch.profiler also names each kernel call itself (``sparkct::sparse_halo``, ...).
"""

from __future__ import annotations

import functools
import os
import time

import torch
from torch.autograd import profiler as _torch_profiler

__all__ = ["range", "ranged", "set_nvtx", "nvtx_enabled", "active", "PHASES"]

#: the trainer's phases in step order (sparkct/train/trainer.py). step/data: next batch (the loader's
#: transform) to the device; step/forward+loss: the method's training_step under autocast (forward and
#: loss come from one call; the loss functions' ``loss/*`` ranges inside it split them); step/sync-loss:
#: reading the loss value (waits for the device); step/backward; step/optimizer: gradient averaging of
#: gradient-caching DDP runs, unscale, clipping, optimizer.step, zero_grad; step/after_step: EMA, queues;
#: step/probe: the online linear probe (--labels). Methods that run their own backward (gradient caching)
#: show step/forward+loss+backward instead of step/forward+loss and step/backward.
PHASES = (
    "step/data",
    "step/forward+loss",
    "step/forward+loss+backward",
    "step/sync-loss",
    "step/backward",
    "step/optimizer",
    "step/after_step",
    "step/probe",
)

_nvtx = os.environ.get("SPARKCT_NVTX", "").strip().lower() not in ("", "0", "false", "no", "off")


def set_nvtx(enable: bool) -> bool:
    """Turn the NVTX ranges on or off for this process (default: the SPARKCT_NVTX environment variable).
    Returns the previous setting."""
    global _nvtx
    prev, _nvtx = _nvtx, bool(enable)
    return prev


def nvtx_enabled() -> bool:
    return _nvtx


def active() -> bool:
    """Whether a range entered now would be emitted."""
    return _nvtx or _torch_profiler._is_profiler_enabled


class _Off:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_OFF = _Off()


class _Range:
    __slots__ = ("name", "record", "pushed")

    def __init__(self, name: str):
        self.name = name
        self.record = None
        self.pushed = False

    def __enter__(self):
        # what was entered is what is left: a profiler that starts or stops inside the range is harmless
        if _torch_profiler._is_profiler_enabled:
            self.record = _torch_profiler.record_function(self.name)
            self.record.__enter__()
        if _nvtx:
            torch.cuda.nvtx.range_push(self.name)
            self.pushed = True
        return None

    def __exit__(self, *exc):
        if self.pushed:
            torch.cuda.nvtx.range_pop()
        if self.record is not None:
            self.record.__exit__(*exc)
        return False


def range(name: str):  # shadows the builtin: the torch.cuda.nvtx.range convention
    """A context manager: the named range while profiling or NVTX is on, else a shared no-op."""
    if _nvtx or _torch_profiler._is_profiler_enabled:
        return _Range(name)
    return _OFF


def ranged(name: str):
    """Decorator: run the function inside ``range(name)`` (a direct call when nothing listens)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not (_nvtx or _torch_profiler._is_profiler_enabled):
                return fn(*args, **kwargs)
            with _Range(name):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def overhead(calls: int = 100_000, repeats: int = 5) -> dict:
    """What the handles cost while nothing listens, in ns per call (min over `repeats` runs of `calls`):
    a bare Python call, the same function under @ranged, and ``with range(...)`` around a bare call.
    ``python -m sparkct.profiling`` prints it."""
    if active():
        raise RuntimeError("overhead() measures the disabled path: stop the profiler and unset SPARKCT_NVTX")

    def bare(x):
        return x

    wrapped = ranged("sparkct.overhead")(bare)

    def loop_bare():
        for i in builtins_range(calls):
            bare(i)

    def loop_wrapped():
        for i in builtins_range(calls):
            wrapped(i)

    def loop_context():
        for i in builtins_range(calls):
            with range("sparkct.overhead"):
                bare(i)

    out = {}
    for key, fn in (("bare_ns", loop_bare), ("ranged_ns", loop_wrapped), ("range_ns", loop_context)):
        best = float("inf")
        for _ in builtins_range(repeats):
            t0 = time.perf_counter_ns()
            fn()
            best = min(best, time.perf_counter_ns() - t0)
        out[key] = best / calls
    out["ranged_extra_ns"] = out["ranged_ns"] - out["bare_ns"]
    out["range_extra_ns"] = out["range_ns"] - out["bare_ns"]
    return out


import builtins as _builtins  # noqa: E402

builtins_range = _builtins.range

if __name__ == "__main__":
    r = overhead()
    print(
        f"disabled path, per call: bare call {r['bare_ns']:.0f} ns; @ranged {r['ranged_ns']:.0f} ns "
        f"(+{r['ranged_extra_ns']:.0f}); with range() {r['range_ns']:.0f} ns (+{r['range_extra_ns']:.0f})"
    )
