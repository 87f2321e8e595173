"""Garbage collection: delete blobs that no version manifest references.

    report = registry.gc(grace_s=24 * 3600, dry_run=True)
    for obj in report.deletable: print(obj.key, obj.size_bytes)

Blobs are listed *before* the manifests are read, so a version committed during the run either
shows up in the manifests or references only blobs that the listing already counted as young.
A blob younger than the grace period is always kept: it may belong to a publish in progress,
whose version manifest is written last. A publish also re-uploads, after its commit, any blob
that vanished meanwhile (publish.py). Claims left by crashed publishers (older than the grace
period and the claim TTL) are removed too. An unreadable version manifest stops the run: it is
safer to delete nothing than to delete blobs a version may need.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flashio.registry import layout
from flashio.registry.backend import ObjectInfo
from flashio.registry.manifest import VersionManifest

if TYPE_CHECKING:
    from flashio.registry.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What gc found; `deleted` says whether `deletable` was actually removed (False for a dry run)."""

    deletable: tuple[ObjectInfo, ...]  # unreferenced blobs older than the grace period
    young: tuple[ObjectInfo, ...]  # unreferenced blobs within the grace period: kept
    stale_claims: tuple[ObjectInfo, ...]
    referenced_blobs: int
    deleted: bool

    @property
    def deletable_bytes(self) -> int:
        return sum(o.size_bytes for o in self.deletable)


def collect_garbage(registry: Registry, *, grace_s: float, dry_run: bool) -> GcReport:
    """Find (and unless `dry_run`, delete) unreferenced blobs older than `grace_s` seconds."""
    backend = registry.backend
    blobs = list(backend.list(layout.BLOBS_PREFIX))  # first: see the module docstring
    referenced: set[str] = set()
    claims = []
    for obj in backend.list(layout.MODELS_PREFIX):
        parsed = layout.parse_model_key(obj.key)
        if parsed is None:
            continue
        _, kind, rest = parsed
        if kind == "versions" and rest.endswith("/" + layout.VERSION_MANIFEST):
            raw = backend.get_bytes(obj.key)
            if raw is None:  # deleted meanwhile by hand: nothing references through it any more
                continue
            vm = VersionManifest.from_json(raw, where=f"{backend.description}/{obj.key}")
            referenced.update(e.sha256 for e in vm.all_files)
        elif kind == "claims":
            claims.append(obj)
    now_s = time.time()
    deletable, young = [], []
    for obj in blobs:
        if obj.key[len(layout.BLOBS_PREFIX):] in referenced:
            continue
        (young if now_s - obj.modified_s < grace_s else deletable).append(obj)
    stale_age_s = max(grace_s, registry.config.claim_ttl_s)
    stale_claims = [c for c in claims if now_s - c.modified_s > stale_age_s]
    if not dry_run:
        for obj in [*deletable, *stale_claims]:
            log.info("gc: deleting %s (%d bytes)", obj.key, obj.size_bytes)
            backend.delete(obj.key)
    return GcReport(deletable=tuple(deletable), young=tuple(young), stale_claims=tuple(stale_claims),
                    referenced_blobs=len(referenced), deleted=not dry_run)
