"""Artifact and version manifests as the registry reads them, and the streaming sha256 check used by uploads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from flashio.errors import ChecksumError, FormatError
from flashio.format import Artifact, check_relative_name, parse_manifest_files
from flashio.hashing import sha256_file
from flashio.registry import IntegrityError, UnsafePathError
from flashio.registry.errors import BadArtifactError
from flashio.registry.hashing import VerifyingReader
from flashio.registry.manifest import VersionManifest, read_artifact_manifest


def make_artifact(root: Path, files: dict[str, bytes], **extra: object) -> Path:
    """An artifact directory with these files and a manifest.json listing them."""
    table = {}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        table[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    doc = {"format_version": 1, "files": table, **extra}
    (root / "manifest.json").write_text(json.dumps(doc))
    return root


def rewrite(root: Path, **changes: object) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    doc.update(changes)
    (root / "manifest.json").write_text(json.dumps(doc))


def test_reads_a_valid_artifact(tmp_path: Path):
    art = make_artifact(tmp_path, {"ffn.safetensors": b"x" * 10, "report/a.json": b"{}"},
                        lineage={"source_model": "facebook/opt-125m"})
    m = read_artifact_manifest(art)
    assert [e.path for e in m.files] == ["ffn.safetensors", "report/a.json"]
    assert m.sha256 == hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    assert m.lineage == {"source_model": "facebook/opt-125m"}
    vm = VersionManifest.from_artifact(m, name="opt", version="1", created_at="2024-01-01T00:00:00Z",
                                       flashio_version="0.1.0", extra_lineage={"pipeline_config": {"k": 1}})
    assert VersionManifest.from_json(vm.to_json(), where="test") == vm
    assert vm.total_bytes == 12 + len(m.raw)
    assert vm.lineage == {"source_model": "facebook/opt-125m", "pipeline_config": {"k": 1}}


REFUSED = r"would leave the artifact directory|must be a non-empty file name"
UNSAFE_NAMES = ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a/", "a\\b", "C:/x", "a:b", "", "a\x00b"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_names_are_refused_by_the_registry_and_the_format_alike(tmp_path: Path, name: str):
    """One rule (flashio.format's): the registry refuses to publish exactly what Artifact refuses to open."""
    with pytest.raises(FormatError, match=REFUSED):
        check_relative_name(name, "file name")
    art = make_artifact(tmp_path, {"ffn.safetensors": b"12345"})
    doc = json.loads((art / "manifest.json").read_text())
    doc["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    (art / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UnsafePathError, match=REFUSED):
        read_artifact_manifest(art)
    with pytest.raises(FormatError, match=REFUSED):
        Artifact(art)


@pytest.mark.parametrize("name", ["ffn.safetensors", "report/summary.json", "tokenizer_config.json", "a.b/c-d_e"])
def test_plain_relative_names_are_accepted(name: str):
    assert check_relative_name(name, "file name") == name


def test_a_file_table_listing_the_manifest_itself_is_refused(tmp_path: Path):
    art = make_artifact(tmp_path, {"ffn.safetensors": b"12345"})
    rewrite(art, files={"manifest.json": {"bytes": 1, "sha256": "0" * 64}})
    with pytest.raises(UnsafePathError, match=r"lists 'manifest\.json' itself"):
        read_artifact_manifest(art)


def test_the_registry_reads_the_file_table_the_format_parses(tmp_path: Path):
    art = make_artifact(tmp_path, {"b.bin": b"2", "a/x.json": b"1"}, lineage={"k": 1})
    raw = (art / "manifest.json").read_bytes()
    table = parse_manifest_files(raw)
    assert read_artifact_manifest(art).files == tuple(table.files.values())
    assert [e.path for e in table.files.values()] == ["a/x.json", "b.bin"] and table.lineage == {"k": 1}


def test_bad_artifacts_say_what_is_wrong(tmp_path: Path):
    art = make_artifact(tmp_path / "a", {"ffn.safetensors": b"12345"})
    rewrite(art, format_version=4)
    with pytest.raises(BadArtifactError, match=r"format_version 4 is not supported \(this flashio reads versions 1, 2, 3\)"):
        read_artifact_manifest(art)
    rewrite(art, format_version=1, files={"ffn.safetensors": {"bytes": 6, "sha256": "0" * 64}})
    with pytest.raises(BadArtifactError, match=r"has 5 bytes on disk, but manifest\.json records 6"):
        read_artifact_manifest(art)
    rewrite(art, files={"missing.bin": {"bytes": 1, "sha256": "0" * 64}})
    with pytest.raises(BadArtifactError, match=r"'missing\.bin', but .* is not a file"):
        read_artifact_manifest(art)
    rewrite(art, files={"ffn.safetensors": {"bytes": 5, "sha256": "XYZ"}})
    with pytest.raises(BadArtifactError, match="64 lowercase hex"):
        read_artifact_manifest(art)
    rewrite(art, files={"r": {"bytes": 5, "sha256": "0" * 64}, "r/x": {"bytes": 5, "sha256": "0" * 64}})
    with pytest.raises(UnsafePathError, match="both a file and the directory"):
        read_artifact_manifest(art)
    (art / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="expected a JSON object"):
        read_artifact_manifest(art)
    with pytest.raises(BadArtifactError, match=r"manifest\.json is missing"):
        read_artifact_manifest(tmp_path / "nothing")


def test_symlink_leaving_the_artifact_is_refused(tmp_path: Path):
    (tmp_path / "secret").write_bytes(b"12345")
    art = make_artifact(tmp_path / "a", {"ffn.safetensors": b"12345"})
    (art / "ffn.safetensors").unlink()
    os.symlink(tmp_path / "secret", art / "ffn.safetensors")
    with pytest.raises(UnsafePathError, match="link that resolves outside the artifact directory"):
        read_artifact_manifest(art)


def _reader(path: Path, data: bytes) -> VerifyingReader:
    return VerifyingReader(path, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), label="f")


@pytest.mark.parametrize("read_size", [1, 7, 1000, 1 << 20])
def test_verifying_reader_passes_the_right_bytes(tmp_path: Path, read_size: int):
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    with _reader(tmp_path / "f", data) as r:
        out = b"".join(iter(lambda: r.read(read_size), b""))
    assert out == data and sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("actual, message", [
    (b"A" * 4999 + b"B", "has sha256"),
    (b"A" * 4999, "has 4999 bytes"),
    (b"A" * 5001, "is larger than"),
])
def test_verifying_reader_fails_before_the_last_byte_is_handed_out(tmp_path: Path, actual: bytes, message: str):
    expected = b"A" * 5000
    (tmp_path / "f").write_bytes(actual)
    handed_out = 0
    with _reader(tmp_path / "f", expected) as r, pytest.raises(IntegrityError, match=message) as info:
        while piece := r.read(1000):
            handed_out += len(piece)
    assert handed_out < 5000
    assert isinstance(info.value, ChecksumError)  # also a flashio.errors.ChecksumError
    assert "rebuild the artifact" in str(info.value)


def test_verifying_reader_empty_file(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"")
    with _reader(tmp_path / "f", b"") as r:
        assert r.read(100) == b""
