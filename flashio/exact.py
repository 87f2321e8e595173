"""Exact selections: each step's neurons chosen from weights held in DRAM instead of a predictor.

- `GateEngine` (mode='sparse', selection='gate'): the two-phase FFN of the paper's Llama
  discussion and of PowerInfer-2, on a gate-resident artifact (`flashio pack --gate-resident`):
  per layer the gate is computed densely from the resident gate rows, g = act(x @ gate.T) [T, N];
  a token keeps the neurons whose |g| clears the layer's threshold (manifest active_threshold),
  or its top `density` fraction by |g|; only the up + down bundles of kept neurons that the window
  cache lacks are read; y = (g[kept] * (x @ up[kept].T)) @ down[kept].
- `GateUpEngine` (selection='gate+up'): the same, ranked by contribution |act(g) * (x @ up)| with
  the up product taken against a 4-bit copy of the up rows kept in DRAM (the artifact's up
  sketch): near the contribution oracle's selection at the cost of ~0.28x the up rows in DRAM.
- `GatePredictorEngine` (selection='gate+predictor'): the same, and the low-rank predictor must
  agree (threshold), or the ranking is |g| x the predictor's probability (density): a predictor
  trained on contribution ranks the neurons whose up projection matters.
- `OracleEngine` (mode='oracle'): |act(gate)| (up for ReLU FFNs) from rows loaded into DRAM at open
  (or resident); for ReLU models at threshold 0 it equals dense.
- `ContributionOracleEngine` (mode='oracle', selection='contribution'): the top `density` fraction
  by |act(gate) * (x @ up)| computed densely: the lower bound the report draws.

Each keeps per token exactly what it selects (a [T, N] mask over the rows the window cache holds,
which include earlier tokens' neurons), so a prompt step equals token-by-token steps, and at density 1.0 (or a threshold every neuron clears)
the output equals dense. The window cache and reads are the sparse engine's (flashio.sparse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flashio import kernels
from flashio.config import FlashConfig, layer_densities
from flashio.engines import ActiveSource, Engine, EngineContext, EngineMemory, SparseOptions
from flashio.errors import FlashError
from flashio.format import Manifest
from flashio.format.manifest import UP_SKETCH_TENSOR
from flashio.models.base import ACTIVATIONS
from flashio.predictor import PredictorWeights
from flashio.quant import CHUNK_ROWS, RowScratch, quant_project
from flashio.sketch import SketchScratch, UpSketch, chunk_rows_for
from flashio.sparse import Coefficients, SparseEngine


def kept_count(density: float, n_neurons: int) -> int:
    """Neurons a token keeps at `density`: the nearest whole number, at least one."""
    return max(1, min(n_neurons, int(density * n_neurons + 0.5)))


def keep_mask(score: torch.Tensor, density: float | None, threshold: float) -> torch.Tensor:
    """score: [T, N] -> [T, N] bool: per token its kept_count(density) highest scores, or, without
    a density, the scores above `threshold`."""
    if density is None:
        return score > threshold
    k = kept_count(density, score.shape[1])
    if k >= score.shape[1]:
        return torch.ones_like(score, dtype=torch.bool)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.topk(score, k, dim=1).indices, True)


class GateEngine(SparseEngine):
    """Exact gate from the resident gate rows (see the module docstring)."""

    needs_predictors = False
    needs_gate_rows = True  # the artifact's gate rows are resident (its bundles hold up + down)

    @classmethod
    def create(cls, ctx: EngineContext, config: FlashConfig, *, capacity: int,
               predictors: list[PredictorWeights] | None, source: ActiveSource | None) -> Engine:
        if source is not None:
            raise FlashError("an active_source replaces the selection of active neurons: open with "
                             "mode='sparse', selection='predictor' to replay it")
        return cls(ctx, predictors=predictors if cls.needs_predictors else None, window=config.window,
                   capacity=capacity, options=SparseOptions.of(config),
                   densities=layer_densities(config, ctx.art.manifest))

    def __init__(self, ctx: EngineContext, *, predictors: list[PredictorWeights] | None, window: int,
                 capacity: int, options: SparseOptions | None = None,
                 densities: Sequence[float | None] | None = None):
        if self.needs_gate_rows and not ctx.art.manifest.gate_resident:
            raise FlashError(f"{ctx.art.path}: the exact gate needs the gate rows resident; this artifact keeps "
                             "them in its flash bundles (pack it with `flashio pack --gate-resident`)")
        super().__init__(ctx, predictors=predictors, window=window, capacity=capacity, options=options)
        self.densities: list[float | None] = [L.density for L in self.layers]
        if densities is not None:
            self.set_densities(densities)

    def set_densities(self, densities: Sequence[float | None]) -> None:
        """Per layer, the fraction of neurons each token keeps (None: the layer's threshold decides);
        takes effect from the next step."""
        if len(densities) != len(self.layers):
            raise FlashError(f"{len(densities)} densities given for {len(self.layers)} layers")
        bad = [d for d in densities if d is not None and not 0.0 < float(d) <= 1.0]
        if bad:
            raise FlashError(f"densities must be fractions in (0, 1] (or None), got {bad[:3]}")
        self.densities = [None if d is None else float(d) for d in densities]

    def key_act(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """[T, N] the activation of every neuron's first projection (act(gate) for gated FFNs)."""
        return self.gate_act(i, h)

    def exact_scores(self, i: int, h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """[T, N] what the selection ranks, >= 0."""
        return key.abs()

    def restrict(self, i: int, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The kept [T, N] mask, narrowed further where the selection says so."""
        return keep

    def _select(self, i: int, h: torch.Tensor, cap: int) -> tuple[np.ndarray, Coefficients]:
        key = self.key_act(i, h)
        score = self.exact_scores(i, h, key)
        keep = self.restrict(i, h, keep_mask(score, self.densities[i], self.layers[i].active_threshold))
        if self.recorder is not None:
            self.recorder.record(i, keep.cpu())
        ids = np.flatnonzero(keep.any(dim=0).cpu().numpy())  # on CUDA: the layer's one wait for the device
        if len(ids) > cap:  # the window cache cannot hold them: the highest scores stay; report the rest
            self.rec.truncated += len(ids) - cap
            ranked = score.masked_fill(~keep, -1.0).amax(dim=0)
            ids = np.sort(torch.topk(ranked, cap).indices.cpu().numpy())
        # the mask: tokens keep different sets, and the window cache also holds earlier tokens' neurons
        return ids.astype(np.int64, copy=False), Coefficients(key if self.gate_w is not None else None, keep)


class GatePredictorEngine(GateEngine):
    """The exact gate and the predictor: both must agree (threshold), or the ranking is
    |act(gate)| x sigmoid(predictor logit) (density)."""

    needs_predictors = True

    def exact_scores(self, i: int, h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if self.densities[i] is None:
            return key.abs()
        return key.abs() * torch.sigmoid(self.predictors[i].logits(h.to(key.dtype)))

    def restrict(self, i: int, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return keep if self.densities[i] is not None else keep & (self.scores(i, h) > 0)


# prompts up to this many tokens rank against the up sketch through the kernels, a token at a time;
# longer ones dequantize it in chunks (quant_project), which costs about the same for any length:
# at 16 positions the two took the same time (tests/bench/sketch_product.py, 11008 x 4096 int4)
SKETCH_KERNEL_TOKENS = 16


class GateUpEngine(GateEngine):
    """The exact gate ranked by contribution (selection='gate+up'): per token the top `density` of
    each layer's neurons by |act(gate) * (x @ up)|, the up product taken against the artifact's up
    sketch (a 4- or 8-bit copy of the up rows kept in DRAM beside the gate rows); the kept
    neurons' up + down rows are read and computed in full precision, so the sketch only ranks."""

    @classmethod
    def memory(cls, manifest: Manifest, compute_dtype: torch.dtype, *, pinned_fraction: float = 0.0) -> EngineMemory:
        """The gate engine's, plus the scratch the sketch is dequantized through (the sketch
        itself is resident: the budget's gate_bytes)."""
        base = super().memory(manifest, compute_dtype)
        q, n = manifest.up_sketch, max(L.n_neurons for L in manifest.ffn_layers)
        dim = manifest.bundle_layout[0][2] - manifest.bundle_layout[0][1]
        scratch = CHUNK_ROWS * dim * 4 + CHUNK_ROWS * dim // 2  # quant_project's (the CPU's long prompts)
        if q is not None and all(UpSketch.supports(q, L.n_neurons) for L in manifest.ffn_layers):
            scratch = max(scratch, SketchScratch.nbytes_for(q, chunk_rows_for(n, q.dim)))
        return dataclasses.replace(base, fixed_bytes=base.fixed_bytes + scratch)

    def __init__(self, ctx: EngineContext, **kw):
        q = ctx.art.manifest.up_sketch
        if q is None:
            raise FlashError(f"{ctx.art.path}: selection 'gate+up' ranks neurons against an up sketch this artifact "
                             "lacks; pack it with `flashio pack --gate-resident --up-sketch int4`, or use "
                             "selection='gate'")
        super().__init__(ctx, **kw)
        self.sketch_quant = q
        names = [UP_SKETCH_TENSOR.format(i) for i in range(len(self.layers))]
        self.sketch: list[torch.Tensor] = []  # the stored rows, where quant_project computes with them
        self.packed: list[UpSketch] = []  # or the rows rearranged in place (flashio.sketch)
        # on the CPU the kernels' quantized dot products take the stored rows a token at a time
        # (an 11008 x 4096 int4 sketch in groups of 32, one token: 0.82 ms on one thread, 0.58 on
        # two, against 10.1 for UpSketch.project, which dequantizes the whole sketch to float; the
        # 2-vCPU EPYC, 2026-12-04). x is then rounded to int8 in blocks of 32 where the CPU has
        # VNNI, as for every one-token product on quantized rows: near-ties may rank the other way
        # than a prompt's (> SKETCH_KERNEL_TOKENS tokens, dequantized chunks) would
        self.kernel_tokens = SKETCH_KERNEL_TOKENS if self.device.type == "cpu" and kernels.available() else 0
        if all(UpSketch.supports(q, L.n_neurons) for L in self.layers) and not self.kernel_tokens:
            # the resident dict drops the stored layout's name: the rows are the engine's, held once
            self.packed = [UpSketch.pack(ctx.resident.pop(name), q) for name in names]
            self.sketch_scratch = SketchScratch(q, max(s.chunk_rows for s in self.packed), self.device)
        else:
            self.sketch = [ctx.resident[name] for name in names]
            self.sketch_scratch = RowScratch(q, self.device)

    def sketch_up(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """[T, N] float32: h @ up.T against layer i's up sketch."""
        if h.shape[0] <= self.kernel_tokens:
            k, layout, x = kernels.kernels(), self.sketch_quant.layout("up"), h.float()
            return torch.stack([k.qdot(self.sketch[i], layout, x[t]) for t in range(h.shape[0])])
        if self.packed:
            return self.packed[i].project(h, self.sketch_scratch)
        return quant_project(h, self.sketch[i], self.sketch_quant, "up", self.sketch_scratch)

    def exact_scores(self, i: int, h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        up = self.sketch_up(i, h)
        if self.b_up[i] is not None:
            up += self.b_up[i].float()
        return (key.float() * up).abs()


class OracleEngine(GateEngine):
    """The exact active set by |act(gate)| (up for ReLU FFNs), from rows kept in DRAM: the resident
    gate rows, or the key part of every bundle loaded once at open. For ReLU models at threshold 0
    the output equals dense."""

    needs_predictors = False
    needs_gate_rows = False

    @classmethod
    def loaded_parts(cls, manifest: Manifest) -> tuple[str, ...]:
        """The bundle parts this engine loads into DRAM at open, for every neuron."""
        return () if manifest.gate_resident else ("gate" if manifest.gated else "up",)

    @classmethod
    def memory(cls, manifest: Manifest, compute_dtype: torch.dtype, *, pinned_fraction: float = 0.0) -> EngineMemory:
        """The sparse engine's, plus the loaded parts of every row (resident gate rows are the budget's)."""
        base = super().memory(manifest, compute_dtype)
        part_bytes = (manifest.bundle_layout[0][2] - manifest.bundle_layout[0][1]) * compute_dtype.itemsize
        rows = manifest.n_layers * manifest.ffn_layers[0].n_neurons
        return dataclasses.replace(base, fixed_bytes=rows * part_bytes * len(cls.loaded_parts(manifest)))

    def __init__(self, ctx: EngineContext, **kw):
        super().__init__(ctx, **kw)
        parts = self.loaded_parts(ctx.art.manifest)
        self.loaded: dict[str, list[torch.Tensor]] = {p: [] for p in parts}
        for i, L in enumerate(self.layers if parts else ()):
            rows = self._load_rows(i, 0, L.n_neurons, keep=False)
            for p in parts:
                self.loaded[p].append(self.part_rows(rows, p))  # [N, D], compute dtype
            del rows

    def key_act(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.gate_w is not None:
            return self.gate_act(i, h)
        key = "gate" if "gate" in self.parts else "up"
        w = self.loaded[key][i]
        bias = self.b_gate[i] if key == "gate" else self.b_up[i]
        return ACTIVATIONS[self.activation](F.linear(h.to(w.dtype), w, bias))


class ContributionOracleEngine(OracleEngine):
    """The top `density` fraction per token by contribution |act(gate) * (x @ up + b_up)|, computed
    densely (up rows loaded at open): the lower bound of any selection at that density."""

    @classmethod
    def loaded_parts(cls, manifest: Manifest) -> tuple[str, ...]:
        return (*super().loaded_parts(manifest), "up") if manifest.gated else super().loaded_parts(manifest)

    def exact_scores(self, i: int, h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if not self.art.manifest.gated:
            return key.abs()  # ReLU: the activation is the contribution
        w = self.loaded["up"][i]
        return (key * F.linear(h.to(w.dtype), w, self.b_up[i])).abs()
