"""Publish an artifact directory to a registry: the pipeline's one call site of the registry.

    ref = publish_artifact(Path("work/bundle/x/artifact"), registry="./flashio-registry", name="opt-stdlib")
    ref.reference    # 'opt-stdlib@20240611T142233Z'; flashio.open(ref.reference, registry=ref.registry)
    find_published("./flashio-registry", "opt-stdlib", key)   # the version with that lineage key, or None

`flashio.registry` (content-addressed blobs, immutable versions, aliases, local or S3) does the
work; this module only adapts its result, so registry changes stay out of the flow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

log = logging.getLogger(__name__)

# The lineage entry that identifies what a conversion produces (see flows.convert.lineage_key).
LINEAGE_KEY = "lineage_key"


@dataclass(frozen=True)
class PublishedArtifact:
    registry: str  # the registry URI as given
    name: str
    version: str
    created: bool  # False when that version already held this exact content
    uploaded_bytes: int
    reused_bytes: int
    aliases: tuple[str, ...]

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"


def publish_artifact(artifact: Path, *, registry: str, name: str, version: str | None = None,
                     aliases: Sequence[str] = (), lineage: Mapping[str, Any] | None = None,
                     endpoint_url: str | None = None, progress=None) -> PublishedArtifact:
    from flashio.registry import open_registry

    with open_registry(registry, endpoint_url=endpoint_url) as reg:
        r = reg.publish(artifact, name=name, version=version, aliases=list(aliases), lineage=lineage,
                        progress=progress)
    log.info("published %s@%s to %s", r.name, r.version, registry)
    return PublishedArtifact(registry=registry, name=r.name, version=r.version, created=r.created,
                             uploaded_bytes=r.uploaded_bytes, reused_bytes=r.reused_bytes, aliases=tuple(r.aliases))


@task(name="publish", retries=2, retry_delay_seconds=5,
      retry_condition_fn=lambda _task, _run, state: _is_transient(state))
def publish_task(artifact: Path, registry: str, name: str, version: str | None, aliases: list[str],
                 lineage: dict[str, Any] | None, endpoint_url: str | None = None) -> PublishedArtifact:
    """Not cached: publishing is the side effect. Retried only on transfer errors (a version
    that already exists with other content, a bad name... fail at once)."""
    res = publish_artifact(artifact, registry=registry, name=name, version=version, aliases=aliases,
                           lineage=lineage, endpoint_url=endpoint_url)
    get_run_logger().info("published %s to %s (%s, %d bytes uploaded, %d reused)", res.reference, registry,
                          "new version" if res.created else "already there", res.uploaded_bytes, res.reused_bytes)
    return res


def find_published(registry: str, name: str, lineage_key: str, *, aliases: Sequence[str] = (),
                   endpoint_url: str | None = None) -> PublishedArtifact | None:
    """The newest version of `name` whose lineage records `lineage_key` (None when there is none,
    or no registry yet). `aliases` are pointed at it: a plan that names them wants them there."""
    from flashio.registry import NotFoundError, open_registry

    with open_registry(registry, endpoint_url=endpoint_url) as reg:
        try:
            versions = reg.versions(name)
        except NotFoundError:  # a local registry that nothing was published to yet
            return None
        found = [v for v in versions if v.lineage.get(LINEAGE_KEY) == lineage_key]
        if not found:
            return None
        vm = found[-1]  # versions() is oldest first
        for alias in aliases:
            if reg.alias_target(name, alias) != vm.version:
                reg.set_alias(name, vm.version, alias)
    return PublishedArtifact(registry=registry, name=name, version=vm.version, created=False, uploaded_bytes=0,
                             reused_bytes=vm.total_bytes, aliases=tuple(aliases))


@task(name="find-published", retries=2, retry_delay_seconds=5,
      retry_condition_fn=lambda _task, _run, state: _is_transient(state))
def find_published_task(registry: str, name: str, lineage_key: str, aliases: list[str],
                        endpoint_url: str | None = None) -> PublishedArtifact | None:
    """Not cached: the registry changes under us."""
    found = find_published(registry, name, lineage_key, aliases=aliases, endpoint_url=endpoint_url)
    if found is not None:
        get_run_logger().info("%s in %s already holds lineage %s: nothing to convert", found.reference, registry,
                              lineage_key[:16])
    return found


def _is_transient(state) -> bool:
    from flashio.registry import TransferError, UnreachableError

    try:
        state.result()
    except (TransferError, UnreachableError):
        return True
    except Exception:
        return False
    return False
