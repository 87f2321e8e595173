"""Resumable multipart uploads of large blobs to S3: a publish that died at 8 of 9 GB sends 1 GB.

    part_bytes = part_size_for(size_bytes, config.part_size_bytes)   # S3's 10,000-part limit applied
    plan = plan_parts(size_bytes, part_bytes)                         # [PlannedPart(1, 0, 16 MiB), ...]
    resumed = upload_resumable(backend, "blobs/sha256/<digest>", path, size_bytes=n, sha256=d, label="ffn")

The part layout is a pure function of the blob's size and the configured part size, so an upload
left by an interrupted publish (same key = same sha256) can be continued: ListMultipartUploads
with the key as prefix finds it, ListParts (paginated) lists what it holds. A part is reused only
if its number is in the plan, its size is the planned size, and its ETag equals the MD5 of the
same byte range of the local file. Anything else (another part size, a foreign or damaged part,
a server whose ETags are not MD5s, such as AWS with SSE-KMS) aborts that upload and starts a new
one: reuse is an optimisation, never a risk.

The file is then read once, in order, through hashing.VerifyingReader: every byte goes into the
sha256 that must equal the manifest's (IntegrityError before the last part is sent otherwise),
and the MD5 of every reused part is computed again from those same bytes, so the parts the final
object is assembled from are exactly the verified bytes. Missing parts are sent in parallel with
their Content-MD5 (servers that check it refuse damaged bodies); CompleteMultipartUpload runs only
after all of that, and its ETag is compared with the one the parts imply (MD5-of-MD5s) when the
server's part ETags are MD5s; a HEAD checks the size. A failure other than a content mismatch
leaves the upload in place for the next publish; `gc` aborts uploads idle for longer than its
grace period.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flashio.errors import RegistryError
from flashio.registry.backend import IncompleteUpload, UploadedPart
from flashio.registry.errors import IntegrityError, NotFoundError, TransferError
from flashio.registry.hashing import VerifyingReader

if TYPE_CHECKING:
    from collections.abc import Callable

    from flashio.registry.s3 import S3Backend

log = logging.getLogger(__name__)

MAX_PARTS = 10_000  # S3's limit per multipart upload
MAX_PART_BYTES = 5 * 1024**3  # S3's largest part
_READ_BYTES = 4 * 1024 * 1024  # pread size when checking the MD5 of parts already on the server


@dataclass(frozen=True)
class PlannedPart:
    """Part `number` (1-based) holds the bytes [start, end) of the blob."""

    number: int
    start: int
    end: int

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


def part_size_for(size_bytes: int, part_size_bytes: int) -> int:
    """The configured part size, doubled until the blob fits in 10,000 parts (as boto3 does)."""
    part = part_size_bytes
    while -(-size_bytes // part) > MAX_PARTS:
        part *= 2
    if part > MAX_PART_BYTES:
        raise RegistryError(f"a blob of {size_bytes} bytes does not fit in {MAX_PARTS} parts of at most "
                            f"{MAX_PART_BYTES} bytes: too large for one S3 object")
    return part


def plan_parts(size_bytes: int, part_bytes: int) -> list[PlannedPart]:
    """Consecutive parts of `part_bytes` (the last one shorter) covering `size_bytes` bytes."""
    return [PlannedPart(i + 1, start, min(start + part_bytes, size_bytes))
            for i, start in enumerate(range(0, size_bytes, part_bytes))]


def composite_etag(md5_digests: list[bytes]) -> str:
    """The ETag S3 gives a completed multipart object: MD5 of the parts' MD5s, '-', part count."""
    return f"{hashlib.md5(b''.join(md5_digests)).hexdigest()}-{len(md5_digests)}"


def clean_etag(etag: str) -> str:
    return etag.strip().strip('"').lower()


def layout_problem(parts: list[UploadedPart], plan: list[PlannedPart]) -> str | None:
    """Why the listed parts cannot belong to an upload following `plan`, or None if they can."""
    for p in parts:
        if not 1 <= p.number <= len(plan):
            return f"it has part {p.number}, the plan has {len(plan)} parts"
        want = plan[p.number - 1].size_bytes
        if p.size_bytes != want:
            return f"its part {p.number} has {p.size_bytes} bytes, the plan {want} (another part size?)"
    return None


def md5_range(path: Path, start: int, end: int) -> bytes:
    """MD5 of the bytes [start, end) of a file, read in 4 MiB pieces."""
    h = hashlib.md5()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            piece = os.pread(fd, min(_READ_BYTES, end - pos), pos)
            if not piece:
                raise IntegrityError(f"{path} ended at byte {pos}, expected {end} bytes")
            h.update(piece)
            pos += len(piece)
    finally:
        os.close(fd)
    return h.digest()


def content_problem(path: Path, parts: list[UploadedPart], plan: list[PlannedPart], concurrency: int) -> str | None:
    """Why the listed parts do not hold the local file's bytes (ETag != MD5), or None if they all do."""
    if not parts:
        return None
    log.debug("checking %d parts of an unfinished upload against %s", len(parts), path)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(parts))), thread_name_prefix="flashio-md5") as pool:
            digests = list(pool.map(lambda p: md5_range(path, plan[p.number - 1].start, plan[p.number - 1].end), parts))
    except IntegrityError as exc:  # the file is shorter than its manifest says: the upload itself reports it
        return f"the local file cannot be compared ({exc})"
    bad = [p for p, d in zip(parts, digests) if p.etag != d.hex()]
    if bad:
        p = bad[0]
        return (f"{len(bad)} of its {len(parts)} parts do not match the local bytes (part {p.number}: ETag {p.etag}, "
                f"MD5 of the local range {digests[parts.index(p)].hex()}; other bytes, or a server whose ETags "
                f"are not MD5s, e.g. SSE-KMS)")
    return None


def find_resumable(backend: S3Backend, key: str, path: Path, plan: list[PlannedPart]) -> tuple[str | None, dict[int, str]]:
    """An unfinished upload of `key` whose parts all fit `plan` and match the file: (upload id, part -> ETag).

    Unfinished uploads of `key` that do not match are aborted. (None, {}) when there is nothing to resume.
    """
    try:
        found = [u for u in backend.incomplete_uploads(key) if u.key == key]
    except TransferError:
        raise
    except RegistryError as exc:  # e.g. no s3:ListBucketMultipartUploads permission: no resume
        log.warning("cannot list unfinished uploads of %s (%s): starting a new upload", key, exc)
        return None, {}
    for upload in sorted(found, key=lambda u: u.initiated_s, reverse=True):
        try:
            parts = backend.upload_parts(upload)
        except NotFoundError:  # completed or aborted meanwhile
            continue
        problem = layout_problem(parts, plan) or content_problem(path, parts, plan, backend.config.concurrency)
        if problem is None:
            return upload.upload_id, {p.number: p.etag for p in parts}
        log.warning("unfinished upload %s of %s cannot be resumed: %s; aborting it and starting a new upload",
                    upload.upload_id, key, problem)
        abort_quietly(backend, upload)
    return None, {}


def abort_quietly(backend: S3Backend, upload: IncompleteUpload) -> None:
    """Abort an upload; when the store refuses (permissions), say so and leave it to gc or a lifecycle rule."""
    try:
        backend.abort_upload(upload)
    except TransferError:
        raise
    except RegistryError as exc:
        log.warning("could not abort unfinished upload %s of %s (%s): `flashio gc` or a lifecycle rule "
                    "must remove it", upload.upload_id, upload.key, exc)


def upload_resumable(backend: S3Backend, key: str, path: Path, *, size_bytes: int, sha256: str, label: str,
                     progress: Callable[[int], None] | None = None) -> int:
    """Upload a file as a multipart object, continuing a matching unfinished upload of `key`.

    Returns the bytes that were already on the server (reported to `progress` first, then what is
    sent as each part finishes). See the module docstring for what is checked.
    """
    plan = plan_parts(size_bytes, part_size_for(size_bytes, backend.config.part_size_bytes))
    upload_id, reused = find_resumable(backend, key, path, plan)
    if upload_id is None:
        upload_id = _create(backend, key)
    resumed_bytes = sum(plan[n - 1].size_bytes for n in reused)
    if reused:
        log.info("resuming upload %s of %s (%s): %d of %d parts (%d bytes) already on the server", upload_id,
                 key, label, len(reused), len(plan), resumed_bytes)
        if progress:
            progress(resumed_bytes)
    upload = IncompleteUpload(key=key, upload_id=upload_id, initiated_s=0.0)
    try:
        etags, md5s = _send_parts(backend, key, upload_id, path, plan, reused, size_bytes=size_bytes,
                                  sha256=sha256, label=label, progress=progress)
    except IntegrityError:  # the file does not match its manifest: its parts are of no use
        abort_quietly(backend, upload)
        raise
    except BaseException:
        log.info("upload %s of %s stays on the server: the next publish resumes it", upload_id, key)
        raise
    _complete(backend, key, upload_id, plan, etags, md5s, size_bytes)
    return resumed_bytes


def _create(backend: S3Backend, key: str) -> str:
    with backend._errors("CreateMultipartUpload", key):
        return str(backend._client.create_multipart_upload(Bucket=backend.bucket, Key=backend._key(key))["UploadId"])


def _vanished(backend: S3Backend, op: str, key: str, upload_id: str) -> TransferError:
    return TransferError(f"{op} {key} at {backend.endpoint}: upload {upload_id} no longer exists (aborted by a "
                         f"concurrent `flashio gc` or publish?); run the publish again")


def _upload_part(backend: S3Backend, key: str, upload_id: str, number: int, data: bytes, md5: bytes) -> str:
    with backend._errors("UploadPart", key):
        try:
            resp = backend._client.upload_part(Bucket=backend.bucket, Key=backend._key(key), UploadId=upload_id,
                                               PartNumber=number, Body=data,
                                               ContentMD5=base64.b64encode(md5).decode("ascii"))
        except backend._exc.ClientError as exc:
            if backend._code(exc)[0] == "NoSuchUpload":
                raise _vanished(backend, "UploadPart", key, upload_id) from None
            raise
    return clean_etag(str(resp.get("ETag", "")))


def _send_parts(backend: S3Backend, key: str, upload_id: str, path: Path, plan: list[PlannedPart],
                reused: dict[int, str], *, size_bytes: int, sha256: str, label: str,
                progress: Callable[[int], None] | None) -> tuple[dict[int, str], dict[int, bytes]]:
    """Read the file once, in order; send the parts not in `reused`. Returns part -> ETag and part -> MD5."""
    concurrency = backend.config.concurrency
    slots = threading.BoundedSemaphore(concurrency + 2)  # parts in memory: being sent or waiting to be
    failed = threading.Event()
    lock = threading.Lock()
    etags: dict[int, str] = dict(reused)
    md5s: dict[int, bytes] = {}

    def send(part: PlannedPart, data: bytes) -> None:
        try:
            if failed.is_set():
                return
            digest = hashlib.md5(data).digest()
            etag = _upload_part(backend, key, upload_id, part.number, data, digest)
            with lock:
                etags[part.number], md5s[part.number] = etag, digest
            if progress:
                progress(len(data))
        except BaseException:
            failed.set()
            raise
        finally:
            slots.release()

    futures: list[Future[None]] = []
    with VerifyingReader(path, sha256=sha256, size_bytes=size_bytes, label=label) as src, \
            ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flashio-upload") as pool:
        try:
            for part in plan:
                slots.acquire()
                if failed.is_set():
                    slots.release()
                    break
                try:
                    data = src.read(part.size_bytes)  # IntegrityError at the last part if the sha256 is wrong
                except BaseException:
                    slots.release()
                    raise
                if part.number in reused:
                    slots.release()
                    digest = hashlib.md5(data).digest()
                    if digest.hex() != reused[part.number]:
                        raise IntegrityError(
                            f"artifact file {label!r} ({path}) changed while it was being published (part "
                            f"{part.number} no longer has the bytes checked a moment ago); publish again"
                        )
                    with lock:
                        md5s[part.number] = digest
                    continue
                futures.append(pool.submit(send, part, data))
                del data
        except BaseException:
            failed.set()
            for f in futures:
                f.cancel()
            raise
    for f in futures:  # the pool has finished: every future is done or cancelled
        if not f.cancelled() and (exc := f.exception()) is not None:
            raise exc
    if len(etags) != len(plan) or len(md5s) != len(plan):  # cancelled without an error: cannot happen
        raise TransferError(f"upload {upload_id} of {key}: {len(plan) - len(etags)} parts were not sent")
    return etags, md5s


def _complete(backend: S3Backend, key: str, upload_id: str, plan: list[PlannedPart], etags: dict[int, str],
              md5s: dict[int, bytes], size_bytes: int) -> None:
    """CompleteMultipartUpload, then check the object's ETag (when it is MD5-based) and size."""
    parts = [{"PartNumber": p.number, "ETag": f'"{etags[p.number]}"'} for p in plan]
    with backend._errors("CompleteMultipartUpload", key):
        try:
            resp = backend._client.complete_multipart_upload(Bucket=backend.bucket, Key=backend._key(key),
                                                             UploadId=upload_id, MultipartUpload={"Parts": parts})
        except backend._exc.ClientError as exc:
            if backend._code(exc)[0] != "NoSuchUpload":
                raise
            info = backend.head(key)  # a concurrent publish of the same blob may have completed it
            if info is not None and info.size_bytes == size_bytes:
                log.info("upload %s of %s was completed by a concurrent publish", upload_id, key)
                return
            raise _vanished(backend, "CompleteMultipartUpload", key, upload_id) from None
    got = clean_etag(str(resp.get("ETag", "")))
    md5_etags = all(etags[p.number] == md5s[p.number].hex() for p in plan)
    expected = composite_etag([md5s[p.number] for p in plan])
    if md5_etags and "-" in got and got != expected:  # compare only S3's multipart form ("<md5>-<parts>")
        backend.delete(key)
        raise IntegrityError(f"{key} at {backend.endpoint}: the completed object has ETag {got}, its parts imply "
                             f"{expected}; it was deleted, publish again")
    info = backend.head(key)
    if info is None:
        raise TransferError(f"{key} at {backend.endpoint} vanished right after its upload was completed "
                            f"(a concurrent delete?); publish again")
    if info.size_bytes != size_bytes:
        backend.delete(key)
        raise IntegrityError(f"{key} at {backend.endpoint}: the completed object has {info.size_bytes} bytes, "
                             f"expected {size_bytes}; it was deleted, publish again")
