"""BundleReader against numpy slices of the same file: every read path gives the same bytes.

The file imitates ffn.safetensors: a 4096-byte header area, then layer blocks of random bytes.
tmp_path is on a disk filesystem here (ext4), so O_DIRECT works; tests that need it skip otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashio import kernels, storage
from flashio.errors import FlashReadError, FormatError
from flashio.storage import (
    MAX_READ_BYTES,
    AlignedArena,
    BundleReader,
    LayerExtent,
    ReadResult,
    evict_from_page_cache,
    plan_runs,
)

HEADER_BYTES = 4096
# (n_rows, row_bytes): aligned rows, unaligned rows, and aligned rows at an unaligned offset
# (layer 2 starts where layer 1's 200-byte rows end). Layer 0 is > MAX_READ_BYTES / 512 rows so
# that long runs are cut into several reads.
LAYERS = [(1200, 1024), (50, 200), (40, 1024)]
TRAILING_BYTES = 7  # the file size is not a block multiple: aligned supersets run past EOF


def _extents() -> list[LayerExtent]:
    extents, offset = [], HEADER_BYTES
    for n_rows, row_bytes in LAYERS:
        extents.append(LayerExtent(offset, n_rows, row_bytes))
        offset += n_rows * row_bytes
    return extents


EXTENTS = _extents()


@pytest.fixture(autouse=True, params=["uring", "native", "python"])
def read_loop(request, monkeypatch):
    """Every test three times: aligned reads through an io_uring, a share's reads in flashio's
    native library (when it is built), and in Python."""
    if request.param != "python" and not kernels.available():
        pytest.skip(f"no native library here: {kernels.why_not()}")
    if request.param == "uring" and not _uring_works():
        pytest.skip("the kernel refuses io_uring here")
    monkeypatch.setattr(storage, "NATIVE_READS", request.param != "python")
    monkeypatch.setattr(storage, "URING_READS", request.param == "uring")
    return request.param


def _uring_works() -> bool:
    err = ctypes.c_int(0)
    ring = kernels.library().flashio_uring_open(8, ctypes.byref(err))
    if ring:
        kernels.library().flashio_uring_close(ring)
    return bool(ring)


@pytest.fixture(scope="module")
def ffn_file(tmp_path_factory) -> tuple[str, np.ndarray]:
    """(path, file bytes as uint8)."""
    size = EXTENTS[-1].offset_bytes + EXTENTS[-1].nbytes + TRAILING_BYTES
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path_factory.mktemp("ffn") / "ffn.bin"
    data.tofile(path)
    return str(path), data


def _block(data: np.ndarray, layer: int) -> np.ndarray:
    ext = EXTENTS[layer]
    return data[ext.offset_bytes : ext.offset_bytes + ext.nbytes].reshape(ext.n_rows, ext.row_bytes)


def _random_ids(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    return np.unique(rng.integers(0, n_rows, size=rng.integers(1, n_rows)))


def _direct_reader(path: str, **kwargs) -> BundleReader:
    reader = BundleReader(path, EXTENTS, **kwargs)
    if not reader.direct:
        reader.close()
        pytest.skip("the filesystem under tmp_path refuses O_DIRECT")
    return reader


def _run_rows(runs: list[tuple[int, int]]) -> int:
    return sum(stop - start for start, stop in runs)


# -- plan_runs ---------------------------------------------------------------------------------

sorted_ids = st.lists(st.integers(0, 2000), unique=True, max_size=200).map(
    lambda xs: np.array(sorted(xs), dtype=np.int64)
)


@given(ids=sorted_ids, max_gap=st.integers(0, 12))
def test_plan_runs_properties(ids, max_gap):
    runs = plan_runs(ids, max_gap)
    covered = np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.array([], int)
    # sorted and disjoint (a row is never read twice), non-empty, covering every id
    assert all(a < b for a, b in runs)
    assert all(b1 < a2 for (_, b1), (a2, _) in pairwise(runs))
    assert set(ids.tolist()) <= set(covered.tolist())
    assert len(covered) == len(set(covered.tolist()))
    for a, b in runs:
        inside = ids[(ids >= a) & (ids < b)]
        # runs start and stop on ids, and every unneeded stretch inside a run is <= max_gap rows
        assert inside[0] == a and inside[-1] == b - 1
        assert np.all(np.diff(inside) - 1 <= max_gap)
    # merged as much as allowed: consecutive runs are separated by more than max_gap rows
    assert all(a2 - b1 > max_gap for (_, b1), (a2, _) in pairwise(runs))


def test_plan_runs_examples():
    ids = np.array([0, 1, 2, 5, 6, 10], dtype=np.int64)
    assert plan_runs(ids) == [(0, 3), (5, 7), (10, 11)]
    assert plan_runs(ids, max_gap=2) == [(0, 7), (10, 11)]
    assert plan_runs(ids, max_gap=3) == [(0, 11)]
    assert plan_runs(np.array([], dtype=np.int64)) == []
    with pytest.raises(ValueError, match="sorted and unique"):
        plan_runs(np.array([3, 1]))
    with pytest.raises(ValueError, match="max_gap"):
        plan_runs(ids, max_gap=-1)


# -- read_rows: three read paths, same bytes ---------------------------------------------------


@pytest.mark.parametrize("max_gap", [0, 3])
@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_read_rows_all_paths_match_numpy(ffn_file, layer, max_gap):
    path, data = ffn_file
    ext = EXTENTS[layer]
    expected_block = _block(data, layer)
    rng = np.random.default_rng(layer * 10 + max_gap)
    with (_direct_reader(path, max_gap=max_gap, threads=4) as direct,
          BundleReader(path, EXTENTS, max_gap=max_gap, threads=4, direct=False) as buffered):
        assert not buffered.direct
        for _ in range(5):
            ids = _random_ids(rng, ext.n_rows)
            expected = expected_block[ids]
            # 1. O_DIRECT into page-aligned arena rows (zero copy when the layer is aligned)
            arena = AlignedArena(len(ids) * ext.row_bytes)
            out = arena.tensor(torch.uint8, (len(ids), ext.row_bytes))
            result = direct.read_rows(layer, ids, out)
            np.testing.assert_array_equal(out.numpy(), expected)
            assert result.direct and result.reads >= 1
            assert result.bytes_read >= len(ids) * ext.row_bytes
            # 2. O_DIRECT into a misaligned tensor: aligned superset into scratch, then a copy
            misaligned = torch.zeros(len(ids) * ext.row_bytes + 1, dtype=torch.uint8)[1:]
            result = direct.read_rows(layer, ids, misaligned)
            np.testing.assert_array_equal(misaligned.numpy().reshape(expected.shape), expected)
            assert result.direct
            # 3. buffered preadv straight into the tensor
            plain = torch.zeros(len(ids), ext.row_bytes, dtype=torch.uint8)
            result = buffered.read_rows(layer, ids, plain)
            np.testing.assert_array_equal(plain.numpy(), expected)
            assert not result.direct
            assert result.bytes_read == _run_rows(plan_runs(ids, max_gap)) * ext.row_bytes
            del out
            arena.close()


def test_read_rows_into_wider_dtype(ffn_file):
    """out of another dtype receives the raw bytes: row j is out.view(uint8)[j]."""
    path, data = ffn_file
    ids = np.array([3, 4, 9, 700, 1199], dtype=np.int64)
    with BundleReader(path, EXTENTS, threads=2) as reader, AlignedArena(5 * 1024) as arena:
        out = arena.tensor(torch.float16, (5, 512))
        reader.read_rows(0, ids, out)
        np.testing.assert_array_equal(out.view(torch.uint8).numpy(), _block(data, 0)[ids])
        del out


@settings(deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), max_gap=st.integers(0, 8), threads=st.sampled_from([1, 3, 16]))
def test_bytes_read_is_sum_of_runs_when_aligned(ffn_file, data, max_gap, threads):
    """Coalescing never reads a neuron twice: bytes_read == rows in runs * row_bytes."""
    path, file_bytes = ffn_file
    ext = EXTENTS[0]
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, ext.n_rows - 1), min_size=1))),
                   dtype=np.int64)
    with (_direct_reader(path, max_gap=max_gap, threads=threads) as reader,
          AlignedArena(len(ids) * ext.row_bytes) as arena):
        out = arena.tensor(torch.uint8, (len(ids), ext.row_bytes))
        result = reader.read_rows(0, ids, out)
        assert result.bytes_read == _run_rows(plan_runs(ids, max_gap)) * ext.row_bytes
        assert result.reads >= len(plan_runs(ids, max_gap))
        np.testing.assert_array_equal(out.numpy(), _block(file_bytes, 0)[ids])
        del out


def test_long_runs_are_cut_and_all_gap_pieces_skipped(ffn_file):
    path, data = ffn_file
    ext = EXTENTS[0]
    max_rows = min(MAX_READ_BYTES // ext.row_bytes, 511)  # 511: iovec limit for gapped reads
    everything = np.arange(ext.n_rows, dtype=np.int64)
    with _direct_reader(path, threads=4) as reader, AlignedArena(ext.nbytes) as arena:
        out = arena.tensor(torch.uint8, (ext.n_rows, ext.row_bytes))
        result = reader.read_rows(0, everything, out)
        np.testing.assert_array_equal(out.numpy(), _block(data, 0))
        assert result.reads == -(-ext.n_rows // max_rows)
        assert result.bytes_read == ext.nbytes
        del out
    # one run [0, 1200) with a 1198-row gap: the pieces holding only gap rows are not read
    ends = np.array([0, ext.n_rows - 1], dtype=np.int64)
    with _direct_reader(path, threads=4, max_gap=ext.n_rows) as reader:
        out = torch.empty(2, ext.row_bytes, dtype=torch.uint8)
        result = reader.read_rows(0, ends, out)
        np.testing.assert_array_equal(out.numpy(), _block(data, 0)[ends])
        assert result.reads == 2


def test_concurrent_callers_get_their_own_rows(ffn_file):
    path, data = ffn_file
    errors: list[BaseException] = []
    with BundleReader(path, EXTENTS, threads=4, max_gap=2) as reader:

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(20):
                    layer = int(rng.integers(len(LAYERS)))
                    ids = _random_ids(rng, EXTENTS[layer].n_rows)
                    out = torch.empty(len(ids), EXTENTS[layer].row_bytes, dtype=torch.uint8)
                    reader.read_rows(layer, ids, out)
                    np.testing.assert_array_equal(out.numpy(), _block(data, layer)[ids])
            except BaseException as e:  # handed to the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
def test_uring_reads_are_one_share_on_one_ring_per_thread(ffn_file, read_loop):
    path, data = ffn_file
    ids = np.arange(0, EXTENTS[0].n_rows, 3, dtype=np.int64)
    with _direct_reader(path, threads=4) as reader, AlignedArena(len(ids) * EXTENTS[0].row_bytes) as arena:
        out = arena.tensor(torch.uint8, (len(ids), EXTENTS[0].row_bytes))
        r = reader.read_rows(0, ids, out)  # on the calling thread's ring
        np.testing.assert_array_equal(out.numpy(), _block(data, 0)[ids])
        assert r.reads == len(ids) and len(reader._rings) == 1
        out.zero_()
        pending = reader.submit_rows(0, ids, out)  # one share, on a pool thread's ring
        assert len(pending._futures) == 1
        pending.result()
        np.testing.assert_array_equal(out.numpy(), _block(data, 0)[ids])
        assert len(reader._rings) == 2
        del out
    assert reader._rings == []  # closed with the reader


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
@pytest.mark.parametrize("depth", [1, 3, 8, 13])
def test_uring_reads_past_the_ring_depth(ffn_file, read_loop, monkeypatch, depth):
    """More reads than the ring keeps in flight: the ring waits for a quarter of its depth while
    reads wait to be submitted, for the rest at the end; every row lands (scattered rows too)."""
    path, data = ffn_file
    monkeypatch.setattr(storage, "URING_DEPTH", depth)
    ids = np.arange(0, EXTENTS[0].n_rows, 7, dtype=np.int64)  # 172 separate reads
    rows = np.random.default_rng(depth).permutation(len(ids) + 5)[: len(ids)]
    with _direct_reader(path, threads=1) as reader, AlignedArena((len(ids) + 5) * EXTENTS[0].row_bytes) as arena:
        assert reader._depth() == depth
        out = arena.tensor(torch.uint8, (len(ids) + 5, EXTENTS[0].row_bytes))
        r = reader.read_rows(0, ids, out, rows=rows)
        assert r.reads == len(ids) and len(reader._rings) == 1
        np.testing.assert_array_equal(out.numpy()[rows], _block(data, 0)[ids])
        del out


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
def test_without_a_ring_the_threads_read(ffn_file, read_loop, monkeypatch, caplog):
    path, data = ffn_file
    monkeypatch.setattr(kernels.library(), "flashio_uring_open", lambda entries, err: None)  # e.g. seccomp
    ids = np.array([0, 2, 5, 9], dtype=np.int64)
    with (caplog.at_level(logging.INFO, logger="flashio.storage"), _direct_reader(path, threads=2) as reader,
          AlignedArena(len(ids) * EXTENTS[0].row_bytes) as arena):
        out = arena.tensor(torch.uint8, (len(ids), EXTENTS[0].row_bytes))
        for _ in range(2):
            reader.read_rows(0, ids, out)
            np.testing.assert_array_equal(out.numpy(), _block(data, 0)[ids])
        assert not reader._uring and reader._rings == []
        del out
    assert sum("no io_uring" in r.message for r in caplog.records) == 1


# -- read_layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_read_layer_matches_numpy(ffn_file, layer, direct):
    path, data = ffn_file
    ext = EXTENTS[layer]
    with BundleReader(path, EXTENTS, threads=3, direct=direct) as reader:
        with AlignedArena(ext.nbytes) as arena:
            out = arena.tensor(torch.uint8, (ext.n_rows, ext.row_bytes))
            result = reader.read_layer(layer, out)
            np.testing.assert_array_equal(out.numpy(), _block(data, layer))
            assert result.bytes_read >= ext.nbytes and result.direct == reader.direct
            del out
        plain = torch.empty(ext.n_rows * ext.row_bytes + 3, dtype=torch.uint8)[3:]
        reader.read_layer(layer, plain)
        np.testing.assert_array_equal(plain.numpy(), _block(data, layer).reshape(-1))


# -- failures ----------------------------------------------------------------------------------


def test_extent_beyond_eof_is_a_format_error(ffn_file, tmp_path):
    _, data = ffn_file
    short = tmp_path / "short.bin"
    data[: EXTENTS[1].offset_bytes + 100].tofile(short)
    with pytest.raises(FormatError) as info:
        BundleReader(short, EXTENTS)
    message = str(info.value)
    assert str(short) in message and "layer 1" in message
    assert str(EXTENTS[1].offset_bytes + 100) in message  # the file size


@pytest.mark.parametrize("direct", [True, False])
def test_file_truncated_underneath_raises_not_garbage(ffn_file, tmp_path, direct):
    _, data = ffn_file
    path = tmp_path / "victim.bin"
    data.tofile(path)
    with BundleReader(path, EXTENTS, threads=2, direct=direct) as reader, AlignedArena(4 * 1024) as arena:
        ids = np.array([0, 1, 1100, 1199], dtype=np.int64)
        out = torch.empty(4, 1024, dtype=torch.uint8)
        aligned = arena.tensor(torch.uint8, (4, 1024))  # read straight into it (the native loop's path)
        reader.read_rows(0, ids, out)  # fine while the file is whole
        reader.read_rows(0, ids, aligned)
        os.truncate(path, EXTENTS[0].offset_bytes + 600 * 1024 + 100)
        with pytest.raises(FlashReadError, match=r"victim\.bin.*offset \d+ expected \d+ bytes, got"):
            reader.read_rows(0, ids, out)
        with pytest.raises(FlashReadError, match=r"victim\.bin.*offset \d+ expected \d+ bytes, got"):
            reader.read_rows(0, ids, aligned)
        del aligned
        with pytest.raises(FlashReadError, match="short read"):
            reader.read_rows(2, np.array([5], dtype=np.int64), torch.empty(1, 1024, dtype=torch.uint8))
        with pytest.raises(FlashReadError):
            reader.read_layer(0, torch.empty(EXTENTS[0].n_rows, 1024, dtype=torch.uint8))
        # rows before the cut still read fine
        reader.read_rows(0, ids[:2], out[:2])
        np.testing.assert_array_equal(out[:2].numpy(), _block(data, 0)[:2])


def test_os_error_is_wrapped(ffn_file, monkeypatch, read_loop, tmp_path):
    path, _ = ffn_file

    def failing_preadv(fd, buffers, offset, *args):
        raise OSError(errno.EIO, "Input/output error")

    with BundleReader(path, EXTENTS, threads=2) as reader, AlignedArena(2 * 1024) as arena:
        aligned = arena.tensor(torch.uint8, (2, 1024))
        ids = np.array([1, 2], dtype=np.int64)
        if read_loop != "python":  # a directory under the reader's descriptor: reads fail with EISDIR
            real, reader._fd_direct = reader._fd_direct, os.open(tmp_path, os.O_RDONLY)
            try:
                for out in (aligned, torch.empty(2, 1024, dtype=torch.uint8)):  # straight in, and staged
                    with pytest.raises(FlashReadError, match=f"errno {errno.EISDIR}"):
                        reader.read_rows(0, ids, out)
            finally:
                os.close(reader._fd_direct)
                reader._fd_direct = real
        else:
            monkeypatch.setattr(os, "preadv", failing_preadv)
            for out in (aligned, torch.empty(2, 1024, dtype=torch.uint8)):
                with pytest.raises(FlashReadError, match="errno 5"):
                    reader.read_rows(0, ids, out)
        del aligned


def test_bad_arguments(ffn_file):
    path, _ = ffn_file
    reader = BundleReader(path, EXTENTS, threads=2)
    out = torch.empty(2, 1024, dtype=torch.uint8)
    with pytest.raises(ValueError, match="sorted and unique"):
        reader.read_rows(0, np.array([5, 2]), out)
    with pytest.raises(ValueError, match="rows"):
        reader.read_rows(0, np.array([1, 5000]), out)
    with pytest.raises(ValueError, match="needs exactly 3072"):
        reader.read_rows(0, np.array([1, 2, 3]), out)
    with pytest.raises(ValueError, match="contiguous"):
        reader.read_rows(0, np.array([1, 2]), torch.empty(1024, 2, dtype=torch.uint8).T)
    with pytest.raises(IndexError, match="3 layers"):
        reader.read_rows(3, np.array([1]), out[:1])
    empty = reader.read_rows(0, np.array([], dtype=np.int64), out[:0])
    assert isinstance(empty, ReadResult) and (empty.bytes_read, empty.reads) == (0, 0)
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        reader.read_rows(0, np.array([1, 2]), out)
    with pytest.raises(FlashReadError, match="cannot open"):
        BundleReader(path + ".missing", EXTENTS)


# -- O_DIRECT availability ---------------------------------------------------------------------


def test_direct_false_reports_buffered(ffn_file):
    path, _ = ffn_file
    with BundleReader(path, EXTENTS, direct=False) as reader:
        assert reader.direct is False
        result = reader.read_rows(1, np.array([0, 7], dtype=np.int64), torch.empty(2, 200, dtype=torch.uint8))
        assert result.direct is False


def test_filesystem_refusing_o_direct_falls_back(ffn_file, monkeypatch, caplog):
    """tmpfs (before Linux 6.6) refuses O_DIRECT with EINVAL: read buffered and say so once."""
    path, data = ffn_file
    real_open = os.open

    def open_without_direct(file, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_direct)
    with caplog.at_level(logging.INFO, logger="flashio.storage"):
        reader = BundleReader(path, EXTENTS, threads=2)
    monkeypatch.undo()
    with reader:
        assert reader.direct is False
        assert sum("O_DIRECT" in r.getMessage() for r in caplog.records) == 1
        ids = np.array([2, 3, 40], dtype=np.int64)
        out = torch.empty(3, 1024, dtype=torch.uint8)
        assert reader.read_rows(0, ids, out).direct is False
        np.testing.assert_array_equal(out.numpy(), _block(data, 0)[ids])


def test_evict_from_page_cache_keeps_contents(ffn_file):
    path, data = ffn_file
    evict_from_page_cache(path)
    with BundleReader(path, EXTENTS, direct=False) as reader:
        out = torch.empty(1, 200, dtype=torch.uint8)
        reader.read_rows(1, np.array([49], dtype=np.int64), out)
        np.testing.assert_array_equal(out.numpy()[0], _block(data, 1)[49])


# -- AlignedArena ------------------------------------------------------------------------------


def test_arena_tensors_are_page_aligned_views():
    with AlignedArena(3 * 4096 + 10) as arena:
        a = arena.tensor(torch.float32, (2, 1024))
        b = arena.tensor(torch.uint8, (4096,), offset_bytes=8192)
        assert a.data_ptr() % 4096 == 0 and b.data_ptr() % 4096 == 0
        a.fill_(1.0)
        b.fill_(7)
        assert arena.memoryview[0:4] == np.float32(1.0).tobytes()
        assert arena.memoryview[8192] == 7 and arena.nbytes == 3 * 4096 + 10
        with pytest.raises(ValueError, match="does not fit"):
            arena.tensor(torch.float32, (4096,), offset_bytes=4096)
        with pytest.raises(ValueError, match="multiple"):
            arena.tensor(torch.float32, (4,), offset_bytes=2)
    # closed while views live: the views stay valid (unmapped when they die), the arena refuses
    assert a.sum().item() == 2048.0 and int(b[0]) == 7
    with pytest.raises(ValueError, match="closed"):
        arena.tensor(torch.uint8, (1,))
    assert AlignedArena(0).tensor(torch.float16, (0, 8)).shape == (0, 8)


def test_private_tensor_is_writable_memory_that_outlives_its_arena():
    from flashio.arena import HUGE_PAGE_MIN_BYTES, private_tensor
    small = private_tensor((4, 4), torch.float16)
    assert small.shape == (4, 4) and small.dtype == torch.float16
    rows = HUGE_PAGE_MIN_BYTES // (2 * 1024) + 3  # over the huge-page size: an arena's mapping
    t = private_tensor((rows, 1024), torch.float16)
    assert t.shape == (rows, 1024) and t.is_contiguous()
    t.fill_(1.5)
    t[-1, -1] = 3.0
    assert float(t.float().sum()) == rows * 1024 * 1.5 + 1.5  # every page mapped and writable
    v = t[1:3]
    del t
    assert float(v.float().sum()) == 2 * 1024 * 1.5  # a view keeps the mapping


def test_arenas_ask_for_huge_pages_only_when_large(monkeypatch):
    import mmap as mmap_module

    from flashio import arena as arena_module
    asked = []

    class Recorder(mmap_module.mmap):
        def madvise(self, option, *args):
            asked.append(option)
            return super().madvise(option, *args)

    monkeypatch.setattr(arena_module.mmap, "mmap", Recorder)
    if not hasattr(mmap_module, "MADV_HUGEPAGE"):
        pytest.skip("this platform has no MADV_HUGEPAGE")
    AlignedArena(4096).close()
    assert asked == []
    AlignedArena(arena_module.HUGE_PAGE_MIN_BYTES).close()
    AlignedArena(4096, huge=True).close()
    assert asked == [mmap_module.MADV_HUGEPAGE] * 2


@pytest.mark.parametrize("reads_thread", [True, False])
@pytest.mark.parametrize("max_gap", [0, 3])
@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_read_rows_into_scattered_rows(ffn_file, layer, max_gap, monkeypatch, reads_thread):
    """rows=: id j lands in out's row rows[j] (a window cache's freed rows), every read path
    (O_DIRECT into aligned rows through io_uring: readplan.scatter_tables); the other rows of out
    are untouched."""
    import flashio.storage as storage
    monkeypatch.setattr(storage, "READS_THREAD", reads_thread)  # submit_rows: the native thread, or the pool
    tables = []
    real = storage.scatter_tables
    monkeypatch.setattr(storage, "scatter_tables", lambda *a, **k: tables.append(1) or real(*a, **k))
    path, data = ffn_file
    ext = EXTENTS[layer]
    expected_block = _block(data, layer)
    rng = np.random.default_rng(100 + layer * 10 + max_gap)
    with (_direct_reader(path, max_gap=max_gap, threads=3) as direct,
          BundleReader(path, EXTENTS, max_gap=max_gap, threads=3, direct=False) as buffered):
        for _ in range(4):
            ids = _random_ids(rng, ext.n_rows)
            capacity = len(ids) + 7
            dest = rng.permutation(capacity)[: len(ids)]
            dest[: len(ids) // 2] = np.sort(dest[: len(ids) // 2])  # some consecutive stretches too
            with AlignedArena(capacity * ext.row_bytes) as arena:
                aligned = arena.tensor(torch.uint8, (capacity, ext.row_bytes))
                misaligned = torch.zeros(capacity * ext.row_bytes + 1, dtype=torch.uint8)[1:].view(capacity, -1)
                plain = torch.zeros(capacity, ext.row_bytes, dtype=torch.uint8)
                for reader, out, submit in ((direct, aligned, True), (direct, aligned, False), (direct, misaligned, False),
                                            (buffered, plain, False)):
                    out.fill_(0xA5)
                    before = len(tables)
                    if submit:
                        r = reader.submit_rows(layer, ids, out, rows=dest).result()
                    else:
                        r = reader.read_rows(layer, ids, out, rows=dest)
                    takes = (reader is direct and out is aligned and reader._uring_library() is not None
                             and (ext.offset_bytes | ext.row_bytes) % reader.block_bytes == 0)
                    native = takes and submit and reads_thread  # planned in the native call
                    assert len(tables) - before == (takes and not native)
                    assert (reader._reads is not None) >= native
                    assert r.bytes_read >= len(ids) * ext.row_bytes
                    np.testing.assert_array_equal(out.numpy()[dest], expected_block[ids])
                    untouched = np.setdiff1d(np.arange(capacity), dest)
                    assert (out.numpy()[untouched] == 0xA5).all()
                del aligned


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
def test_submit_rows_refuses_bad_arguments_on_the_native_path(ffn_file, read_loop):
    """The reading thread's one call checks what the general path checks: whatever it refuses
    goes to the general path, which says what is wrong; nothing is queued."""
    path, _ = ffn_file
    ext = EXTENTS[0]
    with _direct_reader(path) as reader, AlignedArena(4 * ext.row_bytes) as arena:
        out = arena.tensor(torch.uint8, (4, ext.row_bytes))
        for ids, rows, match in (([5, 2, 9], [0, 1, 2], "sorted and unique"), ([2, 2, 9], [0, 1, 2], "sorted and unique"),
                                 ([2, 5, ext.n_rows], [0, 1, 2], "has rows"), ([-1, 5, 9], [0, 1, 2], "has rows"),
                                 ([2, 5, 9], [0, 0, 1], "distinct rows"), ([2, 5, 9], [0, 1, 4], "distinct rows"),
                                 ([2, 5, 9], [0, -1, 1], "distinct rows")):
            with pytest.raises(ValueError, match=match):
                reader.submit_rows(0, np.array(ids, dtype=np.int64), out, rows=np.array(rows, dtype=np.int64))
        assert reader._jobs == {}
        reader.submit_rows(0, np.array([2, 5, 9]), out, rows=np.array([3, 0, 1])).result()
        assert reader._reads is not None
        del out


def test_read_rows_scattered_refuses_bad_rows(ffn_file):
    path, _ = ffn_file
    ext = EXTENTS[0]
    ids = np.array([1, 2, 5], dtype=np.int64)
    out = torch.zeros(4, ext.row_bytes, dtype=torch.uint8)
    with BundleReader(path, EXTENTS, direct=False) as reader:
        with pytest.raises(ValueError, match="distinct rows"):
            reader.read_rows(0, ids, out, rows=np.array([0, 0, 1]))
        with pytest.raises(ValueError, match="distinct rows"):
            reader.read_rows(0, ids, out, rows=np.array([0, 1, 4]))
        with pytest.raises(ValueError, match="one destination per id"):
            reader.read_rows(0, ids, out, rows=np.array([0, 1]))
        with pytest.raises(ValueError, match="one destination per id"):
            reader.read_rows(0, ids, out, rows=np.array([0, 1, 2]), split=2)


def _tables_from_pieces(ids, rows, ext, max_gap, iov_max):
    """plan_pieces + scatter_pieces flattened as the native readers' tables (dest -1: scratch)."""
    from flashio.readplan import plan_pieces, scatter_pieces
    from flashio.storage import _spans
    pieces, nbytes = plan_pieces(ids, ext, max_gap=max_gap, iov_max=iov_max)
    pieces = scatter_pieces(pieces, rows, ext.row_bytes)
    offs, first, dest, lens = [], [0], [], []
    for off, n, d, segs in pieces:
        offs.append(off)
        for dd, k in ([(d, n)] if segs is None else _spans(segs, n)):
            dest.append(-1 if dd is None else dd)
            lens.append(k)
        first.append(len(dest))
    return offs, nbytes.tolist(), first, dest, lens


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("seed", range(40))
def test_scatter_tables_equal_the_planned_pieces(seed, native):
    """Both builders of the tables (flashio.kernels' one pass, numpy's) give plan_pieces' pieces
    and scatter_pieces' iovecs."""
    from flashio import kernels
    from flashio.readplan import LayerExtent, scatter_tables, scatter_tables_numpy
    if native and not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    build = scatter_tables if native else scatter_tables_numpy
    rng = np.random.default_rng(seed)
    n_rows = int(rng.integers(1, 400))
    row_bytes = int(rng.choice([512, 4096, 1 << 20]))  # 1 MiB rows: runs cut at MAX_READ_BYTES
    ext = LayerExtent(4096 * int(rng.integers(0, 4)), n_rows, row_bytes)
    k = int(rng.integers(1, n_rows + 1))
    ids = np.sort(rng.choice(n_rows, k, replace=False)).astype(np.int64)
    if rng.random() < 0.5:  # destinations partly in order: iovecs merge
        rows = (np.arange(k) + int(rng.integers(0, 50))).astype(np.int64)
        swap = rng.choice(k, k // 3, replace=False)
        rows[swap] = rng.permutation(rows[swap])
    else:
        rows = rng.choice(k + 100, k, replace=False).astype(np.int64)
    max_gap, iov_max = int(rng.choice([0, 1, 3, 50])), int(rng.choice([7, 64, 1024]))
    t = build(ids, rows, ext, max_gap=max_gap, iov_max=iov_max)
    offs, nbytes, first, dest, lens = _tables_from_pieces(ids, rows, ext, max_gap, iov_max)
    assert t.offs.tolist() == offs and t.nbytes.tolist() == nbytes and t.first.tolist() == first
    assert t.dest.tolist() == dest and t.lens.tolist() == lens
    assert all(b - a <= iov_max for a, b in pairwise(first))


def _registered_buffers(reader: BundleReader) -> list[int]:
    """The number of registered buffers of each io_uring of `reader` (/proc fdinfo)."""
    lib = kernels.library()
    fds = [lib.flashio_uring_fd(ring) for ring in reader._rings]
    if reader._reads is not None:
        fds.append(lib.flashio_reads_fd(reader._reads))
    counts = []
    for fd in fds:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            counts += [int(line.split()[1]) for line in f.read().splitlines() if line.startswith("UserBufs:")]
    assert len(counts) == len(fds)
    return counts


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
def test_registered_buffers_cover_part_of_out(ffn_file, read_loop):
    """register_buffers: rows landing inside a registered buffer go as READ_FIXED, the others as
    before; a row a buffer holds only partly, or one between two buffers, must not take a fixed
    read (the kernel refuses it: the read would fail). Every ring the reader opens (the calling
    thread's at registration, the pool's on first use) has them; () takes them back."""
    path, data = ffn_file
    ext = EXTENTS[0]
    rb, capacity = ext.row_bytes, 64
    rng = np.random.default_rng(7)
    with _direct_reader(path, threads=2) as reader, AlignedArena(capacity * rb) as arena:
        out = arena.tensor(torch.uint8, (capacity, rb))
        # rows [0, 20) registered, [20, 30) not, [30, 47) plus half of row 47 registered, [48, 64) registered
        half = out.view(-1)[47 * rb : 47 * rb + rb // 2]
        assert reader.register_buffers([out[30:47], out[:20], half, out[48:]])
        assert _registered_buffers(reader) == [4]  # the calling thread's ring, opened to register
        for submit in (False, True, True):
            ids = np.sort(rng.choice(ext.n_rows, capacity, replace=False))
            dest = rng.permutation(capacity)
            out.fill_(0xA5)
            r = (reader.submit_rows(0, ids, out, rows=dest).result() if submit
                 else reader.read_rows(0, ids, out, rows=dest))
            assert r.bytes_read >= capacity * rb
            np.testing.assert_array_equal(out.numpy()[dest], _block(data, 0)[ids])
        rings = reader._all_rings(kernels.library())  # the caller's, the reading thread's, a pool thread's
        assert _registered_buffers(reader) == [4] * len(rings) and len(rings) >= 2
        assert reader.register_buffers(())
        assert _registered_buffers(reader) == [0] * len(rings)
        ids = np.arange(3, 3 + capacity)
        reader.read_rows(0, ids, out)
        np.testing.assert_array_equal(out.numpy(), _block(data, 0)[ids])
        del out, half


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
def test_refused_buffers_leave_reads_as_they_were(ffn_file, read_loop, monkeypatch, caplog):
    """A kernel that refuses the buffers (RLIMIT_MEMLOCK without CAP_IPC_LOCK: ENOMEM) is logged
    once; register_buffers says False, no ring holds any, and reads go on unregistered."""
    path, data = ffn_file
    lib = kernels.library()
    real = lib.flashio_uring_buffers
    monkeypatch.setattr(lib, "flashio_uring_buffers", lambda ring, n, table: -errno.ENOMEM if n else real(ring, 0, None))
    ext = EXTENTS[0]
    with caplog.at_level(logging.INFO, logger="flashio.storage"), _direct_reader(path, threads=2) as reader, \
            AlignedArena(8 * ext.row_bytes) as arena:
        out = arena.tensor(torch.uint8, (8, ext.row_bytes))
        assert not reader.register_buffers([out])
        ids = np.array([1, 5, 9, 10, 11, 40, 41, 90])
        reader.submit_rows(0, ids, out, rows=np.arange(8)[::-1].copy()).result()
        np.testing.assert_array_equal(out.numpy()[::-1], _block(data, 0)[ids])
        assert not reader.register_buffers([out])
        assert _registered_buffers(reader) == [0] * len(reader._all_rings(lib))
        del out
    assert sum("refused" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
def test_reading_thread_jobs(ffn_file, read_loop, tmp_path):
    """submit_rows into aligned scattered rows goes to the reader's native reading thread: jobs
    queued one after another all land, in any order of waiting; a job whose reads fail raises
    FlashReadError from result(); close() waits for a job nobody waited for."""
    _, data = ffn_file
    path = tmp_path / "jobs.bin"
    data.tofile(path)
    ext = EXTENTS[0]
    rng = np.random.default_rng(11)
    with _direct_reader(str(path), threads=2) as reader, AlignedArena(4 * 64 * ext.row_bytes) as arena:
        outs = [arena.tensor(torch.uint8, (4 * 64, ext.row_bytes))[k * 64 : (k + 1) * 64] for k in range(4)]
        jobs = []
        for out in outs:
            ids, rows = np.sort(rng.choice(ext.n_rows, 64, replace=False)), rng.permutation(64)
            jobs.append((ids, rows, reader.submit_rows(0, ids, out, rows=rows), out))
        assert reader._reads is not None
        for ids, rows, pending, out in reversed(jobs):
            r = pending.result()
            assert pending.done() and r.bytes_read == 64 * ext.row_bytes and 0 <= r.elapsed_s < 60
            np.testing.assert_array_equal(out.numpy()[rows], _block(data, 0)[ids])
        assert reader._jobs == {}
        os.truncate(path, ext.offset_bytes + 600 * ext.row_bytes + 100)
        pending = reader.submit_rows(0, np.array([3, 700, 1100]), outs[0], rows=np.array([0, 1, 2]))
        with pytest.raises(FlashReadError, match=r"jobs\.bin.*expected \d+ bytes, got"):
            pending.result()
        reader.submit_rows(0, np.array([5, 9]), outs[1], rows=np.array([1, 0]))  # never waited for
        del outs
    assert reader._jobs == {} and reader._reads is None


@pytest.mark.parametrize("read_loop", ["uring"], indirect=True)
def test_a_forked_child_does_not_use_its_parents_reading_thread(ffn_file, read_loop):
    """A child forked while the reader has its reading thread does not queue jobs for a thread it
    does not have (they would never end), and its close() leaves the parent's thread alone."""
    import multiprocessing
    path, data = ffn_file
    ext = EXTENTS[0]
    with _direct_reader(path, threads=2) as reader, AlignedArena(8 * ext.row_bytes) as arena:
        out = arena.tensor(torch.uint8, (8, ext.row_bytes))
        ids = np.array([1, 5, 9, 10, 11, 40, 41, 90])
        reader.submit_rows(0, ids, out, rows=np.arange(8)).result()
        assert reader._reads is not None
        ctx = multiprocessing.get_context("fork")
        p = ctx.Process(target=_child_reads, args=(reader,))
        p.start()
        p.join(timeout=60)
        assert p.exitcode == 0
        reader.submit_rows(0, ids, out, rows=np.arange(8)[::-1].copy()).result()  # the parent's thread still serves
        np.testing.assert_array_equal(out.numpy()[::-1], _block(data, 0)[ids])
        del out


def _child_reads(reader: BundleReader) -> None:
    assert reader._reads_thread() is None
    reader.close()
