"""Small helpers shared by the data modules: salted hashes, logging.

Nothing here imports torch, so the prepare workers start fast. Atomic writes live in sparkct.io.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

log = logging.getLogger("sparkct.data")


def new_salt() -> str:
    return secrets.token_hex(16)


def salted_hash(salt: str, value: str, n: int = 16) -> str:
    """Hex digest (n chars) of value under salt: a pseudonym that cannot be reversed without the salt
    and a dictionary of candidate values."""
    h = hashlib.blake2b(_bytes(value), key=bytes.fromhex(salt)[:64], digest_size=32)
    return h.hexdigest()[:n]


def stable_hash(value: str, n: int = 16) -> str:
    """Unsalted digest for non-identifying keys (series keys, file names of shards)."""
    return hashlib.sha1(_bytes(value)).hexdigest()[:n]


def _bytes(value: str) -> bytes:
    # File names need not be UTF-8: Python reads their odd bytes as surrogate escapes, which must
    # hash as the original bytes rather than fail.
    return value.encode("utf-8", "surrogateescape")
