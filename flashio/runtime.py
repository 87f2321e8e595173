"""The flashio runtime: open an artifact and run it with the FFN on flash.

    import flashio
    with flashio.open("artifacts/demo", mode="sparse", window=5, dram_budget="512MiB") as model:
        for tok in model.stream("def main():", max_new_tokens=32):
            print(tok.text, end="", flush=True)
        print(model.generate("import os", max_new_tokens=16).summary())

Per step and layer: attention with resident weights and a KV cache, then the mode's FFN engine
(see flashio.engines and flashio.sparse). Every step records bytes read and the I/O / memory / compute split.
A FlashModel is single-session: it owns one KV cache and one set of window caches, so concurrent
calls from several threads are refused with a clear error; open the artifact once per session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashio.budget import MemoryBudget
from flashio.costmodel import CostModel, DeviceProfile, profile_from_env
from flashio.device import TransferPath, resolve_device, transfer_path
from flashio.engines import ActiveSource, DenseEngine, MmapEngine, NaiveEngine, SparseOptions
from flashio.errors import FlashError, TokenizerError
from flashio.format import Artifact
from flashio.format.writer import TORCH_DTYPES
from flashio.models.base import KVCache
from flashio.predictor import PredictorWeights
from flashio.sizes import parse_size
from flashio.sparse import OracleEngine, SparseEngine
from flashio.stats import StatsRecorder, StepStats
from flashio.storage import DEFAULT_THREADS, BundleReader, LayerExtent, evict_from_page_cache
from flashio.tokenizer import TextCodec
from flashio.trace import Trace, TraceRecorder

log = logging.getLogger(__name__)

MODES = ("dense", "naive", "sparse", "oracle", "mmap")
# oneDNN, behind torch's bf16 CPU matmuls, caches a primitive (~1 MB) per matmul shape in two
# caches of 1024 entries; the attention's shapes change with every token, so at 7B scale the
# caches grew by ~5 MB per token, towards ~1 GB outside any DRAM budget. open() bounds them
# (read when oneDNN first runs) unless the user set them.
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
_CPU = torch.device("cpu")


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


@dataclass(frozen=True)
class ReadPlan:
    """How the FFN is read: chosen from the device's cost model unless given."""

    threads: int
    max_gap: int  # unneeded rows read through when coalescing neighbours
    cost_model: CostModel


class FlashModel:
    """An opened artifact. Create with `flashio.open`."""

    def __init__(self, art: Artifact, *, mode: str, window: int, dram_budget: int | None,
                 max_context: int | None, direct: bool, plan: ReadPlan,
                 compute_dtype: torch.dtype | None = None, sparse: SparseOptions | None = None,
                 active_source: ActiveSource | None = None, pinned_fraction: float = 0.0,
                 record_trace: bool = False, device: torch.device = _CPU,
                 transfer: TransferPath | None = None):
        self.artifact, self.mode, self.window, self.plan, self.device = art, mode, window, plan, device
        m = art.manifest
        self.dtype = TORCH_DTYPES[m.dtype]  # storage
        self.compute_dtype = compute_dtype or self.dtype
        self.args = art.args
        max_len = min(self.args.max_positions, max_context or self.args.max_positions)
        resident = art.load_resident(dtype=self.compute_dtype)  # private memory, sha256 checked
        for name in list(resident):  # one tensor at a time: the host copy is freed as it moves
            resident[name] = resident[name].to(device)
        self.model = art.arch.Model(self.args, resident)
        predictors = art.load_predictors() if mode == "sparse" else None
        if predictors is not None:  # private copies: the file's mapping and page cache are let go
            predictors = [p.to(self.compute_dtype, device, copy=True) for p in predictors]
            evict_from_page_cache(art.file(m.predictors_file))
        if mode == "sparse" and predictors is None and active_source is None:
            raise FlashError(f"{art.path}: mode='sparse' needs predictors and this artifact has none "
                             "(packed without the pipeline); use mode='oracle', 'dense' or 'naive', "
                             "give an active_source (a trace replay), or convert it with `flashio convert`")
        extents = [LayerExtent(L.offset_bytes, L.n_neurons, L.bundle_width * m.itemsize) for L in m.ffn_layers]
        budget = MemoryBudget.of(art, mode, self.compute_dtype, max_len, resident, predictors, pinned_fraction)
        self.capacity = budget.capacity(dram_budget)
        self._resident_bytes, self._pred_bytes = budget.resident_bytes, budget.predictor_bytes
        self.reader = BundleReader(art.file(m.ffn_file), extents, threads=plan.threads,
                                   max_gap=plan.max_gap, direct=direct, cost_model=plan.cost_model)
        if transfer is None:  # reads of one layer at most: the window's capacity, or a streamed layer
            rows = self.capacity if mode in ("sparse", "oracle") else budget.stream_rows if mode == "naive" else 0
            try:
                transfer = transfer_path(device, staging_bytes=rows * extents[0].row_bytes,
                                         index_capacity=2 * self.capacity)
            except BaseException:
                self.reader.close()
                raise
        self.transfer = transfer
        self.rec = StatsRecorder()
        self.recorder = None
        if record_trace:
            self.recorder = TraceRecorder(m.n_layers, m.ffn_layers[0].n_neurons, {
                "artifact": str(art.path), "mode": mode, "window": window,
                "ffn_sha256": m.files[m.ffn_file].sha256, "architecture": m.architecture})
        common = (art, self.reader, resident, self.rec, self.dtype)
        kw = {"compute_dtype": self.compute_dtype, "recorder": self.recorder, "transfer": transfer}
        try:
            if mode == "dense":
                self.engine = DenseEngine(*common, **kw)
            elif mode == "naive":
                self.engine = NaiveEngine(*common, pinned_fraction=pinned_fraction, **kw)
            elif mode == "mmap":
                self.engine = MmapEngine(*common, **kw)
            elif mode == "sparse":
                self.engine = SparseEngine(*common, predictors=predictors, window=window, capacity=self.capacity,
                                           source=active_source, options=sparse, **kw)
            else:
                self.engine = OracleEngine(*common, window=window, capacity=self.capacity, options=sparse, **kw)
            self.kv = KVCache(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim,
                              max_len=max_len, dtype=self.compute_dtype, device=device)
        except BaseException:  # e.g. out of device memory: give back the pinned staging and the files
            transfer.close()
            self.reader.close()
            raise
        self.codec = None
        tok = m.tokenizer
        if tok is not None:
            self.codec = TextCodec(art.tokenizer_path(), bos_token_id=tok.get("bos_token_id"),
                                   eos_token_id=tok.get("eos_token_id"), add_bos=bool(tok.get("add_bos", True)))
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
            raise FlashError(f"this model runs mode={self.mode!r} without predictors: thresholds apply to "
                             "mode='sparse' on an artifact with predictors")
        return preds

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
    @torch.inference_mode()
    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run T new tokens (one step) through the model; returns logits [T, V]."""
        if self.device.type == "cuda":  # the model's device is the current one during the step
            with torch.cuda.device(self.device):  # (not across a stream()'s yields: the caller's)
                return self._run_step(tokens)
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
            x = self.model.attention(i, x, self.kv, start)
            y = self.engine(i, self.model.ffn_input(i, x))
            x = self.model.ffn_output(i, x, y)
        logits = self.model.head(x)
        self.kv.advance(len(tokens))
        # CUDA: wait for the step's kernels (so that its total time is real); the device time of
        # the rows' copies and of the cache's moves is reported beside the host's I/O and memory time
        times = self.transfer.finish_step()
        self.rec.upload_s, self.rec.device_mem_s = times.upload_s, times.mem_s
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
        """Logits [T, V] (float32, on the model's device) for a fresh sequence. token_by_token=True
        feeds one token per step, as generation does, so the window cache and predictor act per token."""
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
                tok = _sample(logits.float().cpu(), temperature, top_p, gen)
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

    @property
    def staging_bytes(self) -> int:
        """Pinned host memory of the CUDA transfer path (0 on the CPU): outside dram_budget."""
        return self.transfer.host_bytes()

    def memory_bytes(self) -> dict[str, int]:
        """What the runtime holds on its device, by part (the budget's terms)."""
        return {"resident": self._resident_bytes, "predictors": self._pred_bytes,
                "ffn_engine": self.engine.dram_bytes(), "kv_cache": self.kv.nbytes()}


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
               dram_budget: int | str | None = None, threads: int | None = None,
               device: str | torch.device = "cpu",
               verify: bool = False, max_context: int | None = None, registry: str | None = None,
               direct: bool = True, compute_dtype: str | torch.dtype | None = None,
               device_profile: str | Path | DeviceProfile | None = None, max_gap: int | None = None,
               active_source: ActiveSource | None = None, reuse: bool = True, bundled: bool = True,
               overlap: bool = False, pinned_fraction: float = 0.0, record_trace: bool = False) -> FlashModel:
    """Open an artifact directory (or a registry reference) for inference.

    mode: 'sparse' (predictors + window cache + flash reads), 'dense', 'naive', 'oracle' or
      'mmap' (the FFN file memory-mapped and paged by the OS, for comparison).
    window: tokens a neuron stays cached after it was last predicted active.
    dram_budget: bytes (or '2GiB') for resident weights, KV cache, predictors and window caches,
      in the memory of `device` (see flashio.budget).
    device: 'cpu' (default) or 'cuda[:N]': where resident weights, KV cache, predictors and
      window caches live and the model computes; flash reads then pass through pinned host
      staging and asynchronous copies (flashio.device). One clear error without CUDA.
    threads, max_gap: flash reader threads, and unneeded rows worth reading through when
      coalescing neighbours. Default: chosen by the cost model of `device_profile` (a file from
      `flashio bench device`, or $FLASHIO_DEVICE_PROFILE); without a profile 16 and 0.
    compute_dtype: dtype of weights in DRAM and of the matmuls (default: the artifact's); e.g.
      'bfloat16' for a float16 artifact on CPUs whose fp16 matmuls are slow. Rows are converted
      once when they arrive (memory management time).
    active_source: where the sparse engine gets active sets instead of its predictor (e.g.
      flashio.trace.TraceReplay); the predictor, when present, still runs for its cost.
    reuse: False disables the window (every step loads its whole active set).
    bundled: False reads each neuron's up and down parts as separate requests (the paper's
      unbundled baseline). overlap: compute the cached rows while the missing ones are read.
    pinned_fraction: naive mode only: this fraction of every layer's rows stays in DRAM ("hybrid").
    record_trace: keep every step's active sets; `model.trace()` returns them.
    Sets ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY to 64 unless already set (see
    ONEDNN_CACHE_ENV): torch's oneDNN caches otherwise grow with every token.
    verify: check every file's sha256 first. max_context: KV cache length (default: the model's).
    """
    if mode not in MODES:
        raise FlashError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if window < 1:
        raise FlashError(f"window must be at least 1 token, got {window}")
    if not 0.0 <= pinned_fraction <= 1.0 or (pinned_fraction and mode != "naive"):
        raise FlashError(f"pinned_fraction={pinned_fraction} must be in [0, 1] and is for mode='naive' only")
    if active_source is not None and mode != "sparse":
        raise FlashError(f"active_source drives mode='sparse' only, got mode={mode!r}")
    dev = resolve_device(device)
    if dev.type != "cpu" and mode == "mmap":
        raise FlashError("mode='mmap' runs on the CPU only (the OS pages the FFN into host memory); "
                         "with device='cuda' use mode='sparse', 'naive', 'oracle' or 'dense'")
    for key, value in ONEDNN_CACHE_ENV.items():
        os.environ.setdefault(key, value)
    local = Path(path)
    if not local.is_dir():
        local = _resolve_reference(str(path), registry)
    art = Artifact(local, verify=verify)
    budget = parse_size(dram_budget) if dram_budget is not None else None
    plan = read_plan(art, device_profile, threads=threads, max_gap=max_gap)
    cdt = None
    if compute_dtype is not None:
        cdt = compute_dtype if isinstance(compute_dtype, torch.dtype) else TORCH_DTYPES.get(str(compute_dtype))
        if cdt is None:
            raise FlashError(f"compute_dtype {compute_dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    return FlashModel(art, mode=mode, window=window, dram_budget=budget, max_context=max_context,
                      direct=direct, plan=plan, compute_dtype=cdt,
                      sparse=SparseOptions(reuse=reuse, bundled=bundled, overlap=overlap),
                      active_source=active_source, pinned_fraction=pinned_fraction,
                      record_trace=record_trace, device=dev)


def read_plan(art: Artifact, device_profile: str | Path | DeviceProfile | None, *,
              threads: int | None = None, max_gap: int | None = None) -> ReadPlan:
    """Threads and coalescing gap for reading `art`'s bundles: what is given, else the measured
    profile's cost model's choice, else the defaults (16 threads, no gap reads)."""
    profile = device_profile
    if isinstance(profile, (str, Path)):
        profile = DeviceProfile.load(profile)
    if profile is None:
        profile = profile_from_env()
    cm = CostModel(profile)
    m = art.manifest
    row_bytes = m.ffn_layers[0].bundle_width * m.itemsize
    if threads is None:
        threads = cm.best_threads(row_bytes) if profile is not None else DEFAULT_THREADS
    if max_gap is None:
        max_gap = cm.best_max_gap(row_bytes, threads) if profile is not None else 0
    if threads < 1 or max_gap < 0:
        raise FlashError(f"threads={threads} must be >= 1 and max_gap={max_gap} >= 0")
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
