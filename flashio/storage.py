"""The flash reader: coalesced, threaded O_DIRECT ``preadv`` of FFN bundles (DESIGN.md section 3).

    extents = [LayerExtent(offset_bytes=4096, n_rows=16384, row_bytes=16384), ...]
    with BundleReader("artifact/ffn.safetensors", extents, threads=16) as reader:
        out = arena.tensor(torch.float16, (len(ids), bundle_width))  # arena: an AlignedArena
        result = reader.read_rows(layer, ids, out)                   # ids: sorted unique int64

Why it is built this way (measured on the target machine class, DESIGN.md section 7):
- mmap / safetensors slices of scattered 16 KiB rows read 200-440x more than needed (readahead);
  O_DIRECT reads exactly the bytes asked for and keeps the page cache out of the DRAM budget.
- Small random reads are IOPS-bound and a virtio disk needs 16-32 reads in flight, so a persistent
  pool issues them; the Python cost per read (~10 us) is the ceiling, so each call submits ONE task
  per thread with a contiguous share of the reads (one future per read caps near 48 k IOPS). Where
  flashio's native library is built (flashio.kernels), a share's ``preadv`` calls run in one C call
  (``flashio_read_pieces``) with the GIL released throughout: a read per Python call took the
  interpreter lock back after every read, and the compute thread that the reads overlap with
  waited for it (at half-scale Llama int4, overlap made a token's compute 40 -> 90 ms); else the
  per-read loop does little more than slice a memoryview and call ``os.preadv``.
- Where the kernel has io_uring (Linux 5.1+, not disabled), reads straight into ``out`` go
  through one ring instead: URING_DEPTH (at least ``threads``) reads in flight, submitted and
  reaped in batches by ONE thread (``flashio_uring_read_pieces``). Random 24 KiB O_DIRECT reads,
  64 in flight: the same ~1 GB/s as 64 threads, 3.4 against 8.4 us of CPU per read (the blocked
  threads' wake-ups and context switches), CPU that the overlapped compute shares two cores
  with. ``FLASHIO_URING=0``: the threads. A read into one place goes as IORING_OP_READ (no
  iovec), and as READ_FIXED where that place is in a buffer given to ``register_buffers`` (the
  window caches: their pages pinned once instead of for every read, 2.6 against 4.3 us of CPU a
  read on a 2-vCPU VM).
- Adjacent neuron ids are coalesced into one read (``plan_runs``); the few unneeded rows inside a
  run land in a per-thread scratch buffer, so the needed rows still go straight into ``out``.

Three ways a batch is read, best first: O_DIRECT straight into ``out`` (when ``out``, the row size
and the layer offset are block-aligned: the normal case for arena memory and bundles that are a
multiple of 512 bytes); O_DIRECT of the block-aligned superset of each run into a scratch buffer,
then a copy of the needed rows; buffered ``preadv`` straight into ``out`` (when O_DIRECT is off or
refused, e.g. by tmpfs).

``submit_rows`` starts the same reads on the pool and returns at once (a ``PendingRead``), so
the caller can compute while they fly; ``split=2`` reads each row as two separate requests (the
paper's unbundled layout, for comparison); a ``CostModel`` given to the reader predicts the time
of every batch from the device profile (``ReadResult.predicted_s``).

Which reads a batch needs (coalescing, cutting, sharing out over threads) is planned in
``flashio.readplan``; this module owns the file descriptors, the pool and the scratch memory.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from flashio import kernels
from flashio.arena import PAGE_BYTES, AlignedArena, byte_view, logical_block_size, round_up
from flashio.costmodel import CostModel
from flashio.errors import FlashReadError, FormatError
from flashio.readplan import (
    MAX_READ_BYTES,
    LayerExtent,
    PendingRead,
    Piece,
    ReadResult,
    ScatterTables,
    check_ids,
    max_read_rows,
    plan_pieces,
    plan_range,
    plan_runs,
    plan_split_pieces,
    scatter_pieces,
    scatter_tables,
    split_pieces,
)

__all__ = ["DEFAULT_THREADS", "MAX_READ_BYTES", "AlignedArena", "BundleReader", "LayerExtent", "PendingRead",
           "ReadResult", "evict_from_page_cache", "logical_block_size", "plan_runs"]

log = logging.getLogger(__name__)

# the reads of a thread's share in one native call (flashio.kernels; see above); "0": Python's preadv
NATIVE_READS = os.environ.get("FLASHIO_NATIVE_READS", "1") != "0"
# aligned reads through one io_uring per reading thread (native library; see above); "0": threads
URING_READS = os.environ.get("FLASHIO_URING", "1") != "0"
# a ring's reads in flight (FLASHIO_URING_DEPTH; waiting on a ring costs no CPU, unlike a
# blocked thread's wake-up). Llama-2-7B shape, half DRAM, a token's unhidden I/O: 83-91 ms at 128
# against 111-120 at 64 (bfloat16 compute), 97-98 at 128 against 105-108 at 256 (float16)
URING_DEPTH = int(os.environ.get("FLASHIO_URING_DEPTH", "128"))
DEFAULT_THREADS = 16  # DESIGN.md section 7: 16-32 threads saturate the virtio disk at 16 KiB


# submit_rows' reads into aligned scattered rows (the window caches') go to a native reading
# thread of the reader's own (flashio_reads_*) where reads go through io_uring; "0": the pool
READS_THREAD = os.environ.get("FLASHIO_READS_THREAD", "1") != "0"


def evict_from_page_cache(path: str | os.PathLike) -> None:
    """Drop ``path``'s clean pages from the page cache (before timing cold reads).

    Dirty pages are not dropped: write the file with a final ``os.fsync`` first.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _distinct(values: np.ndarray, bound: int) -> bool:
    """Whether `values` (ints in [0, bound)) are distinct: a mark per value, ~20x faster than
    np.unique for the few hundred rows of a layer's reads."""
    seen = np.zeros(bound, dtype=bool)
    seen[values] = True
    return int(np.count_nonzero(seen)) == values.size


class BundleReader:
    """Reads rows (neuron bundles) of the layer blocks of one file, see the module docstring.

    Owns two file descriptors (O_DIRECT and buffered), a thread pool and per-thread scratch
    arenas: ``close()`` them, or use the reader as a context manager. ``read_rows`` may be called
    from several threads at once; ``close`` must not race with reads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        extents: Sequence[LayerExtent],
        *,
        threads: int | None = None,
        max_gap: int = 0,
        direct: bool = True,
        cost_model: CostModel | None = None,
    ):
        self._path = os.fspath(path)
        self._extents = tuple(extents)
        self._threads = DEFAULT_THREADS if threads is None else int(threads)
        if self._threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0 rows, got {max_gap}")
        self.max_gap = int(max_gap)
        self.cost_model = cost_model
        self._fd = -1  # buffered
        self._fd_direct = -1  # -1: O_DIRECT off (not asked for, or refused by the filesystem)
        self._pool: ThreadPoolExecutor | None = None
        self._tls = threading.local()  # .arena: this thread's scratch AlignedArena; .ring: its io_uring
        self._arenas: list[AlignedArena] = []
        self._rings: list[int] = []  # every thread's io_uring (flashio.kernels), closed with the reader
        self._fixed: list[tuple[int, int]] = []  # register_buffers: (address, bytes), in every ring
        self._fixed_ok = True  # False once a ring refused them (RLIMIT_MEMLOCK): not asked again
        self._reads: int | None = None  # submit_rows' native reading thread (flashio_reads_open)
        self._reads_ok = True  # False once it could not be started
        self._reads_pid = os.getpid()  # the process whose thread it is
        self._jobs: dict[int, _NativeJob] = {}  # its jobs not yet waited for
        self._gaps: AlignedArena | None = None  # its scratch
        self._uring = URING_READS  # False once a ring could not be opened (then threads)
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise FlashReadError(f"cannot open {self._path!r}: {e.strerror}") from e
        try:
            opened = os.fstat(self._fd)
            self._identity = (opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns)
            self._validate_extents(opened.st_size)
            self._block = logical_block_size(self._fd)
            if direct:
                self._fd_direct = self._open_direct()
        except BaseException:
            self.close()
            raise
        # gapped runs need one iovec per segment and per gap: stay under the kernel's IOV_MAX
        self._iov_max = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="flashio-read")

    def _validate_extents(self, file_bytes: int) -> None:
        for layer, ext in enumerate(self._extents):
            if ext.offset_bytes < 0 or ext.n_rows < 0 or ext.row_bytes <= 0:
                raise FormatError(f"{self._path}: layer {layer} has an invalid extent {ext}")
            if ext.offset_bytes + ext.nbytes > file_bytes:
                raise FormatError(
                    f"{self._path}: layer {layer}'s extent {ext} ends at byte "
                    f"{ext.offset_bytes + ext.nbytes}, beyond the file's {file_bytes} bytes: "
                    "the file is truncated or the manifest does not belong to it"
                )

    def _open_direct(self) -> int:
        """The O_DIRECT fd, or -1 (logged) when the filesystem refuses O_DIRECT."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            log.info("%s: O_DIRECT refused at open (%s): reading through the page cache",
                     self._path, e.strerror)
            return -1
        # some filesystems accept the flag and fail the reads: probe one aligned block
        with AlignedArena(self._block) as probe:
            try:
                os.preadv(fd, [probe.memoryview], 0)
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EINVAL:
                    raise FlashReadError(f"cannot read {self._path!r}: {e.strerror}") from e
                log.info("%s: O_DIRECT reads refused (%s): reading through the page cache",
                         self._path, e.strerror)
                return -1
        return fd

    @property
    def path(self) -> str:
        return self._path

    @property
    def direct(self) -> bool:
        """True when reads go through O_DIRECT (False when asked not to or refused)."""
        return self._fd_direct >= 0

    def check_unchanged(self) -> None:
        """Raise FlashReadError when the file this reader opened was deleted or replaced since
        (the open descriptor would keep reading the old, unlinked inode without noticing)."""
        try:
            now = os.stat(self._path)
        except FileNotFoundError:
            raise FlashReadError(f"{self._path} was deleted while the model was open; reopen the artifact") from None
        _, ino, size, _ = self._identity
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != self._identity:
            raise FlashReadError(f"{self._path} was replaced or modified while the model was open "
                                 f"(inode {ino} -> {now.st_ino}, {size} -> {now.st_size} bytes); "
                                 "reopen the artifact")

    @property
    def extents(self) -> tuple[LayerExtent, ...]:
        return self._extents

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def block_bytes(self) -> int:
        """O_DIRECT alignment in bytes (the device's logical block size)."""
        return self._block

    # -- public reads -------------------------------------------------------------------------

    def read_rows(self, layer: int, ids: np.ndarray, out: torch.Tensor, *, split: int = 1,
                  rows: np.ndarray | None = None) -> ReadResult:
        """Read rows ``ids`` (sorted unique) of ``layer`` into ``out``: row j receives row ids[j].

        ``out``: C-contiguous CPU tensor of ``len(ids) * row_bytes`` bytes, viewed as
        ``[len(ids), row_bytes]`` uint8 when its dtype is wider. ``split=k`` reads every row as
        k separate requests of ``row_bytes / k`` (all first parts, then all second parts...),
        never coalesced: how the paper's unbundled layout reads up and down projections.
        ``rows``: where each id lands instead, out's row rows[j] (distinct; out then holds any
        number of rows of row_bytes, e.g. a whole window cache whose freed rows take the new
        neurons); runs are still read as one request each, into one iovec per row.
        """
        return self._rows(layer, ids, out, split, wait_all=True, rows=rows)

    def submit_rows(self, layer: int, ids: np.ndarray, out: torch.Tensor, *, split: int = 1,
                    rows: np.ndarray | None = None) -> PendingRead:
        """As ``read_rows``, but return at once; the pool reads while the caller works."""
        return self._rows(layer, ids, out, split, wait_all=False, rows=rows)

    def _rows(self, layer: int, ids: np.ndarray, out: torch.Tensor, split: int, wait_all: bool,
              rows: np.ndarray | None = None):
        t0 = time.perf_counter()
        if not wait_all and rows is not None and split == 1 and READS_THREAD:
            pending = self._submit_native(layer, ids, out, rows, t0)
            if pending is not None:
                return pending
        ext = self._extent(layer)
        ids = check_ids(ids)
        if ids.size and (ids[0] < 0 or ids[-1] >= ext.n_rows):
            raise ValueError(
                f"layer {layer} has rows [0, {ext.n_rows}), ids span [{ids[0]}, {ids[-1]}]"
            )
        if split < 1 or ext.row_bytes % split:
            raise ValueError(f"split={split} must be >= 1 and divide the row size {ext.row_bytes}")
        if rows is None:
            out_mv = byte_view(out, ids.size * ext.row_bytes)
        else:
            rows = np.asarray(rows, dtype=np.int64)
            n_out = (out.numel() * out.element_size()) // ext.row_bytes
            if split != 1 or rows.shape != ids.shape:
                raise ValueError(f"rows must give one destination per id ({ids.size}), with split=1")
            if rows.size and (rows.min() < 0 or rows.max() >= n_out or not _distinct(rows, n_out)):
                raise ValueError(f"rows must be distinct rows of out [0, {n_out})")
            out_mv = byte_view(out, n_out * ext.row_bytes)
        if ids.size == 0:
            r = ReadResult(0, 0, self.direct, time.perf_counter() - t0, 0.0)
            return r if wait_all else PendingRead([], 0, self.direct, t0, 0.0)
        if split == 1 and rows is not None and self._tables_apply(out, ext):
            tables = scatter_tables(ids, rows, ext, max_gap=self.max_gap, iov_max=self._iov_max)
            return self._execute_tables(tables, out_mv, t0, wait_all)
        if split == 1:
            pieces, nbytes = plan_pieces(ids, ext, max_gap=self.max_gap, iov_max=self._iov_max)
            if rows is not None:
                pieces = scatter_pieces(pieces, rows, ext.row_bytes)
        else:
            pieces, nbytes = plan_split_pieces(ids, ext, split)
        return self._execute(pieces, nbytes, out, out_mv, ext.offset_bytes, ext.row_bytes // split,
                             t0, wait_all)

    def read_layer(self, layer: int, out: torch.Tensor, rows: tuple[int, int] | None = None) -> ReadResult:
        """Read the whole ``[n_rows, row_bytes]`` block of ``layer`` into ``out`` (naive mode),
        or only rows ``[start, stop)`` of it when ``rows`` is given."""
        t0 = time.perf_counter()
        ext = self._extent(layer)
        start, stop = rows if rows is not None else (0, ext.n_rows)
        if not 0 <= start <= stop <= ext.n_rows:
            raise ValueError(f"layer {layer} has rows [0, {ext.n_rows}), asked for [{start}, {stop})")
        base, total = ext.offset_bytes + start * ext.row_bytes, (stop - start) * ext.row_bytes
        out_mv = byte_view(out, total)
        if total == 0:
            return ReadResult(0, 0, self.direct, time.perf_counter() - t0, 0.0)
        pieces, nbytes = plan_range(base, total, self._block)
        return self._execute(pieces, nbytes, out, out_mv, base, total, t0)

    # -- layers -------------------------------------------------------------------------------

    def _extent(self, layer: int) -> LayerExtent:
        if self._pool is None:
            raise ValueError(f"BundleReader({self._path!r}) is closed")
        if not 0 <= layer < len(self._extents):
            raise IndexError(f"layer {layer} out of range: the file has {len(self._extents)} layers")
        return self._extents[layer]

    # -- execution ----------------------------------------------------------------------------

    def _execute(
        self, pieces: list[Piece], nbytes: np.ndarray, out: torch.Tensor, out_mv: memoryview,
        base_bytes: int, size_bytes: int, t0: float, wait_all: bool = True,
    ) -> ReadResult | PendingRead:
        """Choose the way to read (module docstring), split pieces over threads, run, time."""
        block = self._block
        aligned = (out.data_ptr() | base_bytes | size_bytes) % block == 0
        worker: Callable[[int, list[Piece], memoryview, int], int]
        if self._fd_direct >= 0 and aligned:
            worker, fd, scratch_bytes = self._read_into, self._fd_direct, int(nbytes.max())
        elif self._fd_direct >= 0:
            worker, fd, scratch_bytes = self._read_staged, self._fd_direct, int(nbytes.max()) + 2 * block
        else:
            worker, fd, scratch_bytes = self._read_into, self._fd, int(nbytes.max())
        if worker == self._read_into and self._uring_library() is not None:
            worker = self._read_uring  # one share: the ring keeps _depth() of its reads in flight
            groups = [pieces]
        else:
            groups = split_pieces(pieces, nbytes, self._threads)
        predicted = (self.cost_model.read_time_s(nbytes, self._threads)
                     if self.cost_model is not None else float("nan"))
        if not wait_all:  # every share goes to the pool; each reports (bytes, end time)
            futures = [self._pool.submit(_timed, worker, fd, g, out_mv, scratch_bytes) for g in groups]
            return PendingRead(futures, len(pieces), fd == self._fd_direct, t0, predicted)
        futures = [self._pool.submit(worker, fd, g, out_mv, scratch_bytes) for g in groups[1:]]
        try:
            total = worker(fd, groups[0], out_mv, scratch_bytes)  # the caller takes a share too
        finally:
            wait(futures)  # never leave while a thread may still write into `out`
        total += sum(f.result() for f in futures)  # re-raises a worker's FlashReadError
        return ReadResult(total, len(pieces), fd == self._fd_direct, time.perf_counter() - t0, predicted)

    def _tables_apply(self, out: torch.Tensor, ext: LayerExtent) -> bool:
        """Whether reads into scattered rows take the table path: O_DIRECT straight into out's
        rows through io_uring (readplan.ScatterTables; the other paths plan pieces)."""
        return (self._fd_direct >= 0 and (out.data_ptr() | ext.offset_bytes | ext.row_bytes) % self._block == 0
                and self._uring_library() is not None)

    def _execute_tables(self, t: ScatterTables, out_mv: memoryview, t0: float,
                        wait_all: bool) -> ReadResult | PendingRead:
        """Run the tables' reads as one share (io_uring keeps them in flight; without a ring the
        native preadv loop, on one thread)."""
        predicted = (self.cost_model.read_time_s(t.nbytes, self._threads)
                     if self.cost_model is not None else float("nan"))
        scratch_bytes = int(t.nbytes.max())
        if not wait_all:
            future = self._pool.submit(_timed, self._read_tables, t, out_mv, scratch_bytes)
            return PendingRead([future], len(t.offs), True, t0, predicted)
        total = self._read_tables(t, out_mv, scratch_bytes)
        return ReadResult(total, len(t.offs), True, time.perf_counter() - t0, predicted)

    def _read_tables(self, t: ScatterTables, out_mv: memoryview, scratch_bytes: int) -> int:
        lib = kernels.library()
        iov = np.empty((t.dest.size, 2), dtype=np.uint64)
        iov[:, 0] = ctypes.addressof(ctypes.c_char.from_buffer(out_mv)) + np.maximum(t.dest, 0).astype(np.uint64)
        iov[:, 1] = t.lens
        gaps = t.dest < 0
        if gaps.any():
            iov[gaps, 0] = ctypes.addressof(ctypes.c_char.from_buffer(self._scratch(scratch_bytes)))
        ring = self._ring(lib) if self._uring else None
        args = (self._fd_direct, len(t.offs), t.offs.ctypes.data, t.first.ctypes.data, iov.ctypes.data)
        got = (lib.flashio_read_pieces(*args) if ring is None
               else lib.flashio_uring_read_pieces(ring, *args, self._depth()))
        if got < 0:
            return self._native_result(got, list(zip(t.offs.tolist(), t.nbytes.tolist())))
        return got

    def _submit_native(self, layer: int, ids: np.ndarray, out: torch.Tensor, rows: np.ndarray,
                       t0: float) -> PendingRead | None:
        """submit_rows into aligned scattered rows (a window cache's), the runtime's every layer,
        in one native call: validated, planned (readplan.scatter_tables) and queued on the
        reader's reading thread. None where that does not apply (or the arguments are wrong:
        the general path then says what is wrong)."""
        if not (type(ids) is np.ndarray and type(rows) is np.ndarray and ids.dtype == np.int64 == rows.dtype
                and ids.ndim == 1 and rows.shape == ids.shape and ids.size and ids.flags.c_contiguous
                and rows.flags.c_contiguous and out.device.type == "cpu" and out.is_contiguous()):
            return None
        reads = self._reads_thread()
        if reads is None or not 0 <= layer < len(self._extents):
            return None
        ext = self._extents[layer]
        out_bytes = out.numel() * out.element_size()
        if out_bytes % ext.row_bytes or not self._tables_apply(out, ext):
            return None
        lib = kernels.library()
        err = ctypes.c_int(0)
        max_rows = max_read_rows(ext.row_bytes, self._iov_max)
        scratch = self._shared_scratch(max_rows * ext.row_bytes) if self.max_gap else None
        job = lib.flashio_reads_rows(reads, self._fd_direct, ids.ctypes.data, rows.ctypes.data, ids.size, ext.n_rows,
                                     out_bytes // ext.row_bytes, ext.row_bytes, ext.offset_bytes, self.max_gap, max_rows,
                                     out.data_ptr(), scratch, self._depth(), ctypes.byref(err))
        if not job:
            if err.value == errno.ENOMEM:
                raise MemoryError(f"no memory to plan {ids.size} reads")
            return None
        native = _NativeJob(self, reads, job)
        with self._lock:
            self._jobs[id(native)] = native
        cost = self.cost_model
        predicted = ((lambda: cost.read_time_s(native.sizes(), self._threads)) if cost is not None
                     else float("nan"))
        return PendingRead([native], native.pieces, True, t0, predicted)

    def _reads_thread(self) -> int | None:
        """The native reading thread (opened on first use) where reads go through io_uring and
        READS_THREAD is on, else None. A forked child has none of its parent's threads: it
        reads through the pool (a job queued for a thread that is not there would never end)."""
        if self._reads_pid != os.getpid():
            return None
        if self._reads is None and self._reads_ok and READS_THREAD:
            lib = self._uring_library()
            if lib is None:
                return None
            with self._lock:
                if self._reads is None:
                    err = ctypes.c_int(0)
                    reads = lib.flashio_reads_open(max(8, 1 << (self._depth() - 1).bit_length()), ctypes.byref(err))
                    if not reads:
                        self._reads_ok = False
                        log.info("%s: no reading thread (%s): reads go through the pool", self._path,
                                 os.strerror(err.value))
                        return None
                    self._register(lib, functools.partial(lib.flashio_reads_buffers, reads))
                    self._reads = reads
        return self._reads

    def _shared_scratch(self, nbytes: int) -> int:
        """The address of scratch for the reading thread's gaps (what lands there is thrown away,
        so jobs may share it); a larger one replaces it, the old one kept until close (a queued
        job may still read into it)."""
        with self._lock:
            if self._gaps is None or self._gaps.nbytes < nbytes:
                self._gaps = AlignedArena(round_up(max(nbytes, PAGE_BYTES), PAGE_BYTES))
                self._arenas.append(self._gaps)
            return ctypes.addressof(ctypes.c_char.from_buffer(self._gaps.memoryview))

    def _scratch(self, nbytes: int) -> memoryview:
        """This thread's scratch buffer (page-aligned, >= nbytes), kept between calls."""
        arena = getattr(self._tls, "arena", None)
        if arena is None or arena.nbytes < nbytes:
            new = AlignedArena(round_up(max(nbytes, PAGE_BYTES), PAGE_BYTES))
            with self._lock:
                if arena is not None:
                    self._arenas.remove(arena)
                    arena.close()
                self._arenas.append(new)
            self._tls.arena = arena = new
        return arena.memoryview

    def _read_into(self, fd: int, work: list[Piece], out_mv: memoryview, scratch_bytes: int) -> int:
        """preadv straight into out's memory; rows of a run that were not asked for go to scratch."""
        lib = kernels.library() if NATIVE_READS else None
        if lib is not None:
            return self._read_native(lib, fd, work, out_mv, scratch_bytes)
        preadv = os.preadv
        scratch = None
        total = 0
        off, n = -1, 0
        try:
            for off, n, dest, segs in work:
                if segs is None:  # the hot path: one iovec, no Python work beyond a slice
                    got = preadv(fd, [out_mv[dest : dest + n]], off)
                else:
                    if scratch is None:
                        scratch = self._scratch(scratch_bytes)
                    got = preadv(fd, _iovecs(segs, n, out_mv, scratch), off)
                if got != n:
                    raise self._short_read(off, n, got)
                total += got
        except OSError as e:
            raise self._os_error(e, off, n) from e
        return total

    def _uring_library(self):
        """The native library when reads go through io_uring, else None."""
        return kernels.library() if self._uring and NATIVE_READS else None

    def _ring(self, lib) -> int | None:
        """This thread's io_uring (opened on first use), or None when the kernel refuses one."""
        ring = getattr(self._tls, "ring", None)
        if ring is None and self._uring:
            err = ctypes.c_int(0)
            ring = lib.flashio_uring_open(max(8, 1 << (self._depth() - 1).bit_length()), ctypes.byref(err))
            if not ring:
                self._uring = False
                log.info("%s: no io_uring (%s): reading with %d threads", self._path, os.strerror(err.value),
                         self._threads)
                return None
            with self._lock:
                self._rings.append(ring)
                self._register(lib, functools.partial(lib.flashio_uring_buffers, ring))
            self._tls.ring = ring
        return ring

    def register_buffers(self, buffers: Sequence[torch.Tensor]) -> bool:
        """Register the memory that reads land in (e.g. the window caches' rows) with every
        io_uring of this reader, now and when a thread opens one: a read into one place inside
        them then skips the per-read pinning of its pages (READ_FIXED). Replaces what was
        registered; ``()`` releases it, which the owner must do before that memory is freed
        (registered pages stay pinned). Call only while no read is in flight. Returns whether the
        buffers are registered: False without io_uring, or when the kernel refuses (pinning
        counts against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK); reads then go as
        before. Registration faults in every page of the buffers: here, on the calling thread
        (a ring is opened for it), not in the first reads."""
        lib = self._uring_library()
        with self._lock:
            self._fixed = [(t.data_ptr(), t.numel() * t.element_size()) for t in buffers
                           if t.device.type == "cpu" and t.numel()]
            ok = [self._register(lib, ring) for ring in self._all_rings(lib)] if lib is not None else [False]
        if lib is not None and self._fixed and getattr(self._tls, "ring", None) is None:
            ok.append(self._ring(lib) is not None and self._fixed_ok)
        return all(ok)

    def _register(self, lib, ring: Callable[[int, int | None], int]) -> bool:
        """Give a ring the registered buffers (self._fixed), or none; under self._lock. `ring`
        registers on one: flashio_uring_buffers bound to a thread's ring, or flashio_reads_buffers
        bound to the reading thread (whose ring only it may change)."""
        if not self._fixed or not self._fixed_ok:
            ring(0, None)
            return not self._fixed
        table = np.array(self._fixed, dtype=np.uint64)
        got = ring(len(table), table.ctypes.data)
        if got < 0:
            self._fixed_ok = False
            log.info("%s: io_uring refused %d registered buffers of %.1f GB (%s): reads pin their pages "
                     "each time (a higher `ulimit -l`, or CAP_IPC_LOCK, lets them register)", self._path,
                     len(table), int(table[:, 1].sum()) / 1e9, os.strerror(-got))
            for r in self._all_rings(lib):
                r(0, None)
        return got >= 0

    def _all_rings(self, lib) -> list[Callable[[int, int | None], int]]:
        """The threads' rings and the reading thread's, as `_register` takes them."""
        rings = [functools.partial(lib.flashio_uring_buffers, ring) for ring in self._rings]
        return rings + ([functools.partial(lib.flashio_reads_buffers, self._reads)] if self._reads is not None else [])

    def _depth(self) -> int:
        """Reads a ring keeps in flight: at least the threads', at least URING_DEPTH."""
        return max(self._threads, URING_DEPTH)

    def _read_uring(self, fd: int, work: list[Piece], out_mv: memoryview, scratch_bytes: int) -> int:
        """_read_into's reads through this thread's io_uring, _depth() of them in flight."""
        lib = kernels.library()
        ring = self._ring(lib)
        if ring is None:
            return self._read_native(lib, fd, work, out_mv, scratch_bytes)
        o, f, v = self._native_tables(work, out_mv, scratch_bytes)
        got = lib.flashio_uring_read_pieces(ring, fd, len(o), o.ctypes.data, f.ctypes.data, v.ctypes.data,
                                            self._depth())
        return self._native_result(got, work)

    def _read_native(self, lib, fd: int, work: list[Piece], out_mv: memoryview, scratch_bytes: int) -> int:
        """_read_into's reads in one call of the native library (GIL released for all of them)."""
        o, f, v = self._native_tables(work, out_mv, scratch_bytes)
        got = lib.flashio_read_pieces(fd, len(o), o.ctypes.data, f.ctypes.data, v.ctypes.data)
        return self._native_result(got, work)

    def _native_tables(self, work: list[Piece], out_mv: memoryview,
                       scratch_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The native read calls' arguments: each piece's file offset, its first iovec, and the
        iovecs (address, bytes) of all pieces: out's rows, scratch for the gaps."""
        base = ctypes.addressof(ctypes.c_char.from_buffer(out_mv))
        sbase = None
        offs, first, iov = [], [0], []
        for off, n, dest, segs in work:
            offs.append(off)
            if segs is None:
                iov += (base + dest, n)
            else:
                if sbase is None:
                    sbase = ctypes.addressof(ctypes.c_char.from_buffer(self._scratch(scratch_bytes)))
                for d, k in _spans(segs, n):
                    iov += (sbase if d is None else base + d, k)
            first.append(len(iov) // 2)
        return np.array(offs, np.int64), np.array(first, np.int64), np.array(iov, np.uint64)

    def _native_result(self, got: int, work: list[Piece]) -> int:
        """The bytes a native read call returned, or its error raised as FlashReadError."""
        if got <= -1_000_000:  # the file ended inside piece i
            off, n = work[-1_000_000 - got][:2]
            raise self._short_read(off, n, 0)
        if got < 0:
            raise self._os_error(OSError(-got, os.strerror(-got)), work[0][0], sum(p[1] for p in work))
        return got

    def _read_staged(self, fd: int, work: list[Piece], out_mv: memoryview, scratch_bytes: int) -> int:
        """O_DIRECT of each piece's block-aligned superset into scratch, then copy the rows out."""
        preadv = os.preadv
        block = self._block
        stage = self._scratch(scratch_bytes)
        lib = kernels.library() if NATIVE_READS else None
        if lib is not None:  # in one native call, as _read_native
            base = ctypes.addressof(ctypes.c_char.from_buffer(out_mv))
            lo, span, need, first, seg = [], [], [], [0], []
            for off, n, dest, segs in work:
                a = off - off % block
                lo.append(a)
                span.append(round_up(off + n, block) - a)
                need.append(off - a + n)
                for src, d, k in ((0, dest, n),) if segs is None else segs:
                    seg += (off - a + src, base + d, k)
                first.append(len(seg) // 3)
            arrays = [np.array(v, np.int64) for v in (lo, span, need, first, seg)]
            got = lib.flashio_read_staged(fd, len(lo), *[v.ctypes.data for v in arrays],
                                          ctypes.addressof(ctypes.c_char.from_buffer(stage)))
            return self._native_result(got, work)
        total = 0
        off, n = -1, 0
        try:
            for off, n, dest, segs in work:
                lo = off - off % block  # [lo, hi): the aligned superset of [off, off + n)
                hi = round_up(off + n, block)
                got = preadv(fd, [stage[: hi - lo]], lo)
                skip = off - lo
                if got < skip + n:  # the superset may pass EOF; the piece itself may not
                    raise self._short_read(off, n, max(got - skip, 0))
                if segs is None:
                    out_mv[dest : dest + n] = stage[skip : skip + n]
                else:
                    for src, d, k in segs:
                        out_mv[d : d + k] = stage[skip + src : skip + src + k]
                total += got
        except OSError as e:
            raise self._os_error(e, off, n) from e
        return total

    def _short_read(self, offset: int, expected: int, got: int) -> FlashReadError:
        try:
            size = f"{os.fstat(self._fd).st_size} bytes"
        except OSError:
            size = "unknown"
        return FlashReadError(
            f"short read from {self._path}: at offset {offset} expected {expected} bytes, got "
            f"{got} (file size now {size}): the file was truncated or replaced while open"
        )

    def _os_error(self, e: OSError, offset: int, expected: int) -> FlashReadError:
        return FlashReadError(f"read of {expected} bytes at offset {offset} from {self._path} "
                              f"failed: [errno {e.errno}] {e.strerror}")

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads, close the files and free the scratch arenas (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            reads, self._reads = self._reads, None
        if self._reads_pid != os.getpid():  # a forked child: its parent's thread and jobs are not here
            jobs, reads = [], None
        for job in jobs:  # never close the file or free memory under a read
            job.wait()
        if reads is not None:
            kernels.library().flashio_reads_close(reads)
        for attr in ("_fd_direct", "_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        with self._lock:
            for arena in self._arenas:
                arena.close()
            self._arenas.clear()
            rings, self._rings = self._rings, []
        if rings:
            lib = kernels.library()
            for ring in rings:
                lib.flashio_uring_close(ring)

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BundleReader({self._path!r}, layers={len(self._extents)}, "
                f"threads={self._threads}, max_gap={self.max_gap}, direct={self.direct})")


class _NativeJob:
    """A job on the reader's native reading thread (flashio_reads_rows), as PendingRead takes a
    future: ``done()``, ``result()`` -> (bytes, when its last read completed)."""

    def __init__(self, reader: BundleReader, reads: int, job: int):
        self._reader, self._reads, self._job = reader, reads, job
        self.pieces = int(kernels.library().flashio_job_pieces(job, None, -1, None))
        self._got: tuple[int, float] | None = None
        self._failed = (0, 0)  # where a failed job's error happened: (offset, bytes)

    def sizes(self) -> np.ndarray:
        """Each read's bytes (before the job was waited for)."""
        nbytes = np.empty(self.pieces, dtype=np.int64)
        kernels.library().flashio_job_pieces(self._job, nbytes.ctypes.data, -1, None)
        return nbytes

    def done(self) -> bool:
        return self._got is not None or bool(kernels.library().flashio_job_done(self._job))

    def wait(self) -> tuple[int, float]:
        """Wait for the job (once) and release it: (bytes or the native error, end time)."""
        if self._got is None:
            lib = kernels.library()
            t_end = ctypes.c_double(0.0)
            got = lib.flashio_job_wait(self._reads, self._job, ctypes.byref(t_end))
            if got < 0:
                piece = -1_000_000 - got if got <= -1_000_000 else 0
                off, sizes = ctypes.c_int64(0), self.sizes()
                lib.flashio_job_pieces(self._job, None, piece, ctypes.byref(off))
                self._failed = (off.value, int(sizes[piece]) if got <= -1_000_000 else int(sizes.sum()))
            lib.flashio_job_free(self._job)
            self._got, self._job = (got, t_end.value), None
            with self._reader._lock:
                self._reader._jobs.pop(id(self), None)
        return self._got

    def result(self) -> tuple[int, float]:
        got, t_end = self.wait()
        if got <= -1_000_000:  # the file ended inside a piece
            raise self._reader._short_read(*self._failed, 0)
        if got < 0:
            raise self._reader._os_error(OSError(-got, os.strerror(-got)), *self._failed)
        return got, t_end


def _timed(worker: Callable[..., int], *args: object) -> tuple[int, float]:
    """Run one share of a submitted batch; report its bytes and when it ended."""
    return worker(*args), time.perf_counter()


def _spans(segs: tuple[tuple[int, int, int], ...], n: int) -> list[tuple[int | None, int]]:
    """One gapped piece of n bytes in read order: (destination offset in out, bytes) for its
    segments, (None, bytes) for the gaps between them (read into scratch)."""
    spans: list[tuple[int | None, int]] = []
    pos = 0  # bytes of the piece already covered
    for src, dest, k in segs:
        if src > pos:
            spans.append((None, src - pos))
        spans.append((dest, k))
        pos = src + k
    if pos < n:
        spans.append((None, n - pos))
    return spans


def _iovecs(
    segs: tuple[tuple[int, int, int], ...], n: int, out_mv: memoryview, scratch: memoryview
) -> list[memoryview]:
    """Buffers for one gapped piece of n bytes: out's rows for segments, scratch for the gaps."""
    return [scratch[:k] if d is None else out_mv[d : d + k] for d, k in _spans(segs, n)]
