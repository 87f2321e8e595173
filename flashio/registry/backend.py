"""The storage interface a registry is built on: a flat key -> bytes store that streams.

    backend = LocalBackend(Path("/srv/registry"))      # or S3Backend(location, config)
    backend.put_bytes("models/x/aliases/prod", b"...")
    for piece in backend.read_range("blobs/sha256/ab..", 0, 1 << 20):
        out.write(piece)

Keys are '/'-separated and relative to the registry root. Implementations stream every payload:
nothing reads a whole blob into memory (only `get_bytes`, for small JSON documents, does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flashio.registry.hashing import VerifyingReader

# Registry JSON documents (version manifests, aliases, claims) are small; anything larger than
# this under such a key is not one of ours.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024


class Source(Protocol):
    """What `Backend.upload` reads from: a forward-only stream (see hashing.VerifyingReader)."""

    def read(self, size: int = -1) -> bytes: ...


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size, and last-modified time on the store's clock."""

    key: str
    size_bytes: int
    modified_s: float  # seconds since the epoch, as reported by the store


@dataclass(frozen=True)
class IncompleteUpload:
    """A multipart upload that was started and neither completed nor aborted (S3 only)."""

    key: str  # relative to the registry root, like ObjectInfo.key
    upload_id: str
    initiated_s: float  # seconds since the epoch, as reported by the store


@dataclass(frozen=True)
class UploadedPart:
    """One part of an incomplete multipart upload, as the store lists it."""

    number: int
    size_bytes: int
    etag: str  # without quotes, lower case; the part's MD5 on AWS without SSE-KMS/SSE-C and on most servers
    modified_s: float


class Backend(ABC):
    """A key -> bytes store. Implementations: local.LocalBackend, s3.S3Backend."""

    #: Shown in messages and logs: the registry URI (and endpoint), never credentials.
    description: str

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Return the object's size and time, or None when there is no object at `key`."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """Return a small object's content (at most MAX_DOCUMENT_BYTES), or None when absent."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write a small object atomically. With `if_absent`, ask the store not to overwrite.

        Returns False only when the store refused the write because an object exists; True when
        it was written, which, on stores that ignore conditional writes, may be an overwrite:
        callers that need create-once semantics use commit.create_once.
        """

    @abstractmethod
    def upload(self, key: str, source: Source, size_bytes: int, progress: Callable[[int], None] | None = None) -> None:
        """Stream `size_bytes` from `source` to `key`; the object appears only if all went well.

        If `source.read` raises, nothing becomes visible at `key` and the error propagates.
        `progress` receives byte counts as they are sent (negative after a retried part).
        """

    def upload_file(self, key: str, path: Path, *, size_bytes: int, sha256: str, label: str,
                    progress: Callable[[int], None] | None = None) -> int:
        """Upload the file at `path` to `key`, checking its size and sha256 while it streams.

        Nothing becomes visible at `key` unless the bytes match (IntegrityError otherwise).
        Returns how many bytes were not sent because an interrupted earlier upload of the same
        key already holds them (0 here; S3Backend resumes multipart uploads part by part).
        """
        with VerifyingReader(path, sha256=sha256, size_bytes=size_bytes, label=label) as src:
            self.upload(key, src, size_bytes, progress)
        return 0

    def incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]:
        """Yield the unfinished multipart uploads under `prefix` (none, for stores without them)."""
        return iter(())

    def upload_parts(self, upload: IncompleteUpload) -> list[UploadedPart]:
        """The parts an unfinished multipart upload holds, by part number."""
        return []

    def abort_upload(self, upload: IncompleteUpload) -> None:  # noqa: B027 - optional, see incomplete_uploads
        """Abort an unfinished multipart upload and free its parts; a vanished upload is not an error."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes [start, end) of the object at `key`, in pieces of at most 1 MiB."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with `prefix` (recursively, any order)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object at `key`; deleting a missing object is not an error."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections and threads."""
