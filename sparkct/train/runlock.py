"""The run folder's lock: one process at a time trains into a run folder.

``RunLock(run_dir)`` takes an exclusive ``flock`` on ``run_dir/.lock`` (creating the folder) and writes
the holder's PID and host into it; a second process gets a one-line UserError naming them. The operating
system drops the lock when the holder exits, crashes or is killed, so a stale lock file never blocks a
resume. The lock is reentrant within a process (a trainer that raised may still hold it while the same
process starts another run in the folder, as the tests and ``sparkct experiment`` do) and released by
:meth:`RunLock.release` or when the object is collected. The file stays: removing it would let a waiting
process lock a file that a third one has already replaced.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket

from sparkct.errors import UserError

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".lock"

# the lock files this process holds: real path -> [file descriptor, holders in this process]
_held: dict[str, list[int]] = {}


class RunLock:
    """An exclusive lock on the run folder `run_dir` (see the module docstring)."""

    def __init__(self, run_dir: str):
        self.path: str | None = None
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.realpath(os.path.join(run_dir, LOCK_NAME))
        entry = _held.get(self.path)
        if entry is not None:
            entry[1] += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.path = None
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{run_dir} is in use by another run (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}); wait for it to end, or use another --out"
                ) from None
            raise UserError(f"{run_dir}: cannot lock the run folder ({e.strerror or e})") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
        _held[self.path] = [fd, 1]

    def release(self) -> None:
        """Drop this holder (idempotent); the lock is released when the process's last holder drops."""
        path: str | None = getattr(self, "path", None)  # None: __init__ failed before or after taking it
        self.path = None
        entry = _held.get(path) if path is not None else None
        if path is None or entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[path]
            os.close(entry[0])  # closing the descriptor releases the flock

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        holder = json.loads(text)
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
