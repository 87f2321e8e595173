"""Calibration data: spec resolution, deterministic tokenization, the split and the fingerprint."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("datasets")
pytest.importorskip("transformers")

from tasks.calibration import _fill_spread, load_tokens, prepare_calibration, resolve_spec
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


def test_heldout_rows_are_spread_over_documents(tmp_path, source, corpus):
    """Ten held-out files of hundreds of tokens each: four rows of 16 tokens used to be the first 64
    tokens of one file; now they come from four files, the same ones for the same seed."""
    cal, held = resolve_spec(str(corpus[0])), resolve_spec(str(corpus[0].parent))
    kw = {"n_sequences": 2, "seq_len": 16, "n_heldout": 4, "heldout_spec": held}
    a = prepare_calibration(source, cal, seed=0, out_dir=tmp_path / "a", **kw)
    b = prepare_calibration(source, cal, seed=0, out_dir=tmp_path / "b", **kw)
    c = prepare_calibration(source, cal, seed=1, out_dir=tmp_path / "c", **kw)
    assert a.heldout_documents == b.heldout_documents == c.heldout_documents == 4
    rows = load_tokens(a, "heldout")
    assert rows.shape == (4, 16) and (load_tokens(b, "heldout") == rows).all()
    assert not (load_tokens(c, "heldout") == rows).all()
    # not consecutive pieces of one token stream: a passage of each of four files
    from transformers import AutoTokenizer

    from tasks.calibration import _encoder

    tok = AutoTokenizer.from_pretrained(str(source.path))
    encode, bos = _encoder(tok)
    assert bos == tok.bos_token_id is not None  # this tokenizer (like OPT's) puts bos before every text
    streams = [encode(f.read_text()) for f in corpus]
    assert min(len(s) for s in streams) > 4 * 16
    # every row starts with bos, cut from a document's start or not (its first token replaced)
    assert (rows[:, 0] == bos).all() and (load_tokens(a, "calibration")[:, 0] == bos).all()
    rows = rows[:, 1:]

    def holds(stream: list[int], row: list[int]) -> bool:
        return any(stream[i:i + len(row)] == row for i in range(len(stream) - len(row) + 1))

    holders = [[i for i, s in enumerate(streams) if holds(s, r.tolist())] for r in rows]
    # (a short run of this small vocabulary can occur in two files: some choice of holders differs)
    assert any(len(set(pick)) == 4 for pick in itertools.product(*holders)), holders


def _numbered_docs(lengths: list[int]) -> tuple[list[str], Callable[[str], list[int]]]:
    """Documents whose token ids say where they are: token j of document i is 1000 * i + j."""
    docs = [f"doc{i}" for i in range(len(lengths))]

    def encode(text: str) -> list[int]:
        i = int(text[3:])
        return [1000 * i + j for j in range(lengths[i])]

    return docs, encode


def test_fill_spread_takes_one_row_per_document_and_stops_reading():
    docs, encode = _numbered_docs([20] * 10)  # five rows of 4 tokens each
    read: list[str] = []

    def reading():
        for d in docs:
            read.append(d)
            yield d

    rows, used, n_read, n_tok = _fill_spread(reading(), encode, 4, 4, seed=0)
    assert rows.shape == (4, 4) and used == 4 and n_read == len(read) == 4 and n_tok == 80
    assert sorted(int(r[0]) // 1000 for r in rows) == [0, 1, 2, 3]  # one row from each document read
    assert all(int(r[0]) % 4 == 0 and list(r) == list(range(r[0], r[0] + 4)) for r in rows)  # whole rows
    again, *_ = _fill_spread(iter(docs), encode, 4, 4, seed=0)
    other, *_ = _fill_spread(iter(docs), encode, 4, 4, seed=1)
    assert (again == rows).all() and not (other == rows).all()
    assert sorted(int(r[0]) // 1000 for r in other) == [0, 1, 2, 3]  # the seed picks the passages


def test_fill_spread_falls_back_to_more_rows_per_document():
    docs, encode = _numbered_docs([20, 20])
    rows, used, n_read, _ = _fill_spread(iter(docs), encode, 6, 4, seed=0)
    assert rows.shape == (6, 4) and used == 2 and n_read == 2
    firsts = [int(r[0]) for r in rows]
    assert len(set(firsts)) == 6 and sorted(f // 1000 for f in firsts) == [0, 0, 0, 1, 1, 1]
    assert [f // 1000 for f in firsts[:2]] == [0, 1]  # round-robin: the first rows from different documents
    short, *_ = _fill_spread(iter(docs), encode, 11, 4, seed=0)
    assert short.shape == (10, 4)  # all there is; the caller reports too little text
    # a document's own rows leave its last partial row out; when that leaves too few rows, the rows
    # are cut from the stream of everything read, as for calibration
    docs, encode = _numbered_docs([6, 6])
    rows, used, n_read, _ = _fill_spread(iter(docs), encode, 3, 4, seed=0)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 1000, 1001], [1002, 1003, 1004, 1005]]
    assert used == 2 and n_read == 2


def test_fill_spread_short_documents_and_the_reading_bound():
    docs, encode = _numbered_docs([3] * 8)  # documents shorter than a row share rows
    rows, used, n_read, _ = _fill_spread(iter(docs), encode, 2, 4, seed=0)
    assert rows.shape == (2, 4) and n_read == 3 and used == 3
    assert sorted(rows.ravel().tolist()) == [0, 1, 2, 1000, 1001, 1002, 2000, 2001]
    # one long document then tiny ones: it stops after 4 x 2 documents, the rows being enough
    docs, encode = _numbered_docs([40] + [1] * 50)
    rows, used, n_read, _ = _fill_spread(iter(docs), encode, 2, 16, seed=0)
    assert rows.shape == (2, 16) and n_read == 8 and used == 1


def test_too_few_heldout_tokens_says_how_many(tmp_path, source, corpus):
    with pytest.raises(InputError, match=r"held-out data .* holds [\d,]+ tokens in 1 documents; 1000 sequences"):
        prepare_calibration(source, resolve_spec(str(corpus[0])), n_sequences=1, seq_len=16, n_heldout=1000,
                            seed=0, out_dir=tmp_path, heldout_spec=resolve_spec(str(corpus[1])))


def test_rows_keep_their_tokens_when_the_tokenizer_adds_no_bos(tmp_path, corpus):
    """Qwen 2 / GPT-2 style: no bos before a text, eos appended between documents, rows untouched."""
    from tasks.calibration import _encoder, _fill, _open_with_bos

    tok = build_tokenizer(corpus, tmp_path / "tok")
    tok.backend_tokenizer.post_processor = None  # encodings now start with the text itself
    encode, bos = _encoder(tok)
    assert bos is None
    ids = encode("import os")
    assert ids[0] != tok.bos_token_id and ids[-1] == tok.eos_token_id
    rows, *_ = _fill(iter([p.read_text() for p in corpus]), encode, 3, 8)
    assert (_open_with_bos(rows.copy(), bos) == rows).all()
    assert not (rows[:, 0] == tok.bos_token_id).all()
