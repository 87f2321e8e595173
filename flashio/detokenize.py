"""Incremental detokenization: the text each new token adds, without re-decoding the whole output.

    detok = Detokenizer(tokenizer)          # a tokenizers.Tokenizer
    for tok in ids:
        print(detok.step(tok), end="")     # "" while a multi-byte character is still incomplete

Uses tokenizers' DecodeStream (tokenizers >= 0.21), which keeps a small window of ids and emits a
chunk once it decodes to valid UTF-8; concatenated chunks equal `tokenizer.decode(all ids)`. Where
DecodeStream is missing, a prefix-diff over the same kind of window does the job (the technique of
transformers' TextStreamer and vLLM's detokenizer: decode the last few ids, emit what grew, hold
back while the text ends in an incomplete character).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - exercised by forcing the fallback in tests
    DecodeStream = None

REPLACEMENT_CHAR = "\ufffd"  # what decode() shows for an incomplete UTF-8 sequence


class Detokenizer:
    """Text pieces for ids fed one at a time. prompt_ids (optional) are the context the output
    continues, so that the first output token decodes as it would after them (a leading space
    kept by SentencePiece-style decoders); they are never emitted."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True,
                 prompt_ids: Sequence[int] = (), use_decode_stream: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids)[-_CONTEXT_IDS:]
        self._stream = None
        if use_decode_stream and DecodeStream is not None:
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            if context:  # prime the stream with the context; what it emits belongs to the prompt
                self._stream.step(tokenizer, context)
        # prefix-diff state: ids[prefix:] is decoded; the text of ids[prefix:read] was emitted
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)

    @property
    def uses_decode_stream(self) -> bool:
        return self._stream is not None

    def step(self, token_id: int) -> str:
        """The text this token completes ("" when it only starts a multi-byte character)."""
        if self._stream is not None:
            return self._stream.step(self.tokenizer, int(token_id)) or ""
        return self._diff_step(int(token_id))

    def _diff_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=self.skip_special_tokens)
        new_text = decode(self._ids[self._prefix:], skip_special_tokens=self.skip_special_tokens)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            piece = new_text[len(prefix_text):]
            # slide the window: the ids just emitted stay as context for the decoder's spacing rules
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""


# ids of context kept for decoders whose output depends on the previous token (Metaspace, WordPiece)
_CONTEXT_IDS = 6
