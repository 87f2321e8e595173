"""The OpenAI wire format: requests checked into generation jobs, responses and stream chunks.

Only what a single-sequence text model can honour is accepted; anything else (n > 1, logprobs,
tools, presence/frequency penalties, several prompts) is refused with a 400 that names the field,
rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flashio.chat_template import ChatTemplateError
from flashio.errors import FlashError
from flashio.generation import GenerationConfig, GenerationConfigError
from flashio.server.worker import Session

MAX_STOP_STRINGS = 4  # as OpenAI's API
# request field -> GenerationConfig field (top_k, min_p, repetition_penalty: extensions that vLLM also takes)
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "seed": "seed"}


class RequestError(FlashError):
    """A request the API refuses; carries the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(str(self), type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class GenerationRequest:
    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def parse_request(body: Any, session: Session, *, kind: str) -> GenerationRequest:
    if not isinstance(body, Mapping):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != session.model_id:
        raise RequestError(f"model {model!r} is not served here; this server serves {session.model_id!r} "
                           "(GET /v1/models)", status=404, param="model", code="model_not_found")
    _refuse_unsupported(body, kind)
    if kind == "chat":
        prompt_ids = _chat_prompt_ids(body, session)
    else:
        prompt_ids = _completion_prompt_ids(body, session)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", Mapping, None)
    if options is not None and not stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    config = _generation_config(body, session, len(prompt_ids), kind)
    return GenerationRequest(kind, prompt_ids, config, stream, include_usage)


def _refuse_unsupported(body: Mapping[str, Any], kind: str) -> None:
    if body.get("n", 1) != 1:
        raise RequestError(f"n={body['n']!r}: this server generates one choice per request", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported; use repetition_penalty (> 1 penalises repeats)",
                               param=name)
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise RequestError("logprobs are not supported by this server", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise RequestError("tools are not supported by this server (no tool-call parsing)", param="tools")
    if kind == "completion" and body.get("echo"):
        raise RequestError("echo is not supported by this server", param="echo")
    if kind == "completion" and body.get("suffix"):
        raise RequestError("suffix (insertion) is not supported by this server", param="suffix")


def _chat_prompt_ids(body: Mapping[str, Any], session: Session) -> list[int]:
    if session.chat_template is None:
        raise RequestError(f"{session.model_id} has no chat template: use /v1/completions with a prompt",
                           param="messages", code="no_chat_template")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        chat.append({**m, "content": _message_text(m.get("content"), i)})
    try:
        text = session.chat_template.render(chat, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise RequestError(str(exc), param="messages") from None
    return session.tokenizer.encode(text, add_special_tokens=False)  # the template holds the special tokens


def _message_text(content: Any, i: int) -> str | None:
    """A message's text: a string, or OpenAI content parts of type "text" joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content: only text parts are supported, got {part!r:.80}",
                                   param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def _completion_prompt_ids(body: Mapping[str, Any], session: Session) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty: give at least one character", param="prompt")
        return session.tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError(f"{len(prompt)} prompts given: this server takes one prompt per request", param="prompt")
    raise RequestError("prompt must be a non-empty string or a list of token ids", param="prompt")


def _generation_config(body: Mapping[str, Any], session: Session, n_prompt: int, kind: str) -> GenerationConfig:
    context = session.context_tokens
    if n_prompt >= context:
        raise RequestError(f"this model's context is {context} tokens; the prompt alone has {n_prompt} tokens: "
                           "shorten the prompt", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_key)
    room = context - n_prompt
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"{max_key}={max_tokens!r}: expected an integer >= 1", param=max_key)
        if max_tokens > room:
            raise RequestError(f"this model's context is {context} tokens; you asked for {n_prompt + max_tokens} "
                               f"({n_prompt} in the prompt, {max_tokens} to generate): lower {max_key} to at most "
                               f"{room} or shorten the prompt", param=max_key, code="context_length_exceeded")
    else:
        max_tokens = min(session.defaults.max_new_tokens, room)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
                           f"got {stop!r:.80}", param="stop")
    overrides: dict[str, Any] = {cfg: body.get(name) for name, cfg in _SAMPLING_FIELDS.items()}
    try:
        return session.defaults.updated(max_new_tokens=max_tokens, stop=tuple(stop) if stop else None, **overrides)
    except GenerationConfigError as exc:
        raise RequestError(str(exc), param=_first_param(str(exc))) from None


def _first_param(message: str) -> str | None:
    return next((n for n in _SAMPLING_FIELDS if f"{n}=" in message), None)


def _typed(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    v = body.get(key, default)
    if v is not None and not isinstance(v, kind):
        raise RequestError(f"{key} must be a {kind.__name__}, got {v!r:.40}", param=key)
    return v


# -- responses ----------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, rid: str, model: str, text: str, finish_reason: str, n_prompt: int, n_out: int) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(n_prompt, n_out)}


def chunk(kind: str, rid: str, model: str, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, usage_counts: dict[str, int] | None = None) -> dict:
    """One server-sent event's payload; usage_counts makes it the final usage chunk (no choices)."""
    if usage_counts is not None:
        choices: list[dict] = []
    elif kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if usage_counts is not None:
        out["usage"] = usage_counts
    return out
