"""The flashio runtime: open an artifact and run it with the FFN on flash.

    import flashio
    with flashio.open("artifacts/demo", mode="sparse", window=5, dram_budget="512MiB") as model:
        for tok in model.stream("def main():", max_new_tokens=32):
            print(tok.text, end="", flush=True)
        print(model.generate("import os", max_new_tokens=16).summary())

    cfg = flashio.FlashConfig(mode="sparse", window=5, dram_budget="512MiB")  # the same, as one value
    with flashio.open("artifacts/demo", cfg, window=3) as model: ...          # keywords override fields

Per step and layer: attention with resident weights and a KV cache, then the mode's FFN engine
(see flashio.engines and flashio.sparse). Every step records bytes read and the I/O / memory / compute split.
A FlashModel is single-session: it owns one KV cache and one set of window caches, so concurrent
calls from several threads are refused with a clear error; open the artifact once per session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashio import kernels
from flashio.budget import MemoryBudget
from flashio.chat_template import ChatTemplate
from flashio.config import FlashConfig, Mode, resolve_selection
from flashio.costmodel import CostModel, DeviceProfile, find_profile
from flashio.device import TransferPath, resolve_device, transfer_path
from flashio.dtypes import torch_dtype
from flashio.engines import ActiveSource, EngineContext
from flashio.errors import FlashError, TokenizerError
from flashio.format import Artifact
from flashio.generation import GeneratedToken, Generation, GenerationConfig, eos_ids, stream_tokens
from flashio.models.base import KVCache
from flashio.modes import engine_class
from flashio.predictor import PredictorWeights
from flashio.quant import assemble_resident
from flashio.sizes import format_size
from flashio.stats import StatsRecorder, StepStats
from flashio.storage import BundleReader, LayerExtent, evict_from_page_cache
from flashio.tokenizer import TextCodec
from flashio.trace import Trace, TraceRecorder

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"  # the source's, copied into the artifact


@dataclass(frozen=True)
class ReadPlan:
    """How the FFN is read: chosen from the device's cost model unless given."""

    threads: int
    max_gap: int  # unneeded rows read through when coalescing neighbours
    cost_model: CostModel


class FlashModel:
    """An opened artifact. Create with `flashio.open`.

    FlashModel(art, config) opens `art` as `config` says; `active_source` drives the sparse
    engine's active sets (e.g. a flashio.trace.TraceReplay), `transfer` replaces the device's
    transfer path (tests). config.torch_threads, when set, and the kernels' compute_threads are
    applied here, once: both thread counts are process-wide."""

    def __init__(self, art: Artifact, config: FlashConfig, *,
                 active_source: ActiveSource | None = None, transfer: TransferPath | None = None):
        if active_source is not None and config.mode != Mode.SPARSE:
            raise FlashError(f"active_source drives mode='sparse' only, got mode={config.mode.value!r}")
        device = resolve_device(config.device)
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        if device.type == "cpu":
            kernels.set_threads(kernels.threads_for(config.compute_threads))
        self.artifact, self.config, self.device = art, config, device
        self.mode, self.window = config.mode, config.window
        self.plan = read_plan(art, config.device_profile, threads=config.threads, max_gap=config.max_gap)
        m = art.manifest
        self.dtype = torch_dtype(m.dtype)  # storage
        self.compute_dtype = torch_dtype(config.compute_dtype) if config.compute_dtype else self.dtype
        self.args = art.args
        max_len = min(self.args.max_positions, config.max_context or self.args.max_positions)
        selection = resolve_selection(config, m)  # how a windowed mode chooses neurons, checked against the artifact
        engine_cls = engine_class(config.mode, selection)
        resident = art.load_resident(dtype=self.compute_dtype)  # private memory, sha256 checked
        for name in list(resident):  # one tensor at a time: the host copy is freed as it moves
            resident[name] = resident[name].to(device)
        if m.resident_quant is not None:  # codes + scales -> QuantizedWeight / QuantizedRows (flashio.quant)
            resident = assemble_resident(resident, m.resident_quant)
        self.model = art.arch.Model(self.args, resident)
        predictors = art.load_predictors() if engine_cls.needs_predictors else None
        if predictors is not None:  # private copies: the file's mapping and page cache are let go
            predictors = [p.to(self.compute_dtype, device, copy=True) for p in predictors]
            evict_from_page_cache(art.file(m.predictors_file))
        if engine_cls.needs_predictors and predictors is None and active_source is None:
            raise FlashError(f"{art.path}: mode='sparse' needs predictors and this artifact has none "
                             "(packed without the pipeline); use mode='oracle', 'dense' or 'naive', "
                             "give an active_source (a trace replay), or convert it with `flashio convert`")
        extents = [LayerExtent(L.offset_bytes, L.n_neurons, L.bundle_width * m.row_itemsize) for L in m.ffn_layers]
        budget = MemoryBudget.of(art, config.mode, self.compute_dtype, max_len, resident, predictors,
                                 config.pinned_fraction, selection=selection)
        self.capacity = budget.capacity(config.dram_budget)
        self._resident_bytes, self._pred_bytes = budget.resident_bytes, budget.predictor_bytes
        self._ffn_resident_bytes = budget.gate_bytes  # resident gate rows and up sketch (exact gate)
        self.reader = BundleReader(art.file(m.ffn_file), extents, threads=self.plan.threads,
                                   max_gap=self.plan.max_gap, direct=config.direct, cost_model=self.plan.cost_model)
        if transfer is None:  # reads of one layer at most: the window's capacity, or a streamed layer
            rows = budget.engine.transfer_rows(self.capacity)
            try:
                transfer = transfer_path(device, staging_bytes=rows * extents[0].row_bytes,
                                         index_capacity=2 * self.capacity)
            except BaseException:
                self.reader.close()
                raise
        self.transfer = transfer
        self.rec = StatsRecorder()
        self.recorder = None
        if config.record_trace:
            self.recorder = TraceRecorder(m.n_layers, m.ffn_layers[0].n_neurons, {
                "artifact": str(art.path), "mode": config.mode.value, "window": config.window,
                "ffn_sha256": m.files[m.ffn_file].sha256, "architecture": m.architecture})
        ctx = EngineContext(art, self.reader, resident, self.rec, self.compute_dtype, self.recorder, transfer)
        try:
            self.engine = engine_cls.create(ctx, config, capacity=self.capacity, predictors=predictors,
                                            source=active_source)
            self.kv = KVCache(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim,
                              max_len=max_len, dtype=self.compute_dtype, device=device)
            self.preload_bytes = 0  # FFN rows read at open (FlashConfig.preload)
            if config.preload and config.dram_budget is not None:
                t0 = time.perf_counter()
                self.preload_bytes = self.engine.preload()
                if self.preload_bytes:
                    log.info("preloaded the whole FFN (%s) in %.1f s: the budget holds every row",
                             format_size(self.preload_bytes), time.perf_counter() - t0)
        except BaseException:  # e.g. out of device memory: give back the pinned staging and the files
            transfer.close()
            self.reader.close()
            raise
        self.codec = None
        tok = m.tokenizer
        if tok is not None:
            self.codec = TextCodec(art.tokenizer_path(), bos_token_id=tok.get("bos_token_id"),
                                   eos_token_id=tok.get("eos_token_id"), add_bos=bool(tok.get("add_bos", True)))
        # generation defaults: the source's generation_config.json; eos: every id any source names
        gen_file = art.path / GENERATION_CONFIG
        defaults = GenerationConfig.from_generation_config(gen_file if gen_file.is_file() else None)
        eos = eos_ids(defaults.eos_token_ids, self.codec.eos if self.codec else None, m.model_config.get("eos_token_id"))
        self.generation_defaults = defaults.updated(eos_token_ids=eos)
        self.stats: list[StepStats] = []
        self._lock = threading.Lock()

    @property
    def predictor_thresholds(self) -> list[float]:
        """The sparse engine's per-layer predictor thresholds (probabilities)."""
        return [p.threshold for p in self._predictors()]

    def set_predictor_thresholds(self, thresholds: Sequence[float]) -> None:
        """Replace the per-layer predictor thresholds (probabilities in (0, 1)), e.g. to trade
        accuracy for bytes read; takes effect from the next step."""
        preds = self._predictors()
        if len(thresholds) != len(preds):
            raise FlashError(f"{len(thresholds)} thresholds given for {len(preds)} layers")
        bad = [t for t in thresholds if not 0.0 < float(t) < 1.0]
        if bad:
            raise FlashError(f"predictor thresholds must be probabilities in (0, 1), got {bad[:3]}")
        for i, t in enumerate(thresholds):
            preds[i] = dataclasses.replace(preds[i], threshold=float(t))

    def _predictors(self) -> list[PredictorWeights]:
        preds = getattr(self.engine, "predictors", None)
        if preds is None:
            raise FlashError(f"this model runs mode={self.mode.value!r} without predictors: thresholds apply to "
                             "mode='sparse' on an artifact with predictors")
        return preds

    @functools.cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The artifact's chat template (chat_template.jinja or tokenizer_config.json), None when it
        has none; loaded on first use, so a broken template fails chat, not `run`."""
        return ChatTemplate.from_directory(self.artifact.path)

    def trace(self) -> Trace:
        """The active sets this model computed since it was opened (needs record_trace=True)."""
        if self.recorder is None:
            raise FlashError("this model was opened without record_trace=True: nothing was recorded")
        return self.recorder.trace()

    # -- sessions -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache and window caches: the next call starts a new sequence."""
        self.kv.reset()
        self.engine.reset()
        self.stats = []

    def close(self) -> None:
        try:
            self.engine.close()
            self.transfer.close()
        finally:
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
            self.reader.check_unchanged()
            yield
        finally:
            self._lock.release()

    # -- the forward pass -----------------------------------------------------------------
    # A step returns the final hidden states; `_logits` applies the head (final norm, lm_head,
    # soft-capping: each position apart) where logits are needed: once over all positions after a
    # token-by-token forward, on the last one while generating. Gemma 3 270M's 262144 x 640 head
    # per step was ~73 ms of a ~124 ms dense step; over 64 positions, ~6 ms per position.
    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """The model's device is the current one during a step (not across a stream()'s yields)."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            yield

    @torch.inference_mode()
    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run T new tokens (one step) through the model; returns the final hidden states [T, D]
        (before the final norm: `_logits` turns the rows that need logits into logits)."""
        with self._on_device():
            return self._run_step(tokens)

    def _run_step(self, tokens: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.rec.clear()
        self.transfer.begin_step()
        self.engine.begin_step()
        start = self.kv.length
        self.kv.reserve(start + len(tokens))
        x = self.model.embed(tokens.to(self.device), start)
        for i in range(self.args.n_layers):
            if self.engine.guesses(i):  # FlashConfig.lookahead: reads start before the attention
                self.engine.prefetch(i, self.model.ffn_input(i, x))
            x = self.model.attention(i, x, self.kv, start)
            y = self.engine(i, self.model.ffn_input(i, x))
            x = self.model.ffn_output(i, x, y)
        self.kv.advance(len(tokens))
        # CUDA: wait for the step's kernels (so that its total time is real); the device time of
        # the rows' copies and of the cache's moves is reported beside the host's I/O and memory time
        times = self.transfer.finish_step()
        self.rec.upload_s, self.rec.device_mem_s = times.upload_s, times.mem_s
        self.stats.append(self.rec.finish(len(tokens), time.perf_counter() - t0))
        return x  # [T, D]

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states [n, D] -> float32 logits [n, V]; its time is added to
        the latest step's compute and total time."""
        t0 = time.perf_counter()
        with self._on_device():
            logits = self.model.head(hidden).float()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        head_ms = 1e3 * (time.perf_counter() - t0)
        last = self.stats[-1]
        self.stats[-1] = dataclasses.replace(last, compute_ms=last.compute_ms + head_ms, total_ms=last.total_ms + head_ms)
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

    def forward(self, input_ids: str | Sequence[int] | torch.Tensor, *, token_by_token: bool = False,
                head_per_step: bool = False) -> torch.Tensor:
        """Logits [T, V] (float32, on the model's device) for a fresh sequence. token_by_token=True
        feeds one token per step, as generation does, so the window cache and predictor act per token;
        the head then runs once over all positions at the end (the same logits: nothing a step
        does depends on them), and its time is counted in the last step's statistics.
        head_per_step=True runs it within each step instead, as generation does: for per-token
        latencies (flashio.bench) rather than logits."""
        with self._session():
            self.reset()
            ids = self._ids(input_ids)
            if not token_by_token:
                return self._logits(self._step(ids))
            if head_per_step:
                return torch.cat([self._logits(self._step(ids[j : j + 1])) for j in range(len(ids))])
            return self._logits(torch.cat([self._step(ids[j : j + 1]) for j in range(len(ids))]))

    # -- generation -----------------------------------------------------------------------
    def generation_config(self, max_new_tokens: int | None = None, config: GenerationConfig | None = None, *,
                          stop_at_eos: bool = True, **options: Any) -> GenerationConfig:
        """`config` (default: the artifact's generation_config.json defaults, eos ids included)
        with `options` (GenerationConfig fields; None values ignored) and max_new_tokens replaced.
        stop_at_eos=False: no eos ends the output."""
        cfg = (config or self.generation_defaults).updated(max_new_tokens=max_new_tokens, **options)
        return cfg if stop_at_eos else cfg.updated(eos_token_ids=frozenset())

    def stream(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int | None = None,
               config: GenerationConfig | None = None, *, stop_at_eos: bool = True,
               **options: Any) -> Iterator[GeneratedToken]:
        """Yield generated tokens one by one, each with the text it adds and its step's statistics.

        Options are GenerationConfig fields (temperature, top_p, top_k, min_p, repetition_penalty,
        stop, seed, max_new_tokens, eos_token_ids) over `config`, by default the artifact's
        generation_config.json; temperature 0 is greedy. Text is prompt text (tokenized with the
        tokenizer's special tokens) or token ids, e.g. a rendered chat template's."""
        cfg = self.generation_config(max_new_tokens, config, stop_at_eos=stop_at_eos, **options)
        with self._session():
            self.reset()
            ids = self._ids(prompt).tolist()
            tokenizer = self.codec.tok if self.codec is not None else None
            for t in stream_tokens(self._next_logits, ids, cfg, tokenizer=tokenizer, max_total_tokens=self.kv.max_len):
                yield GeneratedToken(t.token_id, t.text, self.stats[-1], t.finish_reason)

    def _next_logits(self, new_ids: list[int]) -> torch.Tensor:
        hidden = self._step(torch.tensor(new_ids, dtype=torch.long))  # [T, D]
        return self._logits(hidden[-1:])[0].cpu()  # [V]: the head on the last position only

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int | None = None,
                 config: GenerationConfig | None = None, **options: Any) -> Generation:
        """The whole generation at once (see stream for the options)."""
        toks = list(self.stream(prompt, max_new_tokens, config, **options))
        return Generation.of_steps("".join(t.text for t in toks), [t.token_id for t in toks], self.stats,
                                   toks[-1].finish_reason if toks else None)

    @property
    def staging_bytes(self) -> int:
        """Pinned host memory of the CUDA transfer path (0 on the CPU): outside dram_budget."""
        return self.transfer.host_bytes()

    def memory_bytes(self) -> dict[str, int]:
        """What the runtime holds on its device, by part (the budget's terms; ffn_resident: a
        gate-resident artifact's gate rows and up sketch)."""
        return {"resident": self._resident_bytes, "predictors": self._pred_bytes,
                "ffn_resident": self._ffn_resident_bytes, "ffn_engine": self.engine.dram_bytes(),
                "kv_cache": self.kv.nbytes()}


def open_model(path: str | Path, config: FlashConfig | None = None, *, registry: str | None = None,
               active_source: ActiveSource | None = None, **overrides) -> FlashModel:
    """Open an artifact directory (or a registry reference) for inference.

    config: a FlashConfig (default: FlashConfig()); `overrides` are FlashConfig fields that
      replace its values, e.g. open_model(path, mode="dense", window=3). See FlashConfig for
      every option; an unknown keyword raises a FlashError naming the valid ones.
    registry: the registry URI that a 'name@version' reference is resolved against (a full URI
      such as s3://bucket/prefix/name@latest needs none).
    active_source: where the sparse engine gets active sets instead of its predictor (e.g.
      flashio.trace.TraceReplay); the predictor, when present, still runs for its cost.

    Nothing process-wide is changed unless config.torch_threads is set (torch's thread count).
    torch's oneDNN (bf16 CPU matmuls) caches grow with every token unless the environment bounds
    them before torch's first matmul: the `flashio` command sets ONEDNN_PRIMITIVE_CACHE_CAPACITY
    and LRU_CACHE_CAPACITY to 64 (see flashio.cli); applications should do the same (README).
    """
    if config is not None and not isinstance(config, FlashConfig):
        raise FlashError(f"config must be a FlashConfig, got {type(config).__name__}; pass options as keywords "
                         "(mode='dense') or build one with flashio.FlashConfig(...)")
    config = config or FlashConfig()
    if overrides:
        config = config.replace(**overrides)
    resolve_device(config.device)  # one clear error without CUDA, before resolving a reference
    local = Path(path)
    if not local.is_dir():
        local = _resolve_reference(str(path), registry)
    art = Artifact(local, verify=config.verify)
    return FlashModel(art, config, active_source=active_source)


def read_plan(art: Artifact, device_profile: str | Path | DeviceProfile | None, *,
              threads: int | None = None, max_gap: int | None = None) -> ReadPlan:
    """Threads and coalescing gap for reading `art`'s bundles: what is given, else the cost
    model's choice for its bundle size. The model prices reads with `device_profile`, else the
    profile flashio.costmodel.find_profile finds ($FLASHIO_DEVICE_PROFILE, then the one `flashio
    bench device` installed), else the built-in model of the developers' machine class (32
    threads and gap reads of up to 1 row for 16 KiB bundles: what its measured profile chose)."""
    profile = device_profile
    if isinstance(profile, (str, Path)):
        profile = DeviceProfile.load(profile)
    if profile is None:
        profile = find_profile()
    cm = CostModel(profile)
    row_bytes = art.manifest.row_bytes
    if threads is None:
        threads = cm.best_threads(row_bytes)
    if max_gap is None:
        max_gap = cm.best_max_gap(row_bytes, threads)
    return ReadPlan(threads, max_gap, cm)


def _resolve_reference(ref: str, registry: str | None) -> Path:
    if "://" not in ref and registry is None:
        raise FlashError(f"{ref!r} is not an artifact directory; for a registry reference pass registry=URI "
                         "or a full URI such as s3://bucket/prefix/name@latest")
    try:
        from flashio.registry import resolve_to_local
    except ModuleNotFoundError as exc:  # pragma: no cover - registry not installed in this build
        raise FlashError(f"registry references need flashio.registry: {exc}") from None
    return resolve_to_local(ref, registry=registry)
