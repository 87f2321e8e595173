"""Pulling a resolved version into the local cache (`Registry.pull`; `resolve_to_local` in
resolver.py decides when a pull is needed at all).

    path = pull_version(registry, registry.resolve("opt-125m@prod"), cache_dir=None, progress=None)

If the cache already holds that version, its directory is returned without transferring
anything. Otherwise, under a per-version file
lock (two processes pulling the same version: one downloads, the other waits and reuses), it
fetches the missing blobs (download.py), checks the artifact manifest against the version
manifest, links the files into a staging directory and renames it into place.

Every pull records in the cache which version it got and what alias named it (offline.py), so
that `resolve_to_local` opens an explicit version already in the cache without any request, and,
when the registry is unreachable, falls back to the version an alias named when last resolved.
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

from flashio.format.manifest import MANIFEST, check_relative_name
from flashio.registry.cache import Cache, default_cache_dir
from flashio.registry.download import fetch_blob
from flashio.registry.errors import IntegrityError, TransferError, UnsafePathError
from flashio.registry.manifest import VersionManifest, parse_artifact_manifest, registry_errors
from flashio.registry.offline import record_pull
from flashio.registry.progress import NullProgress, Progress
from flashio.registry.refs import LATEST, Ref

if TYPE_CHECKING:
    from flashio.registry.registry import Registry, ResolvedVersion

log = logging.getLogger(__name__)


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
    if (vdir / MANIFEST).is_file():
        log.debug("%s@%s is in the cache: %s", vm.name, vm.version, vdir)
        return vdir
    config = registry.config
    with cache.lock(f"version-{rv.sha256}", timeout_s=config.lock_timeout_s):
        if (vdir / MANIFEST).is_file():
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
    with registry_errors():
        check_relative_name(rel, "file name", where="version manifest")
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
