"""Streaming sha256: verify a file while it is being uploaded (hashing a whole file at rest is
flashio.hashing.sha256_file).

    with VerifyingReader(path, sha256=expected, size_bytes=n, label="ffn.safetensors") as src:
        backend.upload(key, src, n)   # src.read() raises IntegrityError on the last byte if wrong
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType

from flashio.registry.errors import IntegrityError


class VerifyingReader:
    """A forward-only file reader that checks size and sha256 as the bytes stream through.

    The check happens when the last expected byte is handed out, before the caller sees it: an
    upload that reads through this object therefore fails before its final part is sent, so no
    object with the wrong content is ever completed under a content-addressed key. Not seekable on
    purpose: boto3's transfer manager then reads strictly in order, once.
    """

    def __init__(self, path: Path, *, sha256: str, size_bytes: int, label: str):
        self.path = Path(path)
        self.expected_sha256 = sha256
        self.expected_bytes = size_bytes
        self.label = label
        self._hash = hashlib.sha256()
        self._seen_bytes = 0
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / __exit__

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        want = self.expected_bytes - self._seen_bytes if size is None or size < 0 else size
        data = self._file.read(want)  # a regular file returns fewer bytes only at its end
        got = len(data)
        self._seen_bytes += got
        self._hash.update(data)
        if self._seen_bytes > self.expected_bytes:
            self._fail(f"is larger than the {self.expected_bytes} bytes recorded in the manifest")
        if self._seen_bytes == self.expected_bytes:
            self._check_eof()
            self._check_digest()
        elif got < want:
            self._fail(f"has {self._seen_bytes} bytes, but the manifest records {self.expected_bytes}")
        return data

    def _check_eof(self) -> None:
        if self._file.read(1):
            self._fail(f"is larger than the {self.expected_bytes} bytes recorded in the manifest")

    def _check_digest(self) -> None:
        digest = self._hash.hexdigest()
        if digest != self.expected_sha256:
            self._fail(f"has sha256 {digest}, but the manifest records {self.expected_sha256}")

    def _fail(self, what: str) -> None:
        raise IntegrityError(
            f"artifact file {self.label!r} ({self.path}) {what}: the file changed after its manifest "
            f"was written; rebuild the artifact (or fix its manifest.json) and publish again"
        )

    @property
    def bytes_read(self) -> int:
        return self._seen_bytes

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
