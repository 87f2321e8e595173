"""FFN engines, one per mode. Each computes a layer's FFN output (without the down bias, which
the architecture adds) from the FFN input, getting its weights in its own way:

- `DenseEngine`: every bundle in DRAM (the reference).
- `NaiveEngine`: each call reads the layer's whole FFN from flash (the paper's baseline).
- `SparseEngine`: predictor -> window cache -> reads of the missing bundles only (the product).
- `OracleEngine`: as sparse, but with the exact active set (for ReLU models equals dense).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from flashio.cache import WindowCache
from flashio.format import Artifact
from flashio.predictor import PredictorWeights
from flashio.stats import StatsRecorder
from flashio.storage import AlignedArena, BundleReader, ReadResult


def ffn_compute(h: torch.Tensor, rows: torch.Tensor, parts: dict[str, slice],
                b_up: torch.Tensor | None, b_gate: torch.Tensor | None) -> torch.Tensor:
    """h: [T, D], rows: [n, W] bundles -> [T, D] (sum over the n neurons)."""
    pre = F.linear(h, rows[:, parts["up"]], b_up)  # [T, n]
    if "gate" in parts:
        act = F.silu(F.linear(h, rows[:, parts["gate"]], b_gate)) * pre
    else:
        act = F.relu(pre)
    return act @ rows[:, parts["down"]]  # [T, D]


class _Engine:
    def __init__(self, art: Artifact, reader: BundleReader, resident: dict[str, torch.Tensor],
                 rec: StatsRecorder, dtype: torch.dtype):
        m = art.manifest
        self.reader, self.rec, self.dtype = reader, rec, dtype
        self.parts = {name: slice(a, b) for name, a, b in m.bundle_layout}
        self.layers = m.ffn_layers
        self.b_up = [resident.get(f"layers.{i}.ffn.up_bias") for i in range(m.n_layers)]
        self.b_gate = [resident.get(f"layers.{i}.ffn.gate_bias") for i in range(m.n_layers)]
        self.arenas: list[AlignedArena] = []

    def _account(self, r: ReadResult) -> None:
        self.rec.bytes_read += r.bytes_read
        self.rec.reads += r.reads
        self.rec.io_s += r.elapsed_s
        if not r.direct:
            self.rec.buffered_reads += r.reads

    def _arena_tensor(self, rows: int, width: int) -> torch.Tensor:
        arena = AlignedArena(max(rows * width * self.dtype.itemsize, 1))
        self.arenas.append(arena)
        return arena.tensor(self.dtype, (rows, width))

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
        self.weights = []
        for i, L in enumerate(self.layers):
            t = self._arena_tensor(L.n_neurons, L.bundle_width)
            self.reader.read_layer(i, t)
            self.weights.append(t)

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        self.rec.neurons_active += self.layers[i].n_neurons
        return ffn_compute(h, self.weights[i], self.parts, self.b_up[i], self.b_gate[i])


class NaiveEngine(_Engine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        rows = max(L.n_neurons for L in self.layers)
        self.buf = self._arena_tensor(rows, self.layers[0].bundle_width)

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        L = self.layers[i]
        rows = self.buf[: L.n_neurons]
        self._account(self.reader.read_layer(i, rows))
        self.rec.neurons_active += L.n_neurons
        self.rec.neurons_loaded += L.n_neurons
        return ffn_compute(h, rows, self.parts, self.b_up[i], self.b_gate[i])


class SparseEngine(_Engine):
    """Windowed sparse FFN: only bundles of predicted-active neurons, kept for `window` steps."""

    def __init__(self, *a, predictors: list[PredictorWeights] | None, window: int, capacity: int, **kw):
        super().__init__(*a, **kw)
        self.predictors = predictors
        self.caches = [WindowCache(self._arena_tensor(capacity, L.bundle_width), L.n_neurons, window)
                       for L in self.layers]

    def scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """[T, N] scores; a neuron is active where its score > 0."""
        p = self.predictors[i]
        return p.logits(h) - p.logit_threshold

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        cache = self.caches[i]
        s = self.scores(i, h).amax(dim=0)  # [N]: a neuron is needed if any token needs it
        ids = torch.nonzero(s > 0).flatten()
        if len(ids) > cache.capacity:  # keep the most confident ones; report the rest
            self.rec.truncated += len(ids) - cache.capacity
            ids = torch.topk(s, cache.capacity).indices.sort().values
        ids_np = ids.numpy().astype(np.int64, copy=False)
        t0 = time.perf_counter()
        up = cache.update(ids_np)
        self.rec.mem_s += time.perf_counter() - t0
        if len(up.missing):
            dest = cache.matrix[up.start : up.start + len(up.missing)]
            try:
                self._account(self.reader.read_rows(i, up.missing, dest))
            except BaseException:
                cache.reset()  # rows were reserved for bundles that never arrived
                raise
        n = cache.n_used
        self.rec.neurons_active += len(ids_np)
        self.rec.neurons_loaded += len(up.missing)
        self.rec.cache_hits += up.hits
        self.rec.cache_rows += n
        idx = torch.from_numpy(cache.neurons)
        b_up = None if self.b_up[i] is None else self.b_up[i][idx]
        b_gate = None if self.b_gate[i] is None else self.b_gate[i][idx]
        return ffn_compute(h, cache.matrix[:n], self.parts, b_up, b_gate)

    def reset(self) -> None:
        for c in self.caches:
            c.reset()


class OracleEngine(SparseEngine):
    """The exact active set, from up (and gate) projections kept in DRAM: tests the sparse path
    with a perfect predictor. For ReLU models the output equals dense."""

    def __init__(self, *a, **kw):
        super().__init__(*a, predictors=None, **kw)
        key = "gate" if "gate" in self.parts else "up"
        self.key_w = []
        for i, L in enumerate(self.layers):
            t = torch.empty(L.n_neurons, L.bundle_width, dtype=self.dtype)
            self.reader.read_layer(i, t)
            self.key_w.append(t[:, self.parts[key]].clone())  # [N, D]

    def scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        L = self.layers[i]
        if "gate" in self.parts:
            return F.silu(F.linear(h, self.key_w[i], self.b_gate[i])).abs() - L.active_threshold
        return F.linear(h, self.key_w[i], self.b_up[i])  # ReLU: active where > 0
