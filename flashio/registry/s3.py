"""A registry in an S3 bucket (AWS or any S3-compatible server), through boto3.

    backend = S3Backend(parse_location("s3://bucket/registry"), RegistryConfig(),
                        endpoint_url="http://127.0.0.1:9000")

Endpoint and credentials come from the standard AWS settings (environment, shared config and
credentials files, `AWS_PROFILE`, `AWS_ENDPOINT_URL_S3`) unless `endpoint_url` is given. A
non-AWS endpoint gets path-style addressing (`http://host/bucket/key`), which S3-compatible
servers expect. Requests time out after the configured connect/read timeouts and are retried
(botocore's "standard" mode) only for transient failures: throttling, 5xx, dropped connections.
This is the only module of flashio that imports boto3, and only when an S3 registry is opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flashio.errors import MissingExtraError, RegistryError
from flashio.registry.backend import (
    MAX_DOCUMENT_BYTES,
    Backend,
    IncompleteUpload,
    ObjectInfo,
    Source,
    UploadedPart,
)
from flashio.registry.config import RegistryConfig
from flashio.registry.errors import NotFoundError, TransferError, UnreachableError
from flashio.registry.refs import Location
from flashio.registry.s3_multipart import upload_resumable

log = logging.getLogger(__name__)

_PIECE_BYTES = 1024 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_MISSING = {"404", "NoSuchKey", "NotFound"}
_LIST_PAGE_SIZE = 1000  # entries per ListMultipartUploads / ListParts request (tests make it small)
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def _scrub(text: str) -> str:
    """Remove user info (`//user:secret@host`) from URLs inside a message."""
    return re.sub(r"//[^/@\s]+@", "//", text)


def safe_endpoint(url: str) -> str:
    """The endpoint URL without any user info, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class S3Backend(Backend):
    """Objects live under `s3://bucket/prefix/`; see the module docstring for settings."""

    def __init__(self, location: Location, config: RegistryConfig, *, endpoint_url: str | None = None,
                 profile: str | None = None, addressing_style: str | None = None):
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError as exc:
            raise MissingExtraError("S3 registries", "s3", "boto3") from exc
        self._exc = botocore.exceptions
        for url in (endpoint_url, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL")):
            if url and (urlsplit(url).username or urlsplit(url).password):
                # boto never uses URL user info for auth; refusing it keeps the secret out of every
                # request line, log record and error message downstream
                raise RegistryError(f"the S3 endpoint URL {safe_endpoint(url)!r} carries credentials (user:secret@); "
                                    "remove them and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        self.bucket = location.bucket
        self.prefix = f"{location.prefix}/" if location.prefix else ""
        self.config = config
        try:
            session = boto3.session.Session(profile_name=profile)
        except botocore.exceptions.BotoCoreError as exc:  # e.g. ProfileNotFound
            raise RegistryError(f"cannot set up the S3 client for {location}: {type(exc).__name__}: {exc}") from None
        region = session.region_name or "us-east-1"

        def make_client(style: str) -> Any:
            cfg = botocore.config.Config(
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.read_timeout_s,
                retries={"total_max_attempts": config.max_attempts, "mode": "standard"},
                max_pool_connections=max(10, config.concurrency + 4),
                s3={"addressing_style": style},
                # Our own sha256 protects the payload; flexible checksums break ranged GETs
                # on some S3-compatible servers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)

        client = make_client(addressing_style or "auto")
        host = urlsplit(client.meta.endpoint_url).hostname or ""
        if addressing_style is None and not host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
            client.close()  # not AWS: S3-compatible servers expect path-style requests
            client = make_client("path")
        self._client = client
        self.endpoint = safe_endpoint(client.meta.endpoint_url)
        self.description = f"s3://{self.bucket}/{self.prefix}".rstrip("/") + f" at {self.endpoint}"
        self._conditional_writes = True  # cleared when the server rejects If-None-Match outright

    # -- errors ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        where = f"s3://{self.bucket}/{self.prefix}{key}"
        exc_mod = self._exc
        try:
            yield
        except exc_mod.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            if code == "NoSuchBucket":
                raise NotFoundError(
                    f"{op} {where}: bucket {self.bucket!r} does not exist at {self.endpoint}; create it "
                    f"(aws s3 mb s3://{self.bucket}) or fix --registry / --endpoint-url"
                ) from None
            if code in _DENIED:
                raise RegistryError(
                    f"{op} {where}: refused by {self.endpoint} ({code}, HTTP {status}); check the AWS "
                    f"credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy"
                ) from None
            raise TransferError(
                f"{op} {where} failed at {self.endpoint}: {code} (HTTP {status}); transient errors were "
                f"retried up to {self.config.max_attempts} attempts"
            ) from None
        except (exc_mod.NoCredentialsError, exc_mod.PartialCredentialsError) as exc:
            raise RegistryError(
                f"{op} {where}: no usable AWS credentials ({type(exc).__name__}); set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except (exc_mod.EndpointConnectionError, exc_mod.ConnectTimeoutError, exc_mod.ConnectionClosedError,
                exc_mod.ReadTimeoutError) as exc:
            raise UnreachableError(
                f"{op} {where}: cannot reach {self.endpoint} ({type(exc).__name__}) after "
                f"{self.config.max_attempts} attempts with a {self.config.connect_timeout_s:g}s connect and "
                f"{self.config.read_timeout_s:g}s read timeout; check that the server is up and the "
                f"endpoint (--endpoint-url or AWS_ENDPOINT_URL_S3)"
            ) from None
        except exc_mod.BotoCoreError as exc:
            raise TransferError(f"{op} {where} via {self.endpoint} failed: {type(exc).__name__}: {_scrub(str(exc))}") from None

    def _key(self, key: str) -> str:
        return self.prefix + key

    # -- Backend ---------------------------------------------------------------------------
    def _code(self, exc: Exception) -> tuple[str, int]:
        """The S3 error code and HTTP status of a botocore ClientError."""
        response = getattr(exc, "response", {}) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        return code, int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)

    def head(self, key: str) -> ObjectInfo | None:
        with self._errors("HEAD", key):
            try:
                resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except self._exc.ClientError as exc:
                if self._code(exc)[0] in _MISSING:
                    return None
                raise
        return ObjectInfo(key=key, size_bytes=int(resp["ContentLength"]), modified_s=resp["LastModified"].timestamp())

    def get_bytes(self, key: str) -> bytes | None:
        with self._errors("GET", key):
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self._exc.ClientError as exc:
                if self._code(exc)[0] in _MISSING:
                    return None
                raise
            with contextlib.closing(resp["Body"]) as body:
                if int(resp.get("ContentLength", 0)) > MAX_DOCUMENT_BYTES:
                    raise RegistryError(
                        f"s3://{self.bucket}/{self._key(key)} is larger than {MAX_DOCUMENT_BYTES} bytes: "
                        f"not a registry document"
                    )
                return body.read()

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        conditional = if_absent and self._conditional_writes
        for attempt in range(4):
            extra = {"IfNoneMatch": "*"} if conditional else {}
            with self._errors("PUT", key):
                try:
                    self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
                    return True
                except self._exc.ClientError as exc:
                    code, status = self._code(exc)
                    if not conditional:
                        raise
                    if code == "PreconditionFailed" or status == 412:
                        return False
                    if status == 409 and attempt < 3:  # a concurrent conditional write: try again
                        time.sleep(0.1 * (attempt + 1))
                        continue
                    if code == "NotImplemented" or status == 501:
                        log.info("%s does not implement If-None-Match: relying on claims and read-back", self.endpoint)
                        self._conditional_writes = False
                        conditional = False
                        continue
                    raise
        raise TransferError(f"PUT {key} at {self.endpoint}: conditional write kept conflicting (HTTP 409); try again")

    def upload(self, key: str, source: Source, size_bytes: int, progress: Callable[[int], None] | None = None) -> None:
        from boto3.s3.transfer import (
            ProgressCallbackInvoker,
            TransferConfig,
            create_transfer_manager,
        )

        cfg = TransferConfig(
            multipart_threshold=self.config.multipart_threshold_bytes,
            multipart_chunksize=self.config.part_size_bytes,
            max_concurrency=self.config.concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        # The source is not seekable (it hashes as it goes), so parts are read into memory:
        # bound how many wait there.
        cfg.max_in_memory_upload_chunks = self.config.concurrency + 2
        subscribers = [ProgressCallbackInvoker(progress)] if progress else None
        with self._errors("upload", key), create_transfer_manager(self._client, cfg) as manager:
            manager.upload(source, self.bucket, self._key(key), subscribers=subscribers).result()

    def upload_file(self, key: str, path: Path, *, size_bytes: int, sha256: str, label: str,
                    progress: Callable[[int], None] | None = None) -> int:
        """Below the multipart threshold one PUT; above it a multipart upload that resumes an
        interrupted one part by part (see s3_multipart.py)."""
        if size_bytes < self.config.multipart_threshold_bytes:
            return super().upload_file(key, path, size_bytes=size_bytes, sha256=sha256, label=label, progress=progress)
        return upload_resumable(self, key, Path(path), size_bytes=size_bytes, sha256=sha256, label=label,
                                progress=progress)

    def incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]:
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._errors("ListMultipartUploads", prefix):
            try:
                for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix),
                                               PaginationConfig={"PageSize": _LIST_PAGE_SIZE}):
                    for up in page.get("Uploads", []):
                        if not up["Key"].startswith(self.prefix):
                            continue
                        yield IncompleteUpload(key=up["Key"][len(self.prefix):], upload_id=up["UploadId"],
                                               initiated_s=up["Initiated"].timestamp())
            except self._exc.ClientError as exc:
                code, status = self._code(exc)
                if code == "NoSuchUpload":  # rclone, before any multipart upload in the bucket
                    return
                if code == "NotImplemented" or status == 501:
                    log.info("%s does not list multipart uploads: nothing to resume or abort", self.endpoint)
                    return
                raise

    def upload_parts(self, upload: IncompleteUpload) -> list[UploadedPart]:
        paginator = self._client.get_paginator("list_parts")
        parts: dict[int, UploadedPart] = {}
        with self._errors("ListParts", upload.key):
            try:
                for page in paginator.paginate(Bucket=self.bucket, Key=self._key(upload.key), UploadId=upload.upload_id,
                                               PaginationConfig={"PageSize": _LIST_PAGE_SIZE}):
                    for p in page.get("Parts", []):
                        n = int(p["PartNumber"])
                        parts[n] = UploadedPart(number=n, size_bytes=int(p["Size"]),
                                                etag=str(p.get("ETag", "")).strip().strip('"').lower(),
                                                modified_s=p["LastModified"].timestamp())
            except self._exc.ClientError as exc:
                if self._code(exc)[0] == "NoSuchUpload":
                    raise NotFoundError(f"upload {upload.upload_id} of {upload.key} no longer exists at "
                                        f"{self.endpoint}") from None
                raise
        return [parts[n] for n in sorted(parts)]

    def abort_upload(self, upload: IncompleteUpload) -> None:
        with self._errors("AbortMultipartUpload", upload.key):
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(upload.key),
                                                    UploadId=upload.upload_id)
            except self._exc.ClientError as exc:
                if self._code(exc)[0] != "NoSuchUpload":
                    raise

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        with self._errors("GET", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}")
        body = resp["Body"]
        try:
            skip = self._range_offset(resp.get("ContentRange"), key, start, end)
            remaining = end - start
            while skip or remaining:
                with self._errors("GET", key):
                    piece = body.read(min(skip or remaining, _PIECE_BYTES))
                if not piece:
                    raise TransferError(f"GET {key} at {self.endpoint}: the body ended {remaining} bytes early")
                if skip:
                    skip -= len(piece)
                    continue
                remaining -= len(piece)
                yield piece
        finally:
            body.close()

    def _range_offset(self, content_range: str | None, key: str, start: int, end: int) -> int:
        """Bytes to skip at the start of a GET body: 0 unless the server ignored the Range header."""
        if not content_range:
            if start:
                log.warning("%s ignored a Range request for %s: skipping %d bytes", self.endpoint, key, start)
            return start
        m = _CONTENT_RANGE.fullmatch(content_range.strip())
        if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
            raise TransferError(
                f"GET {key} at {self.endpoint}: asked for bytes {start}-{end - 1}, the server answered "
                f"Content-Range {content_range!r}"
            )
        return 0

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("LIST", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        key=obj["Key"][len(self.prefix):],
                        size_bytes=int(obj["Size"]),
                        modified_s=obj["LastModified"].timestamp(),
                    )

    def delete(self, key: str) -> None:
        with self._errors("DELETE", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def close(self) -> None:
        self._client.close()
