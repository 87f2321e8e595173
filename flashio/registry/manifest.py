"""What the registry reads of an artifact, and the registry's own version manifest.

    art = read_artifact_manifest(Path("out/opt-125m"))       # validated, files checked on disk
    vm = VersionManifest.from_artifact(art, name="opt-125m", version="1", created_at=utc_now())
    VersionManifest.from_json(vm.to_json(), where="...") == vm

An artifact's `manifest.json` is read by flashio.format (parse_manifest_files: format_version,
the file table and lineage; one rule for file names); the registry adds nothing to that reading
and reports its errors as its own (an unsafe name: UnsafePathError, anything else:
BadArtifactError; both are also flashio.errors.FormatError).

A version manifest (`models/<name>/versions/<version>/manifest.json`) is the registry's own JSON:
name, version, created_at, the artifact manifest's size and digest, the artifact's file table
(the same table, parsed by the same code), lineage, and the publishing flashio's version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flashio.errors import FormatError
from flashio.format.manifest import (
    MANIFEST,
    FileEntry,
    UnsafeNameError,
    check_files_on_disk,
    parse_file_entry,
    parse_file_table,
    parse_manifest_files,
    read_manifest_bytes,
)
from flashio.registry.errors import BadArtifactError, UnsafePathError
from flashio.registry.refs import check_token

REGISTRY_FORMAT = 1
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # created_at, updated_at, resolved_at: UTC, microseconds


def utc_now() -> str:
    """The current time as the registry's documents record it."""
    return datetime.now(UTC).strftime(TIME_FORMAT)


@contextlib.contextmanager
def registry_errors() -> Iterator[None]:
    """Re-raise flashio.format's errors as the registry's, with the same message."""
    try:
        yield
    except BadArtifactError:
        raise
    except UnsafeNameError as exc:
        raise UnsafePathError(str(exc)) from None
    except FormatError as exc:
        raise BadArtifactError(str(exc)) from None


@dataclass(frozen=True)
class ArtifactManifest:
    """An artifact directory's manifest.json, validated, with its own digest."""

    directory: Path
    raw: bytes = field(repr=False)
    sha256: str
    files: tuple[FileEntry, ...]  # sorted by path; manifest.json itself is `entry`
    lineage: Mapping[str, Any]

    @property
    def entry(self) -> FileEntry:
        return FileEntry(path=MANIFEST, size_bytes=len(self.raw), sha256=self.sha256)


def parse_artifact_manifest(raw: bytes, *, where: str) -> tuple[tuple[FileEntry, ...], Mapping[str, Any]]:
    """An artifact manifest's file table (sorted by path) and lineage, validated by flashio.format."""
    with registry_errors():
        table = parse_manifest_files(raw, where=where)
    return tuple(table.files.values()), table.lineage


def read_artifact_manifest(directory: Path) -> ArtifactManifest:
    """Read and check `directory/manifest.json`: names are safe, every listed file exists with its size."""
    directory = Path(directory)
    with registry_errors():
        raw = read_manifest_bytes(directory)
        table = parse_manifest_files(raw, where=str(directory / MANIFEST))
        check_files_on_disk(directory, table.files)
    return ArtifactManifest(directory=directory, raw=raw, sha256=hashlib.sha256(raw).hexdigest(),
                            files=tuple(table.files.values()), lineage=table.lineage)


@dataclass(frozen=True)
class VersionManifest:
    """The registry's record of one published version (immutable once written)."""

    name: str
    version: str
    created_at: str  # ISO 8601, UTC (TIME_FORMAT)
    artifact_manifest: FileEntry  # the artifact's manifest.json as a blob
    files: tuple[FileEntry, ...]
    lineage: Mapping[str, Any]
    flashio_version: str

    @property
    def total_bytes(self) -> int:
        return self.artifact_manifest.size_bytes + sum(e.size_bytes for e in self.files)

    @property
    def all_files(self) -> tuple[FileEntry, ...]:
        """Every file of the artifact, manifest.json included."""
        return (self.artifact_manifest, *self.files)

    @classmethod
    def from_artifact(cls, art: ArtifactManifest, *, name: str, version: str, created_at: str,
                      flashio_version: str, extra_lineage: Mapping[str, Any] | None = None) -> VersionManifest:
        lineage = {**art.lineage, **(extra_lineage or {})}
        return cls(name=name, version=version, created_at=created_at, artifact_manifest=art.entry,
                   files=art.files, lineage=lineage, flashio_version=flashio_version)

    def to_json(self) -> bytes:
        doc = {
            "registry_format": REGISTRY_FORMAT,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "artifact_manifest": {"bytes": self.artifact_manifest.size_bytes, "sha256": self.artifact_manifest.sha256},
            "files": {e.path: {"bytes": e.size_bytes, "sha256": e.sha256} for e in self.files},
            "total_bytes": self.total_bytes,
            "lineage": dict(self.lineage),
            "flashio_version": self.flashio_version,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> VersionManifest:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadArtifactError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise BadArtifactError(f"{where}: expected a JSON object, found {type(doc).__name__}")
        if doc.get("registry_format") != REGISTRY_FORMAT:
            raise BadArtifactError(
                f"{where}: registry_format={doc.get('registry_format')!r}, this flashio reads "
                f"{REGISTRY_FORMAT}; upgrade flashio"
            )
        lineage = doc.get("lineage", {})
        if not isinstance(lineage, Mapping):
            raise BadArtifactError(f"{where}: 'lineage' must be an object")
        with registry_errors():
            artifact_manifest = parse_file_entry(MANIFEST, doc.get("artifact_manifest"), where=where)
            files = tuple(parse_file_table(doc.get("files"), where=where).values())
        return cls(
            name=check_token(str(doc.get("name")), "model name"),
            version=check_token(str(doc.get("version")), "version"),
            created_at=str(doc.get("created_at", "")),
            artifact_manifest=artifact_manifest,
            files=files,
            lineage=lineage,
            flashio_version=str(doc.get("flashio_version", "")),
        )
