"""The local cache that pulls land in, and the file locks that let processes share it.

    cache = Cache(default_cache_dir())
    cache.blob_path(digest)                       # <root>/blobs/sha256/<digest>  (read-only, verified)
    cache.version_dir("opt-125m", "1", vdigest)   # <root>/models/opt-125m/1-<vdigest[:12]>/
    with cache.lock("blob-" + digest, timeout_s=60):
        ...

Blobs are shared by all versions and registries (they are named by content). A version directory
is named by model, version and the digest of its version manifest, so that two registries holding
different `name@version` never collide; its files are hard links to the blobs (copies where the
file system has no hard links). A version directory appears by one atomic rename, complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flashio.registry.errors import TransferError

log = logging.getLogger(__name__)

CACHE_ENV = "FLASHIO_CACHE"


def default_cache_dir() -> Path:
    """$FLASHIO_CACHE, else $XDG_CACHE_HOME/flashio, else ~/.cache/flashio."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flashio"


@dataclass(frozen=True)
class Cache:
    """Paths inside one cache root (see the module docstring)."""

    root: Path

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest

    def partial_path(self, digest: str) -> Path:
        """Where a blob is downloaded to before it is verified; `.chunks` beside it is its journal."""
        return self.root / "blobs" / "sha256" / f"{digest}.partial"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def version_dir(self, name: str, version: str, manifest_sha256: str) -> Path:
        return self.model_dir(name) / f"{version}-{manifest_sha256[:12]}"

    def staging_dir(self, name: str, token: str) -> Path:
        """Where a version is assembled before its rename; `.tmp-*` names are never versions."""
        return self.model_dir(name) / f".tmp-{token}"

    @contextlib.contextmanager
    def lock(self, name: str, *, timeout_s: float) -> Iterator[None]:
        """An exclusive lock across processes (flock on <root>/locks/<name>.lock), waited for up to timeout_s."""
        path = self.root / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        with open(path, "a+b") as f:
            told = False
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TransferError(
                            f"waited {timeout_s:g}s for {path}, held by another process pulling the same "
                            f"files; try again when it is done (or raise lock_timeout_s)"
                        ) from None
                    if not told:
                        log.info("waiting for another process that holds %s", path)
                        told = True
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
