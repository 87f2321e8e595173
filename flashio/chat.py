"""`flashio chat`: a conversation with an artifact through its chat template.

    with flashio.open("artifacts/demo") as model:
        chat(model, system="Be brief.", options={"temperature": 0.7}, stdin=sys.stdin, stdout=sys.stdout,
             stderr=sys.stderr)

Each turn renders the whole kept history with the template (as transformers renders it) and
generates the reply on a fresh sequence; the history keeps the system prompt and the most recent
turns whose prompt leaves room for max_new_tokens in the context. On a terminal it reads lines
(/reset forgets the turns, /exit or Ctrl-D ends, Ctrl-C stops a reply); otherwise all of stdin is
one message. Each reply is followed by a stats line on stderr.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flashio.chat_template import ChatTemplate, ChatTemplateError, History
from flashio.errors import FlashError, TokenizerError
from flashio.generation import GenerationConfig
from flashio.runtime import FlashModel

PROMPT = ">>> "
COMMANDS = "/reset forgets the conversation, /exit ends it"


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: int
    prompt_tokens: int
    first_token_ms: float  # from the request to the first token: the prompt's prefill and one sampling
    decode_tokens_per_s: float
    finish_reason: str | None

    def stats_line(self, context_tokens: int) -> str:
        return (f"[{self.tokens} tokens, {self.decode_tokens_per_s:.1f} tok/s, first token {self.first_token_ms:.0f} ms, "
                f"prompt {self.prompt_tokens} tokens of {context_tokens}, {self.finish_reason or 'stopped'}]")


def load_template(path: str | Path) -> ChatTemplate:
    """A chat template from a jinja2 file (special tokens are the artifact's only through its own)."""
    p = Path(path)
    try:
        return ChatTemplate(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ChatTemplateError(f"cannot read the chat template {p}: {exc.strerror}") from None


class ChatSession:
    """A model, a template and the history: `reply(text)` streams one assistant turn."""

    def __init__(self, model: FlashModel, *, system: str | None = None, template: ChatTemplate | None = None,
                 options: Mapping[str, Any] | None = None):
        if model.codec is None:
            raise TokenizerError(f"{model.artifact.path} has no tokenizer.json: chat needs an artifact with a tokenizer")
        template = template or model.chat_template
        if template is None:
            raise ChatTemplateError(f"{model.artifact.path} has no chat template (no chat_template.jinja, none in "
                                    "tokenizer_config.json): it is probably a base model; use `flashio run --prompt`, "
                                    "or give one with --chat-template FILE")
        self.model, self.codec = model, model.codec
        self.context_tokens = model.kv.max_len
        options = dict(options or {})
        if "max_new_tokens" not in options:  # leave the history at least half of the context
            options["max_new_tokens"] = min(model.generation_defaults.max_new_tokens, self.context_tokens // 2)
        self.config: GenerationConfig = model.generation_config(**options)
        self.history = History(template, self._count, budget_tokens=self.context_tokens - self.config.max_new_tokens,
                               system=system)

    def _count(self, text: str) -> int:
        return len(self.codec.encode(text, add_special_tokens=False))

    def reset(self) -> None:
        self.history.reset()

    def reply(self, text: str, out: TextIO) -> Reply:
        """Add the user's message, write the reply to `out` as it comes, keep it in the history.
        A message that cannot fit the context raises ChatTemplateError and is not kept."""
        self.history.add("user", text)
        try:
            ids = self.codec.encode(self.history.prompt(), add_special_tokens=False)  # the template has them
        except ChatTemplateError:
            self.history.turns.pop()
            raise
        t0 = time.perf_counter()
        first_ms, pieces, finish = float("nan"), [], None
        stream = self.model.stream(ids, config=self.config)
        try:
            for tok in stream:
                if not pieces:
                    first_ms = 1e3 * (time.perf_counter() - t0)
                pieces.append(tok.text)
                finish = tok.finish_reason
                out.write(tok.text)
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            stream.close()
            finish = "interrupted"
        reply_text = "".join(pieces)
        self.history.add("assistant", reply_text)
        decode_ms = sum(s.total_ms for s in self.model.stats[1:])
        n = len(pieces)
        return Reply(reply_text, n, len(ids), first_ms, 1e3 * (n - 1) / decode_ms if decode_ms > 0 else float("nan"),
                     finish)


def chat(model: FlashModel, *, system: str | None = None, template: ChatTemplate | None = None,
         options: Mapping[str, Any] | None = None, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Run the chat on these streams until /exit or end of input; returns the exit status."""
    session = ChatSession(model, system=system, template=template, options=options)
    if not stdin.isatty():  # piped: all of it is one message
        text = stdin.read().strip()
        if not text:
            raise FlashError("stdin is empty: pipe a message, or run `flashio chat` on a terminal")
        _answer(session, text, stdout, stderr)
        return 0
    print(f"chatting with {model.artifact.path.name} (context {session.context_tokens} tokens); {COMMANDS}",
          file=stderr, flush=True)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    while True:
        try:
            line = _read_line(stdin, stdout)
        except (EOFError, KeyboardInterrupt):
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=stderr, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}: {COMMANDS}", file=stderr, flush=True)
            continue
        _answer(session, text, stdout, stderr)


def _read_line(stdin: TextIO, stdout: TextIO) -> str:
    if stdin is sys.stdin and stdout is sys.stdout:
        return input(PROMPT)  # readline's editing on the real terminal
    stdout.write(PROMPT)
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def _answer(session: ChatSession, text: str, stdout: TextIO, stderr: TextIO) -> None:
    try:
        reply = session.reply(text, stdout)
    except ChatTemplateError as exc:
        print(f"error: {exc}", file=stderr, flush=True)
        return
    stdout.write("\n")
    stdout.flush()
    print(reply.stats_line(session.context_tokens), file=stderr, flush=True)
