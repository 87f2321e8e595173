"""`flashio bench device DIR`: the device profile the cost model is built on.

    profile = measure_device(DeviceBenchConfig(Path("/data")))   # minutes at the default grid
    profile.save("device-profile.json"); plot_profile(profile, "device-profile.png")

For every chunk size (4 KiB .. 1 MiB) and thread count (1 .. 64): random O_DIRECT reads of a
test file in DIR, evicted from the page cache first, with the runtime's own reader
(`BundleReader.read_rows`, batches of ids as the runtime issues them per layer; ids never
adjacent, so every read is exactly one chunk); then with fio at the same point when fio is
installed; then sequential throughput. The plot is the paper's Figure 2b for this device.
Then the memory side (flashio.bench.bandwidth): DRAM read and float32/float16/bfloat16
matrix-vector bandwidth for 1..N torch threads, the floor `flashio bench model` reports against.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashio.arena import AlignedArena, logical_block_size
from flashio.bench.bandwidth import (
    MemoryBenchConfig,
    default_memory_threads,
    measure_dram_read,
    measure_matvec,
    memory_markdown,
    plot_memory,
)
from flashio.bench.fio import fio_available, fio_randread, fio_sequential
from flashio.costmodel import DEFAULT_CHUNKS, DEFAULT_THREAD_COUNTS, DeviceProfile, ThroughputPoint
from flashio.errors import FlashError
from flashio.sizes import format_size
from flashio.storage import BundleReader, LayerExtent, evict_from_page_cache

log = logging.getLogger(__name__)

TEST_FILE = ".flashio-device-test.bin"
_BATCH_BYTES = 64 << 20  # at most this much per read_rows call (arena size)


@dataclass(frozen=True)
class DeviceBenchConfig:
    directory: Path
    chunks: tuple[int, ...] = DEFAULT_CHUNKS
    threads: tuple[int, ...] = DEFAULT_THREAD_COUNTS
    file_bytes: int = 4 << 30
    seconds: float = 0.5  # per point, the runtime's reader
    fio: bool = True
    fio_seconds: float = 1.0  # per point (fio's granularity is 1 s)
    keep_file: bool = False
    seed: int = 0
    memory: MemoryBenchConfig | None = None  # None: DRAM/matvec not measured (the profile says "default")

    def __post_init__(self) -> None:
        if not self.chunks or not self.threads:
            raise FlashError("give at least one chunk size and one thread count")
        if any(c % 512 or c <= 0 for c in self.chunks):
            raise FlashError(f"chunk sizes must be positive multiples of 512 bytes, got {self.chunks}")
        if self.file_bytes < 4 * max(self.chunks):
            raise FlashError(f"the test file ({format_size(self.file_bytes)}) must hold at least 4 of "
                             f"the largest chunk ({format_size(max(self.chunks))})")


def device_name(path: Path) -> str:
    """'vda (254:0)' for the block device holding `path`."""
    dev = os.stat(path).st_dev
    mm = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        return f"{Path(os.path.realpath(f'/sys/dev/block/{mm}')).name} ({mm})"
    except OSError:
        return f"({mm})"


def machine_info(device: str = "cpu") -> dict:
    info = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average": os.getloadavg()}
    if device != "cpu":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return info


def ensure_test_file(path: Path, size_bytes: int) -> None:
    """Incompressible, non-sparse data (reused when the size matches), fsynced so that the
    page-cache eviction before each measurement really empties it."""
    if path.exists() and path.stat().st_size == size_bytes:
        return
    free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
    if free < size_bytes + (1 << 30):
        raise FlashError(f"{path.parent} has {format_size(free)} free; the test file needs "
                         f"{format_size(size_bytes)} + 1 GiB: lower --size or choose another directory")
    block = np.random.default_rng(0).bytes(64 << 20)  # repeated: content is irrelevant, holes are not
    with open(path, "wb") as f:
        left = size_bytes
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def reader_randread(path: Path, file_bytes: int, chunk: int, threads: int, seconds: float,
                    rng: np.random.Generator, repeats: int = 3) -> float:
    """MB/s of the runtime's reader: random non-adjacent chunks, batches per read_rows call; the
    median of `repeats` runs of seconds / repeats (a burst of other I/O spoils one, not the point)."""
    n_rows = file_bytes // chunk
    batch = max(threads, min(max(256, 8 * threads), _BATCH_BYTES // chunk, n_rows // 2))
    runs = []
    with (BundleReader(path, [LayerExtent(0, n_rows, chunk)], threads=threads) as reader,
          AlignedArena(batch * chunk) as arena):
        if not reader.direct:
            raise FlashError(f"{path}: the filesystem refuses O_DIRECT (tmpfs?): device throughput "
                             "cannot be measured here; choose a directory on the device")
        out = arena.tensor(torch.uint8, (batch, chunk))
        for _ in range(repeats):
            total = 0
            t0 = time.perf_counter()
            while True:
                ids = np.sort(rng.choice(n_rows // 2, size=batch, replace=False)) * 2
                total += reader.read_rows(0, ids, out).bytes_read
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / repeats:
                    break
            runs.append(total / elapsed / 1e6)
        del out
    return float(np.median(runs))


def reader_sequential(path: Path, file_bytes: int, seconds: float, threads: int = 16) -> float:
    """MB/s of the runtime's reader over one contiguous range (how naive mode reads a layer)."""
    span = min(file_bytes, 256 << 20)
    row = 1 << 20
    n_rows = file_bytes // row
    total = 0
    with (BundleReader(path, [LayerExtent(0, n_rows, row)], threads=threads) as reader,
          AlignedArena(span) as arena):
        out = arena.tensor(torch.uint8, (span // row, row))
        t0 = time.perf_counter()
        start = 0
        while True:
            if start + span // row > n_rows:
                start = 0
            total += reader.read_layer(0, out, (start, start + span // row)).bytes_read
            start += span // row
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        del out
    return total / elapsed / 1e6


def measure_device(cfg: DeviceBenchConfig, progress: Callable[[str], None] | None = None) -> DeviceProfile:
    """Measure every (chunk, threads) point; returns the profile (see the module docstring)."""
    say = progress or (lambda msg: log.info("%s", msg))
    cfg.directory.mkdir(parents=True, exist_ok=True)
    path = cfg.directory / TEST_FILE
    file_bytes = cfg.file_bytes // max(cfg.chunks) * max(cfg.chunks)
    say(f"test file {path} ({format_size(file_bytes)})")
    ensure_test_file(path, file_bytes)
    rng = np.random.default_rng(cfg.seed)
    use_fio = cfg.fio and fio_available()
    ours, theirs = [], []
    try:
        evict_from_page_cache(path)
        for chunk in cfg.chunks:
            for t in cfg.threads:
                mbps = reader_randread(path, file_bytes, chunk, t, cfg.seconds, rng)
                ours.append(ThroughputPoint(chunk, t, round(mbps, 1)))
                ref = fio_randread(path, file_bytes, chunk_bytes=chunk, threads=t,
                                   seconds=cfg.fio_seconds) if use_fio else None
                if ref is not None:
                    theirs.append(ThroughputPoint(chunk, t, round(ref, 1)))
                say(f"{format_size(chunk):>10} x {t:2d} threads: flashio {mbps:7.0f} MB/s"
                    + (f", fio {ref:7.0f} MB/s" if ref is not None else ""))
        evict_from_page_cache(path)
        seq = reader_sequential(path, file_bytes, max(cfg.seconds, 1.0))
        fio_seq = fio_sequential(path, file_bytes, seconds=cfg.fio_seconds) if use_fio else None
        say(f"sequential: flashio {seq:.0f} MB/s" + (f", fio {fio_seq:.0f} MB/s" if fio_seq else ""))
    finally:
        if not cfg.keep_file:
            path.unlink(missing_ok=True)
    dram, matvec = (), ()
    if cfg.memory is not None:
        say(f"memory bandwidth: {format_size(cfg.memory.buffer_bytes)} buffer, threads {cfg.memory.threads}")
        dram = measure_dram_read(cfg.memory)
        say("DRAM read: " + ", ".join(f"{p.threads} thr {p.gbps:.1f} GB/s" for p in dram))
        matvec = measure_matvec(cfg.memory)
        for d in cfg.memory.dtypes:
            say(f"matvec {d}: " + ", ".join(f"{p.threads} thr {p.gbps:.1f} GB/s" for p in matvec if p.dtype == d))
    fd = os.open(cfg.directory, os.O_RDONLY)
    try:
        block = logical_block_size(fd)
    finally:
        os.close(fd)
    return DeviceProfile(
        random=tuple(ours), sequential_mbps=round(seq, 1), fio_random=tuple(theirs),
        fio_sequential_mbps=None if fio_seq is None else round(fio_seq, 1),
        device=device_name(cfg.directory), path=str(cfg.directory.resolve()), block_bytes=block,
        file_bytes=file_bytes, seconds_per_point=cfg.seconds,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), machine=machine_info(),
        dram_read=dram, matvec=matvec, memory_buffer_bytes=cfg.memory.buffer_bytes if cfg.memory else 0,
        matvec_shape=tuple(cfg.memory.shape) if cfg.memory else ())


def memory_config(*, threads: tuple[int, ...] | None = None, **kw) -> MemoryBenchConfig:
    """The memory measurement's settings; threads None: 1, 2, 4 .. the CPU count."""
    return MemoryBenchConfig(threads=threads or default_memory_threads(os.cpu_count() or 1), **kw)


def profile_markdown(profile: DeviceProfile) -> str:
    """Random-read MB/s, chunk sizes down, thread counts across ("flashio / fio" per cell)."""
    ours, ref = profile.table("flashio"), profile.table("fio")
    chunks = sorted({c for c, _ in ours})
    threads = sorted({t for _, t in ours})
    head = "| chunk | " + " | ".join(f"{t} thr" for t in threads) + " |"
    lines = [f"Random O_DIRECT reads, MB/s (flashio reader{' / fio psync' if ref else ''}), "
             f"{profile.device}, {profile.created_at}", "", head, "|---" * (len(threads) + 1) + "|"]
    for c in chunks:
        cells = []
        for t in threads:
            cell = f"{ours.get((c, t), float('nan')):.0f}"
            if (c, t) in ref:
                cell += f" / {ref[(c, t)]:.0f}"
            cells.append(cell)
        lines.append(f"| {format_size(c)} | " + " | ".join(cells) + " |")
    seq = f"Sequential (1 MiB): flashio {profile.sequential_mbps:.0f} MB/s"
    if profile.fio_sequential_mbps:
        seq += f", fio (libaio, 16 in flight) {profile.fio_sequential_mbps:.0f} MB/s"
    return "\n".join([*lines, "", seq, "", memory_markdown(profile)])


def plot_profile(profile: DeviceProfile, path: str | os.PathLike) -> Path | None:
    """Throughput vs chunk size, one line per thread count (fio dashed); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'flashio[pipeline]')")
        return None
    ours, ref = profile.table("flashio"), profile.table("fio")
    chunks = sorted({c for c, _ in ours})
    fig, (ax, mem_ax) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("viridis")
    threads = sorted({t for _, t in ours})
    for k, t in enumerate(threads):
        color = cmap(k / max(len(threads) - 1, 1))
        ax.plot([c / 1024 for c in chunks], [ours.get((c, t), np.nan) for c in chunks], "o-", color=color,
                label=f"{t} threads")
        if ref:
            ax.plot([c / 1024 for c in chunks], [ref.get((c, t), np.nan) for c in chunks], "--", color=color,
                    alpha=0.6)
    ax.axhline(profile.sequential_mbps, color="grey", lw=1, ls=":", label="sequential (flashio)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (KiB)")
    ax.set_ylabel("random read throughput (MB/s)")
    ax.set_title(f"{profile.device}: O_DIRECT random reads (solid: flashio reader, dashed: fio)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    plot_memory(profile, mem_ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
