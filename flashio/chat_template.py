"""Chat templates: a conversation rendered into the prompt text the model was tuned on.

    template = ChatTemplate.from_directory(artifact_dir)       # chat_template.jinja or tokenizer_config.json
    text = template.render([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False).ids  # the template already holds bos

Rendered exactly as transformers' `apply_chat_template(tokenize=False)` renders it: the same sandboxed
jinja2 environment (trim_blocks, lstrip_blocks, loop controls), the same globals and filters
(`raise_exception`, `strftime_now`, `tojson` with its arguments and without HTML escaping, a
dunder-proof `namespace`, `dict`), the tokenizer's named special tokens (`bos_token`...) as
variables, and messages with their None-valued keys dropped. Templates are untrusted code from the
model's source: the sandbox stops them reaching Python internals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flashio.errors import FlashError

# the named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# names a message's reasoning goes under; transformers fills each from the others
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Message = Mapping[str, Any]


class ChatTemplateError(FlashError):
    """A chat template is missing, does not compile, or refused the conversation."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the jinja2 text
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # {"bos_token": "<s>", ...}
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ChatTemplateError(f"a chat template must be non-empty jinja2 text, got {self.source!r}")
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc} (line {exc.lineno})") from None
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "special_tokens", dict(self.special_tokens))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
               **variables: Any) -> str:
        """The prompt text for `messages`; add_generation_prompt appends the header that opens the
        assistant's reply. Extra variables (e.g. date_string) reach the template as transformers'
        kwargs do, overriding the special tokens of the same name."""
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation: give at least one message")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ChatTemplateError(f"message {i} is a {type(m).__name__}, expected a mapping with "
                                        "'role' and 'content'")
            chat.append(_alias_reasoning({k: v for k, v in m.items() if v is not None}))
        try:
            return self._compiled.render(messages=chat, tools=list(tools) if tools is not None else None,
                                         documents=list(documents) if documents is not None else None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **variables})
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {exc}") from None
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:  # template code on odd input
            raise ChatTemplateError(f"the chat template failed on this conversation ({type(exc).__name__}: {exc}); "
                                    "check the messages' roles and content types") from None

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_tokenizer_config(cls, config: str | Path | Mapping[str, Any], *, name: str | None = None,
                              source: str | None = None) -> ChatTemplate:
        """The template of a tokenizer_config.json (path or parsed dict), or `source` with that
        file's special tokens. A config with several named templates needs `name` unless one is
        called "default" (as in transformers)."""
        d = _read_json(config) if isinstance(config, (str, Path)) else dict(config)
        if source is None:
            source = _pick_template(d.get("chat_template"), name, where=str(config) if isinstance(config, (str, Path))
                                    else "tokenizer_config")
        return cls(source, special_tokens=special_tokens_of(d))

    @classmethod
    def from_directory(cls, directory: str | Path, *, name: str | None = None) -> ChatTemplate | None:
        """The template an artifact (or a Hugging Face checkpoint) carries, None when it has none:
        chat_template.jinja first (newer transformers save it there), then tokenizer_config.json."""
        d = Path(directory)
        cfg: dict[str, Any] = _read_json(d / TOKENIZER_CONFIG) if (d / TOKENIZER_CONFIG).is_file() else {}
        if (d / SPECIAL_TOKENS_MAP).is_file():
            cfg = {**_read_json(d / SPECIAL_TOKENS_MAP), **cfg}
        if (d / TEMPLATE_FILE).is_file() and name is None:
            return cls.from_tokenizer_config(cfg, source=(d / TEMPLATE_FILE).read_text(encoding="utf-8"))
        if cfg.get("chat_template") is None:
            return None
        return cls.from_tokenizer_config(cfg, name=name)


def special_tokens_of(config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of a tokenizer config: strings, or AddedToken objects ({"content": ...})."""
    out = {}
    for key in SPECIAL_TOKEN_NAMES:
        v = config.get(key)
        if isinstance(v, Mapping):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def _pick_template(value: Any, name: str | None, *, where: str) -> str:
    if value is None:
        raise ChatTemplateError(f"{where} has no chat_template: this model has no chat format; use plain "
                                "completion (a prompt string) or pass a template")
    if isinstance(value, list):  # [{"name": ..., "template": ...}] as tokenizer_config.json stores several
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
    if isinstance(value, Mapping):
        key = name if name is not None else "default"
        if key not in value:
            raise ChatTemplateError(f"{where} has chat templates {sorted(map(str, value))}, not {key!r}: "
                                    "name one of them")
        value = value[key]
    elif name is not None:
        raise ChatTemplateError(f"{where} has a single chat template; a template name ({name!r}) does not apply")
    if not isinstance(value, str):
        raise ChatTemplateError(f"{where}: chat_template is a {type(value).__name__}, expected jinja2 text")
    return value


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


# -- the environment: transformers' (utils/chat_template_utils.py), one per template ---------------
def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without the attribute access of the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore-prefixed attribute names (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _TemplateNamespace._check_name(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
    rendering keeps the text (transformers' AssistantTracker without the tracking)."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

    def _keep(self, caller: Callable[[], str]) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def fit_messages(messages: Sequence[Message], template: ChatTemplate, count_tokens: Callable[[str], int],
                 budget_tokens: int) -> list[Message]:
    """The leading system message(s) and the most recent turns whose rendered prompt (with the
    generation prompt) takes at most budget_tokens. The kept history starts at a user message, so
    that templates that insist on alternating roles accept it."""
    msgs = list(messages)
    n_sys = 0
    while n_sys < len(msgs) and msgs[n_sys].get("role") in ("system", "developer"):
        n_sys += 1
    system, rest = msgs[:n_sys], msgs[n_sys:]
    starts = [i for i, m in enumerate(rest) if m.get("role") == "user"] or list(range(len(rest)))
    if not starts:
        starts = [0]

    def fits(start: int) -> tuple[bool, int]:
        n = count_tokens(template.render([*system, *rest[start:]], add_generation_prompt=True))
        return n <= budget_tokens, n

    ok, n_last = fits(starts[-1])
    if not ok:
        raise ChatTemplateError(f"the system prompt and the last message take {n_last} tokens; the budget for the "
                                f"prompt is {budget_tokens} (the context minus the reply's max tokens): shorten the "
                                "message or the system prompt, or lower max_new_tokens")
    lo, hi = 0, len(starts) - 1  # find the first start that fits (fewer turns never take more tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid])[0]:
            hi = mid
        else:
            lo = mid + 1
    return [*system, *rest[starts[lo]:]]


class History:
    """A chat's messages for `flashio chat`: a fixed system prompt, the turns so far, and the prompt
    that fits the context window (oldest turns dropped first, the system prompt always kept)."""

    def __init__(self, template: ChatTemplate, count_tokens: Callable[[str], int], *, budget_tokens: int,
                 system: str | None = None):
        if budget_tokens <= 0:
            raise ChatTemplateError(f"budget_tokens={budget_tokens}: the context must leave room for a prompt "
                                    "after max_new_tokens; lower max_new_tokens")
        self.template, self.count_tokens, self.budget_tokens = template, count_tokens, budget_tokens
        self.system = system
        self.turns: list[dict[str, str]] = []

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def reset(self) -> None:
        """Forget the turns (the system prompt stays)."""
        self.turns = []

    def messages(self) -> list[Message]:
        """The system prompt and the most recent turns that fit the budget."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return fit_messages([*system, *self.turns], self.template, self.count_tokens, self.budget_tokens)

    def prompt(self) -> str:
        return self.template.render(self.messages(), add_generation_prompt=True)
