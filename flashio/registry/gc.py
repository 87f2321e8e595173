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

On S3, unfinished multipart uploads of blobs (left by interrupted publishes: their parts are
billed until aborted) are aborted once idle for longer than the grace period: idle since the
later of their start and their newest part, so an upload that a publish is resuming is kept.
Only uploads under the registry's blobs/ prefix are touched, never other uploads in the bucket.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flashio.registry import layout
from flashio.registry.backend import Backend, IncompleteUpload, ObjectInfo
from flashio.registry.errors import NotFoundError, RegistryError, TransferError
from flashio.registry.manifest import VersionManifest

if TYPE_CHECKING:
    from flashio.registry.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AbandonedUpload:
    """An unfinished multipart upload idle for longer than the grace period."""

    key: str
    upload_id: str
    initiated_s: float
    last_activity_s: float  # the later of its start and its newest part, on the store's clock
    parts: int
    size_bytes: int  # what its parts hold (and cost) until it is aborted


@dataclass(frozen=True)
class GcReport:
    """What gc found; `deleted` says whether `deletable` was actually removed (False for a dry run)."""

    deletable: tuple[ObjectInfo, ...]  # unreferenced blobs older than the grace period
    young: tuple[ObjectInfo, ...]  # unreferenced blobs within the grace period: kept
    stale_claims: tuple[ObjectInfo, ...]
    referenced_blobs: int
    deleted: bool  # also: whether `abandoned_uploads` were aborted
    abandoned_uploads: tuple[AbandonedUpload, ...] = ()  # idle past the grace period: aborted
    active_uploads: int = 0  # unfinished uploads within the grace period: kept

    @property
    def deletable_bytes(self) -> int:
        return sum(o.size_bytes for o in self.deletable)

    @property
    def abandoned_upload_bytes(self) -> int:
        return sum(u.size_bytes for u in self.abandoned_uploads)


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
    abandoned, active = _abandoned_uploads(backend, grace_s=grace_s, now_s=now_s)
    if not dry_run:
        for obj in [*deletable, *stale_claims]:
            log.info("gc: deleting %s (%d bytes)", obj.key, obj.size_bytes)
            backend.delete(obj.key)
        for up in abandoned:
            log.info("gc: aborting unfinished upload %s of %s (%d parts, %d bytes)", up.upload_id, up.key,
                     up.parts, up.size_bytes)
            backend.abort_upload(IncompleteUpload(key=up.key, upload_id=up.upload_id, initiated_s=up.initiated_s))
    return GcReport(deletable=tuple(deletable), young=tuple(young), stale_claims=tuple(stale_claims),
                    referenced_blobs=len(referenced), deleted=not dry_run, abandoned_uploads=tuple(abandoned),
                    active_uploads=active)


def _abandoned_uploads(backend: Backend, *, grace_s: float, now_s: float) -> tuple[list[AbandonedUpload], int]:
    """Unfinished blob uploads idle for more than `grace_s`, and how many others there are."""
    abandoned, active = [], 0
    try:
        uploads = list(backend.incomplete_uploads(layout.BLOBS_PREFIX))
    except TransferError:
        raise
    except RegistryError as exc:  # e.g. no s3:ListBucketMultipartUploads permission
        log.warning("gc: cannot list unfinished multipart uploads (%s): none aborted", exc)
        return [], 0
    for up in uploads:
        if now_s - up.initiated_s < grace_s:  # started within the grace period: not idle for longer
            active += 1
            continue
        try:
            parts = backend.upload_parts(up)
        except NotFoundError:  # completed or aborted meanwhile
            continue
        last_s = max([up.initiated_s, *(p.modified_s for p in parts)])
        if now_s - last_s < grace_s:
            active += 1
            continue
        abandoned.append(AbandonedUpload(key=up.key, upload_id=up.upload_id, initiated_s=up.initiated_s,
                                         last_activity_s=last_s, parts=len(parts),
                                         size_bytes=sum(p.size_bytes for p in parts)))
    return abandoned, active
