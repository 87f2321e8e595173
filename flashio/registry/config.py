"""Transfer and safety settings of a registry client, validated once in the constructor.

    cfg = RegistryConfig(part_size_bytes=64 * MiB, concurrency=16, read_timeout_s=30)
    registry = open_registry("s3://bucket/models", config=cfg)
"""

from __future__ import annotations

from dataclasses import dataclass

from flashio.errors import RegistryError

MiB = 1024 * 1024
# S3 refuses multipart parts under 5 MiB (except the last one); AWS allows at most 10,000 parts.
_MIN_PART_BYTES = 5 * MiB


@dataclass(frozen=True)
class RegistryConfig:
    """How a registry client transfers bytes and how long it waits.

    Memory: an S3 upload holds at most `part_size_bytes * (concurrency + 2)` bytes of the file in
    memory (the parts being hashed and sent); a pull holds one 1 MiB buffer per download thread.
    """

    part_size_bytes: int = 16 * MiB  # multipart upload part size
    multipart_threshold_bytes: int = 16 * MiB  # files at least this large use multipart uploads
    download_chunk_bytes: int = 16 * MiB  # ranged GET size: the unit of parallelism and of resume
    concurrency: int = 8  # parallel parts per upload, parallel ranged GETs per pull
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5  # per request, first try included; only transient errors are retried
    commit_timeout_s: float = 60.0  # how long a publish waits for a competing publish to settle
    claim_ttl_s: float = 30.0  # a publish claim older than this is from a crashed publisher
    lock_timeout_s: float = 3600.0  # how long a pull waits for another process pulling the same files

    def __post_init__(self) -> None:
        if self.part_size_bytes < _MIN_PART_BYTES:
            raise RegistryError(
                f"part_size_bytes={self.part_size_bytes}: S3 needs multipart parts of at least "
                f"{_MIN_PART_BYTES} bytes (5 MiB); use a larger part size"
            )
        if self.multipart_threshold_bytes < _MIN_PART_BYTES:
            raise RegistryError(f"multipart_threshold_bytes={self.multipart_threshold_bytes}: expected >= 5 MiB")
        if self.download_chunk_bytes < 64 * 1024:
            raise RegistryError(f"download_chunk_bytes={self.download_chunk_bytes}: expected >= 65536")
        if not 1 <= self.concurrency <= 256:
            raise RegistryError(f"concurrency={self.concurrency}: expected 1..256")
        if not 1 <= self.max_attempts <= 20:
            raise RegistryError(f"max_attempts={self.max_attempts}: expected 1..20 (the first try counts)")
        for field in ("connect_timeout_s", "read_timeout_s", "commit_timeout_s", "claim_ttl_s", "lock_timeout_s"):
            if not getattr(self, field) > 0:
                raise RegistryError(f"{field}={getattr(self, field)}: expected a positive number of seconds")
        if self.commit_timeout_s <= self.claim_ttl_s:
            raise RegistryError(
                f"commit_timeout_s={self.commit_timeout_s} must exceed claim_ttl_s={self.claim_ttl_s} so that "
                f"a publish can outwait the claim of a crashed publisher"
            )
