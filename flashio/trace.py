"""Activation traces: which FFN neurons (stored rows) each step needed, layer by layer.

    with flashio.open(art, mode="sparse", record_trace=True) as model:    # or `flashio run --record-trace F`
        model.generate("def main():", max_new_tokens=64)
        model.trace().save("run.trace.npz")
    trace = Trace.load("run.trace.npz")
    trace.active(step=3, layer=0)                   # sorted int64 row ids
    trace = synthesize(32, 16384, steps=64, params=TraceParams.preset("opt-6.7b"))
    flashio.open(art, mode="sparse", active_source=TraceReplay(trace))   # drive the runtime with it

Random weights do not produce realistic activation patterns, so benchmarks at 7B scale replay a
trace: recorded from a real run (one step per token), or synthesized by `synthesize`, a per-neuron
two-state Markov chain: neuron n is active with stationary probability pi_n (lognormal hotness
around `density`), and an active neuron stays active with probability about `persistence`. The
"opt-6.7b" preset sets them to the paper's OPT-6.7B figures: ~10% of FFN neurons predicted active
per token, ~2.4% newly loaded per token with a window of 5, a window cache of ~24% of the FFN.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashio.errors import FlashError, FormatError

TRACE_VERSION = 1
_CALIBRATION_SAMPLES = 100_000


@dataclass(frozen=True)
class TraceParams:
    """The generator's knobs (see the module docstring)."""

    density: float = 0.10  # mean fraction of a layer's neurons active per step
    persistence: float = 0.53  # P(active at t+1 | active at t), before per-neuron clipping
    hotness_sigma: float = 1.25  # lognormal sigma of per-neuron activation probability
    name: str = "custom"

    def __post_init__(self) -> None:
        if not 0 < self.density < 0.5 or not 0 < self.persistence < 1 or self.hotness_sigma < 0:
            raise FlashError(f"trace parameters out of range: density {self.density} (0-0.5), "
                             f"persistence {self.persistence} (0-1), hotness_sigma {self.hotness_sigma} (>= 0)")

    def probabilities(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per neuron (pi, on-rate a, off-rate b) for standard-normal draws z."""
        b = 1.0 - self.persistence
        cap = 1.0 / (1.0 + b) - 1e-3  # the on-rate a = pi b / (1 - pi) must stay <= 1
        w = np.exp(self.hotness_sigma * z)
        pi = self.density * w / w.mean()
        for _ in range(64):  # clip the hottest, renormalise the rest to keep the mean density
            pi = np.minimum(pi, cap)
            pi *= self.density / pi.mean()
        pi = np.minimum(pi, cap)
        return pi, pi * b / (1.0 - pi), np.full_like(pi, b)

    def expected(self, window: int) -> dict[str, float]:
        """Stationary density, newly-loaded fraction and window-cache fraction per step."""
        z = np.random.default_rng(12345).standard_normal(_CALIBRATION_SAMPLES)
        pi, a, _ = self.probabilities(z)
        off = (1 - pi) * (1 - a) ** (window - 1)  # off for the window's previous steps
        return {"density": float(pi.mean()), "loaded": float((off * a).mean()),
                "cache": float(1 - off.mean())}

    @classmethod
    def calibrated(cls, density: float, loaded: float, window: int, hotness_sigma: float,
                   name: str = "custom") -> TraceParams:
        """The persistence that makes `loaded` of the neurons new per step at this window."""
        lo, hi = 0.01, 0.99  # loaded falls as persistence rises
        for _ in range(40):
            mid = (lo + hi) / 2
            got = cls(density, mid, hotness_sigma, name).expected(window)["loaded"]
            lo, hi = (mid, hi) if got > loaded else (lo, mid)
        return cls(density, round((lo + hi) / 2, 4), hotness_sigma, name)

    @classmethod
    def preset(cls, name: str) -> TraceParams:
        """'opt-6.7b' (also used for the other shapes): the paper's appendix figures. sigma 1.25
        is the hotness spread at which the window cache also holds ~24% of the FFN."""
        if name in ("opt-6.7b", "opt-1.3b", "llama-2-7b", "paper"):
            return cls.calibrated(0.10, 0.024, 5, 1.25, name="paper-opt-6.7b")
        raise FlashError(f"no trace preset {name!r}; presets: opt-6.7b (aliases opt-1.3b, llama-2-7b, paper)")


@dataclass(frozen=True)
class Trace:
    """Per step and layer, the sorted row ids the FFN needed. Entry k = step * n_layers + layer
    holds ids[offsets[k]:offsets[k + 1]]."""

    n_layers: int
    n_neurons: int
    offsets: np.ndarray  # int64 [steps * n_layers + 1]
    ids: np.ndarray  # int32
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.offsets.ndim != 1 or (len(self.offsets) - 1) % max(self.n_layers, 1)
                or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids)):
            raise FormatError(f"trace offsets ({len(self.offsets)}) do not describe whole steps of "
                              f"{self.n_layers} layers over {len(self.ids)} ids")
        if len(self.ids) and (self.ids.min() < 0 or self.ids.max() >= self.n_neurons):
            raise FormatError(f"trace ids span [{self.ids.min()}, {self.ids.max()}], outside the "
                              f"layer's {self.n_neurons} neurons")

    @property
    def steps(self) -> int:
        return (len(self.offsets) - 1) // self.n_layers

    def active(self, step: int, layer: int) -> np.ndarray:
        if not 0 <= step < self.steps or not 0 <= layer < self.n_layers:
            raise FlashError(f"trace has {self.steps} steps x {self.n_layers} layers; asked for "
                             f"step {step}, layer {layer} (record or synthesize a longer trace)")
        k = step * self.n_layers + layer
        return self.ids[self.offsets[k] : self.offsets[k + 1]].astype(np.int64)

    def slice(self, start: int, stop: int) -> Trace:
        a, b = self.offsets[start * self.n_layers], self.offsets[stop * self.n_layers]
        return Trace(self.n_layers, self.n_neurons, self.offsets[start * self.n_layers : stop * self.n_layers + 1] - a,
                     self.ids[a:b], {**self.meta, "sliced": [start, stop]})

    def permuted(self, rows_of: list[np.ndarray], note: str) -> Trace:
        """The trace with neuron n of layer l renamed rows_of[l][n] (a neuron order applied)."""
        parts = []
        for s in range(self.steps):
            for layer in range(self.n_layers):
                parts.append(np.sort(rows_of[layer][self.active(s, layer)]))
        return _from_entries(self.n_layers, self.n_neurons, parts, {**self.meta, "order": note})

    def required_rows(self, window: int | None) -> np.ndarray:
        """[steps, layers] rows a window cache of unlimited capacity loads: active ids not active
        in the previous `window` steps (window None: no reuse, every active id)."""
        out = np.zeros((self.steps, self.n_layers), dtype=np.int64)
        for layer in range(self.n_layers):
            last = np.full(self.n_neurons, -(1 << 40), dtype=np.int64)
            for s in range(self.steps):
                ids = self.active(s, layer)
                out[s, layer] = len(ids) if window is None else int(np.count_nonzero(last[ids] < s - window))
                last[ids] = s
        return out

    def summary(self, window: int, skip: int = 0) -> dict[str, float]:
        """Measured density, newly-loaded and cache fractions per layer and step (after `skip`)."""
        skip = max(0, min(skip, self.steps - 1))
        sizes = np.diff(self.offsets).reshape(self.steps, self.n_layers)[skip:]
        loaded = self.required_rows(window)[skip:]
        cache = np.zeros((self.steps, self.n_layers))
        for layer in range(self.n_layers):
            last = np.full(self.n_neurons, -(1 << 40), dtype=np.int64)
            for s in range(self.steps):
                last[self.active(s, layer)] = s
                cache[s, layer] = np.count_nonzero(last > s - window)
        n = self.n_neurons
        return {"density": float(sizes.mean() / n), "loaded": float(loaded.mean() / n),
                "cache": float(cache[skip:].mean() / n), "cache_max": float(cache[skip:].max() / n)}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": TRACE_VERSION, "n_layers": self.n_layers, "n_neurons": self.n_neurons,
                **self.meta}
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez_compressed(f, offsets=self.offsets, ids=self.ids,
                                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        try:
            with np.load(path) as z:
                meta = json.loads(z["meta"].tobytes())
                offsets, ids = z["offsets"].astype(np.int64), z["ids"].astype(np.int32)
        except (OSError, KeyError, ValueError) as exc:
            raise FormatError(f"{path}: not a flashio trace ({exc}); record one with "
                              "`flashio run --record-trace FILE`") from None
        if meta.pop("format_version", None) != TRACE_VERSION:
            raise FormatError(f"{path}: trace format version is not {TRACE_VERSION}")
        return cls(int(meta.pop("n_layers")), int(meta.pop("n_neurons")), offsets, ids, meta)


def _from_entries(n_layers: int, n_neurons: int, entries: list[np.ndarray], meta: dict) -> Trace:
    lengths = np.array([len(e) for e in entries], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate(entries).astype(np.int32) if entries else np.zeros(0, np.int32)
    return Trace(n_layers, n_neurons, offsets, ids, meta)


def synthesize(n_layers: int, n_neurons: int, steps: int, params: TraceParams, *, seed: int = 0,
               model_seed: int | None = None) -> Trace:
    """A trace from the Markov generator. `model_seed` fixes the neurons' hotness (the "model"),
    `seed` the steps: two traces with one model_seed and different seeds are two runs of one model
    (a calibration run and a measured run)."""
    model_rng = np.random.default_rng(seed if model_seed is None else model_seed)
    rng = np.random.default_rng([seed, 1])
    probs = [params.probabilities(model_rng.standard_normal(n_neurons)) for _ in range(n_layers)]
    states = [rng.random(n_neurons) < pi for pi, _, _ in probs]  # start from the stationary law
    entries = []
    for _ in range(steps):
        for layer, (_, a, b) in enumerate(probs):
            u = rng.random(n_neurons)
            on = states[layer]
            states[layer] = np.where(on, u >= b, u < a)
            entries.append(np.flatnonzero(states[layer]))
    meta = {"kind": "synthetic", "generator": asdict(params), "seed": seed,
            "model_seed": seed if model_seed is None else model_seed}
    return _from_entries(n_layers, n_neurons, entries, meta)


def load_order(trace: Trace, window: int) -> list[np.ndarray]:
    """A neuron order from a calibration trace: per layer, rows_of[n] = the row neuron n gets when
    neurons are sorted by how often the window cache had to load them (ties: by activity), so the
    neurons read together most often sit next to each other and their reads coalesce."""
    loads = np.zeros((trace.n_layers, trace.n_neurons))
    activity = np.zeros((trace.n_layers, trace.n_neurons))
    for layer in range(trace.n_layers):
        last = np.full(trace.n_neurons, -(1 << 40), dtype=np.int64)
        for s in range(trace.steps):
            ids = trace.active(s, layer)
            new = ids[last[ids] < s - window]
            loads[layer, new] += 1
            activity[layer, ids] += 1
            last[ids] = s
    out = []
    for layer in range(trace.n_layers):
        order = np.lexsort((-activity[layer], -loads[layer]))  # order[r] = neuron placed at row r
        rows_of = np.empty_like(order)
        rows_of[order] = np.arange(len(order))
        out.append(rows_of)
    return out


class TraceRecorder:
    """Collects the active set of every (token, layer) a run computes; `trace()` returns it."""

    def __init__(self, n_layers: int, n_neurons: int, meta: dict[str, Any] | None = None):
        self.n_layers, self.n_neurons, self.meta = n_layers, n_neurons, dict(meta or {})
        self._steps: list[list[list[np.ndarray]]] = []  # per step: per layer: per token ids

    def begin_step(self) -> None:
        self._steps.append([])

    def record(self, layer: int, active: torch.Tensor) -> None:
        """active: bool [T, N], the tokens of this step."""
        assert self._steps and len(self._steps[-1]) == layer, "record layers in order after begin_step"
        self._steps[-1].append([np.flatnonzero(row) for row in active.numpy()])

    def reset(self) -> None:
        self._steps.clear()

    def trace(self) -> Trace:
        entries = []
        for step in self._steps:
            if len(step) != self.n_layers:
                continue  # an interrupted step
            for t in range(len(step[0])):  # one trace step per token
                entries.extend(step[layer][t] for layer in range(self.n_layers))
        return _from_entries(self.n_layers, self.n_neurons, entries, {"kind": "recorded", **self.meta})


class TraceReplay:
    """The active-set source that replays a trace: step k of the run gets the trace's step
    `start + k`. Each layer's set is only handed out when the engine asks for that layer (after
    its FFN input exists), as a predictor would produce it.

    `lookahead` (FlashConfig.lookahead) stands for a predictor run on the layer's input before
    its attention: the step's set with a fraction 1 - `lookahead_recall` of it swapped for as
    many neurons outside it, drawn at random (seeded by step and layer), as a top-k guess of the
    right size that misses some neurons. The swapped-in neurons come from the layer's set one step
    earlier where it has enough (a guess from earlier in the residual stream picks what was just
    active: on real models the wrong guesses added 4-60% to the reads, README "Lookahead"), else
    from all the others; each miss costs a read at the FFN."""

    def __init__(self, trace: Trace, *, start: int = 0, lookahead_recall: float = 1.0, seed: int = 0):
        if not 0.0 <= lookahead_recall <= 1.0:
            raise ValueError(f"lookahead_recall must be in [0, 1], got {lookahead_recall}")
        self.trace = trace
        self.start = start
        self.lookahead_recall = lookahead_recall
        self.seed = seed
        self._step = start - 1
        self._guesses: dict[tuple[int, int], np.ndarray] = {}  # prepare(): (step, layer) -> lookahead

    def prepare(self, steps: int) -> None:
        """Draw the lookahead's guesses of the first `steps` steps now (the same ones `lookahead`
        draws), so that a timed run pays for the predictor it stands for (the engine runs that
        anyway), not for these draws: ~0.3 ms a layer on a 2-vCPU machine, 8 ms a Llama-2-7B token."""
        saved = self._step
        try:
            for step in range(self.start, min(self.start + steps, self.trace.steps)):
                self._step = step
                for layer in range(self.trace.n_layers):
                    self._guesses[step, layer] = self._draw_guess(layer)
        finally:
            self._step = saved

    @property
    def description(self) -> dict[str, Any]:
        return {**self.trace.meta, "steps": self.trace.steps, "start": self.start,
                "lookahead_recall": self.lookahead_recall}

    def begin_step(self) -> None:
        self._step += 1

    def reset(self) -> None:
        self._step = self.start - 1

    def active(self, layer: int, h: torch.Tensor) -> np.ndarray:
        del h  # the trace decides; the engine still ran the predictor on h when it has one
        return self.trace.active(self._step, layer)

    def lookahead(self, layer: int, h: torch.Tensor) -> np.ndarray:
        del h
        got = self._guesses.get((self._step, layer))
        return got if got is not None else self._draw_guess(layer)

    def _draw_guess(self, layer: int) -> np.ndarray:
        ids = self.trace.active(self._step, layer)
        swap = round(len(ids) * (1.0 - self.lookahead_recall))
        if not swap:
            return ids
        rng = np.random.default_rng((self.seed, self._step, layer))
        kept = rng.choice(ids, len(ids) - swap, replace=False)
        outside = np.ones(self.trace.n_neurons, dtype=bool)
        outside[ids] = False
        pool = np.flatnonzero(outside)
        if self._step > 0:
            before = self.trace.active(self._step - 1, layer)
            recent = before[outside[before]]
            if len(recent) >= swap:
                pool = recent
        extra = rng.choice(pool, min(swap, len(pool)), replace=False)
        return np.sort(np.concatenate([kept, extra]))


def describe(params: TraceParams, window: int) -> dict[str, Any]:
    return {**asdict(params), "window": window, "expected": params.expected(window)}


__all__ = ["Trace", "TraceParams", "TraceRecorder", "TraceReplay", "describe", "load_order",
           "synthesize"]
