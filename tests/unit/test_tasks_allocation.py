"""Per-layer densities: the greedy allocation meets its error budget with fewer bytes than one
density for every layer; the measured error tables of a tiny gated model favour contribution."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tasks.allocation import GRID, allocate_densities, relative_errors, topk_mask, uniform_error  # noqa: E402
from tasks.errors import InputError  # noqa: E402


def constructed_errors():
    """Three layers of equal size whose error grows as density falls, at different rates: layer 0
    is nearly free to sparsify, layer 2 is costly (the spread of real models: layer 0 sparser)."""
    rates = (0.05, 0.4, 2.0)
    return [[r * (1.0 - d) ** 2 for d in GRID] for r in rates]


def test_greedy_meets_the_budget_with_fewer_bytes_than_uniform():
    errs = constructed_errors()
    budget = uniform_error(errs, GRID, 0.5)
    alloc = allocate_densities(errs, GRID, row_bytes=[1.0] * 3, n_neurons=[100] * 3, error_budget=budget,
                               uniform_density=0.5)
    assert alloc.error <= budget + 1e-12
    assert alloc.bytes_fraction < 0.5 - 0.05  # clearly fewer bytes than 0.5 everywhere
    assert alloc.densities[0] <= alloc.densities[1] < alloc.densities[2]  # the cheap layers go sparsest


def test_greedy_weighs_bytes_per_layer():
    errs = [[1.0 - d for d in GRID]] * 2  # equal errors, layer 1 twice as wide: its steps save twice the bytes
    alloc = allocate_densities(errs, GRID, row_bytes=[1.0, 1.0], n_neurons=[100, 200], error_budget=0.5)
    assert alloc.densities[1] < alloc.densities[0]


def test_zero_budget_stays_dense_and_bad_grids_are_refused():
    errs = constructed_errors()
    assert allocate_densities(errs, GRID, row_bytes=[1.0] * 3, n_neurons=[10] * 3, error_budget=0.0).densities \
        == (1.0, 1.0, 1.0)
    with pytest.raises(InputError, match=r"descend from 1\.0"):
        allocate_densities(errs, GRID[::-1], row_bytes=[1.0] * 3, n_neurons=[10] * 3, error_budget=1.0)


def test_contribution_ranking_loses_less_of_the_output_than_gate_ranking():
    gen = torch.Generator().manual_seed(0)
    d, n = 16, 64
    x = torch.randn(256, d, generator=gen)
    gate, up, down = (torch.randn(n, d, generator=gen) for _ in range(3))
    g = torch.nn.functional.silu(x @ gate.T)
    h = g * (x @ up.T)
    c, gt = relative_errors(h, down.T, g.abs(), (1.0, 0.7, 0.5, 0.3))
    assert c[0] == 0 and gt[0] == 0
    assert all(c[j] < gt[j] for j in (1, 2, 3)) and c[3] > c[1]
    assert topk_mask(h.abs(), 0.5).sum(1).eq(32).all()
