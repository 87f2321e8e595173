"""Publishing an artifact directory as an immutable registry version.

    result = registry.publish("out/opt-125m", name="opt-125m", version="2024.06.1", aliases=["prod"])
    print(result.uploaded_bytes, result.reused_bytes)

Order matters for crash safety: blobs first (each checked against the artifact manifest's size
and sha256 while it streams, and skipped when the registry already has it), then the version
manifest, created exactly once (commit.create_once), then aliases. A publish that dies half-way
leaves only blobs, which the next publish reuses and `gc` eventually removes; no version appears.
On S3 it may also leave the unfinished multipart upload of a large blob: the next publish
continues it, sending only the parts it lacks (s3_multipart.py), and `gc` aborts it once idle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashio.format.manifest import FileEntry
from flashio.registry import layout
from flashio.registry.backend import Backend
from flashio.registry.commit import create_once
from flashio.registry.errors import RefError, TransferError, VersionExistsError
from flashio.registry.manifest import (
    ArtifactManifest,
    VersionManifest,
    read_artifact_manifest,
    utc_now,
)
from flashio.registry.progress import NullProgress, Progress
from flashio.registry.refs import LATEST, check_token
from flashio.version import __version__

if TYPE_CHECKING:
    from flashio.registry.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    """What a publish did. `created` is False when the same content was already that version.

    `uploaded_bytes` counts the blobs this publish stored; `resumed_bytes` the part of them that an
    interrupted earlier publish had already sent (not sent again), so this publish sent
    `uploaded_bytes - resumed_bytes`.
    """

    name: str
    version: str
    created: bool
    uploaded_blobs: int
    uploaded_bytes: int
    reused_blobs: int
    reused_bytes: int
    aliases: tuple[str, ...]
    resumed_bytes: int = 0


def default_version() -> str:
    """A sortable UTC timestamp, e.g. 20240611T142233Z, used when no version is given."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def publish_artifact(registry: Registry, artifact_dir: Path, *, name: str, version: str | None,
                     aliases: tuple[str, ...], lineage: Mapping[str, Any] | None,
                     progress: Progress | None) -> PublishResult:
    """Upload `artifact_dir` as name@version (see the module docstring for the order of writes)."""
    check_token(name, "model name")
    version = check_token(version or default_version(), "version")
    if version == LATEST:
        raise RefError(f"version {LATEST!r} is reserved for the alias that follows every publish; pick another version")
    for alias in aliases:
        check_token(alias, "alias")
    progress = progress or NullProgress()
    backend = registry.backend
    art = read_artifact_manifest(artifact_dir)

    existing = registry.read_version(name, version)
    if existing is None and registry.alias_target(name, version) is not None:
        raise RefError(f"{version!r} is an alias of {name}: a version cannot shadow an alias; pick another version")
    if existing is not None:
        _check_same(existing.manifest, art, registry)
        log.info("%s@%s is already published with this content: nothing to upload", name, version)
        for alias in aliases:
            registry.set_alias(name, version, alias)
        return PublishResult(name, version, False, 0, 0, 0, 0, aliases)

    uploaded = reused = uploaded_bytes = reused_bytes = resumed_bytes = 0
    seen: set[str] = set()
    for entry in sorted(art.files, key=lambda e: (e.size_bytes, e.path)):
        if entry.sha256 in seen:
            continue
        seen.add(entry.sha256)
        resumed = _upload_blob(backend, entry, artifact_dir / entry.path, progress)
        if resumed is not None:
            uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + entry.size_bytes
            resumed_bytes += resumed
        else:
            reused, reused_bytes = reused + 1, reused_bytes + entry.size_bytes
    mkey = layout.blob_key(art.sha256)
    if (info := backend.head(mkey)) is None or info.size_bytes != len(art.raw):
        backend.put_bytes(mkey, art.raw)
        uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + len(art.raw)
    else:
        reused, reused_bytes = reused + 1, reused_bytes + len(art.raw)

    vm = VersionManifest.from_artifact(art, name=name, version=version, created_at=utc_now(),
                                       flashio_version=__version__, extra_lineage=lineage)
    created, found = create_once(backend, layout.version_key(name, version), vm.to_json(),
                                 claims_prefix=layout.claims_prefix(name, version), config=registry.config)
    if not created:
        other = VersionManifest.from_json(found, where=f"{backend.description}/{layout.version_key(name, version)}")
        _check_same(other, art, registry)
        log.info("%s@%s was published with this content by a concurrent publish", name, version)
    else:
        _repair_missing_blobs(backend, art, progress)
        registry.set_alias(name, version, LATEST)
    for alias in aliases:
        registry.set_alias(name, version, alias)
    log.info("published %s@%s to %s: %d blobs uploaded (%d bytes, %d of them resumed), %d reused (%d bytes)",
             name, version, backend.description, uploaded, uploaded_bytes, resumed_bytes, reused, reused_bytes)
    return PublishResult(name, version, created, uploaded, uploaded_bytes, reused, reused_bytes, aliases,
                         resumed_bytes=resumed_bytes)


def _check_same(existing: VersionManifest, art: ArtifactManifest, registry: Registry) -> None:
    if existing.artifact_manifest.sha256 != art.sha256:
        raise VersionExistsError(
            f"{existing.name}@{existing.version} already exists in {registry.backend.description} "
            f"(published {existing.created_at}) with different content (artifact manifest sha256 "
            f"{existing.artifact_manifest.sha256[:16]}..., yours {art.sha256[:16]}...): versions are "
            f"immutable; publish under a new --version"
        )


def _upload_blob(backend: Backend, entry: FileEntry, path: Path, progress: Progress) -> int | None:
    """Upload one file as blob unless the registry has it already.

    Returns None when nothing was uploaded, else how many of its bytes an interrupted earlier
    upload had already sent.
    """
    key = layout.blob_key(entry.sha256)
    info = backend.head(key)
    if info is not None and info.size_bytes == entry.size_bytes:
        log.debug("blob %s (%s) already in the registry", entry.sha256[:16], entry.path)
        return None
    if info is not None:
        log.warning("blob %s has %d bytes in the registry, expected %d: replacing it",
                    entry.sha256[:16], info.size_bytes, entry.size_bytes)
    progress.begin(entry.path, entry.size_bytes)
    try:
        return backend.upload_file(key, path, size_bytes=entry.size_bytes, sha256=entry.sha256, label=entry.path,
                                   progress=progress.advance)
    except TransferError as exc:
        raise type(exc)(
            f"uploading {entry.path} ({entry.size_bytes} bytes) failed, no version was published: {exc}. "
            f"Run the same publish again: blobs already uploaded are reused, and so are the parts of a "
            f"large blob's interrupted upload"
        ) from None
    finally:
        progress.end()


def _repair_missing_blobs(backend: Backend, art: ArtifactManifest, progress: Progress) -> None:
    """After the commit, re-upload any blob that vanished meanwhile (a concurrent `gc`)."""
    for entry in art.files:
        if backend.head(layout.blob_key(entry.sha256)) is None:
            log.warning("blob %s (%s) vanished during the publish: uploading it again", entry.sha256[:16], entry.path)
            _upload_blob(backend, entry, art.directory / entry.path, progress)
    if backend.head(layout.blob_key(art.sha256)) is None:
        backend.put_bytes(layout.blob_key(art.sha256), art.raw)
