"""Generation options, the sampler (what picks the next token from a step's logits), the decoding
loop and its results.

    cfg = GenerationConfig.from_generation_config(artifact / "generation_config.json", temperature=0.7)
    sampler = Sampler(cfg)
    next_id = sampler(logits, ids_so_far)  # logits: [V] float32; ids_so_far: prompt + generated

The filters are applied in the order transformers applies its logits processors, so that a model's
generation_config.json means here what it means there: repetition penalty (over the prompt and the
output), then temperature, top_k, top_p, min_p. Temperature 0 is greedy decoding (the repetition
penalty still applies, as in transformers' greedy search).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer

from flashio.detokenize import Detokenizer
from flashio.errors import FlashError
from flashio.stats import StepStats
from flashio.stopping import StopChecker

DEFAULT_MAX_NEW_TOKENS = 256
# transformers' GenerationConfig defaults, used for keys a generation_config.json leaves out
HF_DEFAULT_TEMPERATURE = 1.0
HF_DEFAULT_TOP_K = 50


class GenerationConfigError(FlashError):
    """A generation option is out of range or of the wrong type."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. temperature=0 is greedy; top_k=0, top_p=1, min_p=0 and repetition_penalty=1
    switch their filter off. stop: strings that end the output (not included in it). eos_token_ids:
    the token ids that end the output (included in the ids, not in the text)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # normalise the containers first (lists and sets from JSON or the CLI), then check every value
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        eos = self.eos_token_ids
        eos = frozenset([eos] if isinstance(eos, int) else (eos or ()))
        object.__setattr__(self, "eos_token_ids", eos)
        problems = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} (expected an integer >= 0)")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            problems.append(f"temperature={self.temperature!r} (expected a finite number >= 0; 0 is greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} (expected a number in (0, 1]; 1 switches it off)")
        if not _is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} (expected an integer >= 0; 0 switches it off)")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            problems.append(f"min_p={self.min_p!r} (expected a number in [0, 1]; 0 switches it off)")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            problems.append(f"repetition_penalty={self.repetition_penalty!r} (expected a finite number > 0; "
                            "1 switches it off)")
        bad_stop = [s for s in stop if not isinstance(s, str) or not s]
        if bad_stop:
            problems.append(f"stop={list(stop)!r} (expected non-empty strings)")
        if self.seed is not None and not _is_int(self.seed):
            problems.append(f"seed={self.seed!r} (expected an integer or None)")
        bad_eos = sorted(repr(i) for i in eos if not _is_int(i) or i < 0)
        if bad_eos:
            problems.append(f"eos_token_ids has {', '.join(bad_eos)} (expected token ids >= 0)")
        if problems:
            raise GenerationConfigError("bad generation options: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with the given options replaced; None values are ignored (an option left out of a request)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise GenerationConfigError(f"unknown generation options {unknown}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_generation_config(cls, source: str | Path | Mapping[str, Any] | None, **overrides: Any) -> GenerationConfig:
        """Defaults from a Hugging Face generation_config.json (a path, its parsed dict, or None for
        flashio's defaults), then `overrides` (None values ignored).

        As in transformers, a file without `do_sample: true` means greedy decoding; its temperature,
        top_k (default 50) and top_p still apply when a caller asks for a temperature > 0.
        `eos_token_id` may be one id or a list (Llama 3 ends a turn with either of two ids).
        """
        d = _read_mapping(source)
        base: dict[str, Any] = {}
        if d:
            do_sample = bool(d.get("do_sample", False))
            temperature = _or_default(d.get("temperature"), HF_DEFAULT_TEMPERATURE)
            base["temperature"] = float(temperature) if do_sample else 0.0
            base["top_k"] = _or_default(d.get("top_k"), HF_DEFAULT_TOP_K)
            base["top_p"] = _or_default(d.get("top_p"), 1.0)
            base["min_p"] = _or_default(d.get("min_p"), 0.0)
            base["repetition_penalty"] = _or_default(d.get("repetition_penalty"), 1.0)
            if d.get("max_new_tokens") is not None:
                base["max_new_tokens"] = d["max_new_tokens"]
            eos = d.get("eos_token_id")
            if eos is not None:
                base["eos_token_ids"] = frozenset(eos if isinstance(eos, list) else [eos])
        return cls(**base).updated(**overrides)


def _read_mapping(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise GenerationConfigError(f"{path}: no such generation config; pass None for flashio's defaults") from None
    except json.JSONDecodeError as exc:
        raise GenerationConfigError(f"{path}: not valid JSON ({exc}); expected a generation_config.json") from None
    if not isinstance(d, dict):
        raise GenerationConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


class Sampler:
    """Turns a step's logits into the next token id, with one torch.Generator (seeded when the
    config has a seed, so that a seeded generation repeats exactly)."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()  # a fresh nondeterministic seed per sampler, no process-wide state

    def process(self, logits: torch.Tensor, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The logits after the config's filters ([V] float32; removed tokens at -inf). Greedy
        decoding applies the repetition penalty only."""
        c = self.config
        scores = logits.float().flatten()  # [V]
        scores = apply_repetition_penalty(scores, ids, c.repetition_penalty)
        if c.greedy:
            return scores
        if c.temperature != 1.0:
            scores = scores / c.temperature
        if c.top_k > 0:
            scores = apply_top_k(scores, c.top_k)
        if c.top_p < 1.0:
            scores = apply_top_p(scores, c.top_p)
        if c.min_p > 0.0:
            scores = apply_min_p(scores, c.min_p)
        return scores

    def __call__(self, logits: torch.Tensor, ids: Sequence[int] | torch.Tensor) -> int:
        scores = self.process(logits, ids)
        if self.config.greedy:
            return int(torch.argmax(scores))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def apply_repetition_penalty(scores: torch.Tensor, ids: Sequence[int] | torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers): a seen token's logit is divided by `penalty` when positive,
    multiplied when negative, once however often it was seen."""
    if penalty == 1.0 or len(ids) == 0:
        return scores
    seen = torch.unique(torch.as_tensor(ids, dtype=torch.long))  # [S]
    if int(seen.max()) >= scores.numel() or int(seen.min()) < 0:
        raise FlashError(f"token ids up to {int(seen.max())} seen with a vocabulary of {scores.numel()}")
    s = scores[seen]
    return scores.index_put((seen,), torch.where(s < 0, s * penalty, s / penalty))


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (and any tied with the k-th)."""
    k = min(k, scores.numel())
    kth = torch.topk(scores, k).values[-1]
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[-1] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = torch.softmax(scores, dim=-1)
    drop = probs < min_p * probs.max()
    drop[torch.argmax(probs)] = False
    return scores.masked_fill(drop, -math.inf)


def eos_ids(*sources: int | Iterable[int] | None) -> frozenset[int]:
    """The union of eos ids from several places (manifest, generation_config.json, tokenizer)."""
    out: set[int] = set()
    for s in sources:
        if s is None:
            continue
        out.update([s] if isinstance(s, int) else s)
    return frozenset(out)


class StreamedToken(NamedTuple):
    """One generated token: a named tuple, so that `token_id, text, finish_reason = t` works too."""

    token_id: int
    text: str  # the text this token adds (stop strings and eos removed; "" inside a multi-byte character)
    finish_reason: str | None  # None, then "stop" (eos or a stop string) or "length" on the last token


def stream_tokens(next_logits: Callable[[list[int]], torch.Tensor], prompt_ids: Sequence[int],
                  config: GenerationConfig, *, tokenizer: Tokenizer | None = None,
                  max_total_tokens: int | None = None) -> Iterator[StreamedToken]:
    """The decoding loop: sample, detokenize, check eos and stop strings, until a finish.

    next_logits(new_ids) runs the model on the ids not yet seen (the whole prompt first, then one
    token at a time) and returns the last position's logits [V]. max_total_tokens bounds prompt +
    output (the model's context). Without a tokenizer the pieces are "" and stop strings are inert.
    """
    if config.max_new_tokens == 0:
        return
    ids = list(prompt_ids)
    if max_total_tokens is not None and len(ids) >= max_total_tokens:
        raise FlashError(f"the prompt has {len(ids)} tokens, the context holds {max_total_tokens}: "
                         "shorten the prompt")
    sampler = Sampler(config)
    detok = Detokenizer(tokenizer, prompt_ids=ids) if tokenizer is not None else None
    stops = StopChecker(config.stop if tokenizer is not None else ())
    logits = next_logits(ids)
    for n in range(1, config.max_new_tokens + 1):
        tok = sampler(logits, ids)
        ids.append(tok)
        if tok in config.eos_token_ids:
            yield StreamedToken(tok, stops.flush(), "stop")
            return
        text, stopped = stops.feed(detok.step(tok) if detok is not None else "")
        if stopped:
            yield StreamedToken(tok, text, "stop")
            return
        if n == config.max_new_tokens or (max_total_tokens is not None and len(ids) >= max_total_tokens):
            yield StreamedToken(tok, text + stops.flush(), "length")
            return
        yield StreamedToken(tok, text, None)
        logits = next_logits([tok])


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # the text this token added
    stats: StepStats  # of the step that produced it (the first one includes the prompt)
    finish_reason: str | None = None  # on the last token: "stop" (eos or a stop string) or "length"


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill: StepStats
    decode: list[StepStats] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"; None when nothing was generated

    @classmethod
    def of_steps(cls, text: str, token_ids: list[int], steps: Sequence[StepStats],
                 finish_reason: str | None) -> Generation:
        """From the model's steps: the first is the prompt's (prefill), the others decode a token each."""
        return cls(text, token_ids, steps[0].tokens if steps else 0, steps[0] if steps else StepStats(),
                   list(steps[1:]), finish_reason)

    @property
    def decode_total(self) -> StepStats:
        return sum(self.decode, StepStats())

    def tokens_per_s(self) -> float:
        ms = self.decode_total.total_ms
        return 1e3 * len(self.decode) / ms if ms > 0 else float("nan")

    def summary(self) -> str:
        n = max(len(self.decode), 1)
        t = self.decode_total
        return (f"{len(self.token_ids)} tokens, {self.tokens_per_s():.2f} tok/s, "
                f"{t.bytes_read / n / 1e6:.3f} MB read/token, "
                f"I/O {t.io_ms / n:.2f} ms / memory {t.mem_ms / n:.2f} ms / compute {t.compute_ms / n:.2f} ms per token")
