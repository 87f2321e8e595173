"""The window cache simulated on active sets: reads and cache size as the runtime's WindowCache
has them, and the window choice under a DRAM limit (short when sets are independent, long when
they repeat, caching off when nothing fits)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tasks.windowing import OFF, choose_window, simulate_windows  # noqa: E402


def sets_to_masks(sets, n):
    m = torch.zeros(len(sets), n, dtype=torch.bool)
    for t, s in enumerate(sets):
        m[t, list(s)] = True
    return m


def by_window(sims):
    return {s.window: s for s in sims}


def test_simulation_counts_what_the_window_cache_reads_and_holds():
    m = sets_to_masks([{0, 1}, {1, 2}, {0}], 4)
    sims = by_window(simulate_windows(m, torch.zeros(3, dtype=torch.int32), windows=(1, 2)))
    assert sims[OFF].read_fraction == pytest.approx(5 / 12)  # every token reads its whole set
    assert sims[1].read_fraction == pytest.approx(4 / 12)  # 2, then {2}, then {0} (left with token 0)
    assert sims[2].read_fraction == pytest.approx(3 / 12)  # token 2's neuron 0 is still cached from token 0
    assert sims[2].held_fraction == pytest.approx(3 / 4) and sims[1].held_fraction == pytest.approx(2 / 4)


def test_each_sequence_starts_cold():
    m = sets_to_masks([{0}, {0}, {0}, {0}], 2)
    one_seq = by_window(simulate_windows(m, torch.tensor([0, 0, 0, 0]), windows=(1,)))
    two_seq = by_window(simulate_windows(m, torch.tensor([0, 0, 1, 1]), windows=(1,)))
    assert one_seq[1].read_fraction == pytest.approx(1 / 8) and two_seq[1].read_fraction == pytest.approx(2 / 8)


def choice_for(masks, fraction=0.5, layers=2):
    seq = torch.arange(len(masks)) // 64  # sequences of 64 tokens
    sims = [simulate_windows(masks, seq) for _ in range(layers)]
    return choose_window(sims, row_bytes=[1.0] * layers, n_neurons=[masks.shape[1]] * layers,
                         ffn_dram_fraction=fraction)


def test_independent_active_sets_get_a_short_window():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(512, 400, generator=gen) < 0.3  # independent tokens, 30% each
    pick = choice_for(masks)
    assert pick.window in (1, 2) and pick.held_fraction <= 0.5
    longer = {w: (r, h) for w, r, h in pick.candidates}
    assert longer[8][1] > 0.5  # a long window would hold most of the FFN


def test_repeating_active_sets_get_a_longer_window():
    gen = torch.Generator().manual_seed(0)
    pool = [torch.rand(400, generator=gen) < 0.12 for _ in range(3)]  # three sets that recur in turn
    masks = torch.stack([pool[t % 3] for t in range(512)])
    pick = choice_for(masks)
    assert pick.window >= 3 and pick.read_fraction < 0.05


def test_caching_is_turned_off_when_no_window_fits():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(256, 300, generator=gen) < 0.7
    pick = choice_for(masks, fraction=0.5)
    assert pick.window == OFF and pick.read_fraction == pytest.approx(float(masks.float().mean()), rel=1e-6)
    assert "caching off" in pick.describe()


def test_resident_gate_rows_count_against_the_dram_limit():
    gen = torch.Generator().manual_seed(0)
    pool = [torch.rand(300, generator=gen) < 0.12 for _ in range(3)]
    masks = torch.stack([pool[t % 3] for t in range(256)])
    sims = [simulate_windows(masks, torch.arange(256) // 64)]
    free = choose_window(sims, row_bytes=[2 / 3], n_neurons=[300], ffn_dram_fraction=0.5, ffn_bytes=300.0)
    gate = choose_window(sims, row_bytes=[2 / 3], n_neurons=[300], ffn_dram_fraction=0.5, ffn_bytes=300.0,
                         resident_fraction=1 / 3)
    assert free.window >= 3 and gate.window < free.window and gate.held_fraction <= 0.5 and gate.fits
    assert gate.read_fraction < float(masks.float().mean()) * 2 / 3 + 1e-9  # reads up + down only
    over = choose_window(sims, row_bytes=[2 / 3], n_neurons=[300], ffn_dram_fraction=0.3, ffn_bytes=300.0,
                         resident_fraction=1 / 3)
    assert not over.fits and over.window == OFF
