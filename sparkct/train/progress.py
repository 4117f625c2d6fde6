"""Progress as plain lines, for logs: a progress bar redraws only on a terminal, so where stderr is a file
or a pipe the trainer reports every few seconds instead (``SPARKCT_PROGRESS_SECONDS``, default 30)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

from sparkct.errors import UserError

__all__ = ["ProgressLines", "progress_interval", "format_seconds"]

ENV = "SPARKCT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def progress_interval(environ=os.environ) -> float:
    """Seconds between progress lines: ``SPARKCT_PROGRESS_SECONDS`` (0: every step), else 30."""
    v = environ.get(ENV, "").strip()
    if not v:
        return DEFAULT_SECONDS
    try:
        s = float(v)
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and s >= 0):
        raise UserError(f"{ENV}={v!r}: expected seconds between progress lines, a number >= 0")
    return s


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if not math.isfinite(s):
        return "?"
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLines:
    """``step 120/1000 (12%), 2.05 steps/s, 16.4 img/s, loss 0.7921, 7 min 09 s left`` at most every
    `interval` seconds (and never for the first step: the rate needs one). The rate counts the steps this
    process ran, from its first step on (a resumed run's earlier steps took no time here)."""

    def __init__(
        self,
        total: int,
        start_step: int,
        interval: float,
        log: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.interval, self.log, self.clock = total, interval, log, clock
        self.start_step = start_step
        self.t0: float | None = None
        self.images = 0
        self.last = -math.inf

    def update(self, step: int, images: int, loss: float | None) -> bool:
        """Step `step` is done, with `images` more images; log a line if it is time. Whether it logged."""
        now = self.clock()
        if self.t0 is None:  # the clock starts at the first step done: set-up and the first batch are not the rate
            self.t0, self.start_step, self.last = now, step, now
            return False
        self.images += images
        if now - self.last < self.interval and step < self.total:
            return False
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate = (step - self.start_step) / dt
        left = (self.total - step) / rate if rate > 0 else math.inf
        pct = 100.0 * step / max(self.total, 1)
        loss_s = "" if loss is None else f", loss {loss:.4g}"
        self.log(
            f"step {step}/{self.total} ({pct:.0f}%), {rate:.3g} steps/s, {self.images / dt:.3g} img/s{loss_s}, "
            f"{format_seconds(left)} left"
        )
        return True
