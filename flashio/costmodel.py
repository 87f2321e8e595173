"""The flash cost model: how long a batch of reads takes on a measured device.

    profile = DeviceProfile.load("device-profile.json")    # written by `flashio bench device DIR`
    cm = CostModel(profile)                                 # CostModel() = built-in defaults
    cm.read_time_s(np.full(400, 16384), threads=16)         # 400 random 16 KiB reads, in seconds
    cm.best_threads(16384)                                  # fewest threads near the peak
    cm.best_max_gap(16384, threads=16)                      # rows worth reading through

A profile is a table of random-read throughput (MB/s) measured with the runtime's own reader
(O_DIRECT, cold file) for chunk sizes x thread counts. The model treats a batch of reads issued
by `threads` workers as a pipe that is busy `size / throughput(size, threads)` per read, where
throughput is the aggregate the device gave at that chunk size and concurrency: small reads are
priced by IOPS, large ones by bandwidth, which is why reading a few unneeded bundles between two
needed ones can beat issuing a second read (`best_max_gap`).

Interpolation: the time of one read is linear in its size between measured chunk sizes (latency +
size / bandwidth), throughput is interpolated in log2(threads). Below the smallest chunk a read
costs what the smallest chunk costs; above the largest it scales with size.

A profile also holds the memory side (`flashio bench device` measures it since the floor columns
of `flashio bench model`): DRAM read bandwidth and each dtype's matrix-vector bandwidth, per
thread count (`profile.memory_bandwidth(threads, "float16")`). A profile without them (written
before, or the built-in one) answers with DEFAULT_DRAM_READ / DEFAULT_MATVEC, marked "default".

Which profile the runtime uses when `open` is given none (`find_profile`): the file named by
$FLASHIO_DEVICE_PROFILE, else the installed one at `default_profile_path()`
($XDG_CONFIG_HOME/flashio/device-profile.json, ~/.config/flashio/... without XDG_CONFIG_HOME),
which `flashio bench device` writes; else none, and the built-in model (`default_profile`) prices
the reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashio.errors import FlashError, FormatError

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
PROFILE_ENV = "FLASHIO_DEVICE_PROFILE"  # path of a profile the runtime uses when given none
PROFILE_FILENAME = "device-profile.json"

# Built-in defaults for the runtime's reader, fitted to the profile `flashio bench device`
# measured on the developers' machine class (2 vCPU, virtio disk; README, "Your device": MB/s at
# 16 KiB 191 on 1 thread, 426 on 16, 502 on 32; 64 KiB 916 on 16; sequential ~1000). One thread's
# read costs `latency + size / stream bandwidth`; t threads give t ** _DEFAULT_THREAD_EXPONENT
# times one thread's throughput (not t times: the readers share 2 vCPUs, ~11 us of CPU per read),
# capped at `iops * size` and at `bandwidth`. On that machine class the model chooses what the
# measured profile chose (32 threads, gap reads of up to 1 row for 16 KiB bundles): the runtime
# without a profile reads as it does with one. (The earlier linear model, 30 us and 45 k IOPS,
# chose 2 threads, whose reads then took 2.7x its prediction: issue 14.)
_DEFAULT_LATENCY_S = 80e-6
_DEFAULT_STREAM_BPS = 2.0e9
_DEFAULT_THREAD_EXPONENT = 0.29
_DEFAULT_IOPS = 31_000
_DEFAULT_RANDOM_BPS = 1.0e9
_DEFAULT_SEQUENTIAL_MBPS = 1000.0
DEFAULT_CHUNKS = tuple(4096 << k for k in range(9))  # 4 KiB .. 1 MiB
DEFAULT_THREAD_COUNTS = (1, 2, 4, 8, 16, 32, 64)

# Built-in memory bandwidth (GB/s = 1e9 bytes/s) by torch thread count, for profiles that did not
# measure it: the LOW end of what the developers' machine class gave (2 vCPU: a plain read of DRAM
# 31 GB/s on 1 thread, 46 on 2; an fp16/bf16 matrix-vector product 18-25 on 1, 26-42 on 2), so
# that a floor computed from them is, if anything, too high. float32 is given fp16's figures
# (it reads the same bytes per second, not the same elements).
DEFAULT_DRAM_READ: tuple[tuple[int, float], ...] = ((1, 31.0), (2, 46.0))
DEFAULT_MATVEC: dict[str, tuple[tuple[int, float], ...]] = {
    "float32": ((1, 18.0), (2, 26.0)), "float16": ((1, 18.0), (2, 26.0)), "bfloat16": ((1, 18.0), (2, 26.0)),
}


@dataclass(frozen=True)
class ThroughputPoint:
    chunk_bytes: int
    threads: int
    mbps: float  # aggregate MB/s (1e6 bytes/s) of random reads of chunk_bytes, `threads` in flight

    @property
    def iops(self) -> float:
        return self.mbps * 1e6 / self.chunk_bytes


@dataclass(frozen=True)
class BandwidthPoint:
    threads: int  # torch.set_num_threads while measured
    gbps: float  # 1e9 bytes/s: bytes read (the buffer, or the matrix) / time
    dtype: str = ""  # the matrix's dtype (matrix-vector points); "" for a plain DRAM read


@dataclass(frozen=True)
class Bandwidth:
    """One answer of DeviceProfile.memory_bandwidth: GB/s and where it came from."""

    gbps: float
    source: str  # "measured" | "default" (built-in: the profile has no such points)
    threads: int
    dtype: str = ""


def _interp_threads(points: Sequence[tuple[int, float]], threads: int) -> float:
    """Linear in the thread count between measured points, the nearest one outside them."""
    pts = sorted(points)
    return float(np.interp(threads, [t for t, _ in pts], [g for _, g in pts]))


@dataclass(frozen=True)
class DeviceProfile:
    """Measured read behaviour of the device under one directory (see `flashio bench device`)."""

    random: tuple[ThroughputPoint, ...]  # the runtime's reader: O_DIRECT random reads, cold file
    sequential_mbps: float  # the runtime's reader, one large contiguous range
    fio_random: tuple[ThroughputPoint, ...] = ()  # the same points measured with fio (psync)
    fio_sequential_mbps: float | None = None
    device: str = ""  # block device name and major:minor, e.g. "vda (254:0)"
    path: str = ""  # the directory measured
    block_bytes: int = 4096  # logical block size (O_DIRECT alignment)
    file_bytes: int = 0  # size of the test file
    seconds_per_point: float = 0.0
    created_at: str = ""
    machine: dict[str, Any] = field(default_factory=dict)  # cpus, cpu model, kernel
    source: str = "measured"  # "measured" | "default"
    format_version: int = PROFILE_VERSION
    # the memory side (absent in profiles written before it was measured: built-in defaults then)
    dram_read: tuple[BandwidthPoint, ...] = ()  # sum over a buffer well past the caches
    matvec: tuple[BandwidthPoint, ...] = ()  # F.linear(x [1, cols], W [rows, cols]), per dtype
    memory_buffer_bytes: int = 0  # the buffer read (and the matrices' total, cycled through)
    matvec_shape: tuple[int, ...] = ()  # (rows, cols) of the matrix

    def __post_init__(self) -> None:
        if not self.random:
            raise FormatError("a device profile needs at least one random-read point")
        for p in self.random:
            if p.chunk_bytes <= 0 or p.threads <= 0 or not p.mbps > 0:
                raise FormatError(f"device profile point {p} is not positive: chunk, threads and "
                                  "MB/s must all be > 0")
        for p in (*self.dram_read, *self.matvec):
            if p.threads <= 0 or not p.gbps > 0:
                raise FormatError(f"device profile bandwidth point {p} is not positive: threads and "
                                  "GB/s must be > 0; re-run `flashio bench device DIR`")

    @property
    def memory_source(self) -> str:
        """'measured' when the profile holds memory bandwidth points, else 'default' (built-in)."""
        return "measured" if self.dram_read or self.matvec else "default"

    def memory_bandwidth(self, threads: int, dtype: str | None = None) -> Bandwidth:
        """GB/s of a plain DRAM read (dtype None) or of a `dtype` matrix-vector product with
        `threads` torch threads: measured points interpolated in the thread count, or the built-in
        default (source "default") when the profile has no point for it."""
        if dtype is None:
            pts = [(p.threads, p.gbps) for p in self.dram_read]
            default = DEFAULT_DRAM_READ
        else:
            if dtype not in DEFAULT_MATVEC:
                raise FlashError(f"no matrix-vector bandwidth for dtype {dtype!r}; expected one of "
                                 f"{', '.join(DEFAULT_MATVEC)}")
            pts = [(p.threads, p.gbps) for p in self.matvec if p.dtype == dtype]
            default = DEFAULT_MATVEC[dtype]
        if pts:
            return Bandwidth(_interp_threads(pts, threads), "measured", threads, dtype or "")
        return Bandwidth(_interp_threads(default, threads), "default", threads, dtype or "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.dumps())
        return path

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeviceProfile:
        if not isinstance(d, dict) or d.get("format_version") != PROFILE_VERSION:
            got = d.get("format_version") if isinstance(d, dict) else type(d).__name__
            raise FormatError(f"device profile format_version {got!r} is not supported (this flashio "
                              f"reads {PROFILE_VERSION}); re-run `flashio bench device DIR`")
        try:
            pts = {k: tuple(ThroughputPoint(int(p["chunk_bytes"]), int(p["threads"]), float(p["mbps"]))
                            for p in d.get(k) or ()) for k in ("random", "fio_random")}
            mem = {k: tuple(BandwidthPoint(int(p["threads"]), float(p["gbps"]), str(p.get("dtype", "")))
                            for p in d.get(k) or ()) for k in ("dram_read", "matvec")}
            known = {f for f in cls.__dataclass_fields__} - {"random", "fio_random", "dram_read", "matvec",
                                                                "matvec_shape"}
            rest = {k: v for k, v in d.items() if k in known}
            return cls(random=pts["random"], fio_random=pts["fio_random"], **mem,
                       matvec_shape=tuple(int(x) for x in d.get("matvec_shape") or ()), **rest)
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"device profile is malformed: {exc!r}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceProfile:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except OSError as exc:
            raise FlashError(f"cannot read device profile {str(path)!r}: {exc.strerror}; create one "
                             "with `flashio bench device DIR --out FILE`") from None
        except json.JSONDecodeError as exc:
            raise FormatError(f"device profile {str(path)!r} is not valid JSON: {exc}") from None

    def table(self, source: str = "flashio") -> dict[tuple[int, int], float]:
        """{(chunk_bytes, threads): MB/s} of the flashio (or fio) points."""
        pts = self.random if source == "flashio" else self.fio_random
        return {(p.chunk_bytes, p.threads): p.mbps for p in pts}


def default_profile() -> DeviceProfile:
    """The built-in profile used when none was measured (see the constants above)."""
    pts = []
    for c in DEFAULT_CHUNKS:
        per_thread = c / (_DEFAULT_LATENCY_S + c / _DEFAULT_STREAM_BPS)
        for t in DEFAULT_THREAD_COUNTS:
            bps = min(t**_DEFAULT_THREAD_EXPONENT * per_thread, _DEFAULT_IOPS * c, _DEFAULT_RANDOM_BPS)
            pts.append(ThroughputPoint(c, t, bps / 1e6))
    return DeviceProfile(random=tuple(pts), sequential_mbps=_DEFAULT_SEQUENTIAL_MBPS,
                         source="default", device="(built-in defaults, DESIGN.md section 7)")


def default_profile_path() -> Path:
    """Where `flashio bench device` installs the profile and the runtime looks for it:
    $XDG_CONFIG_HOME/flashio/device-profile.json, or ~/.config/flashio/device-profile.json."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "flashio" / PROFILE_FILENAME


def find_profile_path() -> Path | None:
    """The profile file the runtime uses when given none: $FLASHIO_DEVICE_PROFILE (even when the
    file is missing: naming one that is not there is an error at load), else the installed
    profile when it exists, else None (the built-in model)."""
    named = os.environ.get(PROFILE_ENV)
    if named:
        return Path(named)
    path = default_profile_path()
    return path if path.is_file() else None


def find_profile() -> DeviceProfile | None:
    """The profile of `find_profile_path()`, loaded; None when there is none (built-in model)."""
    path = find_profile_path()
    return DeviceProfile.load(path) if path is not None else None


class CostModel:
    """Predicted read times from a DeviceProfile (built-in defaults when None)."""

    def __init__(self, profile: DeviceProfile | None = None):
        self.profile = profile or default_profile()
        table = self.profile.table()
        self.thread_counts = np.array(sorted({t for _, t in table}), dtype=np.float64)
        self._by_threads: list[tuple[np.ndarray, np.ndarray]] = []  # per thread count: chunks, s/read
        for t in self.thread_counts:
            chunks = np.array(sorted(c for c, tt in table if tt == t), dtype=np.float64)
            secs = np.array([c / (table[(int(c), int(t))] * 1e6) for c in chunks])
            # a smaller read never takes longer than a larger one: where noise says otherwise
            # (a burst of other I/O during a point), trust the larger, steadier measurement
            self._by_threads.append((chunks, np.minimum.accumulate(secs[::-1])[::-1]))

    @property
    def measured(self) -> bool:
        return self.profile.source == "measured"

    def _per_read_s(self, k: int, sizes: np.ndarray) -> np.ndarray:
        chunks, secs = self._by_threads[k]
        out = np.interp(sizes, chunks, secs)
        big = sizes > chunks[-1]
        out[big] = secs[-1] * sizes[big] / chunks[-1]
        return out

    def per_read_s(self, sizes: Sequence[int] | np.ndarray, threads: int) -> np.ndarray:
        """Device time each read occupies when `threads` reads are in flight (aggregate view)."""
        s = np.asarray(sizes, dtype=np.float64).reshape(-1)
        t = float(np.clip(threads, self.thread_counts[0], self.thread_counts[-1]))
        hi = int(np.searchsorted(self.thread_counts, t))
        if self.thread_counts[min(hi, len(self.thread_counts) - 1)] == t:
            return self._per_read_s(min(hi, len(self.thread_counts) - 1), s)
        lo = hi - 1
        w = (np.log2(t) - np.log2(self.thread_counts[lo])) / (
            np.log2(self.thread_counts[hi]) - np.log2(self.thread_counts[lo]))
        # interpolate throughput (not time) between thread counts
        thr = (1 - w) * s / self._per_read_s(lo, s) + w * s / self._per_read_s(hi, s)
        return s / thr

    def throughput_mbps(self, chunk_bytes: int, threads: int) -> float:
        return chunk_bytes / float(self.per_read_s([chunk_bytes], threads)[0]) / 1e6

    def read_time_s(self, sizes: Iterable[int] | np.ndarray, threads: int) -> float:
        """Predicted wall time of one batch: `sizes` (bytes of each read) over `threads` workers."""
        s = np.asarray(sizes if isinstance(sizes, np.ndarray) else list(sizes), dtype=np.float64)
        if s.size == 0:
            return 0.0
        t_eff = max(1, min(int(threads), s.size))  # fewer reads than threads: fewer in flight
        if s.size <= 4096:  # a step's reads: directly (np.unique's sort costs more than it saves)
            return float(self.per_read_s(s, t_eff).sum())
        uniq, counts = np.unique(s, return_counts=True)
        return float(np.dot(self.per_read_s(uniq, t_eff), counts))

    def best_threads(self, chunk_bytes: int, *, max_threads: int = 64, tolerance: float = 0.05) -> int:
        """The fewest measured threads whose throughput at chunk_bytes is within `tolerance` of
        the best (more threads than that only cost CPU on a small machine)."""
        cands = [int(t) for t in self.thread_counts if t <= max_threads] or [int(self.thread_counts[0])]
        thr = {t: self.throughput_mbps(chunk_bytes, t) for t in cands}
        best = max(thr.values())
        return min(t for t, v in thr.items() if v >= (1 - tolerance) * best)

    def best_max_gap(self, row_bytes: int, threads: int, *, limit: int = 64) -> int:
        """The largest number of unneeded rows worth reading between two needed ones: reading
        `2 + gap` rows in one request must not take longer than two 1-row requests."""
        sizes = row_bytes * (2 + np.arange(limit + 1))
        merged = self.per_read_s(sizes, threads)
        two = 2 * float(self.per_read_s([row_bytes], threads)[0])
        ok = np.flatnonzero(merged <= two)
        return int(ok[-1]) if ok.size else 0
