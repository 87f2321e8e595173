"""Read plans for the flash reader: which ``preadv`` calls fetch a batch of rows, and what the
batch cost (DESIGN.md section 3).

    ext = LayerExtent(offset_bytes=4096, n_rows=16384, row_bytes=16384)
    pieces, nbytes = plan_pieces(ids, ext, max_gap=0, iov_max=1024)  # ids: sorted unique int64
    groups = split_pieces(pieces, nbytes, threads=16)                # one share per pool thread

No file, no threads: ``flashio.storage.BundleReader`` plans every batch here, runs the plan on its
pool and reports a ``ReadResult`` (or a ``PendingRead`` that gives one).
- Adjacent neuron ids are coalesced into one read (``plan_runs``); the few unneeded rows inside a
  run land in a per-thread scratch buffer, so the needed rows still go straight into ``out``.
- A read moves at most ``MAX_READ_BYTES`` (and, when it has gaps, fewer iovecs than IOV_MAX), so
  long runs are cut; the pieces are then shared out as one contiguous group per thread, because
  one task per read costs more Python time than the read itself (module docstring of storage.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise, repeat

import numpy as np

from flashio import kernels

__all__ = ["MAX_READ_BYTES", "LayerExtent", "PendingRead", "Piece", "ReadResult", "ScatterTables", "check_ids", "max_read_rows",
           "plan_pieces", "plan_range", "plan_runs", "plan_split_pieces", "run_bounds", "scatter_tables", "scatter_tables_numpy",
           "split_pieces"]

MAX_READ_BYTES = 2 << 20  # one preadv moves at most this: balances threads, bounds scratch size

# A piece of work: one preadv. (file_offset_bytes, nbytes, dest_offset_bytes, segments) where
# segments is None when the piece maps to out[dest : dest + nbytes] as a whole, else a tuple of
# (offset_in_piece_bytes, dest_offset_bytes, nbytes) for the needed rows (the rest is gap).
Piece = tuple[int, int, int, tuple[tuple[int, int, int], ...] | None]


@dataclass(frozen=True)
class LayerExtent:
    """Where one layer's ``[n_rows, row_bytes]`` bundle block lies in the file."""

    offset_bytes: int  # absolute byte offset of the layer's [n_rows, row_bytes] block in the file
    n_rows: int  # neurons in the layer
    row_bytes: int  # bytes of one bundle (row)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes


@dataclass(frozen=True)
class ReadResult:
    """What one batch cost."""

    bytes_read: int  # bytes transferred from the file (incl. coalescing gaps and alignment padding)
    reads: int  # syscalls issued (preadv calls)
    direct: bool  # True when every byte came through O_DIRECT
    elapsed_s: float  # wall time of the batch (submission to the last byte)
    predicted_s: float = float("nan")  # the reader's cost model's time for these reads


class PendingRead:
    """Reads started by ``BundleReader.submit_rows``: ``result()`` waits for them.

    The destination tensor must not be used (or freed) before ``result()`` returned.
    """

    def __init__(self, futures: list, n_reads: int, direct: bool, t0: float,
                 predicted_s: float | Callable[[], float]):
        """predicted_s: the cost model's time, or a function that gives it (called in `result`,
        before the wait: on the thread that waits anyway, not the one that submits)."""
        self._futures, self._n, self._direct, self._t0 = futures, n_reads, direct, t0
        self._predicted_s = predicted_s
        self._result: ReadResult | None = None

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def result(self) -> ReadResult:
        if self._result is None:
            if callable(self._predicted_s):
                self._predicted_s = self._predicted_s()
            total = end = 0.0
            error = None
            for f in self._futures:  # each waited for before any error is raised: none writes after
                try:
                    got, t_end = f.result()  # re-raises a worker's FlashReadError
                except Exception as e:
                    error = error or e
                    continue
                total += got
                end = max(end, t_end)
            if error is not None:
                raise error
            self._result = ReadResult(int(total), self._n, self._direct,
                                      max(end, self._t0) - self._t0, self._predicted_s)
        return self._result


def check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        raise ValueError("ids must be sorted and unique (np.unique gives that)")
    return ids


def run_bounds(ids: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised plan_runs: (starts, stops) int64 arrays of [start, stop) row runs."""
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0 rows, got {max_gap}")
    if ids.size == 0:
        return ids[:0], ids[:0]
    # ids[i] and ids[i+1] share a run when ids[i+1] - ids[i] - 1 (the rows between) <= max_gap
    breaks = np.flatnonzero(np.diff(ids) > max_gap + 1)
    starts = np.concatenate((ids[:1], ids[breaks + 1]))
    stops = np.concatenate((ids[breaks], ids[-1:])) + 1
    return starts, stops


def plan_runs(ids: np.ndarray, max_gap: int = 0) -> list[tuple[int, int]]:
    """ids: sorted unique int64 row ids. Returns [start, stop) row runs covering all ids, merging two
    consecutive ids into one run when fewer than or equal to max_gap unneeded rows lie between them."""
    starts, stops = run_bounds(check_ids(ids), max_gap)
    return list(zip(starts.tolist(), stops.tolist()))


def plan_pieces(ids: np.ndarray, ext: LayerExtent, *, max_gap: int,
                iov_max: int) -> tuple[list[Piece], np.ndarray]:
    """Coalesced runs, cut into pieces of at most MAX_READ_BYTES (and IOV_MAX iovecs).

    ids: sorted unique, non-empty, within the layer (checked by the caller).
    """
    rb = ext.row_bytes
    max_rows = max(1, min(MAX_READ_BYTES // rb, (iov_max - 1) // 2))
    starts, stops = run_bounds(ids, max_gap)
    lens = stops - starts
    if lens.max() > max_rows:  # cut long runs: p-th piece of a run starts p * max_rows in
        n_pieces = -(-lens // max_rows)
        first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        starts_rep = np.repeat(starts, n_pieces)
        starts, stops = (
            starts_rep + (np.arange(first.size) - first) * max_rows,
            np.minimum(starts_rep + (np.arange(first.size) - first + 1) * max_rows,
                       np.repeat(stops, n_pieces)),
        )
    j0 = np.searchsorted(ids, starts)  # index in ids (= row of out) of each piece's first id
    j1 = np.searchsorted(ids, stops)
    if max_gap >= max_rows:  # a cut may leave a piece that is all gap: skip it
        keep = j1 > j0
        starts, stops, j0, j1 = starts[keep], stops[keep], j0[keep], j1[keep]
    nbytes = (stops - starts) * rb
    offsets = (ext.offset_bytes + starts * rb).tolist()
    dests = (j0 * rb).tolist()
    gapped = np.flatnonzero(j1 - j0 != stops - starts)
    segments: list[tuple[tuple[int, int, int], ...] | None] = [None] * len(offsets)
    if gapped.size:
        # segments: maximal runs of consecutive ids, also cut where a piece starts
        cut = np.zeros(ids.size, dtype=bool)
        cut[0] = True
        cut[1:] = np.diff(ids) != 1
        cut[j0] = True
        seg_at = np.flatnonzero(cut)  # seg_at[k]: index in ids of segment k's first id
        seg_len = np.diff(np.append(seg_at, ids.size))
        seg_at_l, seg_id, seg_len_l = seg_at.tolist(), ids[seg_at].tolist(), seg_len.tolist()
        first_seg = np.searchsorted(seg_at, j0[gapped]).tolist()
        last_seg = np.searchsorted(seg_at, j1[gapped]).tolist()
        for p, k0, k1 in zip(gapped.tolist(), first_seg, last_seg):
            start = int(starts[p])
            segments[p] = tuple(
                ((seg_id[k] - start) * rb, seg_at_l[k] * rb, seg_len_l[k] * rb)
                for k in range(k0, k1)
            )
    return list(zip(offsets, nbytes.tolist(), dests, segments)), nbytes


def scatter_pieces(pieces: list[Piece], rows: np.ndarray, row_bytes: int) -> list[Piece]:
    """`pieces` planned for rows landing contiguously (id j at byte j * row_bytes of out) sent to
    out's rows `rows` instead (id j at row rows[j]): a piece whose rows stay consecutive keeps one
    destination, the others get one segment per row (IOV_MAX holds: a piece has at most
    (iov_max - 1) // 2 rows, and a row gets one iovec, a gap at most one more)."""
    rb = row_bytes
    dest_of = rows.tolist()
    out: list[Piece] = []
    for off, n, dest, segs in pieces:
        if segs is None:
            segs = ((0, dest, n),)
        new: list[tuple[int, int, int]] = []
        for src, d, k in segs:
            j0, count = d // rb, k // rb
            for t in range(count):
                real = dest_of[j0 + t] * rb
                if new and new[-1][0] + new[-1][2] == src + t * rb and new[-1][1] + new[-1][2] == real:
                    new[-1] = (new[-1][0], new[-1][1], new[-1][2] + rb)  # still consecutive: extend
                else:
                    new.append((src + t * rb, real, rb))
        if len(new) == 1 and new[0][0] == 0 and new[0][2] == n:
            out.append((off, n, new[0][1], None))
        else:
            out.append((off, n, -1, tuple(new)))
    return out


@dataclass(frozen=True)
class ScatterTables:
    """`plan_pieces` + `scatter_pieces` as the native readers' tables, built with numpy alone: at
    Llama-2-7B shape (290 of 11008 rows into a window cache, gap reads of up to 1 row) 57 us a
    layer against 157 for those two on the compute thread plus ~50 in the reader thread, which
    held the GIL the compute thread wanted.

    Piece p reads nbytes[p] bytes at file offset offs[p] into the iovecs first[p] .. first[p + 1]:
    iovec e has lens[e] bytes and goes to out's byte dest[e], or to scratch where dest[e] < 0 (rows
    of a coalesced run that were not asked for)."""

    offs: np.ndarray  # [P] int64
    nbytes: np.ndarray  # [P] int64
    first: np.ndarray  # [P + 1] int64
    dest: np.ndarray  # [E] int64, -1: scratch
    lens: np.ndarray  # [E] int64


def scatter_tables(ids: np.ndarray, rows: np.ndarray, ext: LayerExtent, *, max_gap: int,
                   iov_max: int) -> ScatterTables:
    """The reads of `ids` (sorted unique, non-empty, in the layer) into out's rows `rows` (id j to
    row rows[j]): the same pieces as plan_pieces (runs coalesced across gaps of up to max_gap rows,
    cut at MAX_READ_BYTES) and the same iovecs as scatter_pieces (ids whose rows follow one another
    in both the file and out share one). Built by flashio.kernels' flashio_scatter_tables in one
    pass where the kernels are built (a Llama-2-7B layer's ~300 ids: a few us against ~60 for
    numpy's ~30 calls, on the compute thread every layer), else by `scatter_tables_numpy`."""
    lib = kernels.library()
    if lib is None:
        return scatter_tables_numpy(ids, rows, ext, max_gap=max_gap, iov_max=iov_max)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    n = ids.size
    offs, nbytes, first = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n + 1, np.int64)
    dest, lens = np.empty(3 * n, np.int64), np.empty(3 * n, np.int64)
    p = lib.flashio_scatter_tables(ids.ctypes.data, rows.ctypes.data, n, ext.row_bytes, ext.offset_bytes, max_gap,
                                   max_read_rows(ext.row_bytes, iov_max), offs.ctypes.data, nbytes.ctypes.data,
                                   first.ctypes.data, dest.ctypes.data, lens.ctypes.data)
    e = int(first[p])
    return ScatterTables(offs[:p], nbytes[:p], first[: p + 1], dest[:e], lens[:e])


def max_read_rows(row_bytes: int, iov_max: int) -> int:
    """The rows one read of scattered rows may cover: MAX_READ_BYTES, and a gap and a row per
    iovec within iov_max."""
    return max(1, min(MAX_READ_BYTES // row_bytes, (iov_max - 1) // 2))


def scatter_tables_numpy(ids: np.ndarray, rows: np.ndarray, ext: LayerExtent, *, max_gap: int,
                         iov_max: int) -> ScatterTables:
    """scatter_tables with numpy alone (no kernels)."""
    rb = ext.row_bytes
    max_rows = max_read_rows(rb, iov_max)
    starts, stops = run_bounds(ids, max_gap)
    lens = stops - starts
    if lens.max() > max_rows:  # cut long runs, as plan_pieces
        n_pieces = -(-lens // max_rows)
        first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        starts_rep = np.repeat(starts, n_pieces)
        starts, stops = (
            starts_rep + (np.arange(first.size) - first) * max_rows,
            np.minimum(starts_rep + (np.arange(first.size) - first + 1) * max_rows, np.repeat(stops, n_pieces)),
        )
    j0, j1 = np.searchsorted(ids, starts), np.searchsorted(ids, stops)
    keep = j1 > j0  # a cut may leave a piece that is all gap
    starts, stops, j0, j1 = starts[keep], stops[keep], j0[keep], j1[keep]
    n = ids.size
    piece = np.repeat(np.arange(starts.size), j1 - j0)  # the piece of each id
    head = np.zeros(n, dtype=bool)
    head[j0] = True
    prev = np.empty(n, dtype=np.int64)
    prev[0], prev[1:] = -1, ids[:-1]
    gap = np.where(head, ids - starts[piece], ids - prev - 1)  # rows read to scratch before id j
    prev_row = np.empty(n, dtype=np.int64)
    prev_row[0], prev_row[1:] = -2, rows[:-1]
    new = head | (gap > 0) | (rows != prev_row + 1)  # id j starts an iovec (else extends j-1's)
    tail = np.zeros(n, dtype=np.int64)
    tail[j1 - 1] = stops - ids[j1 - 1] - 1  # rows read to scratch after a piece's last id
    count = (gap > 0).astype(np.int64) + new + (tail > 0)  # iovecs opened at id j
    at = np.cumsum(count) - count  # the first of them
    total = int(count.sum())
    dest = np.full(total, -1, dtype=np.int64)
    out_lens = np.zeros(total, dtype=np.int64)
    g = np.flatnonzero(gap > 0)
    out_lens[at[g]] = gap[g] * rb
    d = at + (gap > 0)  # where id j's iovec is, when it opens one
    opener = np.flatnonzero(new)
    dest[d[opener]] = rows[opener] * rb
    owner = np.cumsum(new) - 1  # the iovec-opening id each id extends
    np.add.at(out_lens, d[opener][owner], rb)
    t = np.flatnonzero(tail > 0)
    out_lens[d[t] + new[t]] = tail[t] * rb
    first = np.append(at[j0], total)
    return ScatterTables(ext.offset_bytes + starts * rb, (stops - starts) * rb, first, dest, out_lens)


def plan_split_pieces(ids: np.ndarray, ext: LayerExtent, split: int) -> tuple[list[Piece], np.ndarray]:
    """One piece per row part: every row's part 0, then every row's part 1, ..."""
    part = ext.row_bytes // split
    k = np.repeat(np.arange(split, dtype=np.int64), ids.size)  # part index of each piece
    rows = np.tile(ids, split)
    j = np.tile(np.arange(ids.size, dtype=np.int64), split)  # row of out
    offsets = (ext.offset_bytes + rows * ext.row_bytes + k * part).tolist()
    dests = (j * ext.row_bytes + k * part).tolist()
    nbytes = np.full(rows.size, part, dtype=np.int64)
    return list(zip(offsets, nbytes.tolist(), dests, repeat(None))), nbytes


def plan_range(base_bytes: int, total_bytes: int, block_bytes: int) -> tuple[list[Piece], np.ndarray]:
    """One contiguous range of the file, read into out[0 : total_bytes] (naive mode's layers)."""
    # chunks of MAX_READ_BYTES, a block multiple so that every chunk but the last is aligned
    chunk = max(MAX_READ_BYTES // block_bytes, 1) * block_bytes
    starts = list(range(0, total_bytes, chunk))
    sizes = [min(chunk, total_bytes - s) for s in starts]
    pieces = list(zip([base_bytes + s for s in starts], sizes, starts, repeat(None)))
    return pieces, np.asarray(sizes)


def split_pieces(pieces: list[Piece], nbytes: np.ndarray, threads: int) -> list[list[Piece]]:
    """At most `threads` contiguous groups of about equal bytes: one task per thread."""
    k = min(threads, len(pieces))
    if k <= 1:
        return [pieces]
    cum = np.cumsum(nbytes)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k) / k) + 1
    bounds = [0, *sorted(set(cuts.tolist()) - {0, len(pieces)}), len(pieces)]
    return [pieces[a:b] for a, b in pairwise(bounds)]
