"""Incremental detokenization: concatenated pieces equal one decode of all ids, multi-byte UTF-8
included, with DecodeStream and with the prefix-diff fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers

from flashio.detokenize import Detokenizer

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "tasks" / "demo" / "opt-stdlib" / "tokenizer.json"

TEXTS = [
    "Hello, world! café naïve Ångström — “quotes” and emoji 😀🚀👩‍👩‍👧 done.",
    "日本語のテキストと中文字符, mixed with ASCII and ü ö ä ß.",
    "def main():\n    print('héllo')\n\n\ttabs\tand  double  spaces",
    "🙂",
]


def _sentencepiece_style() -> Tokenizer:
    """A Llama-2-style BPE (Metaspace-like spaces, byte fallback) trained inline on ASCII only, so
    that every accent and emoji goes through <0xNN> byte tokens that only decode in groups."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=80)
    corpus = ["the quick brown fox jumps over the lazy dog " * 3, "hello world def main print tabs and spaces",
              "mixed with ASCII done quotes emoji text"]
    trained.train_from_iterator(corpus, trainer)
    vocab = trained.get_vocab()
    for b in range(256):  # byte tokens as ordinary (not special) tokens, as in Llama 2's vocabulary
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = trained.normalizer
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _tokenizers():
    yield "demo byte-level BPE", Tokenizer.from_file(str(DEMO_TOKENIZER))
    yield "sentencepiece byte fallback", _sentencepiece_style()


@pytest.mark.parametrize("use_decode_stream", [True, False])
@pytest.mark.parametrize("name,tok", list(_tokenizers()))
def test_pieces_concatenate_to_the_full_decode(name, tok, use_decode_stream):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        detok = Detokenizer(tok, use_decode_stream=use_decode_stream)
        assert detok.uses_decode_stream == use_decode_stream
        pieces = [detok.step(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), (name, text)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == text.strip(" ")  # nothing lost to unknown or skipped tokens
        # some token only starts a character: the test sees the multi-byte path
        if any(ord(c) > 127 for c in text):
            assert "" in pieces


@pytest.mark.parametrize("use_decode_stream", [True, False])
@pytest.mark.parametrize("name,tok", list(_tokenizers()))
def test_after_a_prompt_the_pieces_are_the_continuation(name, tok, use_decode_stream):
    prompt = tok.encode("the quick brown", add_special_tokens=False).ids
    out = tok.encode(" fox jumps 😀 over", add_special_tokens=False).ids
    detok = Detokenizer(tok, prompt_ids=prompt, use_decode_stream=use_decode_stream)
    text = "".join(detok.step(i) for i in out)
    full = tok.decode(prompt + out)
    assert full.endswith(text) and full[: len(full) - len(text)] == tok.decode(prompt)


def test_special_tokens_are_skipped():
    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    ids = [2, *tok.encode("a b", add_special_tokens=False).ids, 2]
    for flag in (True, False):
        detok = Detokenizer(tok, use_decode_stream=flag)
        assert "".join(detok.step(i) for i in ids) == tok.decode(ids, skip_special_tokens=True) == "a b"
