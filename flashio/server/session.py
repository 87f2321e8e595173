"""A FlashModel behind the server's Session protocol (flashio.server.worker.Session).

    with flashio.open("artifacts/demo", mode="dense") as model:
        serve(FlashSession(model), host="127.0.0.1", port=8000)

The model's tokenizer encodes prompts, its generation_config.json gives the defaults (eos ids
included) and its chat template renders conversations; generation runs on the worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from flashio.chat_template import ChatTemplate
from flashio.errors import TokenizerError
from flashio.generation import GenerationConfig, StreamedToken
from flashio.runtime import FlashModel
from flashio.tokenizer import TextCodec


class FlashSession:
    def __init__(self, model: FlashModel, *, model_id: str | None = None,
                 chat_template: ChatTemplate | None = None, options: Mapping[str, Any] | None = None):
        """options: GenerationConfig fields that replace the artifact's defaults (requests override them)."""
        if model.codec is None:
            raise TokenizerError(f"{model.artifact.path} has no tokenizer.json: the server takes text, so it needs "
                                 "an artifact with a tokenizer (pack or convert a checkpoint that has one)")
        self.model = model
        self.model_id = model_id or model.artifact.path.resolve().name
        self.context_tokens = model.kv.max_len
        self.defaults = model.generation_defaults.updated(**(options or {}))
        self.chat_template = chat_template or model.chat_template
        self.tokenizer: TextCodec = model.codec

    def stream(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[StreamedToken]:
        for t in self.model.stream(list(prompt_ids), config=config):
            yield StreamedToken(t.token_id, t.text, t.finish_reason)
