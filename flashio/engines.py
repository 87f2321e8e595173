"""FFN engines, one per mode. Each computes a layer's FFN output (without the down bias, which
the architecture adds) from the FFN input, getting its weights in its own way:

- `DenseEngine`: every bundle in memory (the reference).
- `NaiveEngine`: each call reads the layer's whole FFN from flash (the paper's baseline); with
  `pinned_fraction` the first rows of every layer stay in memory ("hybrid") and only the rest is read.
- `SparseEngine` (flashio.sparse): active set -> window cache -> reads of the missing bundles only.
- `GateEngine`, `OracleEngine` (flashio.exact): as sparse, with the active set computed exactly
  (the resident gate of a gate-resident artifact; the oracles: for ReLU models equal to dense).
- `MmapEngine`: the FFN file memory-mapped and paged in by the OS (as llama.cpp does); CPU only.

Rows kept across tokens (window cache, pinned rows, dense weights) are held in the compute dtype
on the model's device, converted once when they arrive (counted as memory management); rows
streamed for one use are computed in the storage dtype. Quantized rows (flashio.quant) are kept
as stored, codes and scales, and dequantized a chunk at a time inside the product. Flash reads land in host memory given by
the device's transfer path (flashio.device): on the CPU that is the destination rows themselves,
on CUDA pinned staging buffers that are then copied to the device asynchronously.
"""

from __future__ import annotations

import contextlib
import mmap
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from flashio.arena import private_tensor
from flashio.config import FlashConfig
from flashio.device import HostTransfer, TransferPath
from flashio.dtypes import torch_dtype
from flashio.ffn import CONVERT_ROWS, convert_rows, ffn_compute
from flashio.format import Artifact, Manifest
from flashio.models.base import ACTIVATIONS
from flashio.predictor import PredictorWeights
from flashio.quant import RowScratch, dequantize_rows, linear, quant_ffn_compute
from flashio.stats import StatsRecorder
from flashio.storage import AlignedArena, BundleReader, ReadResult
from flashio.trace import TraceRecorder


@dataclass(frozen=True)
class SparseOptions:
    """How the sparse engine loads what it needs (each option is one of the paper's steps)."""

    reuse: bool = True  # window cache; False: every step loads its whole active set ("+predictor")
    bundled: bool = True  # False: up and down parts of a neuron read as two requests ("unbundled")
    overlap: bool = False  # start the reads, compute the cached rows while they fly
    retain: bool = False  # rows that left the window stay while the cache has room (WindowCache)
    compute: str = "window"  # the FFN on the window's rows, or "active": the step's active set (FlashConfig.compute)
    lookahead: bool = False  # reads started before the attention (FlashConfig.lookahead)

    @classmethod
    def of(cls, config: FlashConfig) -> SparseOptions:
        return cls(reuse=config.reuse, bundled=config.bundled, overlap=config.overlap, retain=config.retain,
                   compute=config.compute, lookahead=config.lookahead)


class ActiveSource(Protocol):
    """Where the sparse engine gets each layer's active set instead of its predictor. With
    FlashConfig.lookahead the engine also asks for a guess before the attention: the source's
    `lookahead(layer, h)` where it has one (e.g. TraceReplay), else `active` on that earlier input."""

    def begin_step(self) -> None: ...

    def reset(self) -> None: ...

    def active(self, layer: int, h: torch.Tensor) -> np.ndarray: ...  # sorted unique row ids


@dataclass(frozen=True)
class EngineContext:
    """What every engine is built from: the artifact, its reader, the resident tensors (for the
    FFN biases), the step's statistics, the dtype of the rows it keeps, the trace recorder and
    the transfer path to the model's device."""

    art: Artifact
    reader: BundleReader
    resident: dict[str, torch.Tensor]
    rec: StatsRecorder
    compute_dtype: torch.dtype
    recorder: TraceRecorder | None = None
    transfer: TransferPath = field(default_factory=HostTransfer)


@dataclass(frozen=True)
class EngineMemory:
    """What an engine holds on the model's device, in bytes: the terms of flashio.budget."""

    fixed_bytes: int = 0  # whatever the budget: dense's FFN, naive's pinned rows and streamed layer...
    row_bytes: int = 0  # per window-cache row: that row in every layer (+ shared scratch rows)
    staging_row_bytes: int = 0  # per window-cache row: where a read row lands before its dtype conversion
    min_rows: int = 0  # the smallest window cache the engine runs with
    stream_rows: int = 0  # rows of one layer read per call (the transfer path's staging), windowless engines

    @property
    def per_row_bytes(self) -> int:
        return self.row_bytes + self.staging_row_bytes

    def transfer_rows(self, capacity: int) -> int:
        """Rows of one layer read at once, at most: the window's capacity, or a streamed layer."""
        return capacity if self.row_bytes else self.stream_rows


def kept_row_bytes(manifest: Manifest, compute_dtype: torch.dtype) -> int:
    """Bytes of one bundle row kept in memory: as stored when quantized, else in the compute dtype."""
    if manifest.quant is not None:
        return manifest.row_bytes
    return manifest.ffn_layers[0].bundle_width * compute_dtype.itemsize


class Engine:
    """What the engines share: the artifact's layout, the reader, the biases, the transfer path
    to the model's device and the buffers the engine owns (released by close()).

    Each engine class states what it needs (`memory`, `needs_predictors`) and how it is built
    from a FlashConfig (`create`), so that the runtime picks it from a table (flashio.modes)."""

    needs_predictors = False  # the artifact's predictors are loaded for this engine
    lookahead = False  # the runtime may call prefetch(i, ffn_input(i, x)) before layer i's attention

    @classmethod
    def memory(cls, manifest: Manifest, compute_dtype: torch.dtype, *, pinned_fraction: float = 0.0) -> EngineMemory:
        """What the engine holds for `manifest` in `compute_dtype` (see EngineMemory)."""
        return EngineMemory()

    @classmethod
    def create(cls, ctx: EngineContext, config: FlashConfig, *, capacity: int,
               predictors: list[PredictorWeights] | None, source: ActiveSource | None) -> Engine:
        """The engine for `config`, with a window cache of `capacity` rows per layer where it has one."""
        return cls(ctx)

    def __init__(self, ctx: EngineContext):
        m = ctx.art.manifest
        self.art, self.reader, self.rec = ctx.art, ctx.reader, ctx.rec
        self.quant = m.quant  # flashio.quant.RowQuant: rows of uint8 codes + scales; None: float rows
        self.dtype = torch.uint8 if self.quant is not None else torch_dtype(m.dtype)  # storage of a row
        self.compute_dtype = ctx.compute_dtype
        self.rows_dtype = self.dtype if self.quant is not None else self.compute_dtype  # of the rows kept
        self.recorder = ctx.recorder
        self.transfer = ctx.transfer
        self.device = self.transfer.device
        self.parts = {name: slice(a, b) for name, a, b in m.bundle_layout}
        self.activation = m.activation  # of the gate (gated) or up part: ffn_compute's
        self.layers = m.ffn_layers
        self.b_up = [ctx.resident.get(f"layers.{i}.ffn.up_bias") for i in range(m.n_layers)]
        self.b_gate = [ctx.resident.get(f"layers.{i}.ffn.gate_bias") for i in range(m.n_layers)]
        # gate-resident artifacts (flashio.exact): each layer's gate rows [N, D], stored order, in DRAM
        self.gate_w = [ctx.resident[L.gate_tensor] for L in self.layers] if m.gate_resident else None
        self.arenas: list[AlignedArena] = []  # host buffers (CPU)
        self.owned: list[torch.Tensor] = []  # other buffers: on a CUDA device, or converted rows
        self._scratch = torch.empty(CONVERT_ROWS, self.layers[0].bundle_width, dtype=torch.float32)
        self._chunk = torch.empty(CONVERT_ROWS, self.layers[0].bundle_width, dtype=self.rows_dtype)
        self.qscratch = RowScratch(self.quant, self.device) if self.quant is not None else None

    def gate_act(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        """[T, N] act(x @ gate.T + b_gate) from layer i's resident gate rows (the first phase of a
        gate-resident FFN); None when the bundles hold the gate."""
        if self.gate_w is None:
            return None
        return ACTIVATIONS[self.activation](linear(h.to(self.compute_dtype), self.gate_w[i], self.b_gate[i]))

    def rows_ffn(self, h: torch.Tensor, rows: torch.Tensor, b_up: torch.Tensor | None, b_gate: torch.Tensor | None,
                 zero: torch.Tensor | None = None, n_valid: int | None = None, *, gate_act: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """flashio.ffn.ffn_compute on kept rows, float or quantized."""
        if self.quant is not None:
            return quant_ffn_compute(h, rows, self.quant, self.qscratch, b_up, b_gate, zero, n_valid,
                                     ACTIVATIONS[self.activation], gate_act=gate_act, mask=mask)
        return ffn_compute(h, rows, self.parts, b_up, b_gate, zero, n_valid, self.activation,
                           gate_act=gate_act, mask=mask)

    def part_rows(self, rows: torch.Tensor, part: str) -> torch.Tensor:
        """[R, D] the `part` (up, gate, down) of bundle rows, in the compute dtype (a copy)."""
        if self.quant is not None:
            return dequantize_rows(rows, self.quant, part).to(self.compute_dtype)
        return rows[:, self.parts[part]].clone()

    def _ffn(self, i: int, h: torch.Tensor, rows: torch.Tensor, lo: int, hi: int,
             gate: torch.Tensor | None) -> torch.Tensor:
        """The FFN over `rows`, which hold the layer's neurons [lo, hi) (`gate`: [T, N] or None)."""
        b_up, b_gate = self.b_up[i], self.b_gate[i]
        return self.rows_ffn(h, rows, None if b_up is None else b_up[lo:hi],
                             None if b_gate is None else b_gate[lo:hi], gate_act=None if gate is None else gate[:, lo:hi])

    def _account(self, r: ReadResult, waited_s: float | None = None) -> None:
        self.rec.bytes_read += r.bytes_read
        self.rec.reads += r.reads
        self.rec.io_s += r.elapsed_s if waited_s is None else waited_s
        self.rec.io_busy_s += r.elapsed_s
        self.rec.io_pred_s += r.predicted_s
        if not r.direct:
            self.rec.buffered_reads += r.reads

    def _arena_tensor(self, rows: int, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        arena = AlignedArena(max(rows * width * dtype.itemsize, 1))
        self.arenas.append(arena)
        return arena.tensor(dtype, (rows, width))

    def _buffer(self, rows: int, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows that live as long as the engine, on its device: page-aligned host memory when
        reads land in place (the reader writes them with O_DIRECT), else device memory filled
        through the transfer path's staging."""
        if self.transfer.in_place:
            return self._arena_tensor(rows, width, dtype)
        # zeroed: rows past the used ones pad the FFN's matmuls and must be finite
        t = torch.zeros(rows, width, dtype=dtype or self.dtype, device=self.device)
        self.owned.append(t)
        return t

    def _load_rows(self, i: int, start: int, stop: int, *, keep: bool = True) -> torch.Tensor:
        """Rows [start, stop) of layer i read once onto the device, in the compute dtype
        (keep=False: a temporary, not a buffer that lives as long as the engine)."""
        width = self.layers[i].bundle_width
        n = stop - start
        if self.transfer.in_place and self.rows_dtype == self.dtype:
            t = self._arena_tensor(n, width) if keep else torch.empty(n, width, dtype=self.dtype)
            self.reader.read_layer(i, t, (start, stop))
            return t
        if keep and self.device.type == "cpu":
            out = private_tensor((n, width), self.rows_dtype)  # huge pages: read every token
        else:
            out = torch.empty(n, width, dtype=self.rows_dtype, device=self.device)
        if keep:
            self.owned.append(out)
        step = max(1, (64 << 20) // (width * self.dtype.itemsize))  # 64 MiB staging at a time
        # on a device: rows go up in the storage dtype (a blocking copy: the staging is reused
        # next) and are converted there, not by the CPU
        landing = None
        if not self.transfer.in_place and self.rows_dtype != self.dtype:
            landing = torch.empty(min(n, step), width, dtype=self.dtype, device=self.device)
        with AlignedArena(min(n, step) * width * self.dtype.itemsize) as arena:
            for a in range(start, stop, step):
                b = min(stop, a + step)
                stage = arena.tensor(self.dtype, (b - a, width))
                self.reader.read_layer(i, stage, (a, b))
                dst = out[a - start : b - start]
                if self.transfer.in_place:
                    convert_rows(dst, stage, self._scratch)
                elif landing is None:
                    dst.copy_(stage)
                else:
                    landing[: b - a].copy_(stage)
                    dst.copy_(landing[: b - a])
                del stage
        return out

    def guesses(self, i: int) -> bool:
        """Whether the runtime calls prefetch(i, ...) before layer i's attention this step."""
        return self.lookahead

    def prefetch(self, i: int, h: torch.Tensor) -> None:
        """Before layer i's attention, where `guesses(i)`: h is the layer's input through its FFN's norm."""

    def begin_step(self) -> None:
        if self.recorder is not None:
            self.recorder.begin_step()

    def reset(self) -> None:
        pass

    def preload(self) -> int:
        """Read at open what the engine would otherwise read step by step, where its memory holds
        all of it (FlashConfig.preload); returns the bytes read (0: nothing to preload)."""
        return 0

    def dram_bytes(self) -> int:
        """Memory the engine holds on the model's device (host arenas on the CPU)."""
        return sum(a.nbytes for a in self.arenas) + sum(t.numel() * t.element_size() for t in self.owned)

    def close(self) -> None:
        for a in self.arenas:
            a.close()
        self.arenas.clear()
        self.owned.clear()


class DenseEngine(Engine):
    """Every bundle in memory, in the compute dtype (quantized: as stored)."""

    @classmethod
    def memory(cls, manifest: Manifest, compute_dtype: torch.dtype, *, pinned_fraction: float = 0.0) -> EngineMemory:
        row_bytes = kept_row_bytes(manifest, compute_dtype)
        return EngineMemory(fixed_bytes=sum(L.n_neurons for L in manifest.ffn_layers) * row_bytes)

    def __init__(self, ctx: EngineContext):
        super().__init__(ctx)
        self.weights = [self._load_rows(i, 0, L.n_neurons) for i, L in enumerate(self.layers)]

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        self.rec.neurons_active += self.layers[i].n_neurons
        return self._ffn(i, h, self.weights[i], 0, self.layers[i].n_neurons, self.gate_act(i, h))


class NaiveEngine(Engine):
    """Reads each layer's FFN every call; `pinned_fraction` of its rows (the first ones) are
    loaded once and kept in DRAM instead (the paper's "hybrid" row)."""

    @classmethod
    def memory(cls, manifest: Manifest, compute_dtype: torch.dtype, *, pinned_fraction: float = 0.0) -> EngineMemory:
        layers = manifest.ffn_layers
        pinned = [round(pinned_fraction * L.n_neurons) for L in layers]
        stream_rows = max(L.n_neurons - k for L, k in zip(layers, pinned))
        return EngineMemory(fixed_bytes=sum(pinned) * kept_row_bytes(manifest, compute_dtype)  # pinned: compute dtype
                            + stream_rows * manifest.row_bytes,  # one streamed layer: storage dtype
                            stream_rows=stream_rows)

    @classmethod
    def create(cls, ctx: EngineContext, config: FlashConfig, *, capacity: int,
               predictors: list[PredictorWeights] | None, source: ActiveSource | None) -> Engine:
        return cls(ctx, pinned_fraction=config.pinned_fraction)

    def __init__(self, ctx: EngineContext, *, pinned_fraction: float = 0.0):
        super().__init__(ctx)
        self.pinned_rows = [round(pinned_fraction * L.n_neurons) for L in self.layers]
        self.pinned = [self._load_rows(i, 0, k) if k else None for i, k in enumerate(self.pinned_rows)]
        rows = max(L.n_neurons - k for L, k in zip(self.layers, self.pinned_rows))
        self.buf = self._buffer(max(rows, 1), self.layers[0].bundle_width)

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        L, k = self.layers[i], self.pinned_rows[i]
        rows = self.buf[: L.n_neurons - k]
        if len(rows):
            host, slot = self.transfer.staging(len(rows), rows)
            self._account(self.reader.read_layer(i, host, (k, L.n_neurons)))
            self.transfer.upload(slot, host, rows)
            self.transfer.before_compute()
        self.rec.neurons_active += L.n_neurons
        self.rec.neurons_loaded += L.n_neurons - k
        gate = self.gate_act(i, h)
        y = self._ffn(i, h, rows, k, L.n_neurons, gate)
        if k:
            y = y + self._ffn(i, h, self.pinned[i], 0, k, gate)
        return y


class MmapEngine(Engine):
    """The whole FFN file memory-mapped; the OS pages weights in on first touch (with its
    readahead) and out under memory pressure. Reads cannot be timed apart from the compute that
    faults them in: the step's I/O time is 0 and bytes_read comes from /proc/self/io."""

    def __init__(self, ctx: EngineContext):
        super().__init__(ctx)
        self._file = open(self.reader.path, "rb")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        self.weights = []
        for L in self.layers:
            t = torch.frombuffer(self._map, dtype=self.dtype, count=L.n_neurons * L.bundle_width,
                                 offset=L.offset_bytes)
            self.weights.append(t.view(L.n_neurons, L.bundle_width))

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        before = _proc_read_bytes()
        y = self._ffn(i, h, self.weights[i], 0, self.layers[i].n_neurons, self.gate_act(i, h))
        self.rec.bytes_read += _proc_read_bytes() - before
        self.rec.neurons_active += self.layers[i].n_neurons
        return y

    def dram_bytes(self) -> int:
        return 0  # page cache, owned by the OS

    def close(self) -> None:
        self.weights.clear()
        with contextlib.suppress(BufferError):  # a tensor still views the mapping: unmapped when it dies
            self._map.close()
        self._file.close()
        super().close()


def _proc_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page faults included)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
