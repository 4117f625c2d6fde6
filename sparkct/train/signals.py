"""Stopping a run cleanly: SIGINT (Ctrl-C) or SIGTERM asks the trainer to finish its step and save; a
second signal aborts at once (the checkpoint write is atomic: the previous one stays)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

__all__ = ["StopSignals", "resume_command"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (in the main thread; elsewhere Python cannot install handlers and it does nothing),
    SIGINT and SIGTERM set ``signum`` instead of stopping the process; a second one raises
    KeyboardInterrupt. A signal the process ignores (``nohup``, a background job) stays ignored. The old
    handlers come back on exit."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in _SIGNALS:
            old = signal.getsignal(s)
            if old == signal.SIG_IGN:
                continue
            try:
                signal.signal(s, self._handle)
            except (ValueError, OSError):  # not allowed here (an embedding interpreter)
                continue
            self._old[s] = old
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            # None: a handler installed outside Python; the default is the nearest Python can restore
            signal.signal(s, old if old is not None else signal.SIG_DFL)  # type: ignore[arg-type]
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second: stop now; an interrupted checkpoint write leaves the last one
        self.signum = signum
        if self.announce:
            # os.write, not print: a handler runs between any two bytecodes, maybe inside a print
            msg = (
                f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (again to abort now)\n"
            )
            try:
                os.write(sys.stderr.fileno(), msg.encode())
            except (OSError, ValueError, AttributeError):
                pass


def resume_command(argv: list[str] | None = None, flag: str | None = "--resume") -> str:
    """The command line that ran this process (``sys.argv``), with `flag` added if absent (None: a command
    that resumes when run again as it was), quoted for a POSIX shell; ``python -m sparkct`` and the
    ``sparkct`` script both read as ``sparkct``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = os.path.basename(argv[0])
    if head == "sparkct" or (head == "__main__.py" and os.path.basename(os.path.dirname(argv[0])) == "sparkct"):
        cmd = ["sparkct", *argv[1:]]
    else:
        cmd = [os.path.basename(sys.executable) or "python", *argv]
    if flag is not None and flag not in cmd:
        cmd.append(flag)
    return shlex.join(cmd)
