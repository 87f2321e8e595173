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
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashio.costmodel import CostModel, DeviceProfile, profile_from_env
from flashio.errors import BudgetError, ChecksumError, FlashError, FormatError, TokenizerError
from flashio.ffn import (
    ActiveSource,
    DenseEngine,
    MmapEngine,
    NaiveEngine,
    OracleEngine,
    SparseEngine,
    SparseOptions,
    convert_rows,
    one_thread,
)
from flashio.format import Artifact
from flashio.format.ffnfile import read_safetensors_header
from flashio.format.writer import TORCH_DTYPES
from flashio.models.base import KVCache
from flashio.predictor import PredictorWeights
from flashio.sizes import format_size, parse_size
from flashio.stats import StatsRecorder, StepStats
from flashio.storage import (
    DEFAULT_THREADS,
    AlignedArena,
    BundleReader,
    LayerExtent,
    evict_from_page_cache,
)
from flashio.tokenizer import TextCodec
from flashio.trace import Trace, TraceRecorder

log = logging.getLogger(__name__)

MODES = ("dense", "naive", "sparse", "oracle", "mmap")
# oneDNN, behind torch's bf16 CPU matmuls, caches a primitive (~1 MB) per matmul shape in two
# caches of 1024 entries; the attention's shapes change with every token, so at 7B scale the
# caches grew by ~5 MB per token, towards ~1 GB outside any DRAM budget. open() bounds them
# (read when oneDNN first runs) unless the user set them.
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
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
                 record_trace: bool = False):
        self.artifact, self.mode, self.window, self.plan = art, mode, window, plan
        m = art.manifest
        self.dtype = TORCH_DTYPES[m.dtype]  # storage
        self.compute_dtype = compute_dtype or self.dtype
        self.args = art.args
        max_len = min(self.args.max_positions, max_context or self.args.max_positions)
        resident = load_resident(art, self.compute_dtype)
        self.model = art.arch.Model(self.args, resident)
        predictors = art.load_predictors() if mode == "sparse" else None
        if predictors is not None:  # private copies: the file's mapping and page cache are let go
            predictors = [p.to(self.compute_dtype) if self.compute_dtype != self.dtype else
                          PredictorWeights(p.A.clone(), p.B.clone(), p.bias.clone(), p.threshold)
                          for p in predictors]
            evict_from_page_cache(art.file(m.predictors_file))
        if mode == "sparse" and predictors is None and active_source is None:
            raise FlashError(f"{art.path}: mode='sparse' needs predictors and this artifact has none "
                             "(packed without the pipeline); use mode='oracle', 'dense' or 'naive', "
                             "give an active_source (a trace replay), or convert it with `flashio convert`")
        extents = [LayerExtent(L.offset_bytes, L.n_neurons, L.bundle_width * m.itemsize) for L in m.ffn_layers]
        n_neurons = m.ffn_layers[0].n_neurons
        c_item = self.compute_dtype.itemsize
        row_bytes = m.ffn_layers[0].bundle_width * c_item  # a cached row, in the compute dtype
        kv_bytes = 2 * self.args.n_layers * max_len * self.args.n_kv_heads * self.args.head_dim * c_item
        resident_bytes = sum(t.numel() * t.element_size() for t in resident.values())
        pred_bytes = sum(p.A.numel() + p.B.numel() + p.bias.numel() for p in predictors or []) * c_item
        fixed = resident_bytes + pred_bytes + kv_bytes
        if mode == "oracle":
            fixed += m.n_layers * n_neurons * (row_bytes // len(m.bundle_layout))
        staged = self.compute_dtype != self.dtype and mode in ("sparse", "oracle")
        # a cached row in every layer, + one row of the shared move scratch, + one staging row
        per_row = (m.n_layers + 1) * row_bytes + (extents[0].row_bytes if staged else 0)
        ffn_bytes = sum(e.n_rows for e in extents) * row_bytes
        pinned_bytes = sum(round(pinned_fraction * e.n_rows) for e in extents) * row_bytes
        stream = max(e.n_rows - round(pinned_fraction * e.n_rows) for e in extents) * extents[0].row_bytes
        capacity = n_neurons
        if dram_budget is not None:
            need = {"dense": fixed + ffn_bytes, "naive": fixed + pinned_bytes + stream, "mmap": fixed}
            min_rows = max(1, math.ceil(MIN_CACHE_FRACTION * n_neurons))
            need["sparse"] = need["oracle"] = fixed + min_rows * per_row
            if dram_budget < need[mode]:
                raise BudgetError(
                    f"dram_budget {format_size(dram_budget)} is too small for mode {mode!r}: it needs at "
                    f"least {format_size(need[mode])} (resident {format_size(resident_bytes)}, KV cache for "
                    f"{max_len} tokens {format_size(kv_bytes)}, predictors {format_size(pred_bytes)}, "
                    f"FFN {format_size(need[mode] - fixed)}); raise the budget or lower max_context")
            if mode in ("sparse", "oracle"):
                capacity = min(n_neurons, (dram_budget - fixed) // per_row)
        self.capacity = capacity
        self._resident_bytes, self._pred_bytes = resident_bytes, pred_bytes
        self.reader = BundleReader(art.file(m.ffn_file), extents, threads=plan.threads,
                                   max_gap=plan.max_gap, direct=direct, cost_model=plan.cost_model)
        self.rec = StatsRecorder()
        self.recorder = None
        if record_trace:
            self.recorder = TraceRecorder(m.n_layers, n_neurons, {
                "artifact": str(art.path), "mode": mode, "window": window,
                "ffn_sha256": m.files[m.ffn_file].sha256, "architecture": m.architecture})
        common = (art, self.reader, resident, self.rec, self.dtype)
        kw = {"compute_dtype": self.compute_dtype, "recorder": self.recorder}
        if mode == "dense":
            self.engine = DenseEngine(*common, **kw)
        elif mode == "naive":
            self.engine = NaiveEngine(*common, pinned_fraction=pinned_fraction, **kw)
        elif mode == "mmap":
            self.engine = MmapEngine(*common, **kw)
        elif mode == "sparse":
            self.engine = SparseEngine(*common, predictors=predictors, window=window, capacity=capacity,
                                       source=active_source, options=sparse, **kw)
        else:
            self.engine = OracleEngine(*common, window=window, capacity=capacity, options=sparse, **kw)
        self.kv = KVCache(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim,
                          max_len=max_len, dtype=self.compute_dtype)
        self.codec = None
        tok = m.tokenizer
        if tok is not None:
            self.codec = TextCodec(art.tokenizer_path(), bos_token_id=tok.get("bos_token_id"),
                                   eos_token_id=tok.get("eos_token_id"), add_bos=bool(tok.get("add_bos", True)))
        self.stats: list[StepStats] = []
        self._lock = threading.Lock()

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
            self.reader.check_unchanged()
            yield
        finally:
            self._lock.release()

    # -- the forward pass -----------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run T new tokens (one step) through the model; returns logits [T, V]."""
        t0 = time.perf_counter()
        self.rec.clear()
        self.engine.begin_step()
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
        """What the runtime holds in DRAM, by part (the budget's terms)."""
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
               dram_budget: int | str | None = None, threads: int | None = None, device: str = "cpu",
               verify: bool = False, max_context: int | None = None, registry: str | None = None,
               direct: bool = True, compute_dtype: str | torch.dtype | None = None,
               device_profile: str | Path | DeviceProfile | None = None, max_gap: int | None = None,
               active_source: ActiveSource | None = None, reuse: bool = True, bundled: bool = True,
               overlap: bool = False, pinned_fraction: float = 0.0, record_trace: bool = False) -> FlashModel:
    """Open an artifact directory (or a registry reference) for inference.

    mode: 'sparse' (predictors + window cache + flash reads), 'dense', 'naive', 'oracle' or
      'mmap' (the FFN file memory-mapped and paged by the OS, for comparison).
    window: tokens a neuron stays cached after it was last predicted active.
    dram_budget: bytes (or '2GiB') for resident weights, KV cache, predictors and window caches.
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
    if device != "cpu":
        if not torch.cuda.is_available():
            raise FlashError(f"device={device!r} requested but CUDA is not available on this machine; use device='cpu'")
        raise FlashError(f"device={device!r} is not supported yet by this flashio build; use device='cpu'")
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
                      record_trace=record_trace)


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


_STAGING_BYTES = 64 << 20  # load_resident's conversion buffer
_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def load_resident(art: Artifact, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The resident weights in private memory, floating tensors in `dtype`; the file's sha256 is
    checked against the manifest on the way (ChecksumError), in the same single pass.

    Read with plain preads in file order, each tensor's pages dropped from the page cache once
    copied: the weights then live in DRAM once, as the budget counts them (a memory-mapped file
    is page cache that the kernel may evict and re-read at any time, and mapped pages are what a
    memory-limited cgroup reclaims worst). Converted tensors go through one reusable staging
    arena, so no large temporary is ever freed to the allocator (which keeps freed blocks below
    its mmap threshold: hundreds of MB at 7B scale).
    """
    name_in_art = art.manifest.resident_file
    path = art.file(name_in_art)
    out: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    with open(path, "rb") as f, AlignedArena(_STAGING_BYTES) as arena:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        infos = read_safetensors_header(f, size, str(path))
        staging = arena.memoryview
        pos = 0  # bytes of the file hashed so far

        def skip_to(offset: int) -> None:  # hash what lies between tensors (header, padding)
            nonlocal pos
            while pos < offset:
                k = min(offset - pos, len(staging))
                _pread_full(fd, staging[:k], pos, path, "(header)")
                digest.update(staging[:k])
                pos += k

        for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):
            if info.dtype not in _ST_TORCH:
                raise FormatError(f"{path}: tensor {name!r} has dtype {info.dtype}, not a weight dtype")
            skip_to(info.start)
            src_dtype = _ST_TORCH[info.dtype]
            target = dtype if src_dtype.is_floating_point else src_dtype
            t = torch.empty(info.shape, dtype=target)
            n = info.end - info.start
            if n and target == src_dtype:
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                _pread_full(fd, view, info.start, path, name)
                digest.update(view)
            elif n:  # row chunks: read into staging, convert into place
                width = info.shape[-1] if info.shape else 1
                flat = t.view(-1, width)
                row_bytes = width * src_dtype.itemsize
                step = max(1, _STAGING_BYTES // row_bytes)
                scratch = torch.empty(min(128, step), width)
                for a in range(0, flat.shape[0], step):
                    k = min(step, flat.shape[0] - a)
                    chunk = staging[: k * row_bytes]
                    _pread_full(fd, chunk, info.start + a * row_bytes, path, name)
                    digest.update(chunk)
                    src = torch.frombuffer(chunk, dtype=src_dtype).view(k, width)
                    with one_thread():
                        convert_rows(flat[a : a + k], src, scratch)
                    del src
            pos = info.end
            if n:
                os.posix_fadvise(fd, info.start, n, os.POSIX_FADV_DONTNEED)
            out[name] = t
        skip_to(size)
    want = art.manifest.files[name_in_art].sha256
    if digest.hexdigest() != want:
        raise ChecksumError(f"{path}: sha256 is {digest.hexdigest()}, the manifest says {want}; "
                            "the file is corrupt or was modified")
    return out


def _pread_full(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise FormatError(f"{path}: the file ends inside tensor {name!r} (truncated?)")
        done += got


def _resolve_reference(ref: str, registry: str | None) -> Path:
    if "://" not in ref and registry is None:
        raise FlashError(f"{ref!r} is not an artifact directory; for a registry reference pass registry=URI "
                         "or a full URI such as s3://bucket/prefix/name@latest")
    try:
        from flashio.registry import resolve_to_local
    except ModuleNotFoundError as exc:  # pragma: no cover - registry not installed in this build
        raise FlashError(f"registry references need flashio.registry: {exc}") from None
    return resolve_to_local(ref, registry=registry)
