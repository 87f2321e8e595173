"""The flashio runtime: open an artifact and run it with the FFN on flash.

    import flashio
    with flashio.open("artifacts/demo", mode="sparse", window=5, dram_budget="512MiB") as model:
        for tok in model.stream("def main():", max_new_tokens=32):
            print(tok.text, end="", flush=True)
        print(model.generate("import os", max_new_tokens=16).summary())

Per step and layer: attention with resident weights and a KV cache, then the mode's FFN engine
(see flashio.ffn). Every step records bytes read and the I/O / memory / compute split.
A FlashModel is single-session: it owns one KV cache and one set of window caches, so concurrent
calls from several threads are refused with a clear error; open the artifact once per session.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashio.errors import BudgetError, FlashError, TokenizerError
from flashio.ffn import DenseEngine, NaiveEngine, OracleEngine, SparseEngine
from flashio.format import Artifact
from flashio.format.writer import TORCH_DTYPES
from flashio.models.base import KVCache
from flashio.sizes import format_size, parse_size
from flashio.stats import StatsRecorder, StepStats
from flashio.storage import BundleReader, LayerExtent
from flashio.tokenizer import TextCodec

log = logging.getLogger(__name__)

MODES = ("dense", "naive", "sparse", "oracle")
# The smallest window cache open() accepts, as a fraction of each layer's neurons: a token's
# predicted set is typically 2-10% of the FFN (paper, appendix), so less cannot run usefully.
MIN_CACHE_FRACTION = 0.05


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # the text this token added
    stats: StepStats  # of the step that produced it (the first one includes the prompt)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill: StepStats
    decode: list[StepStats] = field(default_factory=list)

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


class FlashModel:
    """An opened artifact. Create with `flashio.open`."""

    def __init__(self, art: Artifact, *, mode: str, window: int, dram_budget: int | None,
                 threads: int | None, max_context: int | None, direct: bool):
        self.artifact, self.mode, self.window = art, mode, window
        m = art.manifest
        self.dtype = TORCH_DTYPES[m.dtype]
        self.args = art.args
        max_len = min(self.args.max_positions, max_context or self.args.max_positions)
        resident = art.load_resident()
        self.model = art.arch.Model(self.args, resident)
        predictors = art.load_predictors() if mode == "sparse" else None
        if mode == "sparse" and predictors is None:
            raise FlashError(f"{art.path}: mode='sparse' needs predictors and this artifact has none "
                             "(packed without the pipeline); use mode='oracle', 'dense' or 'naive', "
                             "or convert it with `flashio convert`")
        extents = [LayerExtent(L.offset_bytes, L.n_neurons, L.bundle_width * m.itemsize) for L in m.ffn_layers]
        row_bytes = extents[0].row_bytes
        n_neurons = m.ffn_layers[0].n_neurons
        kv_bytes = 2 * self.args.n_layers * max_len * self.args.n_kv_heads * self.args.head_dim * self.dtype.itemsize
        resident_bytes = sum(t.numel() * t.element_size() for t in resident.values())
        pred_bytes = sum(p.A.numel() + p.B.numel() + p.bias.numel() for p in predictors or []) * self.dtype.itemsize
        fixed = resident_bytes + pred_bytes + kv_bytes
        if mode == "oracle":
            fixed += m.n_layers * n_neurons * (row_bytes // len(m.bundle_layout))
        capacity = n_neurons
        if dram_budget is not None:
            need = {"dense": fixed + sum(e.n_rows * e.row_bytes for e in extents),
                    "naive": fixed + max(e.n_rows * e.row_bytes for e in extents)}
            min_rows = max(1, math.ceil(MIN_CACHE_FRACTION * n_neurons))
            need["sparse"] = need["oracle"] = fixed + m.n_layers * min_rows * row_bytes
            if dram_budget < need[mode]:
                raise BudgetError(
                    f"dram_budget {format_size(dram_budget)} is too small for mode {mode!r}: it needs at "
                    f"least {format_size(need[mode])} (resident {format_size(resident_bytes)}, KV cache for "
                    f"{max_len} tokens {format_size(kv_bytes)}, predictors {format_size(pred_bytes)}, "
                    f"FFN {format_size(need[mode] - fixed)}); raise the budget or lower max_context")
            if mode in ("sparse", "oracle"):
                capacity = min(n_neurons, (dram_budget - fixed) // (m.n_layers * row_bytes))
        self.capacity = capacity
        self.reader = BundleReader(art.file(m.ffn_file), extents, threads=threads, direct=direct)
        self.rec = StatsRecorder()
        common = (art, self.reader, resident, self.rec, self.dtype)
        if mode == "dense":
            self.engine = DenseEngine(*common)
        elif mode == "naive":
            self.engine = NaiveEngine(*common)
        elif mode == "sparse":
            self.engine = SparseEngine(*common, predictors=predictors, window=window, capacity=capacity)
        else:
            self.engine = OracleEngine(*common, window=window, capacity=capacity)
        self.kv = KVCache(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim,
                          max_len=max_len, dtype=self.dtype)
        self.codec = None
        tok = m.tokenizer
        if tok is not None:
            self.codec = TextCodec(art.tokenizer_path(), bos_token_id=tok.get("bos_token_id"),
                                   eos_token_id=tok.get("eos_token_id"), add_bos=bool(tok.get("add_bos", True)))
        self.stats: list[StepStats] = []
        self._lock = threading.Lock()

    # -- sessions -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache and window caches: the next call starts a new sequence."""
        self.kv.reset()
        self.engine.reset()
        self.stats = []

    def close(self) -> None:
        self.engine.close()
        self.reader.close()

    def __enter__(self) -> FlashModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise FlashError("this FlashModel is already running a call in another thread; a FlashModel "
                             "is single-session (one KV cache, one window cache): open one per thread")
        try:
            yield
        finally:
            self._lock.release()

    # -- the forward pass -----------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run T new tokens (one step) through the model; returns logits [T, V]."""
        t0 = time.perf_counter()
        self.rec.clear()
        start = self.kv.length
        self.kv.reserve(start + len(tokens))
        x = self.model.embed(tokens, start)
        for i in range(self.args.n_layers):
            x = self.model.attention(i, x, self.kv, start)
            y = self.engine(i, self.model.ffn_input(i, x))
            x = self.model.ffn_output(i, x, y)
        logits = self.model.head(x)
        self.kv.advance(len(tokens))
        self.stats.append(self.rec.finish(len(tokens), time.perf_counter() - t0))
        return logits

    def _ids(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(prompt, str):
            if self.codec is None:
                raise TokenizerError(f"{self.artifact.path} has no tokenizer.json: pass token ids instead of text")
            ids = self.codec.encode(prompt)
        else:
            ids = torch.as_tensor(prompt).flatten().tolist()
        if not ids:
            raise FlashError("empty prompt: give at least one token")
        bad = [i for i in ids if not 0 <= i < self.args.vocab_size]
        if bad:
            raise FlashError(f"token ids {bad[:5]} are outside the vocabulary (size {self.args.vocab_size})")
        return torch.tensor(ids, dtype=torch.long)

    def forward(self, input_ids: str | Sequence[int] | torch.Tensor, *, token_by_token: bool = False) -> torch.Tensor:
        """Logits [T, V] (float32) for a fresh sequence. token_by_token=True feeds one token per
        step, as generation does, so the window cache and predictor act per token."""
        with self._session():
            self.reset()
            ids = self._ids(input_ids)
            if token_by_token:
                return torch.cat([self._step(ids[j : j + 1]) for j in range(len(ids))]).float()
            return self._step(ids).float()

    # -- generation -----------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 64, *,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop_at_eos: bool = True) -> Iterator[GeneratedToken]:
        """Yield generated tokens one by one, each with the statistics of its step."""
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise FlashError(f"bad sampling options: max_new_tokens={max_new_tokens} (>= 0), "
                             f"temperature={temperature} (>= 0), top_p={top_p} (in (0, 1])")
        with self._session():
            self.reset()
            ids = self._ids(prompt)
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            eos = self.codec.eos if self.codec else self.artifact.manifest.model_config.get("eos_token_id")
            out: list[int] = []
            text = ""
            logits = self._step(ids)[-1]
            for _ in range(max_new_tokens):
                tok = _sample(logits.float(), temperature, top_p, gen)
                out.append(tok)
                if self.codec is not None:
                    full = self.codec.decode(out)
                    piece, text = full[len(text):], full
                else:
                    piece = ""
                yield GeneratedToken(tok, piece, self.stats[-1])
                if stop_at_eos and tok == eos:
                    break
                if len(out) == max_new_tokens or self.kv.length >= self.kv.max_len:
                    break
                logits = self._step(torch.tensor([tok]))[-1]

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 64, **kw) -> Generation:
        toks = list(self.stream(prompt, max_new_tokens, **kw))
        ids = [t.token_id for t in toks]
        text = self.codec.decode(ids) if self.codec else ""
        steps = self.stats
        return Generation(text, ids, steps[0].tokens if steps else 0, steps[0] if steps else StepStats(),
                          list(steps[1:]))

    def memory_bytes(self) -> dict[str, int]:
        m = self.artifact.manifest
        return {"resident": m.files[m.resident_file].bytes, "ffn_engine": self.engine.dram_bytes(),
                "kv_cache": self.kv.nbytes()}


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p  # smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def open_model(path: str | Path, *, mode: str = "sparse", window: int = 5,
               dram_budget: int | str | None = None, threads: int | None = None, device: str = "cpu",
               verify: bool = False, max_context: int | None = None, registry: str | None = None,
               direct: bool = True) -> FlashModel:
    """Open an artifact directory (or a registry reference) for inference.

    mode: 'sparse' (predictors + window cache + flash reads), 'dense', 'naive' or 'oracle'.
    window: tokens a neuron stays cached after it was last predicted active.
    dram_budget: bytes (or '2GiB') for resident weights, KV cache, predictors and window caches.
    threads: flash reader threads. verify: check every file's sha256 first.
    max_context: KV cache length (default: the model's maximum).
    """
    if mode not in MODES:
        raise FlashError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if window < 1:
        raise FlashError(f"window must be at least 1 token, got {window}")
    if device != "cpu":
        if not torch.cuda.is_available():
            raise FlashError(f"device={device!r} requested but CUDA is not available on this machine; use device='cpu'")
        raise FlashError(f"device={device!r} is not supported yet by this flashio build; use device='cpu'")
    local = Path(path)
    if not local.is_dir():
        local = _resolve_reference(str(path), registry)
    art = Artifact(local, verify=verify)
    budget = parse_size(dram_budget) if dram_budget is not None else None
    return FlashModel(art, mode=mode, window=window, dram_budget=budget, threads=threads,
                      max_context=max_context, direct=direct)


def _resolve_reference(ref: str, registry: str | None) -> Path:
    if "://" not in ref and registry is None:
        raise FlashError(f"{ref!r} is not an artifact directory; for a registry reference pass registry=URI "
                         "or a full URI such as s3://bucket/prefix/name@latest")
    try:
        from flashio.registry import resolve_to_local
    except ModuleNotFoundError as exc:  # pragma: no cover - registry not installed in this build
        raise FlashError(f"registry references need flashio.registry: {exc}") from None
    return resolve_to_local(ref, registry=registry)
