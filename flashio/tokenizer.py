"""Text in and out through the artifact's tokenizer.json (the `tokenizers` library, no transformers)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from flashio.errors import TokenizerError


class TextCodec:
    def __init__(self, path: Path, *, bos_token_id: int | None, eos_token_id: int | None, add_bos: bool):
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load tokenizer: {exc}") from None
        self.bos, self.eos, self.add_bos = bos_token_id, eos_token_id, add_bos

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text).ids
        if self.add_bos and self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
