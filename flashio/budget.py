"""What an opened model holds in memory, term by term: the arithmetic behind `dram_budget`.

The budget counts memory on the model's device (host DRAM on the CPU, GPU memory with CUDA):
resident weights, predictors, the KV cache for the context, and what the mode's FFN engine
states it holds (flashio.engines.EngineMemory: the whole FFN for dense; the pinned rows and one
streamed layer for naive; per window-cache row for sparse and oracle, whose row capacity is
what the budget leaves). Pinned host staging on CUDA is host memory and is reported apart
(FlashModel.staging_bytes). A gate-resident artifact's gate rows (flashio.exact) are resident
weights, counted apart as `gate_bytes` with its up sketch if any: they are DRAM of the FFN
(`ffn_dram_bytes`).

The runtime builds it from what it loaded (`MemoryBudget.of`); the benchmark's memory plan,
before anything is loaded, from the artifact's file sizes (`MemoryBudget.estimate`): one formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from flashio.config import FlashConfig, Mode, Selection, resolve_selection
from flashio.dtypes import torch_dtype
from flashio.engines import EngineMemory
from flashio.errors import BudgetError
from flashio.format import Artifact, Manifest
from flashio.modes import engine_class
from flashio.predictor import PredictorWeights
from flashio.quant import weight_bytes
from flashio.sizes import format_size


class KVShape(Protocol):
    """What the KV cache's size depends on (every architecture's ModelArgs has it)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


def kv_cache_bytes(args: KVShape, max_len: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for `max_len` tokens."""
    return 2 * args.n_layers * max_len * args.n_kv_heads * args.head_dim * dtype.itemsize


@dataclass(frozen=True)
class MemoryBudget:
    mode: Mode
    max_len: int  # tokens the KV cache holds
    n_neurons: int  # per layer
    resident_bytes: int  # without the gate rows
    predictor_bytes: int
    kv_bytes: int
    engine: EngineMemory  # what the mode's engine holds
    gate_bytes: int = 0  # resident gate rows (and up sketch) of a gate-resident artifact: the FFN's, in DRAM

    @classmethod
    def of(cls, art: Artifact, mode: Mode | str, compute_dtype: torch.dtype, max_len: int,
           resident: dict[str, torch.Tensor], predictors: list[PredictorWeights] | None,
           pinned_fraction: float = 0.0, *, selection: Selection | str | None = None) -> MemoryBudget:
        """The budget of a model being opened: resident tensors and predictors as loaded."""
        c_item = compute_dtype.itemsize
        gates = set(art.manifest.ffn_resident_tensors())
        nbytes = {k: weight_bytes(t) for k, t in resident.items()}  # quantized matrices: codes + scales
        return cls._build(art, mode, compute_dtype, max_len, pinned_fraction, selection,
                          resident_bytes=sum(v for k, v in nbytes.items() if k not in gates),
                          gate_bytes=sum(v for k, v in nbytes.items() if k in gates),
                          predictor_bytes=sum(p.A.numel() + p.B.numel() + p.bias.numel()
                                              for p in predictors or []) * c_item)

    @classmethod
    def estimate(cls, art: Artifact, mode: Mode | str, compute_dtype: torch.dtype, max_len: int,
                 pinned_fraction: float = 0.0, *, selection: Selection | str | None = None) -> MemoryBudget:
        """The budget before loading anything: resident weights and predictors from their file
        sizes, converted to the compute dtype (the files' headers are counted too: a few KB)."""
        m = art.manifest
        scale = compute_dtype.itemsize / torch_dtype(m.dtype).itemsize
        engine = engine_class(mode, _selection(m, mode, selection))
        preds = m.files[m.predictors_file].size_bytes if m.predictors_file and engine.needs_predictors else 0
        # quantized matrices keep their codes and fp16 scales whatever the compute dtype
        rq = m.resident_quant
        quant = rq.matrices if rq is not None else ()
        rows = {L.gate_tensor: L.n_neurons for L in m.ffn_layers if L.gate_tensor}

        def gate_row_bytes(g: str) -> int:
            if g not in quant:
                return art.args.dim * compute_dtype.itemsize
            return rq.rows[g].row_bytes if g in rq.rows else art.args.dim + 2

        gate_bytes = sum(n * gate_row_bytes(g) for g, n in rows.items())
        # the up sketch: uint8 codes + scales, as stored whatever the compute dtype
        sketch = sum(L.n_neurons for L in m.ffn_layers) * m.up_sketch.row_bytes if m.up_sketch is not None else 0
        stored = (art.resident_tensor_bytes(list(rq.stored_tensors)) if quant else 0) + sketch
        gate_bytes += sketch
        resident = int((m.files[m.resident_file].size_bytes - stored) * scale) + stored
        return cls._build(art, mode, compute_dtype, max_len, pinned_fraction, selection,
                          resident_bytes=resident - gate_bytes,
                          gate_bytes=gate_bytes, predictor_bytes=int(preds * scale))

    @classmethod
    def _build(cls, art: Artifact, mode: Mode | str, compute_dtype: torch.dtype, max_len: int,
               pinned_fraction: float, selection: Selection | str | None, *, resident_bytes: int,
               gate_bytes: int, predictor_bytes: int) -> MemoryBudget:
        m = art.manifest
        engine = engine_class(mode, _selection(m, mode, selection))
        return cls(mode=Mode(mode), max_len=max_len, n_neurons=m.ffn_layers[0].n_neurons,
                   resident_bytes=resident_bytes, predictor_bytes=predictor_bytes,
                   kv_bytes=kv_cache_bytes(art.args, max_len, compute_dtype),
                   engine=engine.memory(m, compute_dtype, pinned_fraction=pinned_fraction), gate_bytes=gate_bytes)

    @property
    def fixed_bytes(self) -> int:
        """What the model holds whatever the budget: everything but the window caches."""
        return self.resident_bytes + self.gate_bytes + self.predictor_bytes + self.kv_bytes + self.engine.fixed_bytes

    def ffn_dram_bytes(self, capacity: int) -> int:
        """The FFN's share of memory with window caches of `capacity` rows: resident gate rows, what
        the engine holds whatever the budget, and the caches (the report's ffn_dram_fraction)."""
        return self.gate_bytes + self.engine.fixed_bytes + capacity * self.engine.per_row_bytes

    def capacity_for_ffn_dram(self, ffn_dram_bytes: int) -> int:
        """Window cache rows per layer when the FFN may hold `ffn_dram_bytes` (e.g. half its size);
        BudgetError when that does not cover the gate rows and the engine's minimum."""
        rows = (ffn_dram_bytes - self.gate_bytes - self.engine.fixed_bytes) // max(self.engine.per_row_bytes, 1)
        if rows < self.engine.min_rows:
            raise BudgetError(
                f"an FFN memory of {format_size(ffn_dram_bytes)} is too small for mode {self.mode.value!r}: the gate "
                f"rows take {format_size(self.gate_bytes)}, the engine {format_size(self.engine.fixed_bytes)} and the "
                f"smallest window cache ({self.engine.min_rows} rows per layer) "
                f"{format_size(self.engine.min_rows * self.engine.per_row_bytes)}; allow the FFN more memory")
        return min(self.n_neurons, rows) if self.engine.per_row_bytes else self.n_neurons

    def minimum_bytes(self) -> int:
        """The smallest budget the mode runs in."""
        return self.fixed_bytes + self.engine.min_rows * self.engine.per_row_bytes

    def bytes_for(self, capacity: int) -> int:
        """The budget that gives window caches of `capacity` rows per layer."""
        return self.fixed_bytes + capacity * self.engine.per_row_bytes

    def capacity(self, dram_budget: int | None) -> int:
        """Window cache rows per layer that `dram_budget` leaves (all neurons when unbounded);
        BudgetError, with the minimum, when the budget cannot run the mode at all."""
        if dram_budget is None:
            return self.n_neurons
        need = self.minimum_bytes()
        if dram_budget < need:
            ffn = need - self.resident_bytes - self.predictor_bytes - self.kv_bytes
            gate = f" of which resident gate rows {format_size(self.gate_bytes)}" if self.gate_bytes else ""
            raise BudgetError(
                f"dram_budget {format_size(dram_budget)} is too small for mode {self.mode.value!r}: it needs at "
                f"least {format_size(need)} (resident {format_size(self.resident_bytes)}, KV cache for "
                f"{self.max_len} tokens {format_size(self.kv_bytes)}, predictors "
                f"{format_size(self.predictor_bytes)}, FFN {format_size(ffn)}{gate}); "
                "raise the budget or lower max_context")
        if self.engine.per_row_bytes:
            return min(self.n_neurons, (dram_budget - self.fixed_bytes) // self.engine.per_row_bytes)
        return self.n_neurons


def _selection(manifest: Manifest, mode: Mode | str, selection: Selection | str | None) -> Selection | None:
    """`selection`, or the one the artifact runs `mode` with by default."""
    if selection is not None:
        return Selection(selection)
    return resolve_selection(FlashConfig(mode=Mode(mode)), manifest)
