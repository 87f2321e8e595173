"""Text in and out through the artifact's tokenizer.json (the `tokenizers` library, no transformers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from flashio.detokenize import Detokenizer
from flashio.errors import TokenizerError


class TextCodec:
    def __init__(self, path: Path, *, bos_token_id: int | None, eos_token_id: int | None, add_bos: bool):
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load tokenizer: {exc}") from None
        self.bos, self.eos, self.add_bos = bos_token_id, eos_token_id, add_bos

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens=False: the text alone, no BOS and no
        post-processor tokens (a rendered chat prompt already holds its special tokens)."""
        if not add_special_tokens:
            return self.tok.encode(text, add_special_tokens=False).ids
        ids = self.tok.encode(text).ids
        if self.add_bos and self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        """An incremental decoder for the tokens that follow `prompt_ids`."""
        return Detokenizer(self.tok, prompt_ids=prompt_ids)
