"""Calibration data: spec resolution, deterministic tokenization, the split and the fingerprint."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("datasets")
pytest.importorskip("transformers")

from tasks.calibration import load_tokens, prepare_calibration, resolve_spec
from tasks.errors import InputError
from tasks.source import SourceModel
from tasks.testing import build_tokenizer, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text"), n_files=10, lines_per_file=40)


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus):
    """A SourceModel with a tokenizer and a config, no weights: all that calibration reads."""
    d = tmp_path_factory.mktemp("tok")
    tok = build_tokenizer(corpus, d)
    (d / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": len(tok)}))
    return SourceModel(ref=str(d), path=d, revision=None, model_type="opt", n_layers=1, dim=8, ffn_dim=32,
                       gated=False, max_positions=128, config_dtype="float32", files=(), fingerprint="x")


def test_spec_kinds(tmp_path, corpus):
    one = resolve_spec(str(corpus[0]))
    assert one.kind == "files" and one.builder == "text" and one.files == (corpus[0].resolve(),)
    directory = resolve_spec(str(corpus[0].parent))
    assert len(directory.files) == len(corpus)
    glob = resolve_spec(str(corpus[0].parent / "doc00*.txt"))
    assert len(glob.files) == len(corpus)
    assert resolve_spec("stdlib:heldout").builder == "text"
    hub = resolve_spec("allenai/c4:en:validation")
    assert (hub.kind, hub.hub_name, hub.hub_config, hub.hub_split) == ("hub", "allenai/c4", "en", "validation")
    assert resolve_spec("imdb:test").hub_split == "test"
    assert resolve_spec("wikitext:wikitext-2-raw-v1").hub_config == "wikitext-2-raw-v1"


def test_spec_digest_follows_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    d1 = resolve_spec(str(f)).digest
    f.write_text("hello!")
    assert resolve_spec(str(f)).digest != d1


@pytest.mark.parametrize("spec", ["{dir}/*.txt", "{dir}/missing.jsonl", "{dir}"])
def test_spec_matching_nothing_is_an_input_error(tmp_path, spec):
    with pytest.raises(InputError, match="matches no files"):
        resolve_spec(spec.format(dir=tmp_path))


def test_spec_mixing_kinds_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(InputError, match="mixes kinds"):
        resolve_spec(str(tmp_path))


def test_calibration_is_deterministic_and_split(tmp_path, source, corpus):
    spec = resolve_spec(str(corpus[0].parent))
    kw = {"n_sequences": 6, "seq_len": 32, "n_heldout": 2}
    a = prepare_calibration(source, spec, seed=0, out_dir=tmp_path / "a", **kw)
    b = prepare_calibration(source, spec, seed=0, out_dir=tmp_path / "b", **kw)
    c = prepare_calibration(source, spec, seed=1, out_dir=tmp_path / "c", **kw)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    cal, held = load_tokens(a, "calibration"), load_tokens(a, "heldout")
    assert cal.shape == (6, 32) and held.shape == (2, 32)
    assert (load_tokens(b, "calibration") == cal).all()
    # the held-out part starts at a document the calibration part did not use
    assert a.heldout_documents >= 1
    assert not any((row == cal).all(dim=1).any() for row in held)


def test_heldout_from_its_own_spec(tmp_path, source, corpus):
    cal = resolve_spec(str(corpus[0]))
    held = resolve_spec(str(corpus[1]))
    data = prepare_calibration(source, cal, n_sequences=2, seq_len=16, n_heldout=2, seed=0, out_dir=tmp_path,
                               heldout_spec=held)
    assert data.heldout_spec == str(corpus[1])
    assert data.documents == 1 and data.heldout_documents == 1


def test_jsonl_with_a_text_field(tmp_path, source):
    rows = [{"id": i, "body": " ".join(["def value return"] * 30)} for i in range(4)]
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = resolve_spec(str(f))
    assert spec.builder == "json"
    data = prepare_calibration(source, spec, n_sequences=2, seq_len=16, n_heldout=1, seed=0, out_dir=tmp_path / "o")
    assert load_tokens(data, "calibration").shape == (2, 16)
    with pytest.raises(InputError, match="no field 'missing'"):
        prepare_calibration(source, spec, n_sequences=2, seq_len=16, n_heldout=1, seed=0, out_dir=tmp_path / "p",
                            text_field="missing")


def test_too_few_tokens_says_how_many(tmp_path, source, corpus):
    spec = resolve_spec(str(corpus[0]))
    with pytest.raises(InputError, match=r"holds [\d,]+ tokens in 1 documents; 1000 sequences of 64 tokens need 64,000"):
        prepare_calibration(source, spec, n_sequences=1000, seq_len=64, n_heldout=0, seed=0, out_dir=tmp_path)


def test_sequence_longer_than_the_model_is_refused(tmp_path, source, corpus):
    with pytest.raises(InputError, match="exceeds the model's 128 positions"):
        prepare_calibration(source, resolve_spec(str(corpus[0])), n_sequences=1, seq_len=512, n_heldout=0, seed=0,
                            out_dir=tmp_path)
