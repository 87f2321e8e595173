"""The two manifests the registry reads: the artifact's `manifest.json` and its own version manifest.

    art = read_artifact_manifest(Path("out/opt-125m"))       # validated, files checked on disk
    vm = VersionManifest.from_artifact(art, name="opt-125m", version="1", created_at=now)
    VersionManifest.from_json(vm.to_json(), where="...") == vm

The artifact format belongs to flashio's format module; the registry relies only on
`format_version` and the `files` table (relative path -> bytes, sha256), plus optional `lineage`.
A version manifest (`models/<name>/versions/<version>/manifest.json`) is the registry's own JSON:
name, version, created_at, the artifact manifest's digest, the file table, lineage, and the
publishing flashio's version. Every file name is checked so that it cannot leave the directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from flashio.registry.errors import BadArtifactError, UnsafePathError
from flashio.registry.refs import check_token

ARTIFACT_MANIFEST = "manifest.json"
ARTIFACT_FORMAT_VERSION = 1
REGISTRY_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """One file: its relative posix path, size and sha256 (hex)."""

    path: str
    size_bytes: int
    sha256: str


def check_relative_path(path: object, *, where: str) -> str:
    """Return `path` if it is a safe relative posix path inside a directory, else raise UnsafePathError."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise UnsafePathError(f"{where}: file name {path!r} is not a plain relative posix path")
    parts = path.split("/")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path) or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(
            f"{where}: file name {path!r} would leave the artifact directory (absolute, empty "
            f"segment, '.' or '..'); expected a relative path such as 'report/summary.json'"
        )
    if path == ARTIFACT_MANIFEST:
        raise UnsafePathError(f"{where}: the file table lists {ARTIFACT_MANIFEST!r} itself; it must not")
    return path


def _parse_files(table: object, *, where: str) -> tuple[FileEntry, ...]:
    if not isinstance(table, Mapping) or not table:
        raise BadArtifactError(f"{where}: 'files' must be a non-empty object of path -> {{bytes, sha256}}")
    entries = []
    for path, info in table.items():
        check_relative_path(path, where=where)
        if not isinstance(info, Mapping):
            raise BadArtifactError(f"{where}: entry {path!r} must be an object with 'bytes' and 'sha256'")
        size, digest = info.get("bytes"), info.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadArtifactError(f"{where}: {path!r} has bytes={size!r}, expected a non-negative integer")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BadArtifactError(f"{where}: {path!r} has sha256={digest!r}, expected 64 lowercase hex digits")
        entries.append(FileEntry(path=path, size_bytes=size, sha256=digest))
    entries.sort(key=lambda e: e.path)
    names = {e.path for e in entries}
    for e in entries:  # 'report' and 'report/x.json' cannot both be files
        parent = PurePosixPath(e.path).parent
        while parent.name:
            if str(parent) in names:
                raise UnsafePathError(f"{where}: {str(parent)!r} is both a file and the directory of {e.path!r}")
            parent = parent.parent
    return tuple(entries)


def _load_json(raw: bytes, *, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadArtifactError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadArtifactError(f"{where}: expected a JSON object, found {type(doc).__name__}")
    return doc


@dataclass(frozen=True)
class ArtifactManifest:
    """An artifact directory's manifest.json, validated, with its own digest."""

    directory: Path
    raw: bytes = field(repr=False)
    sha256: str
    files: tuple[FileEntry, ...]
    lineage: Mapping[str, Any]

    @property
    def entry(self) -> FileEntry:
        return FileEntry(path=ARTIFACT_MANIFEST, size_bytes=len(self.raw), sha256=self.sha256)


def parse_artifact_manifest(raw: bytes, *, where: str) -> tuple[tuple[FileEntry, ...], Mapping[str, Any]]:
    """Validate an artifact manifest's bytes; return its file table and lineage."""
    doc = _load_json(raw, where=where)
    version = doc.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        raise BadArtifactError(
            f"{where}: format_version={version!r}, this flashio reads {ARTIFACT_FORMAT_VERSION}; "
            f"rebuild the artifact or upgrade flashio"
        )
    lineage = doc.get("lineage", {})
    if not isinstance(lineage, Mapping):
        raise BadArtifactError(f"{where}: 'lineage' must be an object, found {type(lineage).__name__}")
    return _parse_files(doc.get("files"), where=where), lineage


def read_artifact_manifest(directory: Path) -> ArtifactManifest:
    """Read and check `directory/manifest.json`: paths are safe and every listed file exists with its size."""
    directory = Path(directory)
    path = directory / ARTIFACT_MANIFEST
    if not path.is_file():
        raise BadArtifactError(f"{directory} is not an artifact: {ARTIFACT_MANIFEST} is missing; pass the artifact's directory")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BadArtifactError(f"{path} is larger than {_MAX_MANIFEST_BYTES} bytes: not an artifact manifest")
    raw = path.read_bytes()
    files, lineage = parse_artifact_manifest(raw, where=str(path))
    root = directory.resolve()
    for e in files:
        file = directory / e.path
        if not file.resolve().is_relative_to(root):
            raise UnsafePathError(f"{path}: {e.path!r} is a link that leaves the artifact directory")
        if not file.is_file():
            raise BadArtifactError(f"{path} lists {e.path!r}, but {file} is not a file; rebuild the artifact")
        if (size := file.stat().st_size) != e.size_bytes:
            raise BadArtifactError(
                f"{file} has {size} bytes, but {ARTIFACT_MANIFEST} records {e.size_bytes}; rebuild the artifact"
            )
    return ArtifactManifest(directory=directory, raw=raw, sha256=hashlib.sha256(raw).hexdigest(),
                            files=files, lineage=lineage)


@dataclass(frozen=True)
class VersionManifest:
    """The registry's record of one published version (immutable once written)."""

    name: str
    version: str
    created_at: str  # ISO 8601, UTC
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
        doc = _load_json(raw, where=where)
        if doc.get("registry_format") != REGISTRY_FORMAT:
            raise BadArtifactError(
                f"{where}: registry_format={doc.get('registry_format')!r}, this flashio reads "
                f"{REGISTRY_FORMAT}; upgrade flashio"
            )
        art = _parse_files({"artifact": doc.get("artifact_manifest")}, where=where)[0]
        lineage = doc.get("lineage", {})
        if not isinstance(lineage, Mapping):
            raise BadArtifactError(f"{where}: 'lineage' must be an object")
        return cls(
            name=check_token(str(doc.get("name")), "model name"),
            version=check_token(str(doc.get("version")), "version"),
            created_at=str(doc.get("created_at", "")),
            artifact_manifest=FileEntry(ARTIFACT_MANIFEST, art.size_bytes, art.sha256),
            files=_parse_files(doc.get("files"), where=where),
            lineage=lineage,
            flashio_version=str(doc.get("flashio_version", "")),
        )
