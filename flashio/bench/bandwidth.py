"""The memory side of `flashio bench device`: DRAM read and matrix-vector bandwidth per thread count.

    cfg = MemoryBenchConfig(threads=(1, 2))
    dram = measure_dram_read(cfg)          # (BandwidthPoint(threads=1, gbps=...), ...)
    mv = measure_matvec(cfg)               # one point per (dtype, threads)

These are what a token's compute can reach at best: `flashio bench model` divides the bytes a
token touches by them (flashio.bench.floor). Both read buffers well past the caches (`buffer_bytes`,
default 512 MiB; several copies of the matrix cycled through, so no call finds its matrix in the
last-level cache), with torch.set_num_threads(t) for each thread count, restored afterwards.

- DRAM read: `torch.sum` over a float32 buffer of buffer_bytes (bytes / time).
- matrix-vector: the faster of `F.linear(x [1, cols], W [rows, cols])` and the runtime's own
  one-token product (flashio.quant.linear: flashio.kernels' dot products at one torch thread),
  W a 7B layer-sized matrix (16384 x 4096: OPT-6.7B's FFN projection, one 7B layer's attention)
  in float32, float16 and bfloat16 (W's bytes / time).
Each point is the median of per-call bandwidths over `seconds` (at least `min_calls` calls).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashio import kernels
from flashio.costmodel import BandwidthPoint, DeviceProfile
from flashio.dtypes import TORCH_DTYPES
from flashio.errors import FlashError
from flashio.quant import linear
from flashio.sizes import format_size
from flashio.threads import torch_threads

MATVEC_SHAPE = (16384, 4096)  # rows x cols: OPT-6.7B's FFN projection, a 7B layer's attention
MATVEC_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class MemoryBenchConfig:
    threads: tuple[int, ...] = (1,)
    buffer_bytes: int = 512 << 20  # well past any last-level cache of the machine measured
    seconds: float = 0.3  # per point
    min_calls: int = 3
    dtypes: tuple[str, ...] = MATVEC_DTYPES
    shape: tuple[int, int] = MATVEC_SHAPE

    def __post_init__(self) -> None:
        if not self.threads or any(t < 1 for t in self.threads):
            raise FlashError(f"memory thread counts must be >= 1, got {self.threads}")
        if self.buffer_bytes < 1 << 20:
            raise FlashError(f"the memory buffer ({format_size(self.buffer_bytes)}) must be at least 1 MiB "
                             "(and, to measure DRAM, several times the last-level cache)")
        unknown = [d for d in self.dtypes if d not in TORCH_DTYPES]
        if unknown:
            raise FlashError(f"unknown matrix-vector dtype(s) {unknown}; choose from {', '.join(TORCH_DTYPES)}")


def default_memory_threads(cpus: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the CPU count, and the CPU count itself."""
    out = [1]
    while out[-1] * 2 <= cpus:
        out.append(out[-1] * 2)
    return tuple(sorted({*out, max(cpus, 1)}))


def _median_gbps(call: Callable[[int], int], seconds: float, min_calls: int) -> float:
    """Median over calls of bytes / time; call(k) does the k-th read and returns its bytes."""
    call(0)  # warm-up: page faults, kernels' first-call setup
    rates: list[float] = []
    t_end = time.perf_counter() + seconds
    k = 1
    while len(rates) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        n = call(k)
        rates.append(n / (time.perf_counter() - t0) / 1e9)
        k += 1
    return statistics.median(rates)


def _sig(gbps: float) -> float:
    return float(f"{gbps:.4g}")  # 4 significant digits: never rounded to 0 (a profile refuses 0)


def measure_dram_read(cfg: MemoryBenchConfig) -> tuple[BandwidthPoint, ...]:
    """GB/s of torch.sum over a float32 buffer of cfg.buffer_bytes, per thread count."""
    buf = torch.ones(cfg.buffer_bytes // 4, dtype=torch.float32)  # written: every page is real

    def read(_k: int) -> int:
        buf.sum()
        return buf.nbytes

    pts = []
    for t in cfg.threads:
        with torch_threads(t):
            pts.append(BandwidthPoint(t, _sig(_median_gbps(read, cfg.seconds, cfg.min_calls))))
    return tuple(pts)


def measure_matvec(cfg: MemoryBenchConfig) -> tuple[BandwidthPoint, ...]:
    """GB/s (the matrix's bytes / time) of the faster of F.linear(x, W) and the runtime's linear
    per dtype and thread count (torch's and the kernels'), cycling through enough copies of W to fill
    cfg.buffer_bytes."""
    return tuple(p for name in cfg.dtypes for p in _matvec_points(cfg, name))


def _matvec_points(cfg: MemoryBenchConfig, name: str) -> list[BandwidthPoint]:
    return MatvecProbe(cfg, name).measure()


class MatvecProbe:
    """One dtype's matrix-vector bandwidth, measurable again and again on the same matrices
    (`flashio bench model` measures it around each of its rows: the machine's bandwidth at the
    time the row ran)."""

    def __init__(self, cfg: MemoryBenchConfig, name: str):
        rows, cols = cfg.shape
        dt = TORCH_DTYPES[name]
        gen = torch.Generator().manual_seed(0)
        self.cfg, self.name, self.one = cfg, name, rows * cols * dt.itemsize
        n = max(2, -(-cfg.buffer_bytes // self.one))
        self.mats = [(torch.rand(rows, cols, generator=gen) - 0.5).to(dt) for _ in range(n)]
        self.x = torch.randn(1, cols, generator=gen).to(dt)  # [1, cols]

    def _torch_product(self, k: int) -> int:
        F.linear(self.x, self.mats[k % len(self.mats)])  # [1, rows]
        return self.one

    def _runtime_product(self, k: int) -> int:
        linear(self.x, self.mats[k % len(self.mats)])
        return self.one

    def measure(self) -> list[BandwidthPoint]:
        """One point per thread count of the config (the faster of torch's and the runtime's product)."""
        pts = []
        before = kernels.threads()
        try:
            for t in self.cfg.threads:
                kernels.set_threads(t)  # the runtime's products run on the kernels' threads
                with torch_threads(t):
                    gbps = max(_median_gbps(f, self.cfg.seconds, self.cfg.min_calls)
                               for f in (self._torch_product, self._runtime_product))
                    pts.append(BandwidthPoint(t, _sig(gbps), self.name))
        finally:
            kernels.set_threads(before)
        return pts


def memory_markdown(profile: DeviceProfile) -> str:
    """GB/s by thread count: DRAM read and each dtype's matrix-vector product."""
    src = profile.memory_source
    threads = sorted({p.threads for p in (*profile.dram_read, *profile.matvec)}) or [1, 2]
    head = "| GB/s | " + " | ".join(f"{t} thr" for t in threads) + " |"
    shape = "x".join(map(str, profile.matvec_shape or MATVEC_SHAPE))
    title = (f"Memory bandwidth, GB/s ({format_size(profile.memory_buffer_bytes)} buffer; matrix-vector: "
             f"the faster of F.linear and flashio's kernels with a {shape} matrix)" if src == "measured" else
             "Memory bandwidth: NOT measured in this profile; the built-in defaults below are used "
             "(re-run `flashio bench device` to measure)")
    lines = [title, "", head, "|---" * (len(threads) + 1) + "|"]
    for label, dtype in (("DRAM read", None), *((f"matvec {d}", d) for d in MATVEC_DTYPES)):
        cells = []
        for t in threads:
            bw = profile.memory_bandwidth(t, dtype)
            cells.append(f"{bw.gbps:.1f}" + ("" if bw.source == "measured" else " (default)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def plot_memory(profile: DeviceProfile, ax) -> None:
    """GB/s vs threads on a matplotlib axes: DRAM read and one line per matvec dtype."""
    threads = sorted({p.threads for p in (*profile.dram_read, *profile.matvec)})
    if not threads:
        ax.text(0.5, 0.5, "memory bandwidth not measured\n(built-in defaults are used)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    ax.plot(threads, [profile.memory_bandwidth(t).gbps for t in threads], "ko-", label="DRAM read (sum)")
    for d in MATVEC_DTYPES:
        if any(p.dtype == d for p in profile.matvec):
            ax.plot(threads, [profile.memory_bandwidth(t, d).gbps for t in threads], "s--", label=f"matvec {d}")
    ax.set_xlabel("torch threads")
    ax.set_ylabel("GB/s")
    ax.set_xticks(threads)
    ax.set_ylim(bottom=0)
    ax.set_title("memory bandwidth (the compute floor)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
