"""The one sha256 helper: hash a file in 1 MiB reads into one reused buffer.

    from flashio.hashing import sha256_file
    digest = sha256_file(path)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

READ_BYTES = 1 << 20


def sha256_file(path: str | Path, *, read_bytes: int = READ_BYTES) -> str:
    """The hex sha256 of the file at `path`."""
    h = hashlib.sha256()
    buf = bytearray(read_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
