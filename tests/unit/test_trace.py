"""Activation traces: the generator's statistics, the file format, recording and replay."""

from __future__ import annotations

import numpy as np
import pytest

import flashio
from flashio.errors import FlashError, FormatError
from flashio.format import write_artifact
from flashio.trace import Trace, TraceParams, TraceReplay, load_order, synthesize

PROMPT = [2, 17, 101, 55, 9, 240, 33, 78, 12, 5, 99, 301]


def test_preset_matches_the_papers_opt_figures():
    p = TraceParams.preset("opt-6.7b")
    e = p.expected(window=5)
    assert e["density"] == pytest.approx(0.10, abs=1e-3)
    assert e["loaded"] == pytest.approx(0.024, abs=5e-4)
    assert e["cache"] == pytest.approx(0.24, abs=0.01)
    # and a generated trace has those statistics (not just the formula)
    t = synthesize(4, 8192, 60, p, seed=3)
    got = t.summary(window=5, skip=10)
    assert got["density"] == pytest.approx(0.10, abs=0.005)
    assert got["loaded"] == pytest.approx(0.024, abs=0.002)
    assert got["cache"] == pytest.approx(0.24, abs=0.015)


def test_persistence_controls_reuse():
    sticky = synthesize(2, 4096, 40, TraceParams(0.1, 0.9, 1.0), seed=0).summary(5, skip=5)
    fickle = synthesize(2, 4096, 40, TraceParams(0.1, 0.3, 1.0), seed=0).summary(5, skip=5)
    assert sticky["loaded"] < 0.5 * fickle["loaded"]
    with pytest.raises(FlashError, match="out of range"):
        TraceParams(density=0.7)
    with pytest.raises(FlashError, match="preset"):
        TraceParams.preset("gpt-5")


def test_model_seed_fixes_hotness_across_runs():
    p = TraceParams.preset("opt-6.7b")
    a = synthesize(1, 4096, 200, p, seed=1, model_seed=7)
    b = synthesize(1, 4096, 200, p, seed=2, model_seed=7)
    freq = [np.bincount(np.concatenate([t.active(s, 0) for s in range(t.steps)]), minlength=4096)
            for t in (a, b)]
    assert np.corrcoef(freq[0], freq[1])[0, 1] > 0.8  # the same neurons are hot in both runs
    assert not np.array_equal(a.active(5, 0), b.active(5, 0))


def test_save_load_slice_and_permute(tmp_path):
    t = synthesize(3, 512, 10, TraceParams.preset("opt-6.7b"), seed=0)
    path = t.save(tmp_path / "t.trace")  # no .npz appended
    assert path.name == "t.trace"
    back = Trace.load(path)
    assert back.meta["kind"] == "synthetic" and back.steps == 10
    for s in range(10):
        for layer in range(3):
            assert np.array_equal(back.active(s, layer), t.active(s, layer))
    part = t.slice(4, 7)
    assert part.steps == 3 and np.array_equal(part.active(0, 2), t.active(4, 2))
    rows_of = load_order(t, window=5)
    assert all(np.array_equal(np.sort(r), np.arange(512)) for r in rows_of)
    moved = t.permuted(rows_of, "test")
    assert np.array_equal(moved.active(3, 1), np.sort(rows_of[1][t.active(3, 1)]))
    # the number of loads is a property of the activity, not of the layout
    assert np.array_equal(moved.required_rows(5), t.required_rows(5))
    with pytest.raises(FlashError, match="asked for step 10"):
        t.active(10, 0)
    (tmp_path / "bad").write_bytes(b"not a trace")
    with pytest.raises(FormatError, match="not a flashio trace"):
        Trace.load(tmp_path / "bad")


def test_required_rows_by_hand():
    from flashio.trace import _from_entries

    sets = [[1, 2], [2, 3], [1], [4], [1, 2]]  # one layer, 5 steps
    t = _from_entries(1, 8, [np.array(s) for s in sets], {})
    assert t.required_rows(None)[:, 0].tolist() == [2, 2, 1, 1, 2]
    # window 1: keep what the previous step used
    assert t.required_rows(1)[:, 0].tolist() == [2, 1, 1, 1, 2]
    # window 2: 1 is still cached at step 2 (used at step 0); at step 4, 1 (step 2) is, 2 is not
    assert t.required_rows(2)[:, 0].tolist() == [2, 1, 0, 1, 1]


@pytest.fixture(scope="module")
def packed(tiny_opt, tmp_path_factory):
    return write_artifact(tiny_opt[1], tmp_path_factory.mktemp("trace") / "art")


@pytest.mark.parametrize("window", [1, 3])
def test_replay_drives_the_runtime_and_loads_what_the_trace_requires(packed, window):
    t = synthesize(2, 256, len(PROMPT), TraceParams.preset("opt-6.7b"), seed=5)
    with flashio.open(packed, mode="sparse", window=window, max_gap=0,  # no gap reads: the trace's rows only
                      retain=False,  # rows leave with the window, as the trace's count assumes
                      active_source=TraceReplay(t)) as model:
        model.forward(PROMPT, token_by_token=True)
        loaded = [s.neurons_loaded for s in model.stats]
        active = [s.neurons_active for s in model.stats]
        assert all(s.bytes_read == s.neurons_loaded * 512 for s in model.stats)
        model.forward(PROMPT, token_by_token=True)  # a new sequence restarts the trace
        assert [s.neurons_loaded for s in model.stats] == loaded
    assert loaded == t.required_rows(window).sum(axis=1).tolist()
    assert active == t.required_rows(None).sum(axis=1).tolist()
    with flashio.open(packed, mode="sparse", window=window, max_gap=0, active_source=TraceReplay(t)) as model:
        model.forward(PROMPT, token_by_token=True)  # retain (the default): rows stay while the cache has room
        kept = [s.neurons_loaded for s in model.stats]
        assert model.capacity == 256  # room for every neuron: each one is read once
    distinct = sum(len(np.unique(np.concatenate([t.active(s, layer) for s in range(t.steps)]))) for layer in range(2))
    assert sum(kept) == distinct < sum(loaded)


def test_record_then_replay_reproduces_the_run(packed, tmp_path):
    with flashio.open(packed, mode="oracle", window=2, record_trace=True, lookahead=False) as model:
        model.forward(PROMPT[:4])  # a 4-token step is recorded as 4 trace steps
        model.forward(PROMPT, token_by_token=True)
        want = [s.neurons_loaded for s in model.stats]
        trace = model.trace()
    assert trace.steps == 4 + len(PROMPT) and trace.meta["kind"] == "recorded"
    path = trace.save(tmp_path / "run.npz")
    replay = TraceReplay(Trace.load(path), start=4)
    with flashio.open(packed, mode="sparse", window=2, active_source=replay, lookahead=False) as model:
        model.forward(PROMPT, token_by_token=True)
        assert [s.neurons_loaded for s in model.stats] == want
    with flashio.open(packed, mode="oracle") as model, pytest.raises(FlashError, match="record_trace"):
        model.trace()


def test_cli_run_records_a_trace(tiny_opt, tmp_path, capsys):
    from flashio.cli import main

    art = write_artifact(tiny_opt[1], tmp_path / "art")
    out = tmp_path / "t.npz"
    assert main(["run", str(art), "--prompt", "def add(a, b):", "--max-new-tokens", "4", "--mode", "oracle",
                 "--record-trace", str(out)]) == 0
    assert "trace:" in capsys.readouterr().err
    t = Trace.load(out)
    assert t.n_layers == 2 and t.n_neurons == 256 and t.steps >= 4


def test_replay_lookahead_guesses_a_set_of_the_same_size_with_the_recall_asked():
    rng = np.random.default_rng(0)
    sets = [np.sort(rng.choice(1000, 200, replace=False)) for _ in range(2 * 3)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    trace = Trace(3, 1000, offsets, np.concatenate(sets).astype(np.int32))
    replay = TraceReplay(trace, lookahead_recall=0.8)
    replay.begin_step()
    for layer in range(3):
        truth, guess = replay.active(layer, None), replay.lookahead(layer, None)
        assert len(guess) == len(truth) and np.all(np.diff(guess) > 0)
        assert len(np.intersect1d(guess, truth)) == 160
        assert np.array_equal(guess, replay.lookahead(layer, None))  # seeded by step and layer
    replay.begin_step()  # step 1: the wrong guesses come from the layer's set of step 0
    for layer in range(3):
        truth, guess = replay.active(layer, None), replay.lookahead(layer, None)
        wrong = np.setdiff1d(guess, truth)
        assert len(wrong) == 40 and np.isin(wrong, trace.active(0, layer)).all()
    prepared = TraceReplay(trace, lookahead_recall=0.8)
    prepared.prepare(5)  # drawn before the run (the trace has 2 steps): the same guesses, step by step
    assert len(prepared._guesses) == 2 * 3 and prepared._step == -1
    replay.reset()
    for _ in range(2):
        replay.begin_step()
        prepared.begin_step()
        for layer in range(3):
            assert np.array_equal(prepared.lookahead(layer, None), replay.lookahead(layer, None))
            assert prepared.lookahead(layer, None) is prepared._guesses[prepared._step, layer]
    exact = TraceReplay(trace)  # recall 1: the set itself
    exact.begin_step()
    assert np.array_equal(exact.lookahead(0, None), trace.active(0, 0))
    with pytest.raises(ValueError, match="lookahead_recall"):
        TraceReplay(trace, lookahead_recall=1.5)
