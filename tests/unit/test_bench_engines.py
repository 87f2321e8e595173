"""The runtime options the benchmark's configurations use, each checked against dense mode:
window off, unbundled reads, overlapped reads, pinned rows (hybrid), mmap, compute dtype, and the
reader's split and asynchronous reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashio
from flashio.cache import FillingWindowCache
from flashio.errors import FlashError
from flashio.format import write_artifact
from flashio.storage import AlignedArena, BundleReader, LayerExtent

PROMPT = [2, 17, 101, 55, 9, 240, 33, 78, 12, 5]


@pytest.fixture(scope="module")
def dense_logits(opt_artifact):
    with flashio.open(opt_artifact, mode="dense") as model:
        return model.forward(PROMPT, token_by_token=True)


@pytest.mark.parametrize("options", [
    {"reuse": False}, {"bundled": False}, {"overlap": True}, {"overlap": True, "bundled": False},
    {"overlap": True, "max_gap": 3, "threads": 2},
])
def test_oracle_options_equal_dense_for_relu(opt_artifact, dense_logits, options):
    with flashio.open(opt_artifact, mode="oracle", window=2, **options) as model:
        got = model.forward(PROMPT, token_by_token=True)
        stats = model.stats
    assert (got - dense_logits).abs().max().item() <= 1e-5
    if options.get("reuse") is False:
        assert all(s.cache_hits == 0 and s.neurons_loaded == s.neurons_active for s in stats)
    if options.get("bundled") is False:  # two requests per neuron, never coalesced
        assert all(s.reads == 2 * s.neurons_loaded for s in stats)
    if options.get("overlap"):  # reads in flight are timed apart from the wait for them
        assert all(s.io_busy_ms > 0 for s in stats if s.neurons_loaded)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_hybrid_pins_rows_and_reads_the_rest(opt_artifact, dense_logits, fraction):
    with flashio.open(opt_artifact, mode="naive", pinned_fraction=fraction) as model:
        got = model.forward(PROMPT, token_by_token=True)
        pinned = round(fraction * 256)
        assert all(s.bytes_read == 2 * (256 - pinned) * 512 for s in model.stats)
    assert (got - dense_logits).abs().max().item() <= 1e-5


def test_mmap_mode_equals_dense(opt_artifact, dense_logits):
    with flashio.open(opt_artifact, mode="mmap") as model:
        got = model.forward(PROMPT, token_by_token=True)
        assert all(s.reads == 0 and s.io_ms == 0 for s in model.stats)
    assert (got - dense_logits).abs().max().item() <= 1e-5


def test_compute_dtype_converts_once_and_stays_close(tiny_opt, tmp_path):
    art = write_artifact(tiny_opt[1], tmp_path / "fp16", dtype="float16")
    with flashio.open(art, mode="dense", compute_dtype="float32") as ref:
        want = ref.forward(PROMPT, token_by_token=True)
    for mode, kw in (("dense", {}), ("oracle", {"window": 2}), ("oracle", {"overlap": True}),
                     ("oracle", {"overlap": True, "bundled": False, "window": 1}),
                     ("oracle", {"reuse": False, "dram_budget": 600_000, "max_context": 64}),
                     ("naive", {"pinned_fraction": 0.5})):
        with flashio.open(art, mode=mode, compute_dtype="bfloat16", **kw) as model:
            assert model.compute_dtype == torch.bfloat16 and model.kv.k[0].dtype == torch.bfloat16
            got = model.forward(PROMPT, token_by_token=True)
            if mode == "oracle":  # new rows were converted: counted as memory management
                assert sum(s.mem_ms for s in model.stats) > 0
        assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    with pytest.raises(FlashError, match="compute_dtype"):
        flashio.open(art, compute_dtype="int8", mode="dense")


def test_option_errors(opt_artifact):
    with pytest.raises(FlashError, match="pinned_fraction"):
        flashio.open(opt_artifact, mode="oracle", pinned_fraction=0.5)
    with pytest.raises(FlashError, match="active_source"):
        flashio.open(opt_artifact, mode="dense", active_source=object())


@pytest.fixture
def rows_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(64, 4096), dtype=np.uint8)
    path = tmp_path / "rows.bin"
    path.write_bytes(data.tobytes())
    return path, data


def test_split_reads_each_part_separately(rows_file):
    path, data = rows_file
    ids = np.array([1, 2, 3, 10, 40])
    with BundleReader(path, [LayerExtent(0, 64, 4096)], threads=3) as reader, AlignedArena(5 * 4096) as a:
        out = a.tensor(torch.uint8, (5, 4096))
        r = reader.read_rows(0, ids, out, split=2)
        assert r.reads == 10 and r.bytes_read == 5 * 4096
        assert np.array_equal(out.numpy(), data[ids])
        with pytest.raises(ValueError, match="split"):
            reader.read_rows(0, ids, out, split=3)
        del out


def test_submit_rows_reads_in_the_background(rows_file):
    path, data = rows_file
    ids = np.array([0, 5, 6, 7, 33, 63])
    with BundleReader(path, [LayerExtent(0, 64, 4096)], threads=4) as reader, AlignedArena(6 * 4096) as a:
        out = a.tensor(torch.uint8, (6, 4096))
        pending = reader.submit_rows(0, ids, out)
        r = pending.result()
        assert pending.done() and r.reads == 4 and r.bytes_read == 6 * 4096 and r.elapsed_s > 0
        assert np.array_equal(out.numpy(), data[ids])
        assert reader.submit_rows(0, np.array([], dtype=np.int64), out[:0]).result().reads == 0
        del out


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 5), capacity=st.integers(8, 40),
       steps=st.lists(st.sets(st.integers(0, 39), max_size=8), min_size=1, max_size=25))
def test_filling_cache_holds_the_window_and_reuses_freed_rows(window, capacity, steps):
    """The window's union (or, when it does not fit, the current set plus the most recent),
    every row carrying its neuron, and no row moved unless more neurons left than arrived."""
    fill = FillingWindowCache(torch.full((capacity, 2), -1.0), 40, window)
    fill._scratch = torch.empty(capacity, 2)
    for s, active_set in enumerate(steps):
        active = np.array(sorted(active_set), dtype=np.int64)
        before = set(fill.neurons.tolist())
        f = fill.update_fill(active)
        fill.matrix[torch.from_numpy(f.dest)] = torch.from_numpy(f.missing).float()[:, None]
        held = set(fill.neurons.tolist())
        want = set().union(*map(set, steps[max(0, s - window + 1) : s + 1]))
        if len(want) <= capacity:
            assert held == want
        else:
            assert active_set <= held <= want and len(held) <= capacity
        assert set(f.missing.tolist()) == active_set - before and f.hits == len(active_set & before)
        assert f.moved <= max(0, f.evicted - len(f.missing))
        for slot, neuron in enumerate(fill.neurons.tolist()):
            assert fill.slot_of[neuron] == slot and torch.all(fill.matrix[slot] == neuron)
        assert np.all(fill.neuron_at[fill.n_used :] == -1)
