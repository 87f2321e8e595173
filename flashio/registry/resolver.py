"""`resolve_to_local`, behind `flashio.open(ref)`: a registry reference as a local artifact directory.

    path = resolve_to_local("s3://bucket/models/opt-125m@latest")
    path = resolve_to_local("opt-125m@prod", registry="/srv/registry", cache_dir="/tmp/c")

It resolves the reference (one or two small GETs) and pulls what the cache lacks (pull.py); an
explicit version already complete in the cache opens without any request, and an alias whose
registry is unreachable opens the version it named when last resolved (offline.py; see the
`offline` argument and $FLASHIO_OFFLINE).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flashio.registry.config import RegistryConfig
from flashio.registry.errors import NotFoundError, RefError, UnreachableError
from flashio.registry.offline import (
    OFFLINE_ENV,
    describe_age,
    find_cached,
    find_version,
    offline_setting,
)
from flashio.registry.progress import Progress
from flashio.registry.pull import open_cache, pull_version
from flashio.registry.refs import LATEST, parse_ref, split_ref_uri
from flashio.registry.registry import open_registry

log = logging.getLogger(__name__)

REGISTRY_ENV = "FLASHIO_REGISTRY"


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
