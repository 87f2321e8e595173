"""Opening models from the pull cache when the registry cannot (or must not) be contacted.

    record_pull(cache, registry_id, rv, alias="prod")         # after every successful pull
    find_cached(cache, registry_id, "opt", "3", as_version=True) # -> CachedCopy (path None if absent)
    offline_setting(None)                                       # None, or True under FLASHIO_OFFLINE=1

Every pull records, per registry, what it resolved, next to the cached versions:

    <cache>/refs/<registry digest>/<name>/versions/<version>.json   version -> cached directory
    <cache>/refs/<registry digest>/<name>/aliases/<alias>.json      alias -> version, resolved_at

`<registry digest>` is the sha256 of the registry's description (its directory, or for S3 its
bucket, prefix and endpoint), so records of two registries never mix; each record also names its
registry in clear. A record is written to a temporary file, fsynced and renamed into place.

A version is complete in the cache when its directory holds `manifest.json` with the sha256 the
version manifest records, and every file that manifest lists, with its recorded size. Only
`manifest.json` is hashed here, not the weights (GBs): every blob was verified by sha256 before
it entered the cache and is read-only there; the runtime checks the sha256 of resident and
predictor files when it loads them, and of everything with `verify=True`.

The rules `resolve_to_local` applies (resolver.py) are in :func:`offline_setting`'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashio.errors import RegistryError
from flashio.registry.cache import Cache
from flashio.registry.errors import BadArtifactError, RefError
from flashio.registry.manifest import TIME_FORMAT, read_artifact_manifest, utc_now
from flashio.registry.refs import check_token

if TYPE_CHECKING:
    from flashio.registry.registry import ResolvedVersion

log = logging.getLogger(__name__)

OFFLINE_ENV = "FLASHIO_OFFLINE"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = ("1", "true", "yes", "on")
_AUTO = ("", "0", "false", "no", "off", "auto")


def offline_setting(offline: bool | None) -> bool | None:
    """The effective offline mode: `offline` if given, else from $FLASHIO_OFFLINE.

    None (the default): an explicit version complete in the cache opens without contacting the
    registry; anything else is resolved by the registry, and when the registry is unreachable
    (connection refused, DNS failure, timeouts: UnreachableError) the last recorded resolution
    is used if that version is complete in the cache, with a warning. Authorization errors,
    missing aliases or versions and damaged registries are never masked.
    True ($FLASHIO_OFFLINE=1): the registry is never contacted; only the cache is used.
    False: the registry is always contacted and nothing falls back (the behaviour before records).
    """
    if offline is not None:
        return bool(offline)
    raw = os.environ.get(OFFLINE_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _AUTO:
        return None
    raise RegistryError(
        f"${OFFLINE_ENV}={raw!r}: expected 1 (never contact the registry, use only the local cache) or "
        f"0 / unset (contact it, fall back to the cache when it is unreachable)"
    )


def describe_age(stamp: str) -> str:
    """`stamp` with how long ago it was, for messages: '2024-06-01T10:00:00.000000Z (3h 5m ago)'."""
    try:
        then = datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return repr(stamp)
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        age = f"{days}d {hours}h"
    elif hours:
        age = f"{hours}h {minutes}m"
    elif minutes:
        age = f"{minutes}m {seconds}s"
    else:
        age = f"{seconds}s"
    return f"{stamp} ({age} ago)"


def _refs_dir(cache: Cache, registry_id: str, name: str) -> Path:
    digest = hashlib.sha256(registry_id.encode()).hexdigest()[:32]
    return cache.root / "refs" / digest / name


def _version_record(cache: Cache, registry_id: str, name: str, version: str) -> Path:
    return _refs_dir(cache, registry_id, name) / "versions" / f"{version}.json"


def _alias_record(cache: Cache, registry_id: str, name: str, alias: str) -> Path:
    return _refs_dir(cache, registry_id, name) / "aliases" / f"{alias}.json"


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache record %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def record_pull(cache: Cache, registry_id: str, rv: ResolvedVersion, *, alias: str | None) -> None:
    """Record that `rv` is complete in the cache (and, when `alias` is given, that alias -> rv now).

    Never fails the pull: a record that cannot be written only costs offline use.
    """
    vm = rv.manifest
    try:
        vpath = _version_record(cache, registry_id, vm.name, vm.version)
        existing = _read_json(vpath)
        if not existing or existing.get("manifest_sha256") != rv.sha256 or existing.get("registry") != registry_id:
            _write_json(vpath, {
                "registry": registry_id, "name": vm.name, "version": vm.version, "manifest_sha256": rv.sha256,
                "artifact_manifest_sha256": vm.artifact_manifest.sha256, "total_bytes": vm.total_bytes,
                "recorded_at": utc_now(),
            })
        if alias is not None:
            _write_json(_alias_record(cache, registry_id, vm.name, alias), {
                "registry": registry_id, "name": vm.name, "alias": alias, "version": vm.version,
                "manifest_sha256": rv.sha256, "resolved_at": utc_now(),
            })
    except OSError as exc:
        log.warning("could not record %s@%s in the cache %s (%s): opening it offline will not work",
                    vm.name, alias or vm.version, cache.root, exc)


@dataclass(frozen=True)
class CachedCopy:
    """What the cache holds for one reference: `path` is None when there is no complete copy."""

    path: Path | None
    version: str | None = None  # the version the reference named when recorded
    resolved_at: str | None = None  # when an alias was resolved to `version` (None for versions)
    problem: str = ""  # why `path` is None, for messages


def _complete(cache: Cache, name: str, version: str, manifest_sha256: str, artifact_sha256: str) -> tuple[Path | None, str]:
    vdir = cache.version_dir(name, version, manifest_sha256)
    if not vdir.is_dir():
        return None, f"{name}@{version} was pulled before, but {vdir} is gone"
    try:
        art = read_artifact_manifest(vdir)  # every listed file present with its recorded size
    except (BadArtifactError, OSError) as exc:
        return None, f"the cached copy of {name}@{version} in {vdir} is damaged or incomplete ({exc})"
    if art.sha256 != artifact_sha256:
        return None, (f"the cached copy of {name}@{version} in {vdir} is damaged: its manifest.json has sha256 "
                      f"{art.sha256}, the registry's version manifest records {artifact_sha256}")
    return vdir, ""


def _valid_record(doc: dict[str, Any] | None, registry_id: str, name: str) -> bool:
    if not doc or doc.get("registry") != registry_id or doc.get("name") != name:
        return False
    try:
        check_token(doc.get("version"), "version")
    except RefError:
        return False
    return bool(_SHA256.fullmatch(str(doc.get("manifest_sha256", ""))))


def find_version(cache: Cache, registry_id: str, name: str, version: str) -> CachedCopy:
    """The complete cached copy of name@version pulled from this registry, if there is one."""
    doc = _read_json(_version_record(cache, registry_id, name, version))
    if not _valid_record(doc, registry_id, name) or doc["version"] != version or not _SHA256.fullmatch(
            str(doc.get("artifact_manifest_sha256", ""))):
        return CachedCopy(None, problem=f"{name}@{version} was never pulled from this registry into {cache.root}")
    path, problem = _complete(cache, name, version, doc["manifest_sha256"], doc["artifact_manifest_sha256"])
    return CachedCopy(path, version=version, problem=problem)


def find_alias(cache: Cache, registry_id: str, name: str, alias: str) -> CachedCopy:
    """The version name@alias named when last resolved, if that version is complete in the cache."""
    doc = _read_json(_alias_record(cache, registry_id, name, alias))
    if not _valid_record(doc, registry_id, name) or doc.get("alias") != alias:
        return CachedCopy(None, problem=f"{name}@{alias} was never resolved from this registry with the cache {cache.root}")
    copy = find_version(cache, registry_id, name, doc["version"])
    if copy.path is not None and (vrec := _read_json(_version_record(cache, registry_id, name, doc["version"]))) \
            and vrec.get("manifest_sha256") != doc["manifest_sha256"]:
        copy = CachedCopy(None, problem=f"the records of {name}@{alias} -> {doc['version']} disagree in {cache.root}")
    return CachedCopy(copy.path, version=doc["version"], resolved_at=str(doc.get("resolved_at", "?")),
                      problem=copy.problem)


def find_cached(cache: Cache, registry_id: str, name: str, tag: str, *, as_version: bool) -> CachedCopy:
    """`tag` as a version (if `as_version`), else as an alias: the first complete copy found."""
    first = None
    if as_version:
        first = find_version(cache, registry_id, name, tag)
        if first.path is not None:
            return first
    second = find_alias(cache, registry_id, name, tag)
    if second.path is not None or first is None:
        return second
    # report the more useful reason: a damaged copy beats "never pulled"
    return first if first.version is not None or second.version is None else second

