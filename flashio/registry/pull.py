"""Pulling a version into the local cache, and `resolve_to_local` behind `flashio.open(ref)`.

    path = resolve_to_local("s3://bucket/models/opt-125m@latest")
    path = resolve_to_local("opt-125m@prod", registry="/srv/registry", cache_dir="/tmp/c")

A pull resolves the reference (one or two small GETs), and if the cache already holds that
version returns its directory without transferring anything. Otherwise, under a per-version file
lock (two processes pulling the same version: one downloads, the other waits and reuses), it
fetches the missing blobs (download.py), checks the artifact manifest against the version
manifest, links the files into a staging directory and renames it into place.

Every pull records in the cache which version it got and what alias named it (offline.py), so
that `resolve_to_local` opens an explicit version already in the cache without any request, and,
when the registry is unreachable, falls back to the version an alias named when last resolved
(see its `offline` argument and $FLASHIO_OFFLINE).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from flashio.registry.cache import Cache, default_cache_dir
from flashio.registry.config import RegistryConfig
from flashio.registry.download import fetch_blob
from flashio.registry.errors import (
    IntegrityError,
    NotFoundError,
    RefError,
    TransferError,
    UnreachableError,
    UnsafePathError,
)
from flashio.registry.manifest import (
    ARTIFACT_MANIFEST,
    VersionManifest,
    check_relative_path,
    parse_artifact_manifest,
)
from flashio.registry.offline import (
    OFFLINE_ENV,
    describe_age,
    find_cached,
    find_version,
    offline_setting,
    record_pull,
)
from flashio.registry.progress import NullProgress, Progress
from flashio.registry.refs import LATEST, Ref, parse_ref, split_ref_uri

if TYPE_CHECKING:
    from flashio.registry.registry import Registry, ResolvedVersion

log = logging.getLogger(__name__)

REGISTRY_ENV = "FLASHIO_REGISTRY"


def open_cache(cache_dir: str | Path | None) -> Cache:
    return Cache(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())


def pull_version(registry: Registry, rv: ResolvedVersion, *, cache_dir: str | Path | None,
                 progress: Progress | None, ref: Ref | None = None) -> Path:
    """Make `rv` available in the cache and return its artifact directory.

    The cache records (offline.py) that `rv` is there and, when `ref` named it through an alias,
    that the alias resolved to it now: what lets the version open later without the registry.
    """
    cache = open_cache(cache_dir)
    vdir = _pull_into(cache, registry, rv, progress or NullProgress())
    tag = (ref.tag or LATEST) if ref is not None else None
    alias = tag if tag is not None and (tag == LATEST or tag != rv.manifest.version) else None
    record_pull(cache, registry.backend.description, rv, alias=alias)
    return vdir


def _pull_into(cache: Cache, registry: Registry, rv: ResolvedVersion, progress: Progress) -> Path:
    vm = rv.manifest
    vdir = cache.version_dir(vm.name, vm.version, rv.sha256)
    if (vdir / ARTIFACT_MANIFEST).is_file():
        log.debug("%s@%s is in the cache: %s", vm.name, vm.version, vdir)
        return vdir
    config = registry.config
    with cache.lock(f"version-{rv.sha256}", timeout_s=config.lock_timeout_s):
        if (vdir / ARTIFACT_MANIFEST).is_file():
            return vdir
        blobs = {}
        for entry in vm.all_files:
            if entry.sha256 in blobs:
                continue
            try:
                blobs[entry.sha256] = fetch_blob(registry.backend, cache, entry, config=config, progress=progress)
            except TransferError as exc:
                raise type(exc)(
                    f"pulling {entry.path} of {vm.name}@{vm.version} failed: {exc}. Run the pull again: "
                    f"it resumes where it stopped"
                ) from None
        _check_artifact_manifest(blobs[vm.artifact_manifest.sha256], vm, registry)
        _remove_abandoned_staging(cache.model_dir(vm.name))
        staging = cache.staging_dir(vm.name, uuid.uuid4().hex)
        try:
            for entry in vm.all_files:
                dest = _inside(staging, entry.path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(blobs[entry.sha256], dest)
            os.rename(staging, vdir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    log.info("pulled %s@%s (%d bytes) into %s", vm.name, vm.version, vm.total_bytes, vdir)
    return vdir


def _remove_abandoned_staging(models_dir: Path, *, age_s: float = 3600.0) -> None:
    """Staging directories of pulls that crashed (older than an hour) hold only hard links: drop them."""
    now = time.time()
    for path in models_dir.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > age_s:
                shutil.rmtree(path, ignore_errors=True)


def _inside(root: Path, rel: str) -> Path:
    """root/rel, refusing any name that would land outside root."""
    if rel != ARTIFACT_MANIFEST:
        check_relative_path(rel, where="version manifest")
    dest = root.joinpath(*rel.split("/"))
    if not dest.resolve().is_relative_to(root.resolve()):
        raise UnsafePathError(f"version manifest: file name {rel!r} leaves the version directory")
    return dest


def _link_or_copy(blob: Path, dest: Path) -> None:
    try:
        os.link(blob, dest)
    except OSError:  # no hard links on this file system: a read-only copy
        shutil.copyfile(blob, dest)
        os.chmod(dest, 0o444)


def _check_artifact_manifest(path: Path, vm: VersionManifest, registry: Registry) -> None:
    files, _ = parse_artifact_manifest(path.read_bytes(), where=f"manifest.json of {vm.name}@{vm.version}")
    if files != vm.files:
        raise IntegrityError(
            f"{vm.name}@{vm.version} in {registry.backend.description}: the artifact's manifest.json and the "
            f"version manifest list different files; the registry is damaged: publish the artifact again "
            f"under a new version"
        )


def resolve_to_local(ref_or_uri: str, *, registry: str | None = None, cache_dir: str | Path | None = None,
                     endpoint_url: str | None = None, config: RegistryConfig | None = None,
                     progress: Progress | None = None, offline: bool | None = None) -> Path:
    """Pull `ref_or_uri` (or reuse the cache) and return the local artifact directory.

    `ref_or_uri` is `<registry>/<name>[@tag]` (e.g. `s3://bucket/prefix/opt@latest`,
    `file:///srv/reg/opt@1`) or, with `registry=` (or $FLASHIO_REGISTRY), a plain `name[@tag]`.

    `offline` (None: from $FLASHIO_OFFLINE, unset means automatic):
      None  an explicit version already complete in the cache opens without contacting the
            registry; an alias (or `latest`) is resolved by the registry, and if the registry is
            unreachable (UnreachableError: connection refused, DNS, timeouts) the version the
            alias named when last resolved opens from the cache, with a warning naming it and
            when it was resolved. Authorization errors and missing aliases are never masked.
      True  never contact the registry: only what the cache holds (NotFoundError otherwise).
      False always contact the registry; never fall back.
    """
    from flashio.registry.registry import open_registry

    if registry is None and "/" in ref_or_uri:
        registry, ref = split_ref_uri(ref_or_uri)
    else:
        ref = ref_or_uri
        registry = registry or os.environ.get(REGISTRY_ENV)
        if not registry:
            raise RefError(
                f"{ref_or_uri!r} names no registry: pass registry='s3://bucket/prefix' (or a directory), "
                f"set ${REGISTRY_ENV}, or write the full URI 's3://bucket/prefix/{ref_or_uri}'"
            )
    parsed = parse_ref(ref)
    mode = offline_setting(offline)
    tag = parsed.tag or LATEST
    cache = open_cache(cache_dir)
    with open_registry(registry, endpoint_url=endpoint_url, config=config) as reg:
        where = reg.backend.description
        if mode is not False and tag != LATEST:
            copy = find_version(cache, where, parsed.name, tag)
            if copy.path is not None:  # versions are immutable: no need to ask the registry
                log.debug("%s@%s is complete in the cache: %s", parsed.name, tag, copy.path)
                return copy.path
        if mode is True:
            copy = find_cached(cache, where, parsed.name, tag, as_version=tag != LATEST)
            if copy.path is None:
                raise NotFoundError(
                    f"offline (offline=True or ${OFFLINE_ENV}=1), so {where} was not contacted, and "
                    f"{parsed.name}@{tag} is not usable from the local cache: {copy.problem}; open it once "
                    f"with the registry reachable (without ${OFFLINE_ENV}=1)"
                )
            if copy.resolved_at is not None:
                log.info("offline: %s@%s -> version %s as resolved at %s, from %s", parsed.name, tag,
                         copy.version, describe_age(copy.resolved_at), copy.path)
            return copy.path
        try:
            rv = reg.resolve(parsed)
        except UnreachableError as exc:
            if mode is False:
                raise
            copy = find_cached(cache, where, parsed.name, tag, as_version=tag != LATEST)
            if copy.path is None:
                raise UnreachableError(
                    f"{exc}. Nothing to fall back to: {parsed.name}@{tag} is not usable from the local "
                    f"cache ({copy.problem})"
                ) from None
            if copy.resolved_at is None:  # a version that became complete meanwhile
                return copy.path
            log.warning(
                "registry %s is unreachable (%s); opening %s@%s as version %s, which it named when last "
                "resolved at %s, from the local cache %s; the alias may have moved since",
                where, type(exc).__name__, parsed.name, tag, copy.version, describe_age(copy.resolved_at),
                copy.path)
            return copy.path
        return pull_version(reg, rv, cache_dir=cache.root, progress=progress, ref=parsed)
