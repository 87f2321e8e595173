"""Downloading one blob into the cache: parallel ranged GETs, resumable, verified before it is used.

    path = fetch_blob(backend, cache, entry, config=cfg, progress=NullProgress())

The blob is written to `<digest>.partial` with `os.pwrite` by up to `concurrency` threads, one
`download_chunk_bytes` range each; a journal (`<digest>.partial.chunks`) records the finished
ranges, so an interrupted download (Ctrl-C, a dropped connection, a killed server) continues
where it stopped. Only after its sha256 matches is the file made read-only and renamed to
`<digest>`: a corrupt blob is never exposed. A resumed file that fails verification is
downloaded once more from scratch (the journal could have outlived the data it describes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from flashio.format.manifest import FileEntry
from flashio.hashing import READ_BYTES
from flashio.registry import layout
from flashio.registry.backend import Backend
from flashio.registry.cache import Cache
from flashio.registry.config import RegistryConfig
from flashio.registry.errors import IntegrityError, NotFoundError, TransferError, UnreachableError
from flashio.registry.progress import Progress

log = logging.getLogger(__name__)

_JOURNAL_MAGIC = "flashio-partial v1"


def _usable(path: Path, size_bytes: int) -> bool:
    try:
        return path.stat().st_size == size_bytes
    except FileNotFoundError:
        return False


def fetch_blob(backend: Backend, cache: Cache, entry: FileEntry, *, config: RegistryConfig,
               progress: Progress) -> Path:
    """Return the cache path of blob `entry.sha256`, downloading and verifying it if needed."""
    final = cache.blob_path(entry.sha256)
    if _usable(final, entry.size_bytes):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with cache.lock(f"blob-{entry.sha256}", timeout_s=config.lock_timeout_s):
        if _usable(final, entry.size_bytes):  # another process fetched it while we waited
            return final
        key = layout.blob_key(entry.sha256)
        info = backend.head(key)
        where = f"blob sha256:{entry.sha256} ({entry.path}) in {backend.description}"
        if info is None:
            raise NotFoundError(f"{where} is missing: the registry is damaged; publish the artifact again")
        if info.size_bytes != entry.size_bytes:
            raise IntegrityError(
                f"{where} has {info.size_bytes} bytes, the version manifest records {entry.size_bytes}: the "
                f"registry copy is corrupt; publish the artifact again (it replaces the blob)"
            )
        partial = cache.partial_path(entry.sha256)
        journal = partial.with_name(partial.name + ".chunks")
        for attempt in range(2):
            resumed, digest = _download(backend, key, partial, journal, entry, config, progress)
            if digest == entry.sha256:
                break
            partial.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            if not resumed or attempt == 1:
                raise IntegrityError(
                    f"{where} has sha256 {digest} after download, expected {entry.sha256}: the registry "
                    f"copy is corrupt and was not used; delete {key} from the registry and publish the "
                    f"artifact again (a publish skips blobs that are present with the right size)"
                )
            log.warning("resumed download of %s failed verification: downloading it again", entry.path)
        os.chmod(partial, 0o444)
        os.replace(partial, final)
        journal.unlink(missing_ok=True)
    return final


def _read_journal(journal: Path, entry: FileEntry, chunk_bytes: int) -> set[int] | None:
    """The start offsets already downloaded, or None when the journal is missing or does not fit."""
    try:
        lines = journal.read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if not lines or lines[0] != f"{_JOURNAL_MAGIC} size={entry.size_bytes} chunk={chunk_bytes}":
        return None
    done = set()
    for line in lines[1:]:
        if line.isdigit() and int(line) % chunk_bytes == 0 and int(line) < entry.size_bytes:
            done.add(int(line))
    return done


def _download(backend: Backend, key: str, partial: Path, journal: Path, entry: FileEntry,
              config: RegistryConfig, progress: Progress) -> tuple[bool, str]:
    """Fill `partial` with the blob's bytes; return (resumed earlier work?, sha256 of the file).

    The sha256 is computed while the download runs: whenever the finished chunks form a longer
    prefix of the file, the main thread hashes that prefix back from the page cache.
    """
    chunk = config.download_chunk_bytes
    size = entry.size_bytes
    done = _read_journal(journal, entry, chunk) if partial.exists() else None
    if done is None:
        partial.unlink(missing_ok=True)
        journal.write_text(f"{_JOURNAL_MAGIC} size={size} chunk={chunk}\n")
        done = set()
    resumed = bool(done)
    todo = [(s, min(s + chunk, size)) for s in range(0, size, chunk) if s not in done]
    if resumed:
        log.info("resuming %s: %d of %d chunks already here", entry.path, len(done), len(done) + len(todo))
    stop = threading.Event()
    journal_lock = threading.Lock()
    digest = hashlib.sha256()
    hashed = 0  # the prefix of the file that `digest` covers
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    progress.begin(entry.path, size)
    try:
        os.ftruncate(fd, size)
        progress.advance(size - sum(e - s for s, e in todo))
        with open(journal, "ab") as jf, ThreadPoolExecutor(max(1, min(config.concurrency, len(todo)))) as pool:

            def work(start: int, end: int) -> bool:
                if not _fetch_range(backend, key, fd, start, end, config, stop, progress):
                    return False
                with journal_lock:
                    jf.write(f"{start}\n".encode())
                    jf.flush()
                return True

            futures = {pool.submit(work, s, e): s for s, e in todo}
            try:
                hashed = _hash_prefix(fd, digest, hashed, done, chunk, size)
                for future in as_completed(futures):
                    if future.result():
                        done.add(futures[future])
                        hashed = _hash_prefix(fd, digest, hashed, done, chunk, size)
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
        os.fsync(fd)
    finally:
        os.close(fd)
        progress.end()
    if hashed != size:  # cannot happen: every chunk is done
        raise TransferError(f"internal error: {entry.path} hashed {hashed} of {size} bytes")
    return resumed, digest.hexdigest()


def _hash_prefix(fd: int, digest: Any, hashed: int, done: set[int], chunk: int, size: int) -> int:
    """Extend `digest` over the finished chunks that follow byte `hashed`; return the new prefix end."""
    while hashed < size and hashed in done:
        end = min(hashed + chunk, size)
        while hashed < end:
            piece = os.pread(fd, min(end - hashed, READ_BYTES), hashed)
            if not piece:
                raise TransferError(f"internal error: short read at byte {hashed} of a partial download")
            digest.update(piece)
            hashed += len(piece)
    return hashed


def _fetch_range(backend: Backend, key: str, fd: int, start: int, end: int, config: RegistryConfig,
                 stop: threading.Event, progress: Progress) -> bool:
    """Copy [start, end) of `key` into `fd`, retrying transient failures from where they stopped."""
    pos = start
    failures = 0
    while pos < end:
        try:
            for piece in backend.read_range(key, pos, end):
                if stop.is_set():
                    return False
                view = memoryview(piece)
                while view:
                    written = os.pwrite(fd, view, pos)
                    view, pos = view[written:], pos + written
                progress.advance(len(piece))
        except UnreachableError:
            raise  # the backend already retried with its own timeouts
        except TransferError as exc:
            failures += 1
            if failures >= config.max_attempts:
                raise
            log.warning("download of %s failed at byte %d (%s): retrying (%d/%d)", key, pos, exc, failures, config.max_attempts)
            time.sleep(min(2.0, 0.1 * 2**failures))
    return True
