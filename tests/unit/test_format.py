"""The artifact format: layout, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

import flashio
from flashio.cli import main
from flashio.errors import ChecksumError, FlashError, FormatError, UnsupportedArchitectureError
from flashio.format import Artifact, UnsafeNameError, parse_manifest, write_artifact
from tests.conftest import make_opt


@pytest.fixture
def art(opt_artifact, tmp_path):
    """A private copy of the tiny OPT artifact, free to damage."""
    return shutil.copytree(opt_artifact, tmp_path / "art")


def _edit_manifest(path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_layout_is_aligned_and_readable_by_safetensors(opt_artifact, tiny_opt):
    a = Artifact(opt_artifact, verify=True)
    m = a.manifest
    assert [p for p, _, _ in m.bundle_layout] == ["up", "down"]
    for L in m.ffn_layers:
        assert L.offset_bytes % 4096 == 0 and L.bundle_width == 128
    with safe_open(str(opt_artifact / "ffn.safetensors"), "pt") as f:  # any safetensors reader
        bundles = f.get_tensor("layers.1.bundles")
    hf = tiny_opt[0].model.decoder.layers[1]
    # row i = up column i (fc1.weight row i) followed by down row i (fc2.weight column i)
    assert (bundles[7, :64] == hf.fc1.weight[7]).all()
    assert (bundles[7, 64:] == hf.fc2.weight[:, 7]).all()
    assert set(m.files) >= {"ffn.safetensors", "resident.safetensors", "tokenizer.json"}


def test_truncated_ffn_file(art):
    with open(art / "ffn.safetensors", "r+b") as f:
        f.truncate(10000)
    with pytest.raises(FormatError, match=r"ffn.safetensors has 10000 bytes on disk, but manifest.json records"):
        Artifact(art)


def test_truncated_ffn_file_with_matching_manifest_size(art):
    """Even when the manifest is edited to match, the header's offsets leave the file."""
    with open(art / "ffn.safetensors", "r+b") as f:
        f.truncate(10000)
    _edit_manifest(art, lambda m: m["files"]["ffn.safetensors"].update(bytes=10000))
    with pytest.raises(FormatError, match="outside the data buffer"):
        Artifact(art)


def test_flipped_byte_detected_by_verify(art, capsys):
    with open(art / "ffn.safetensors", "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0xFF]))
    Artifact(art)  # cheap checks pass: same size, valid header
    with pytest.raises(ChecksumError, match=r"ffn.safetensors: sha256 is [0-9a-f]{64}, the manifest says"):
        Artifact(art, verify=True)
    assert main(["inspect", str(art), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "Traceback" not in err[0]


def test_unknown_format_version(art, capsys):
    _edit_manifest(art, lambda m: m.update(format_version=99))
    with pytest.raises(FormatError, match="format_version 99 is not supported"):
        Artifact(art)
    assert main(["inspect", str(art)]) == 2
    assert "format_version 99" in capsys.readouterr().err


# the one rule for file names (flashio.format.check_relative_name), also what the registry applies
UNSAFE_NAMES = ["../x", "/etc/passwd", "a/../../x", "..\\x", "a//b", "./a", "a/", "C:/x", "a:b", "a\x00b"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_manifest_naming_a_file_outside(art, name):
    def edit(m):
        m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    _edit_manifest(art, edit)
    with pytest.raises(UnsafeNameError, match="would leave the artifact directory"):
        Artifact(art)


@pytest.mark.parametrize("field", ["ffn_file", "resident_file", "tokenizer"])
def test_every_file_name_field_follows_the_one_rule(art, field):
    def edit(m):
        if field == "tokenizer":
            m["tokenizer"]["file"] = "C:/tokenizer.json"
        else:
            m[field] = "C:/" + m[field]
    _edit_manifest(art, edit)
    with pytest.raises(UnsafeNameError, match=r"'C:/.*' would leave the artifact directory"):
        Artifact(art)


def test_manifest_listing_a_file_and_its_directory_or_itself(art):
    for table in ({"report": {"bytes": 1, "sha256": "0" * 64}, "report/x.json": {"bytes": 1, "sha256": "0" * 64}},
                  {"manifest.json": {"bytes": 1, "sha256": "0" * 64}}):
        _edit_manifest(art, lambda m, table=table: m["files"].update(table))
        with pytest.raises(UnsafeNameError, match=r"both a file and the directory|lists 'manifest\.json' itself"):
            Artifact(art)
        _edit_manifest(art, lambda m, table=table: [m["files"].pop(k) for k in table])


def test_writer_refuses_names_the_reader_would_refuse(tiny_opt, tmp_path):
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG fake")
    for name in ("report/a:b.png", "../plot.png"):
        with pytest.raises(UnsafeNameError, match="would leave the artifact directory"):
            write_artifact(tiny_opt[1], tmp_path / "out", report_files={name: png})
    assert list(tmp_path.iterdir()) == [png]  # refused before anything was written
    art = write_artifact(tiny_opt[1], tmp_path / "out", report_files={"report/plot.png": png})
    assert Artifact(art, verify=True).manifest.files["report/plot.png"].size_bytes == png.stat().st_size


def test_symlink_leaving_the_artifact(art, tmp_path):
    (tmp_path / "outside").write_bytes(b"x")
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(tmp_path / "outside")
    with pytest.raises(FormatError, match="resolves outside the artifact"):
        Artifact(art)


def test_unsupported_architecture(art, tmp_path, capsys):
    _edit_manifest(art, lambda m: m.update(architecture="gpt2"))
    from flashio.models import architectures  # every registered family is named in the message

    with pytest.raises(UnsupportedArchitectureError, match="supported: " + ", ".join(sorted(architectures()))):
        Artifact(art)
    ckpt = tmp_path / "ckpt"
    make_opt(ckpt, with_tokenizer=False)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["pack", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'gpt2' is not supported" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_offsets_disagreeing_with_header(art):
    _edit_manifest(art, lambda m: m["ffn_layers"][1].update(offset_bytes=4096))
    with pytest.raises(FormatError, match="the manifest says"):
        Artifact(art)


@pytest.mark.parametrize("bad", [
    b"", b"[]", b"{", b'{"format_version": 1}', b"[" * 100000,
    json.dumps({"format_version": 1, "dtype": "float32", "bundle_layout": [["up", 0, 8]], "files": {},
                "ffn_layers": [{"tensor": "t", "n_neurons": -1}]}).encode(),
])
def test_malformed_manifests_raise_format_error(bad):
    with pytest.raises(FormatError):
        parse_manifest(bad)


def test_missing_checkpoint_and_pickled_weights(tmp_path):
    with pytest.raises(FormatError, match="is not a directory"):
        write_artifact(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text('{"model_type": "opt"}')
    (tmp_path / "pkl" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FormatError, match="pickled weights are not loaded"):
        write_artifact(tmp_path / "pkl", tmp_path / "out")


def test_existing_output_is_not_clobbered(opt_artifact, tiny_opt):
    before = (opt_artifact / "manifest.json").read_bytes()
    with pytest.raises(FlashError, match="already exists"):
        write_artifact(tiny_opt[1], opt_artifact)
    assert (opt_artifact / "manifest.json").read_bytes() == before


def test_failed_write_leaves_nothing(tiny_opt, tmp_path):
    with pytest.raises(FlashError, match="not a permutation"):
        write_artifact(tiny_opt[1], tmp_path / "out", orders=[[0] * 256, list(range(256))])
    assert list(tmp_path.iterdir()) == []  # no half-written artifact, no temporary left


def test_float16_pack_runs(tiny_opt, tmp_path):
    art = write_artifact(tiny_opt[1], tmp_path / "f16", dtype="float16")
    a = Artifact(art)
    assert a.manifest.dtype == "float16" and a.manifest.ffn_layers[0].length_bytes == 256 * 128 * 2
    with flashio.open(art, mode="oracle") as model:
        assert model.forward([2, 5, 9]).isfinite().all()


def test_resident_checksum_checked_on_open(art):
    """Resident and predictor files are verified when loaded, without --verify."""
    with open(art / "resident.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(ChecksumError, match=r"resident\.safetensors: sha256"):
        flashio.open(art, mode="dense")


def test_finalize_links_weights_and_adds_report(opt_artifact, tmp_path):
    from flashio.format import finalize_artifact

    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG fake")
    out = finalize_artifact(opt_artifact, tmp_path / "final", lineage={"calibration": {"fingerprint": "abc"}},
                            report={"summary": {"perplexity": 1.5}}, report_files={"report/plot.png": png})
    a = Artifact(out, verify=True)
    assert a.manifest.report == {"summary": {"perplexity": 1.5}}
    assert a.manifest.lineage["calibration"] == {"fingerprint": "abc"}
    assert "source" in a.manifest.lineage  # merged, not replaced
    assert (out / "ffn.safetensors").stat().st_ino == (opt_artifact / "ffn.safetensors").stat().st_ino
    assert "report/plot.png" in a.manifest.files
    with pytest.raises(FlashError, match="would replace"):
        finalize_artifact(opt_artifact, tmp_path / "bad", report_files={"ffn.safetensors": png})
    assert not (tmp_path / "bad").exists()
