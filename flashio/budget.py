"""What an opened model holds in memory, term by term: the arithmetic behind `dram_budget`.

The budget counts memory on the model's device (host DRAM on the CPU, GPU memory with CUDA):
resident weights, predictors, the KV cache for the context, and the FFN part of the mode (the
whole FFN for dense; the pinned rows and one streamed layer for naive; the window caches for
sparse and oracle, whose row capacity is what the budget leaves). Pinned host staging on CUDA
is host memory and is reported apart (FlashModel.staging_bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashio.errors import BudgetError
from flashio.format import Artifact
from flashio.format.writer import TORCH_DTYPES
from flashio.predictor import PredictorWeights
from flashio.sizes import format_size

# The smallest window cache open() accepts, as a fraction of each layer's neurons: a token's
# predicted set is typically 2-10% of the FFN (paper, appendix), so less cannot run usefully.
MIN_CACHE_FRACTION = 0.05


@dataclass(frozen=True)
class MemoryBudget:
    mode: str
    max_len: int  # tokens the KV cache holds
    n_neurons: int  # per layer
    resident_bytes: int
    predictor_bytes: int
    kv_bytes: int
    oracle_bytes: int  # the oracle's exact-activation weights (up or gate parts of every row)
    per_row_bytes: int  # one cached row in every layer + one row of the shared scratch (+ staging)
    ffn_bytes: int  # the whole FFN in the compute dtype
    pinned_bytes: int  # naive: rows kept in memory ("hybrid")
    stream_rows: int  # naive: rows of the largest layer read per call
    stream_bytes: int

    @classmethod
    def of(cls, art: Artifact, mode: str, compute_dtype: torch.dtype, max_len: int,
           resident: dict[str, torch.Tensor], predictors: list[PredictorWeights] | None,
           pinned_fraction: float = 0.0) -> MemoryBudget:
        m, a = art.manifest, art.args
        c_item = compute_dtype.itemsize
        row_bytes = m.ffn_layers[0].bundle_width * c_item  # a cached row, in the compute dtype
        storage_row_bytes = m.ffn_layers[0].bundle_width * m.itemsize
        n_neurons = m.ffn_layers[0].n_neurons
        staged = compute_dtype != TORCH_DTYPES[m.dtype] and mode in ("sparse", "oracle")
        pinned = [round(pinned_fraction * L.n_neurons) for L in m.ffn_layers]
        stream_rows = max(L.n_neurons - k for L, k in zip(m.ffn_layers, pinned))
        return cls(
            mode=mode, max_len=max_len, n_neurons=n_neurons,
            resident_bytes=sum(t.numel() * t.element_size() for t in resident.values()),
            predictor_bytes=sum(p.A.numel() + p.B.numel() + p.bias.numel() for p in predictors or []) * c_item,
            kv_bytes=2 * a.n_layers * max_len * a.n_kv_heads * a.head_dim * c_item,
            oracle_bytes=m.n_layers * n_neurons * (row_bytes // len(m.bundle_layout)) if mode == "oracle" else 0,
            per_row_bytes=(m.n_layers + 1) * row_bytes + (storage_row_bytes if staged else 0),
            ffn_bytes=sum(L.n_neurons for L in m.ffn_layers) * row_bytes,
            pinned_bytes=sum(pinned) * row_bytes,
            stream_rows=stream_rows, stream_bytes=stream_rows * storage_row_bytes,
        )

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.predictor_bytes + self.kv_bytes + self.oracle_bytes

    def minimum_bytes(self) -> int:
        """The smallest budget the mode runs in."""
        if self.mode == "dense":
            return self.fixed_bytes + self.ffn_bytes
        if self.mode == "naive":
            return self.fixed_bytes + self.pinned_bytes + self.stream_bytes
        if self.mode in ("sparse", "oracle"):
            return self.fixed_bytes + max(1, math.ceil(MIN_CACHE_FRACTION * self.n_neurons)) * self.per_row_bytes
        return self.fixed_bytes  # mmap: the FFN is page cache, owned by the OS

    def capacity(self, dram_budget: int | None) -> int:
        """Window cache rows per layer that `dram_budget` leaves (all neurons when unbounded);
        BudgetError, with the minimum, when the budget cannot run the mode at all."""
        if dram_budget is None:
            return self.n_neurons
        need = self.minimum_bytes()
        if dram_budget < need:
            raise BudgetError(
                f"dram_budget {format_size(dram_budget)} is too small for mode {self.mode!r}: it needs at "
                f"least {format_size(need)} (resident {format_size(self.resident_bytes)}, KV cache for "
                f"{self.max_len} tokens {format_size(self.kv_bytes)}, predictors "
                f"{format_size(self.predictor_bytes)}, FFN {format_size(need - self.fixed_bytes)}); "
                "raise the budget or lower max_context")
        if self.mode in ("sparse", "oracle"):
            return min(self.n_neurons, (dram_budget - self.fixed_bytes) // self.per_row_bytes)
        return self.n_neurons
