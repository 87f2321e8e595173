"""Per-step statistics: the paper's latency breakdown (I/O, memory management, compute) and
the bytes that crossed from flash to DRAM."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class StepStats:
    tokens: int = 0  # tokens processed in this step (1 while generating)
    bytes_read: int = 0  # bytes read from the FFN file
    reads: int = 0  # read syscalls issued
    neurons_active: int = 0  # neurons the FFN used (predicted/oracle set, all layers)
    neurons_loaded: int = 0  # neurons read from flash (missing from the window)
    cache_hits: int = 0  # active neurons already in the window cache
    cache_rows: int = 0  # rows of the windows (all layers): neurons active in the last `window` steps; rows retained past it are not counted
    rows_computed: int = 0  # bundle rows the FFN computed (all layers): the active set's or the window's (FlashConfig.compute)
    truncated: int = 0  # active neurons dropped because the cache capacity was reached
    late_loaded: int = 0  # lookahead: neurons the FFN needed that the lookahead had not read (read at the FFN)
    guesses: int = 0  # lookahead: layers whose reads started before their attention (a second selection each)
    buffered_reads: int = 0  # reads that could not use O_DIRECT
    io_ms: float = 0.0  # time the step waited for reads (overlapped reads count only their wait)
    mem_ms: float = 0.0  # window cache management (evictions, row moves, dtype conversion of new rows)
    compute_ms: float = 0.0  # everything else: attention, predictors, FFN matmuls
    total_ms: float = 0.0
    io_busy_ms: float = 0.0  # wall time reads were in flight (= io_ms unless reads overlap compute)
    io_predicted_ms: float = 0.0  # the cost model's time for the reads issued (nan: no cost model)
    # CUDA only, device time measured with events (asynchronous work: it may overlap host time
    # above, and compute_ms includes whatever of it the host waited for):
    upload_ms: float = 0.0  # host-to-device copies of the rows read from flash (copy stream)
    device_mem_ms: float = 0.0  # cache management kernels: row moves, dtype conversions

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def per_token(self, n: int) -> dict[str, float]:
        n = max(n, 1)
        return {f.name: getattr(self, f.name) / n for f in fields(self)}


class StatsRecorder:
    """Mutable accumulator the engines add to during one step."""

    __slots__ = (
        "buffered_reads",
        "bytes_read",
        "cache_hits",
        "cache_rows",
        "device_mem_s",
        "guesses",
        "io_busy_s",
        "io_pred_s",
        "io_s",
        "late_loaded",
        "mem_s",
        "neurons_active",
        "neurons_loaded",
        "reads",
        "rows_computed",
        "truncated",
        "upload_s",
    )

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.bytes_read = self.reads = self.neurons_active = self.neurons_loaded = 0
        self.cache_hits = self.cache_rows = self.rows_computed = self.truncated = self.buffered_reads = 0
        self.late_loaded = 0
        self.guesses = 0
        self.io_s = self.mem_s = self.io_busy_s = self.io_pred_s = 0.0
        self.upload_s = self.device_mem_s = 0.0

    def finish(self, tokens: int, total_s: float) -> StepStats:
        return StepStats(
            tokens=tokens, bytes_read=self.bytes_read, reads=self.reads,
            neurons_active=self.neurons_active, neurons_loaded=self.neurons_loaded,
            cache_hits=self.cache_hits, cache_rows=self.cache_rows,
            rows_computed=self.rows_computed, truncated=self.truncated, late_loaded=self.late_loaded, guesses=self.guesses,
            buffered_reads=self.buffered_reads, io_ms=1e3 * self.io_s, mem_ms=1e3 * self.mem_s,
            compute_ms=1e3 * max(total_s - self.io_s - self.mem_s, 0.0), total_ms=1e3 * total_s,
            io_busy_ms=1e3 * self.io_busy_s, io_predicted_ms=1e3 * self.io_pred_s,
            upload_ms=1e3 * self.upload_s, device_mem_ms=1e3 * self.device_mem_s)
