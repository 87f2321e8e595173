"""FFN engines, one per mode. Each computes a layer's FFN output (without the down bias, which
the architecture adds) from the FFN input, getting its weights in its own way:

- `DenseEngine`: every bundle in DRAM (the reference).
- `NaiveEngine`: each call reads the layer's whole FFN from flash (the paper's baseline); with
  `pinned_fraction` the first rows of every layer stay in DRAM ("hybrid") and only the rest is read.
- `SparseEngine`: active set -> window cache -> reads of the missing bundles only (the product).
  The active set comes from the layer's predictor, or from an `ActiveSource` (a trace replay).
- `OracleEngine`: as sparse, but with the exact active set (for ReLU models equals dense).
- `MmapEngine`: the FFN file memory-mapped and paged in by the OS (as llama.cpp does).

Rows kept across tokens (window cache, pinned rows, dense weights) are held in the compute dtype,
converted once when they arrive (counted as memory management); rows streamed for one use are
computed in the storage dtype.
"""

from __future__ import annotations

import contextlib
import mmap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from flashio.cache import WindowCache
from flashio.format import Artifact
from flashio.predictor import PredictorWeights
from flashio.stats import StatsRecorder
from flashio.storage import AlignedArena, BundleReader, ReadResult

_CONVERT_ROWS = 128  # rows per chunk of a dtype conversion: few ops, an fp32 scratch of a few MB
# The sparse FFN's row counts change every step; matmuls are padded to a multiple of this many
# rows, because oneDNN (torch's bf16 CPU matmul) caches a primitive of ~1 MB per shape: unpadded,
# the cache grew by ~0.6 GB in a few hundred steps.
BUCKET_ROWS = 256


def ffn_compute(h: torch.Tensor, rows: torch.Tensor, parts: dict[str, slice],
                b_up: torch.Tensor | None, b_gate: torch.Tensor | None,
                zero: torch.Tensor | None = None, n_valid: int | None = None) -> torch.Tensor:
    """h: [T, D], rows: [R, W] bundles -> [T, D] in h's dtype: the sum over the first n_valid
    rows (default all; biases have n_valid entries), except the rows listed in `zero`. Rows past
    n_valid only pad the matmuls to a fixed shape; their contents are ignored (but must be finite)."""
    n = rows.shape[0] if n_valid is None else n_valid
    x = h.to(rows.dtype)
    pre = F.linear(x, rows[:, parts["up"]])  # [T, R]
    if b_up is not None:  # streamed rows keep the storage dtype: cast the bias to theirs
        pre[:, :n] += b_up.to(rows.dtype)
    if "gate" in parts:
        gate = F.linear(x, rows[:, parts["gate"]])
        if b_gate is not None:
            gate[:, :n] += b_gate.to(rows.dtype)
        act = F.silu(gate) * pre
    else:
        act = F.relu(pre)
    if n < rows.shape[0]:
        act[:, n:] = 0
    if zero is not None and len(zero):
        act.index_fill_(1, zero, 0)
    down = rows[:, parts["down"]]  # [R, D]
    if rows.dtype == torch.float16 and act.shape[0] == 1:
        # torch's CPU fp16 `act @ down` (no-transpose GEMV) is ~10x slower than mv on down.T
        return torch.mv(down.t(), act[0]).unsqueeze(0).to(h.dtype)
    return (act @ down).to(h.dtype)  # [T, D]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on the calling thread only. For the memory-bound copies of cache management
    one core is nearly as fast as two, and on a busy 2-core machine two threads' fork/join
    barriers made them ~8x slower (73 ms vs 9 ms for one layer's conversion at 7B). torch's
    thread count is process-wide: it is restored on exit (and only the runtime's own thread calls
    torch while this holds; the reader threads run no torch ops)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def rows_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a 2-D tensor's rows (as integers of the element size: numpy has no
    bfloat16). Row gathers and scatters through numpy's fancy indexing are ~6x faster than
    torch's index_copy_ on CPU (0.19 vs 1.1 ms for 400 rows of 16 KiB)."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


def convert_rows(dst: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
    """dst[:] = src in dst's dtype, through an fp32 scratch of _CONVERT_ROWS rows: fp16 -> bf16
    in two vectorised steps is ~8x faster than torch's direct copy on CPU."""
    if dst.dtype == src.dtype:
        dst.copy_(src)
        return
    for a in range(0, src.shape[0], _CONVERT_ROWS):
        s = scratch[: min(_CONVERT_ROWS, src.shape[0] - a)]
        s.copy_(src[a : a + _CONVERT_ROWS])
        dst[a : a + _CONVERT_ROWS].copy_(s)


@dataclass(frozen=True)
class SparseOptions:
    """How the sparse engine loads what it needs (each option is one of the paper's steps)."""

    reuse: bool = True  # window cache; False: every step loads its whole active set ("+predictor")
    bundled: bool = True  # False: up and down parts of a neuron read as two requests ("unbundled")
    overlap: bool = False  # start the reads, compute the cached rows while they fly


class ActiveSource(Protocol):
    """Where the sparse engine gets each layer's active set instead of its predictor."""

    def begin_step(self) -> None: ...

    def reset(self) -> None: ...

    def active(self, layer: int, h: torch.Tensor) -> np.ndarray: ...  # sorted unique row ids


class _Engine:
    def __init__(self, art: Artifact, reader: BundleReader, resident: dict[str, torch.Tensor],
                 rec: StatsRecorder, dtype: torch.dtype, *, compute_dtype: torch.dtype | None = None,
                 recorder=None):
        m = art.manifest
        self.art, self.reader, self.rec, self.dtype = art, reader, rec, dtype
        self.compute_dtype = compute_dtype or dtype
        self.recorder = recorder  # flashio.trace.TraceRecorder or None
        self.parts = {name: slice(a, b) for name, a, b in m.bundle_layout}
        self.layers = m.ffn_layers
        self.b_up = [resident.get(f"layers.{i}.ffn.up_bias") for i in range(m.n_layers)]
        self.b_gate = [resident.get(f"layers.{i}.ffn.gate_bias") for i in range(m.n_layers)]
        self.arenas: list[AlignedArena] = []
        self._scratch = torch.empty(_CONVERT_ROWS, self.layers[0].bundle_width, dtype=torch.float32)
        self._chunk = torch.empty(_CONVERT_ROWS, self.layers[0].bundle_width, dtype=self.compute_dtype)

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

    def _load_rows(self, i: int, start: int, stop: int, *, keep: bool = True) -> torch.Tensor:
        """Rows [start, stop) of layer i read once into DRAM, in the compute dtype (keep=False:
        a temporary, not in an arena that lives as long as the engine)."""
        width = self.layers[i].bundle_width
        if self.compute_dtype == self.dtype:
            t = self._arena_tensor(stop - start, width) if keep else torch.empty(stop - start, width, dtype=self.dtype)
            self.reader.read_layer(i, t, (start, stop))
            return t
        out = torch.empty(stop - start, width, dtype=self.compute_dtype)
        step = max(1, (64 << 20) // (width * self.dtype.itemsize))  # 64 MiB staging at a time
        with AlignedArena(step * width * self.dtype.itemsize) as arena:
            for a in range(start, stop, step):
                b = min(stop, a + step)
                stage = arena.tensor(self.dtype, (b - a, width))
                self.reader.read_layer(i, stage, (a, b))
                with one_thread():
                    convert_rows(out[a - start : b - start], stage, self._scratch)
                del stage
        return out

    def begin_step(self) -> None:
        if self.recorder is not None:
            self.recorder.begin_step()

    def reset(self) -> None:
        pass

    def dram_bytes(self) -> int:
        return sum(a.nbytes for a in self.arenas)

    def close(self) -> None:
        for a in self.arenas:
            a.close()
        self.arenas.clear()


class DenseEngine(_Engine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.weights = [self._load_rows(i, 0, L.n_neurons) for i, L in enumerate(self.layers)]

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        self.rec.neurons_active += self.layers[i].n_neurons
        return ffn_compute(h, self.weights[i], self.parts, self.b_up[i], self.b_gate[i])

    def dram_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)


class NaiveEngine(_Engine):
    """Reads each layer's FFN every call; `pinned_fraction` of its rows (the first ones) are
    loaded once and kept in DRAM instead (the paper's "hybrid" row)."""

    def __init__(self, *a, pinned_fraction: float = 0.0, **kw):
        super().__init__(*a, **kw)
        self.pinned_rows = [round(pinned_fraction * L.n_neurons) for L in self.layers]
        self.pinned = [self._load_rows(i, 0, k) if k else None for i, k in enumerate(self.pinned_rows)]
        rows = max(L.n_neurons - k for L, k in zip(self.layers, self.pinned_rows))
        self.buf = self._arena_tensor(max(rows, 1), self.layers[0].bundle_width)

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        L, k = self.layers[i], self.pinned_rows[i]
        rows = self.buf[: L.n_neurons - k]
        if len(rows):
            self._account(self.reader.read_layer(i, rows, (k, L.n_neurons)))
        self.rec.neurons_active += L.n_neurons
        self.rec.neurons_loaded += L.n_neurons - k
        b_up = self.b_up[i]
        b_gate = self.b_gate[i]
        y = ffn_compute(h, rows, self.parts, None if b_up is None else b_up[k:],
                        None if b_gate is None else b_gate[k:])
        if k:
            y = y + ffn_compute(h, self.pinned[i], self.parts, None if b_up is None else b_up[:k],
                                None if b_gate is None else b_gate[:k])
        return y

    def dram_bytes(self) -> int:
        return super().dram_bytes() + sum(p.numel() * p.element_size() for p in self.pinned if p is not None)


@dataclass(frozen=True)
class FillUpdate:
    missing: np.ndarray  # sorted neuron ids to load
    dest: np.ndarray  # the row each one goes to
    hits: int
    evicted: int
    moved: int  # rows copied to keep the matrix compact


class FillingWindowCache(WindowCache):
    """A WindowCache whose arriving neurons take the rows freed in the same step.

    The paper deletes by moving the last used rows into the freed slots and appends the new
    ones (at 7B scale ~400 rows, 2 x 6.5 MB of copies per layer and token). In steady state about
    as many neurons arrive as leave, so here they simply take the freed rows; only a surplus of
    leavers is compacted. Rows in use stay compact in [:n_used], but new rows are scattered:
    the engine reads them into a staging buffer and scatters them (fused with a dtype conversion).
    """

    def update_fill(self, active: np.ndarray) -> FillUpdate:
        """As WindowCache.update (same window and capacity rules), with new rows in freed slots."""
        expired, missing = self._advance(active)
        freed = np.sort(self.slot_of[expired])
        self.slot_of[expired] = -1
        self.neuron_at[freed] = -1
        m, f = len(missing), len(freed)
        k = min(m, f)
        dest = np.empty(m, dtype=np.int64)
        dest[:k] = freed[:k]  # the lowest freed rows: never in the tail that compaction empties
        if m > f:
            dest[k:] = np.arange(self.n_used, self.n_used + m - f)
            self.n_used += m - f
        self.neuron_at[dest] = missing
        self.slot_of[missing] = dest
        moved = self._compact(freed[k:]) if f > m else 0
        return FillUpdate(missing, dest, len(active) - m, f, moved)

    def _compact(self, holes: np.ndarray) -> int:
        """Close empty rows by moving the last used rows into them; returns rows moved."""
        new_used = self.n_used - len(holes)
        inner = holes[holes < new_used]
        tail = np.arange(new_used, self.n_used)
        movers = tail[self.neuron_at[tail] >= 0]
        assert len(movers) == len(inner), (len(movers), len(inner))
        if len(inner):
            rows = rows_view(self.matrix)
            rows[inner] = rows[movers]
            moved = self.neuron_at[movers]
            self.neuron_at[inner] = moved
            self.slot_of[moved] = inner
        self.neuron_at[new_used : self.n_used] = -1
        self.n_used = new_used
        return len(inner)


class SparseEngine(_Engine):
    """Windowed sparse FFN: only bundles of active neurons, kept for `window` steps.

    The active set is the predictor's, or `source`'s when given; with both, the predictor still
    runs (its cost is part of every real step) and the source's set is used. When the cache holds
    the storage dtype, reads land straight in its rows (appended, the paper's layout); otherwise
    they land in a staging buffer and are converted into the rows freed this step.
    """

    def __init__(self, *a, predictors: list[PredictorWeights] | None, window: int, capacity: int,
                 source: ActiveSource | None = None, options: SparseOptions | None = None, **kw):
        super().__init__(*a, **kw)
        self.predictors = predictors
        self.source = source
        self.options = options = options or SparseOptions()
        self.split = 1 if options.bundled else len(self.parts)
        width = self.layers[0].bundle_width
        self.staging = None  # reads land here first when the cache holds another dtype
        cache_cls = WindowCache
        if self.compute_dtype != self.dtype:  # one for all layers: a layer's new rows <= capacity
            self.staging = self._arena_tensor(capacity, width)
            cache_cls = FillingWindowCache
        self.caches = [cache_cls(self._arena_tensor(capacity, L.bundle_width, self.compute_dtype),
                                 L.n_neurons, window) for L in self.layers]
        # one scratch for all layers (they update one at a time), sized for the worst step so
        # that no cache grows its own (32 private ones were ~0.4 GB at 7B scale); it also holds
        # converted new rows before they are scattered
        self.shared = self._arena_tensor(capacity, width, self.compute_dtype)
        for c in self.caches:
            c._scratch = self.shared

    def scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """[T, N] scores; a neuron is active where its score > 0."""
        p = self.predictors[i]
        return p.logits(h) - p.logit_threshold

    def _active(self, i: int, h: torch.Tensor, cap: int) -> np.ndarray:
        s = self.scores(i, h) if self.predictors is not None or self.source is None else None
        if self.source is not None:
            ids = self.source.active(i, h)
            if self.recorder is not None:
                mask = torch.zeros(h.shape[0], self.layers[i].n_neurons, dtype=torch.bool)
                mask[:, torch.from_numpy(ids)] = True
                self.recorder.record(i, mask)
            if len(ids) > cap:  # the source has no scores to rank by: keep the first ones
                self.rec.truncated += len(ids) - cap
                ids = ids[:cap]
            return ids
        if self.recorder is not None:
            self.recorder.record(i, s > 0)
        s = s.amax(dim=0)  # [N]: a neuron is needed if any token needs it
        ids = torch.nonzero(s > 0).flatten()
        if len(ids) > cap:  # keep the most confident ones; report the rest
            self.rec.truncated += len(ids) - cap
            ids = torch.topk(s, cap).indices.sort().values
        return ids.numpy().astype(np.int64, copy=False)

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        cache = self.caches[i]
        ids_np = self._active(i, h, cache.capacity)
        t0 = time.perf_counter()
        if not self.options.reuse:
            cache.reset()  # no window: the whole active set is loaded again
        with one_thread():
            up = cache.update(ids_np) if self.staging is None else cache.update_fill(ids_np)
        self.rec.mem_s += time.perf_counter() - t0
        m = len(up.missing)
        self.rec.neurons_active += len(ids_np)
        self.rec.neurons_loaded += m
        self.rec.cache_hits += up.hits
        self.rec.cache_rows += cache.n_used
        try:
            if self.staging is None:
                return self._in_place(i, h, cache, up.start, m, up.missing)
            return self._staged(i, h, cache, up)
        except BaseException:
            cache.reset()  # rows were reserved for bundles that never arrived
            raise

    def _read(self, i: int, ids: np.ndarray, dest: torch.Tensor):
        """Start (overlap) or do the reads; returns the pending read or None when done."""
        if not len(ids):
            return None
        if self.options.overlap:
            return self.reader.submit_rows(i, ids, dest, split=self.split)
        self._account(self.reader.read_rows(i, ids, dest, split=self.split))
        return None

    def _wait(self, pending) -> None:
        t1 = time.perf_counter()
        r = pending.result()
        self._account(r, waited_s=time.perf_counter() - t1)

    def _in_place(self, i: int, h: torch.Tensor, cache: WindowCache, start: int, m: int,
                  missing: np.ndarray) -> torch.Tensor:
        n = cache.n_used
        idx = torch.from_numpy(cache.neurons)
        pending = self._read(i, missing, cache.matrix[start : start + m])
        if pending is None:
            return self._compute(i, h, cache.matrix, 0, n, idx)
        # overlap: the cached rows are computed while the missing ones are read
        y = self._compute(i, h, cache.matrix, 0, start, idx[:start])
        self._wait(pending)
        return y + self._compute(i, h, cache.matrix, start, n, idx[start:n])

    def _staged(self, i: int, h: torch.Tensor, cache: FillingWindowCache, up: FillUpdate) -> torch.Tensor:
        n, m = cache.n_used, len(up.missing)
        idx = torch.from_numpy(cache.neurons)
        stage, fresh, dest = self.staging[:m], self.shared[:m], torch.from_numpy(up.dest)
        pending = self._read(i, up.missing, stage)
        if pending is None:
            self._scatter(cache, stage, None, dest)
            return self._compute(i, h, cache.matrix, 0, n, idx)
        # overlap: everything cached is computed while the reads fly, the arriving rows masked
        # out (their slots still hold what left); then the new rows, from the converted buffer
        y = self._compute(i, h, cache.matrix, 0, n, idx, zero=dest)
        self._wait(pending)
        self._scatter(cache, stage, fresh, dest)
        return y + self._compute(i, h, self.shared, 0, m, torch.from_numpy(up.missing))

    def _scatter(self, cache: WindowCache, stage: torch.Tensor, fresh: torch.Tensor | None,
                 dest: torch.Tensor) -> None:
        """Convert the staged rows to the compute dtype and put them in their cache rows; also
        into `fresh` (contiguous) when given, else chunk by chunk through a small buffer."""
        if not len(dest):
            return
        t0 = time.perf_counter()
        rows, dest_np = rows_view(cache.matrix), dest.numpy()
        with one_thread():
            if fresh is not None:
                convert_rows(fresh, stage, self._scratch)
                rows[dest_np] = rows_view(fresh)
            else:  # fused: each chunk converted and scattered while it is in cache
                chunk = rows_view(self._chunk)
                for a in range(0, len(dest_np), _CONVERT_ROWS):
                    k = min(_CONVERT_ROWS, len(dest_np) - a)
                    convert_rows(self._chunk[:k], stage[a : a + k], self._scratch)
                    rows[dest_np[a : a + k]] = chunk[:k]
        self.rec.mem_s += time.perf_counter() - t0

    def _compute(self, i: int, h: torch.Tensor, matrix: torch.Tensor, lo: int, hi: int, idx: torch.Tensor,
                 zero: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN over rows [lo, hi) of `matrix` (neurons idx), padded to a BUCKET_ROWS multiple."""
        if hi <= lo:
            return torch.zeros_like(h)
        stop = min(matrix.shape[0], lo + -(-(hi - lo) // BUCKET_ROWS) * BUCKET_ROWS)
        b_up = None if self.b_up[i] is None else self.b_up[i][idx]
        b_gate = None if self.b_gate[i] is None else self.b_gate[i][idx]
        return ffn_compute(h, matrix[lo:stop], self.parts, b_up, b_gate, zero=zero, n_valid=hi - lo)

    def begin_step(self) -> None:
        super().begin_step()
        if self.source is not None:
            self.source.begin_step()

    def reset(self) -> None:
        for c in self.caches:
            c.reset()
        if self.source is not None:
            self.source.reset()


class OracleEngine(SparseEngine):
    """The exact active set, from up (and gate) projections kept in DRAM: tests the sparse path
    with a perfect predictor. For ReLU models the output equals dense."""

    def __init__(self, *a, **kw):
        super().__init__(*a, predictors=None, **kw)
        key = "gate" if "gate" in self.parts else "up"
        self.key_w = [self._load_rows(i, 0, L.n_neurons, keep=False)[:, self.parts[key]].clone()  # [N, D]
                      for i, L in enumerate(self.layers)]

    def scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        L = self.layers[i]
        x = h.to(self.compute_dtype)
        if "gate" in self.parts:
            return F.silu(F.linear(x, self.key_w[i], self.b_gate[i])).abs() - L.active_threshold
        return F.linear(x, self.key_w[i], self.b_up[i])  # ReLU: active where > 0


class MmapEngine(_Engine):
    """The whole FFN file memory-mapped; the OS pages weights in on first touch (with its
    readahead) and out under memory pressure. Reads cannot be timed apart from the compute that
    faults them in: the step's I/O time is 0 and bytes_read comes from /proc/self/io."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._file = open(self.reader.path, "rb")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        self.weights = []
        for L in self.layers:
            t = torch.frombuffer(self._map, dtype=self.dtype, count=L.n_neurons * L.bundle_width,
                                 offset=L.offset_bytes)
            self.weights.append(t.view(L.n_neurons, L.bundle_width))

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        before = _proc_read_bytes()
        y = ffn_compute(h, self.weights[i], self.parts, self.b_up[i], self.b_gate[i])
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
