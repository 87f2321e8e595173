"""Per-layer densities for gated FFNs: each layer's measured error against density, then a greedy
allocation that meets an error budget with the fewest bytes (as in TEAL).

    errs = measure_layer_errors(source, calib, n_sequences=16, options=ActivationOptions())
    alloc = allocate_densities(errs.contribution, errs.grid, row_bytes=[...], n_neurons=[...],
                               error_budget=uniform_error(errs.contribution, errs.grid, 0.5))
    alloc.densities                                  # one per layer, mean bytes <= uniform 0.5's

The error of a layer at density d is the FFN output's relative error ||y_d - y|| / ||y|| per
token (y_d keeps the top d of the neurons, y all of them), averaged over calibration tokens,
computed densely from the hooked FFN (the down projection's input h = act(gate)·up) for two
rankings: by contribution |h| and by gate magnitude |act(gate)|. Errors of layers add up only
roughly, so the budget is in the same unit as what it replaces: by default the summed error of
one density for every layer; the greedy allocation reaches that error with fewer bytes.

Greedy: start dense (every layer at density 1), repeatedly lower by one grid step the density of
the layer whose step costs the least error per byte saved, among the steps that keep the total
within the budget; stop when no step fits.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from prefect import get_run_logger, task

from tasks.activations import ActivationOptions
from tasks.caching import run_stage, stage_cache
from tasks.calibration import CalibrationData, load_tokens
from tasks.errors import InputError
from tasks.hooks import down_modules, ffn_spec, run_hooked
from tasks.hooks import load_model as load_source_model
from tasks.source import SourceModel

GRID = tuple(round(1.0 - 0.05 * j, 2) for j in range(17))  # 1.0, 0.95, ..., 0.2
ERROR_ROW_STRIDE = 4  # errors on every 4th token: a matmul per grid point, the cost of the stage


@dataclass(frozen=True)
class LayerErrors:
    """Per layer, the mean relative FFN-output error at each grid density, for both rankings."""

    grid: tuple[float, ...]  # descending, grid[0] == 1.0
    contribution: tuple[tuple[float, ...], ...]  # [layer][grid point], top-k by |act(gate)·up|
    gate: tuple[tuple[float, ...], ...]  # [layer][grid point], top-k by |act(gate)|
    tokens: int


@dataclass(frozen=True)
class Allocation:
    densities: tuple[float, ...]  # per layer
    error: float  # summed over layers (the budget's unit)
    error_budget: float
    bytes_fraction: float  # FFN bytes at these densities / the whole FFN
    uniform_density: float  # the single density whose error was the default budget (or 0)


def topk_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """Bool [T, N]: per row, the round(density N) highest scores (at least one)."""
    n = score.shape[-1]
    k = min(n, max(1, round(density * n)))
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(-1, torch.topk(score, k, dim=-1).indices, True)


def relative_errors(h: torch.Tensor, down_weight: torch.Tensor, gate_mag: torch.Tensor,
                    grid: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed over rows, ||(h * ~keep) W^T|| / ||h W^T|| at each density, for keep = top-k by
    |h| and by gate_mag. h, gate_mag: [T, N]; down_weight: [D, N]. Returns two [G] tensors."""
    hf, w = h.float(), down_weight.float()
    norm = (hf @ w.T).norm(dim=-1).clamp_min(1e-12)  # [T]
    out = torch.zeros(2, len(grid), dtype=torch.float64)
    for r, score in enumerate((hf.abs(), gate_mag.float())):
        for j, d in enumerate(grid):
            if d >= 1.0:
                continue
            dropped = hf.masked_fill(topk_mask(score, d), 0.0)
            out[r, j] = float(((dropped @ w.T).norm(dim=-1) / norm).sum())
    return out[0], out[1]


def measure_layer_errors(source: SourceModel, calib: CalibrationData, *, n_sequences: int,
                         options: ActivationOptions, grid: Sequence[float] = GRID) -> LayerErrors:
    """The error table of every layer on the first `n_sequences` calibration sequences."""
    ffn = ffn_spec(source)
    if not ffn.gated:
        raise InputError(f"{source.ref}: per-layer densities are for gated FFNs; {source.model_type} is not gated")
    ids = load_tokens(calib, "calibration")[:n_sequences]
    model = load_source_model(str(source.path), options.dtype, source.fingerprint)
    n_layers = source.n_layers
    sums = torch.zeros(2, n_layers, len(grid), dtype=torch.float64)
    gate_mag: list[torch.Tensor | None] = [None] * n_layers
    rows = [0]

    def gate_hook(i: int):
        def fn(_m, _inputs, output) -> None:
            gate_mag[i] = ffn.magnitude(output.reshape(-1, output.shape[-1]))[::ERROR_ROW_STRIDE]
        return fn

    def down_hook(i: int, down: torch.nn.Module):
        def fn(_m, inputs) -> None:
            h = inputs[0].reshape(-1, inputs[0].shape[-1])[::ERROR_ROW_STRIDE]  # [T', N]
            c, g = relative_errors(h, down.weight, gate_mag[i], grid)
            sums[0, i] += c
            sums[1, i] += g
            if i == 0:
                rows[0] += len(h)
        return fn

    downs = down_modules(model, source)
    run_hooked(model, source, ids, batch_sequences=options.batch_sequences, threads=options.torch_threads,
               gate=gate_hook, down=lambda i: down_hook(i, downs[i]))
    mean = (sums / max(1, rows[0])).tolist()
    return LayerErrors(grid=tuple(float(g) for g in grid), contribution=tuple(tuple(r) for r in mean[0]),
                       gate=tuple(tuple(r) for r in mean[1]), tokens=rows[0])


def uniform_error(errors: Sequence[Sequence[float]], grid: Sequence[float], density: float) -> float:
    """Summed error of every layer at one density (linear between grid points)."""
    return sum(_interp(grid, e, density) for e in errors)


def _interp(grid: Sequence[float], values: Sequence[float], x: float) -> float:
    pts = sorted(zip(grid, values))
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


def allocate_densities(errors: Sequence[Sequence[float]], grid: Sequence[float], *, row_bytes: Sequence[float],
                       n_neurons: Sequence[int], error_budget: float, uniform_density: float = 0.0) -> Allocation:
    """TEAL-style greedy: the per-layer grid densities of fewest bytes whose summed error stays
    within `error_budget` (errors[i][j]: layer i at grid[j]; grid descending from 1.0)."""
    if list(grid) != sorted(grid, reverse=True) or grid[0] != 1.0:
        raise InputError(f"the density grid must descend from 1.0; got {tuple(grid)}")
    if len(errors) != len(row_bytes) or len(errors) != len(n_neurons) or not errors:
        raise InputError(f"{len(errors)} layers of errors for {len(row_bytes)} row sizes and {len(n_neurons)} widths")
    if error_budget < 0:
        raise InputError(f"the error budget must be >= 0; got {error_budget}")
    idx = [0] * len(errors)
    total = sum(e[0] for e in errors)
    while True:
        best = None
        for i, e in enumerate(errors):
            j = idx[i]
            if j + 1 >= len(grid):
                continue
            cost = e[j + 1] - e[j]
            if total + cost > error_budget + 1e-12:
                continue
            saved = (grid[j] - grid[j + 1]) * n_neurons[i] * row_bytes[i]
            ratio = max(cost, 0.0) / saved
            if best is None or ratio < best[0]:
                best = (ratio, i, cost)
        if best is None:
            break
        _, i, cost = best
        idx[i] += 1
        total += cost
    dens = tuple(float(grid[j]) for j in idx)
    full = sum(n * b for n, b in zip(n_neurons, row_bytes))
    used = sum(d * n * b for d, n, b in zip(dens, n_neurons, row_bytes))
    return Allocation(densities=dens, error=total, error_budget=error_budget, bytes_fraction=used / full,
                      uniform_density=uniform_density)


@task(name="allocation")
def allocation_task(errs: LayerErrors, density: float, n_layers: int, ffn_dim: int, per_layer: bool,
                    ranking: str = "contribution") -> Allocation:
    """Per-layer densities as good as `density` everywhere (or `density` everywhere: per_layer off),
    by the error of the `ranking` ("contribution", or "gate" for the exact gate)."""
    ones, widths = [1.0] * n_layers, [ffn_dim] * n_layers
    table = errs.contribution if ranking == "contribution" else errs.gate
    if not per_layer:
        e = uniform_error(table, errs.grid, density)
        return Allocation(densities=(density,) * n_layers, error=e, error_budget=e, bytes_fraction=density,
                          uniform_density=density)
    alloc = allocate_densities(table, errs.grid, row_bytes=ones, n_neurons=widths,
                               error_budget=uniform_error(table, errs.grid, density), uniform_density=density)
    get_run_logger().info("per-layer densities by %s (%.1f%% of the FFN's bytes, as accurate as %.2f everywhere): %s",
                          ranking, 100 * alloc.bytes_fraction, density, ", ".join(f"{d:.2f}" for d in alloc.densities))
    return alloc


@task(name="layer-errors", cache_key_fn=stage_cache("layer-errors", __name__, "tasks.activations", "tasks.hooks"))
def layer_errors_task(source: SourceModel, calib: CalibrationData, n_sequences: int, options: ActivationOptions,
                      work_dir) -> LayerErrors:
    errs = run_stage("layer-errors", [__name__, "tasks.activations", "tasks.hooks"], lambda _out: measure_layer_errors(
        source, calib, n_sequences=n_sequences, options=options))
    get_run_logger().info("FFN-output error at 50%% density, by contribution: %s",
                          ", ".join(f"{_interp(errs.grid, e, 0.5):.3f}" for e in errs.contribution))
    return errs
