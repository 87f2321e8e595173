"""The window cache: it holds exactly the union of the last k active sets, compactly."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashio.cache import FillingWindowCache, WindowCache

N = 40


def _fill(cache: WindowCache, start: int, ids: np.ndarray) -> None:
    """What the reader does: write each new neuron's bundle (its id, repeated) into its row."""
    cache.matrix[start : start + len(ids)] = torch.from_numpy(ids).float()[:, None]


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 6),
       steps=st.lists(st.sets(st.integers(0, N - 1), max_size=N), min_size=1, max_size=30))
def test_cache_holds_union_of_last_k_sets(window, steps):
    cache = WindowCache(torch.full((N, 3), -1.0), N, window)
    for s, active_set in enumerate(steps):
        active = np.array(sorted(active_set), dtype=np.int64)
        before = set(cache.neurons.tolist())
        up = cache.update(active)
        _fill(cache, up.start, up.missing)
        want = set().union(*map(set, steps[max(0, s - window + 1) : s + 1]))
        held = cache.neurons.tolist()
        assert set(held) == want  # exactly the window's union
        assert len(held) == len(set(held)) == cache.n_used  # one neuron per slot
        assert set(up.missing.tolist()) == set(active_set) - before  # reads = the missing bundles
        assert up.hits == len(active_set & before)
        for slot, neuron in enumerate(held):  # every row still carries its neuron's bundle
            assert cache.slot_of[neuron] == slot
            assert torch.all(cache.matrix[slot] == neuron)
        assert np.all(cache.neuron_at[cache.n_used :] == -1)


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(5, N),
       steps=st.lists(st.sets(st.integers(0, N - 1), max_size=5), min_size=1, max_size=30))
def test_capacity_evicts_least_recently_active(capacity, steps):
    cache = WindowCache(torch.zeros(capacity, 2), N, window=10)
    for active_set in steps:
        active = np.array(sorted(active_set), dtype=np.int64)
        up = cache.update(active)
        _fill(cache, up.start, up.missing)
        assert cache.n_used <= capacity
        assert set(active_set) <= set(cache.neurons.tolist())  # this step's set is always there
        for slot, neuron in enumerate(cache.neurons.tolist()):
            assert torch.all(cache.matrix[slot] == neuron)


def test_row_moves_reuse_one_growing_scratch_buffer():
    """Row moves go through a scratch buffer that only grows (doubling): over many steps it is
    reallocated at most log2(capacity) + 1 times, never once per step."""
    cache = WindowCache(torch.zeros(N, 4), N, window=2)
    rng = np.random.default_rng(0)
    reallocations, ptr, moved = 0, cache._scratch.data_ptr(), 0
    for _ in range(200):
        up = cache.update(np.sort(rng.choice(N, int(rng.integers(0, N)), replace=False)))
        moved += up.moved
        if cache._scratch.data_ptr() != ptr:
            reallocations, ptr = reallocations + 1, cache._scratch.data_ptr()
    assert moved > 200  # the test did exercise row moves
    assert reallocations <= int(np.log2(N)) + 1


@settings(max_examples=150, deadline=None)
@given(window=st.integers(1, 4), capacity=st.integers(8, N), filling=st.booleans(),
       steps=st.lists(st.sets(st.integers(0, N - 1), max_size=8), min_size=1, max_size=30))
def test_retained_rows_stay_while_there_is_room_and_only_the_window_is_live(window, capacity, filling, steps):
    """retain=True: a neuron that left the window keeps its row until the capacity needs it (the
    least recently active leave first), so it is not read again; live() marks exactly the rows of
    the window's neurons, the rows a step computes."""
    cls = FillingWindowCache if filling else WindowCache
    cache = cls(torch.full((capacity, 3), -1.0), N, window, retain=True)
    plain = WindowCache(torch.full((capacity, 3), -1.0), N, window)  # the same steps without retention
    seen: list[int] = []  # neurons in order of last activity
    for s, active_set in enumerate(steps):
        active = np.array(sorted(active_set), dtype=np.int64)
        before = set(cache.neurons.tolist())
        if filling:
            up = cache.update_fill(active)
            cache.matrix[torch.from_numpy(up.dest)] = torch.from_numpy(up.missing).float()[:, None]
        else:
            up = cache.update(active)
            _fill(cache, up.start, up.missing)
        _fill(plain, *(lambda u: (u.start, u.missing))(plain.update(active)))
        seen = [n for n in seen if n not in active_set] + sorted(active_set)
        held = cache.neurons.tolist()
        assert set(up.missing.tolist()) == set(active_set) - before
        # the most recently active neurons that fit: a retained cache holds them all
        assert set(held) == set(seen[-min(len(seen), capacity):]) or len(held) == capacity
        assert set(active_set) <= set(held) and len(held) <= capacity
        assert set(plain.neurons.tolist()) <= set(held) or len(held) == capacity
        window_ids = set().union(*map(set, steps[max(0, s - window + 1) : s + 1]))
        live = cache.live()
        live_ids = set(held) if live is None else {n for n, keep in zip(held, live) if keep}
        assert live_ids == window_ids & set(held)
        for slot, neuron in enumerate(held):
            assert torch.all(cache.matrix[slot] == neuron)


def test_a_cache_with_room_for_every_neuron_reads_each_once():
    rng = np.random.default_rng(1)
    cache = WindowCache(torch.zeros(N, 2), N, window=2, retain=True)
    plain = WindowCache(torch.zeros(N, 2), N, window=2)
    loaded = plain_loaded = 0
    for _ in range(50):
        active = np.sort(rng.choice(N, 6, replace=False))
        loaded += len(cache.update(active).missing)
        plain_loaded += len(plain.update(active).missing)
    assert loaded == len(set(cache.neurons.tolist())) <= N  # each neuron read once
    assert plain_loaded > 2 * loaded


@settings(max_examples=150, deadline=None)
@given(window=st.integers(1, 4), capacity=st.integers(8, N), retain=st.booleans(),
       steps=st.lists(st.tuples(st.sets(st.integers(0, N - 1), max_size=4), st.sets(st.integers(0, N - 1), max_size=4)),
                      min_size=1, max_size=25))
def test_extend_gives_a_guessed_step_its_own_set(window, capacity, retain, steps):
    """The lookahead's two updates (a guess, then the step's own set via extend): every row keeps
    its neuron, the step's set is cached, and the window is the step's sets alone: with retained
    rows and room for the window, `live()` marks what a cache never given the guesses marks."""
    cache = FillingWindowCache(torch.full((capacity, 3), -1.0), N, window, retain=retain)
    plain = FillingWindowCache(torch.full((capacity, 3), -1.0), N, window, retain=retain)
    for guess_set, active_set in steps:
        guess = np.array(sorted(guess_set), dtype=np.int64)
        active = np.array(sorted(active_set), dtype=np.int64)
        first = cache.update_guess(guess)
        cache.matrix[first.dest] = torch.from_numpy(first.missing).float()[:, None]
        before = set(cache.neurons.tolist())
        late, _ = cache.extend(active)
        cache.matrix[late.dest] = torch.from_numpy(late.missing).float()[:, None]
        assert late.hits == len(active_set & before)
        assert set(late.missing.tolist()) == set(active_set) - before
        assert set(active_set) <= set(cache.neurons.tolist())
        assert cache.n_used <= capacity and len(set(cache.neurons.tolist())) == cache.n_used
        for slot, neuron in enumerate(cache.neurons.tolist()):
            assert cache.slot_of[neuron] == slot and torch.all(cache.matrix[slot] == neuron)
        plain.update_fill(active)
        if retain and capacity >= (window + 1) * 4:  # both hold the window (and a guess besides)
            live, want = cache.live(), plain.live()
            got = set(cache.neurons.tolist() if live is None else cache.neurons[live].tolist())
            assert got == set(plain.neurons.tolist() if want is None else plain.neurons[want].tolist())


def test_extend_past_the_capacity_takes_rows_being_read_last():
    cache = FillingWindowCache(torch.zeros(4, 2), N, window=3, retain=True)
    first = cache.update_guess(np.array([0, 1, 2]))
    late, took = cache.extend(np.array([3, 4, 5]), first.dest)  # one free row; the wrong guesses' rows are being read
    assert sorted(late.missing.tolist()) == [3, 4, 5] and late.evicted == 2 and took
    assert {3, 4, 5} <= set(cache.neurons.tolist())
    second = cache.update_guess(np.array([3, 6]))  # step 2: 6 takes the wrong guess left over
    assert second.missing.tolist() == [6]
    late, took = cache.extend(np.array([6, 7]), second.dest)  # 7 takes a row of step 1's, not 6's being read
    assert late.missing.tolist() == [7] and late.evicted == 1 and not took
    assert {6, 7} <= set(cache.neurons.tolist())
