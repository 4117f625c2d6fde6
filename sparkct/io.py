"""Atomic file writes and JSON: the one way sparkct writes anything that must survive a crash
(caches, checkpoints, reports). Nothing here imports torch, so data workers start fast.

A crash at any point leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "fsync_dir",
    "atomic_path",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "read_json",
    "write_npz_atomic",
    "clean_stale_temps",
    "json_default",
    "is_disk_full",
    "filesystem_of",
]


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which races with other threads' file creation.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`.

    A crash at any point leaves either the old file or the new one, never a half-written one; the
    temporary file (``.<name>.<random>.tmp``) is removed on error and ignored/cleaned by readers."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix + ".tmp", dir=d)
    os.close(fd)
    # mkstemp creates 0600; a plain open() would give 0666 & ~umask, which is what users expect of results
    # files others read (reports, checkpoints shared with a team).
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(d)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=json_default) + "\n")


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def clean_stale_temps(root: str) -> int:
    """Remove ``*.tmp`` files left in `root` (recursively) by an interrupted run; returns how many."""
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith(".tmp") and f.startswith("."):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
    return n


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that failed for want of space: an OSError ENOSPC (or EDQUOT, a quota), or
    torch.save's zip writer reporting a short write (``[enforce fail at inline_container.cc...] unexpected
    pos``; it drops the errno, and a full disk is what makes its writes come up short)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError):
        msg = str(e)
        return "No space left on device" in msg or (
            "inline_container" in msg and ("unexpected pos" in msg or "write failed" in msg)
        )
    return False


def filesystem_of(path: str) -> str:
    """The mount point of the filesystem that holds `path` (or would: the nearest existing folder above it)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p
