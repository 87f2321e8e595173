"""The window cache simulated on recorded active sets: bytes read per token and DRAM held, and
the window that reads least while the FFN's DRAM stays within a fraction of its bytes.

    sims = simulate_windows(masks, seq_ids, windows=(1, 2, 3, 5, 8))   # one layer, [T, N] bool
    pick = choose_window([sims_layer0, sims_layer1, ...], row_bytes=[...], ffn_dram_fraction=0.5)
    pick.window, pick.read_fraction, pick.held_fraction                  # 0 = caching off

Semantics are the runtime's (flashio.cache.WindowCache): with window k the cache after token s
holds the union of the active sets of tokens s-k+1..s, and token s reads the neurons of A_s that
none of tokens s-k..s-1 had (a neuron active at s-k and again at s is still cached). Window 0 is
caching off (FlashConfig(reuse=False)): every token reads its whole active set and nothing stays
between tokens. A window *fits* when, summed over layers, the most rows any token's cache held
(its capacity) times the row's bytes is at most `ffn_dram_fraction` of the FFN's bytes; caching
off always fits (a layer's rows live only during its step). The paper shortens the window to 2
tokens for Llama 2 and turns caching off past ~55% of the FFN: both fall out of this choice.
Each sequence starts with a cold cache, as in the evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from prefect import get_run_logger, task

from tasks.caching import run_stage, stage_cache
from tasks.errors import InputError

WINDOWS = (1, 2, 3, 5, 8)
OFF = 0  # caching off: FlashConfig(reuse=False)


@dataclass(frozen=True)
class WindowSim:
    """One layer's figures for one window (fractions of the layer's neurons)."""

    window: int
    read_fraction: float  # neurons read per token / all neurons
    held_fraction: float  # neurons the cache held at its fullest / all neurons (the capacity it needs)
    held_mean_fraction: float


@dataclass(frozen=True)
class WindowChoice:
    """The model's window and what it costs, all layers together (fractions of the FFN's bytes)."""

    window: int  # 0: caching off
    read_fraction: float  # FFN bytes read per token / naive (the whole FFN)
    held_fraction: float  # window caches' capacity / FFN bytes
    ffn_dram_fraction: float
    candidates: tuple[tuple[int, float, float], ...]  # (window, read fraction, held fraction), every window
    resident_fraction: float = 0.0  # FFN bytes always in DRAM (resident gate rows), within held_fraction
    fits: bool = True  # False: the resident rows alone exceed the limit (caching off is then reported)

    def describe(self) -> str:
        name = "caching off" if self.window == OFF else f"window {self.window}"
        return (f"{name}: reads {100 * self.read_fraction:.1f}% of the FFN per token, caches hold "
                f"{100 * self.held_fraction:.1f}% (DRAM limit {100 * self.ffn_dram_fraction:.0f}%)")


def _sequences(seq_ids: torch.Tensor) -> list[slice]:
    """Row ranges of consecutive equal sequence ids (pairs are stored sequence after sequence)."""
    change = torch.nonzero(seq_ids[1:] != seq_ids[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), len(seq_ids)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def simulate_windows(masks: torch.Tensor, seq_ids: torch.Tensor, windows: Sequence[int] = WINDOWS) -> list[WindowSim]:
    """Per window (and caching off), the layer's reads and cache size on its active sets.
    masks: [T, N] bool, rows in sequence order; seq_ids: [T]."""
    if masks.ndim != 2 or len(masks) != len(seq_ids) or len(masks) == 0:
        raise InputError(f"window simulation needs [T, N] masks and [T] sequence ids; got {tuple(masks.shape)} "
                         f"and {tuple(seq_ids.shape)}")
    t, n = masks.shape
    m = masks.to(torch.int32)
    active = float(m.sum())
    out = [WindowSim(OFF, active / (t * n), 0.0, 0.0)]
    for k in windows:
        if k < 1:
            raise InputError(f"windows must be >= 1 (0 is caching off); got {k}")
        read = held_sum = 0.0
        held_max = 0
        for rows in _sequences(seq_ids):
            s = m[rows]  # [L, N]
            c = torch.cumsum(s, 0)  # active counts up to each token
            pad = torch.zeros(k + 1, n, dtype=c.dtype)
            prev = c - s - torch.cat([pad, c])[: len(s)]  # counts over tokens j-k..j-1
            read += float(((s > 0) & (prev == 0)).sum())
            held = (c - torch.cat([pad[1:], c])[: len(s)]) > 0  # active in tokens j-k+1..j
            per_token = held.sum(1)
            held_sum += float(per_token.sum())
            held_max = max(held_max, int(per_token.max()))
        out.append(WindowSim(k, read / (t * n), held_max / n, held_sum / (t * n)))
    return out


def choose_window(layers: Sequence[Sequence[WindowSim]], *, row_bytes: Sequence[float],
                  n_neurons: Sequence[int], ffn_dram_fraction: float = 0.5, resident_fraction: float = 0.0,
                  ffn_bytes: float | None = None) -> WindowChoice:
    """The window with the fewest FFN bytes read per token whose caches fit the DRAM limit
    (`layers[i]`: simulate_windows of layer i; row_bytes[i] the bytes a neuron's read moves).
    ffn_bytes: the whole FFN (naive reads it per token; default the rows' bytes summed);
    resident_fraction of it is held in DRAM whatever the window (gate rows of the exact gate)."""
    if not 0.0 < ffn_dram_fraction <= 1.0:
        raise InputError(f"ffn_dram_fraction must be in (0, 1]; got {ffn_dram_fraction}")
    if not layers or len(layers) != len(row_bytes) or len(layers) != len(n_neurons):
        raise InputError(f"{len(layers)} layers of simulations for {len(row_bytes)} row sizes")
    total = ffn_bytes if ffn_bytes is not None else sum(b * n for b, n in zip(row_bytes, n_neurons))
    windows = [s.window for s in layers[0]]
    cands = []
    for j, w in enumerate(windows):
        read = sum(sims[j].read_fraction * b * n for sims, b, n in zip(layers, row_bytes, n_neurons)) / total
        held = sum(sims[j].held_fraction * b * n for sims, b, n in zip(layers, row_bytes, n_neurons)) / total
        cands.append((w, read, resident_fraction + held))
    fits = resident_fraction <= ffn_dram_fraction + 1e-12
    fitting = [c for c in cands if c[0] == OFF or c[2] <= ffn_dram_fraction + 1e-12]
    w, read, held = min(fitting, key=lambda c: (c[1], c[2]))  # ties: the smaller cache
    return WindowChoice(window=w, read_fraction=read, held_fraction=held, ffn_dram_fraction=ffn_dram_fraction,
                        candidates=tuple(cands), resident_fraction=resident_fraction, fits=fits)


def unlimited_choice(choice: WindowChoice) -> tuple[int, float, float]:
    """(window, read fraction, held fraction) with no DRAM limit: the fewest bytes of all."""
    return min(choice.candidates, key=lambda c: (c[1], c[2]))


# -- the stage: windows for a set of predictors, at each of their thresholds ---------------------

@dataclass(frozen=True)
class WindowPoint:
    """The window choice for one predictor threshold setting ("chosen", or a sweep recall)."""

    label: str  # "chosen" or "recall 0.99" (as tasks.evaluation.Comparison.label)
    recall_target: float | None
    choice: WindowChoice


@dataclass(frozen=True)
class WindowPlan:
    """One predictor set's windows, simulated on its predicted active sets over the calibration pairs."""

    labels: str  # the predictors' labels ("active", "contribution")
    tokens: int
    points: tuple[WindowPoint, ...]  # points[0] is "chosen": the window the model is evaluated with

    @property
    def chosen(self) -> WindowChoice:
        return self.points[0].choice

    def point(self, label: str) -> WindowChoice | None:
        return next((p.choice for p in self.points if p.label == label), None)


MAX_SEQUENCES = 32  # calibration sequences simulated: enough for the mean, bounded memory on wide FFNs


def plan_windows(predictors: Sequence, shards: Sequence, *, ffn_dram_fraction: float = 0.5,
                 windows: Sequence[int] = WINDOWS, max_sequences: int = MAX_SEQUENCES) -> WindowPlan:
    """Per threshold setting of `predictors` (tasks.predictors.LayerPredictor, all layers), the
    cheapest window that fits, on the sets they predict for the calibration pairs in `shards`
    (the first `max_sequences` sequences)."""
    from tasks.activations import load_pairs
    from tasks.predictors import load_layer_predictor

    preds = sorted(predictors, key=lambda p: p.layer)
    settings = [("chosen", None, [p.threshold for p in preds])]
    settings += [(f"recall {r:g}", r, [p.threshold_for(r) for p in preds]) for r, _, _ in preds[0].sweep]
    sims: list[list[list[WindowSim]]] = [[] for _ in settings]  # [setting][layer]
    n_neurons, tokens = [], 0
    for p in preds:
        x, _, seq_ids = load_pairs(shards, p.layer)
        keep = seq_ids < torch.unique(seq_ids)[: max_sequences][-1] + 1
        x, seq_ids = x[keep], seq_ids[keep]
        w = load_layer_predictor(p)
        with torch.no_grad():
            logits = w.logits(x)  # [T, N]
        n_neurons.append(logits.shape[1])
        tokens = len(x)
        for j, (_, _, th) in enumerate(settings):
            t = th[p.layer]
            sims[j].append(simulate_windows(logits > torch.log(torch.tensor(t / (1.0 - t))), seq_ids, windows))
    ones = [1.0] * len(preds)  # every neuron's bundle has the same size: fractions need no bytes
    points = tuple(WindowPoint(label, r, choose_window(s, row_bytes=ones, n_neurons=n_neurons,
                                                       ffn_dram_fraction=ffn_dram_fraction))
                   for (label, r, _), s in zip(settings, sims))
    return WindowPlan(labels=preds[0].labels, tokens=tokens, points=points)


@task(name="windows", cache_key_fn=stage_cache("windows", __name__, "tasks.predictors", "tasks.activations"))
def window_task(stats, predictors: list, ffn_dram_fraction: float, work_dir) -> WindowPlan:
    plan = run_stage("windows", [__name__, "tasks.predictors", "tasks.activations"], lambda _out: plan_windows(
        predictors, stats.shards, ffn_dram_fraction=ffn_dram_fraction))
    get_run_logger().info("%s predictors: %s", plan.labels, plan.chosen.describe())
    return plan
