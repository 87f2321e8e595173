"""What an opened model holds in memory, term by term: the arithmetic behind `dram_budget`.

The budget counts memory on the model's device (host DRAM on the CPU, GPU memory with CUDA):
resident weights, predictors, the KV cache for the context, and what the mode's FFN engine
states it holds (flashio.engines.EngineMemory: the whole FFN for dense; the pinned rows and one
streamed layer for naive; per window-cache row for sparse and oracle, whose row capacity is
what the budget leaves). Pinned host staging on CUDA is host memory and is reported apart
(FlashModel.staging_bytes).

The runtime builds it from what it loaded (`MemoryBudget.of`); the benchmark's memory plan,
before anything is loaded, from the artifact's file sizes (`MemoryBudget.estimate`): one formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from flashio.config import Mode
from flashio.dtypes import torch_dtype
from flashio.engines import EngineMemory
from flashio.errors import BudgetError
from flashio.format import Artifact
from flashio.modes import engine_class
from flashio.predictor import PredictorWeights
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
    resident_bytes: int
    predictor_bytes: int
    kv_bytes: int
    engine: EngineMemory  # what the mode's engine holds

    @classmethod
    def of(cls, art: Artifact, mode: Mode | str, compute_dtype: torch.dtype, max_len: int,
           resident: dict[str, torch.Tensor], predictors: list[PredictorWeights] | None,
           pinned_fraction: float = 0.0) -> MemoryBudget:
        """The budget of a model being opened: resident tensors and predictors as loaded."""
        c_item = compute_dtype.itemsize
        return cls._build(art, mode, compute_dtype, max_len, pinned_fraction,
                          resident_bytes=sum(t.numel() * t.element_size() for t in resident.values()),
                          predictor_bytes=sum(p.A.numel() + p.B.numel() + p.bias.numel()
                                              for p in predictors or []) * c_item)

    @classmethod
    def estimate(cls, art: Artifact, mode: Mode | str, compute_dtype: torch.dtype, max_len: int,
                 pinned_fraction: float = 0.0) -> MemoryBudget:
        """The budget before loading anything: resident weights and predictors from their file
        sizes, converted to the compute dtype (the files' headers are counted too: a few KB)."""
        m = art.manifest
        scale = compute_dtype.itemsize / torch_dtype(m.dtype).itemsize
        preds = m.files[m.predictors_file].size_bytes if m.predictors_file and engine_class(mode).needs_predictors else 0
        return cls._build(art, mode, compute_dtype, max_len, pinned_fraction,
                          resident_bytes=int(m.files[m.resident_file].size_bytes * scale),
                          predictor_bytes=int(preds * scale))

    @classmethod
    def _build(cls, art: Artifact, mode: Mode | str, compute_dtype: torch.dtype, max_len: int,
               pinned_fraction: float, *, resident_bytes: int, predictor_bytes: int) -> MemoryBudget:
        m = art.manifest
        return cls(mode=Mode(mode), max_len=max_len, n_neurons=m.ffn_layers[0].n_neurons,
                   resident_bytes=resident_bytes, predictor_bytes=predictor_bytes,
                   kv_bytes=kv_cache_bytes(art.args, max_len, compute_dtype),
                   engine=engine_class(mode).memory(m, compute_dtype, pinned_fraction=pinned_fraction))

    @property
    def fixed_bytes(self) -> int:
        """What the model holds whatever the budget: everything but the window caches."""
        return self.resident_bytes + self.predictor_bytes + self.kv_bytes + self.engine.fixed_bytes

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
            raise BudgetError(
                f"dram_budget {format_size(dram_budget)} is too small for mode {self.mode.value!r}: it needs at "
                f"least {format_size(need)} (resident {format_size(self.resident_bytes)}, KV cache for "
                f"{self.max_len} tokens {format_size(self.kv_bytes)}, predictors "
                f"{format_size(self.predictor_bytes)}, FFN {format_size(ffn)}); "
                "raise the budget or lower max_context")
        if self.engine.per_row_bytes:
            return min(self.n_neurons, (dram_budget - self.fixed_bytes) // self.engine.per_row_bytes)
        return self.n_neurons
