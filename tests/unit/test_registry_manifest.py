"""Artifact and version manifests, and the streaming sha256 check used by uploads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from flashio.errors import ChecksumError, FormatError
from flashio.registry import IntegrityError, UnsafePathError
from flashio.registry.errors import BadArtifactError
from flashio.registry.hashing import VerifyingReader, sha256_file
from flashio.registry.manifest import VersionManifest, check_relative_path, read_artifact_manifest


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


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a\\b", "C:/x", "", "manifest.json"])
def test_unsafe_names_are_refused(name: str):
    with pytest.raises(UnsafePathError):
        check_relative_path(name, where="test")


def test_bad_artifacts_say_what_is_wrong(tmp_path: Path):
    art = make_artifact(tmp_path / "a", {"ffn.safetensors": b"12345"})
    rewrite(art, format_version=2)
    with pytest.raises(BadArtifactError, match="format_version=2, this flashio reads 1"):
        read_artifact_manifest(art)
    rewrite(art, format_version=1, files={"ffn.safetensors": {"bytes": 6, "sha256": "0" * 64}})
    with pytest.raises(BadArtifactError, match=r"has 5 bytes, but manifest\.json records 6"):
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
    with pytest.raises(UnsafePathError, match="link that leaves"):
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
