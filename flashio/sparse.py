"""The windowed sparse FFN (LLM in a flash, sections 3.1-3.3) and its oracle.

Per layer and step: the active set (predictor, or an ActiveSource such as a trace replay) ->
the window cache update -> reads of the missing bundles only -> the FFN on the window's rows, or
on the active set's only (FlashConfig.compute='active'; the cache's other rows are masked out).
On the CPU with rows kept as stored, arriving neurons are read straight into the rows freed in
the same step (FillingWindowCache); elsewhere deletion moves the last rows into the freed slots
and insertion appends (the paper's layout), or rows pass through a staging buffer.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import NamedTuple

import numpy as np
import torch

from flashio import kernels
from flashio.cache import FillingWindowCache, FillUpdate, WindowCache, rows_view
from flashio.config import FlashConfig
from flashio.dtypes import torch_dtype
from flashio.engines import (
    ActiveSource,
    Engine,
    EngineContext,
    EngineMemory,
    SparseOptions,
    kept_row_bytes,
)
from flashio.errors import FlashError
from flashio.ffn import BUCKET_ROWS, CONVERT_ROWS, convert_rows
from flashio.format import Manifest
from flashio.predictor import PredictorWeights
from flashio.readplan import PendingRead

# The smallest window cache the windowed engines run with, as a fraction of each layer's neurons:
# a token's predicted set is typically 2-10% of the FFN (paper, appendix), so less cannot run usefully.
MIN_CACHE_FRACTION = 0.05
# FlashConfig.lookahead, per layer: a layer stops guessing while its guesses' wasted reads (rows
# read early that the step did not need) exceed WASTE_LIMIT x the useful ones, or the useful ones
# fall below one row (decayed by SCORE_DECAY a step: nothing left to hide, e.g. a cache that holds
# the layer), or while its cache cannot hold a guess beside the step's own set (the step's neurons
# had to take rows of wrong guesses still being read, or exceed the capacity themselves: guesses
# would evict rows the coming steps find). And the layers stop guessing while the guesses cost
# more time than there is to hide: the guesses' own time (selection on the layer input, cache
# update, read submission) against the time the FFNs wait for their reads without a guess (a
# small model's reads hide behind its cached rows anyway), summed over the layers (one layer's
# figures vary by more than the difference at stake on a busy machine), each an average over
# one-token steps decayed by COST_DECAY (a cold cache's first steps are forgotten fast). Every
# PROBE_STEPS-th step (staggered over the layers) a layer does the other, to keep both measured:
# a probe of a guessing layer waits for its reads, so each probe costs time (at 8, four of
# Llama-2-7B's 32 layers a token: I/O wait 21-22 against 12-15 ms at 32, three alternated pairs).
# (Timing whole FFNs with and without a guess was tried: a single layer's switch cost it more
# than the steady state of either mode, so such probes misjudged.)
# On real models the first layers' guesses read 5-18x more wasted than useful rows, the later
# layers' 0.1-0.8x (README "Lookahead")
WASTE_LIMIT = 0.5
SCORE_DECAY = 0.8
COST_DECAY = 0.5
PROBE_STEPS = 32


class Coefficients(NamedTuple):
    """What scales a step's activations besides the rows themselves, per layer: [T, N] each or None."""

    gate: torch.Tensor | None = None  # act(gate) from the resident gate rows (bundles without a gate)
    mask: torch.Tensor | None = None  # 1 where a token keeps a neuron (exact per-token selections)


class SparseEngine(Engine):
    """Windowed sparse FFN: only bundles of active neurons, kept for `window` steps.

    The active set is the predictor's, or `source`'s when given; with both, the predictor still
    runs (its cost is part of every real step) and the source's set is used. When the cache holds
    the storage dtype, reads land straight in its rows: on the CPU in the rows freed this step, on
    CUDA appended (the paper's layout) via the pinned staging and an asynchronous copy. When it
    holds another dtype, on the CPU reads land in a staging buffer and are converted into the rows
    freed this step (FillingWindowCache); on CUDA they land in a device buffer and one copy kernel
    converts them into the appended rows.
    """

    needs_predictors = True

    @classmethod
    def memory(cls, manifest: Manifest, compute_dtype: torch.dtype, *, pinned_fraction: float = 0.0) -> EngineMemory:
        """Per cached row: that row in every layer and in the shared scratch (compute dtype), plus,
        when the cache holds another dtype than storage, the row's landing place before conversion
        (the CPU's staging or CUDA's landing buffer, storage dtype)."""
        n = manifest.ffn_layers[0].n_neurons
        staged = manifest.quant is None and compute_dtype != torch_dtype(manifest.dtype)  # quantized: kept as stored
        return EngineMemory(row_bytes=(manifest.n_layers + 1) * kept_row_bytes(manifest, compute_dtype),
                            staging_row_bytes=manifest.row_bytes if staged else 0,
                            min_rows=max(1, math.ceil(MIN_CACHE_FRACTION * n)))

    @classmethod
    def create(cls, ctx: EngineContext, config: FlashConfig, *, capacity: int,
               predictors: list[PredictorWeights] | None, source: ActiveSource | None) -> Engine:
        return cls(ctx, predictors=predictors, window=config.window, capacity=capacity, source=source,
                   options=SparseOptions.of(config))

    def __init__(self, ctx: EngineContext, *, predictors: list[PredictorWeights] | None, window: int,
                 capacity: int, source: ActiveSource | None = None, options: SparseOptions | None = None):
        super().__init__(ctx)
        self.predictors = predictors
        self.source = source
        self.preloaded = False  # every row read at open (preload)
        self.options = options = options or SparseOptions()
        self.split = 1 if options.bundled else len(self.parts)
        if self.quant is not None and self.split > 1:
            raise FlashError("unbundled reads (bundled=False) split a row into equal float parts; quantized rows "
                             "hold codes and scales per part: open this artifact with bundled=True")
        width = self.layers[0].bundle_width
        self.staging = None  # CPU: reads land here first when the cache holds another dtype
        self.landing = None  # CUDA: uploads land here first when the cache holds another dtype
        cache_cls = WindowCache
        # CPU, rows kept as stored: new neurons are read straight into the rows freed this step
        # (FillingWindowCache, scattered reads), so the paper's row moves (at 7B ~400 rows, 2 x 10 MB
        # of copies per layer and token) are left only for a surplus of leavers
        self.fill_in_place = self.rows_dtype == self.dtype and self.transfer.in_place and self.split == 1
        if self.fill_in_place:
            cache_cls = FillingWindowCache
        # FlashConfig.lookahead: the runtime calls prefetch(i, ...) before layer i's attention
        # (with rows retained past the window, where the guess's wrong neurons stay as read)
        self.lookahead = options.lookahead and options.overlap and self.fill_in_place and options.retain and options.reuse
        self._ahead: dict[int, tuple[FillUpdate, PendingRead | None]] = {}  # layer -> prefetch's rows and reads
        n_layers = len(self.layers)
        self._guess_reads = np.zeros((n_layers, 2))  # per layer, decayed: (useful, wasted) rows read early
        self._cost_s = np.full((n_layers, 2), np.nan)  # per layer, decayed: (the FFN's wait without a guess, a guess)
        self._useful = np.ones(n_layers, dtype=bool)  # WASTE_LIMIT's verdict
        # the layer's last plain one-token FFN read no row / had more neurons than its cache holds
        self._read_nothing = np.zeros(n_layers, dtype=bool)
        self._overfull = np.zeros(n_layers, dtype=bool)
        self.guessing = np.ones(n_layers, dtype=bool)  # the layers whose lookahead pays (see WASTE_LIMIT)
        self._steps = 0
        if not self.fill_in_place and self.rows_dtype != self.dtype:  # one for all layers: a layer's new rows <= capacity
            if self.transfer.in_place:
                self.staging = self._arena_tensor(capacity, width)
                cache_cls = FillingWindowCache
            else:
                self.landing = self._buffer(capacity, width)
        self.caches = [cache_cls(self._buffer(capacity, L.bundle_width, self.rows_dtype),
                                 L.n_neurons, window, indices=self.transfer.indices, span=self.transfer.span,
                                 retain=options.retain and options.reuse)
                       for L in self.layers]
        # one scratch for all layers (they update one at a time), sized for the worst step so
        # that no cache grows its own (32 private ones were ~0.4 GB at 7B scale); it also holds
        # converted new rows before they are scattered
        self.shared = self._buffer(capacity, width, self.rows_dtype)
        for c in self.caches:
            c._scratch = self.shared
        if self.transfer.in_place:  # reads land in these (READ_FIXED: BundleReader.register_buffers)
            self.reader.register_buffers([c.matrix for c in self.caches]
                                         + ([self.staging] if self.staging is not None else []))

    def scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """[T, N] scores; a neuron is active where its score > 0."""
        p = self.predictors[i]
        return p.logits(h) - p.logit_threshold

    def _predict(self, i: int, h: torch.Tensor) -> np.ndarray | None:
        """One token's predicted neurons in one native call (PredictorWeights.active), or None
        where the scores are needed (several tokens, a recorder, no kernels)."""
        if self.predictors is None or self.recorder is not None or h.shape[0] != 1:
            return None
        return self.predictors[i].active(h)

    def _active(self, i: int, h: torch.Tensor, cap: int) -> np.ndarray:
        predicted = self._predict(i, h)
        if self.source is not None:
            if predicted is None and self.predictors is not None:  # the predictor's cost is part of every real step
                self.scores(i, h)
            ids = self.source.active(i, h)
            if self.recorder is not None:
                mask = torch.zeros(h.shape[0], self.layers[i].n_neurons, dtype=torch.bool)
                mask[:, torch.from_numpy(ids)] = True
                self.recorder.record(i, mask)
            if len(ids) > cap:  # the source has no scores to rank by: keep the first ones
                self.rec.truncated += len(ids) - cap
                ids = ids[:cap]
            return ids
        if predicted is not None and len(predicted) <= cap:
            return predicted
        s = self.scores(i, h)
        if self.recorder is not None:
            self.recorder.record(i, (s > 0).cpu())
        s = s.amax(dim=0)  # [N]: a neuron is needed if any token needs it
        ids = np.flatnonzero((s > 0).cpu().numpy())  # on CUDA: the layer's one wait for the device
        if len(ids) > cap:  # keep the most confident ones; report the rest
            self.rec.truncated += len(ids) - cap
            ids = np.sort(torch.topk(s, cap).indices.cpu().numpy())
        return ids.astype(np.int64, copy=False)

    def _select(self, i: int, h: torch.Tensor, cap: int) -> tuple[np.ndarray, Coefficients]:
        """The step's neurons (sorted ids, at most `cap`) and what scales their activations: the
        resident gate's act(gate) when the bundles hold no gate (computed for the whole layer),
        and a per-token mask where tokens keep different neurons (flashio.exact)."""
        return self._active(i, h, cap), Coefficients(self.gate_act(i, h))

    def prefetch(self, i: int, h: torch.Tensor) -> None:
        """Start layer i's reads before its attention (FlashConfig.lookahead): the step's window
        update for the neurons picked from `h`, the layer's input through its FFN's norm, and
        their reads; `__call__` then adds what the FFN's own input needs."""
        start = time.perf_counter()
        cache = self.caches[i]
        ids = self._guess(i, h, cache.capacity)
        t0 = time.perf_counter()
        up = cache.update_guess(ids)
        self.rec.mem_s += time.perf_counter() - t0
        try:
            pending = self.reader.submit_rows(i, up.missing, cache.matrix, rows=up.dest) if len(up.missing) else None
        except BaseException:
            cache.reset()
            raise
        self._ahead[i] = (up, pending)
        self.rec.guesses += 1
        if h.shape[0] == 1:
            self._learn(i, 1, time.perf_counter() - start)

    def guesses(self, i: int) -> bool:
        """Whether layer i's reads start before its attention this step: with lookahead, where its
        guesses pay (WASTE_LIMIT), but the other way every PROBE_STEPS-th step."""
        if not self.lookahead:
            return False
        if (self._steps + i) % PROBE_STEPS:
            return bool(self.guessing[i])
        # a probe, the other way; a layer whose plain FFN read nothing has nothing to hide, one
        # whose cache did not hold the step's set has no room for a guess
        return not (self.guessing[i] or self._read_nothing[i] or self._overfull[i])

    def lookahead_state(self) -> dict | None:
        """Per layer: whether it guesses now, its FFN's decayed wait for reads without a guess
        and a guess's decayed time, in ms (WASTE_LIMIT; None where unmeasured); None without
        lookahead."""
        if not self.lookahead:
            return None
        cost = [[None if np.isnan(c) else round(float(c) * 1e3, 3) for c in row] for row in self._cost_s]
        return {"guessing": self.guessing.tolist(), "wait_ms": [c[0] for c in cost], "guess_ms": [c[1] for c in cost]}

    def _learn(self, i: int, kind: int, seconds: float) -> None:
        """Layer i's one-token figures (WASTE_LIMIT): kind 0, its FFN's wait for reads without a
        guess; kind 1, a guess's time. `_decide` weighs them at the next step."""
        old = float(self._cost_s[i, kind])
        self._cost_s[i, kind] = seconds if old != old else COST_DECAY * old + (1 - COST_DECAY) * seconds

    def _decide(self) -> None:
        """Which layers guess this step (WASTE_LIMIT): those whose guesses pay, summed over the
        layers with both figures; a layer's first one-token steps time one of each."""
        wait, guess = self._cost_s.T
        both = ~(np.isnan(wait) | np.isnan(guess))
        pays = guess[both].sum() < wait[both].sum()
        self.guessing = self._useful & np.where(both, pays, np.isnan(guess))

    def _guess(self, i: int, h: torch.Tensor, cap: int) -> np.ndarray:
        """The lookahead's neurons: an active source's `lookahead` where it has one (a trace
        replay's model of a predictor's misses), else the selection run on `h`, unrecorded."""
        guess = getattr(self.source, "lookahead", None)
        if guess is not None:
            if self.predictors is not None and self._predict(i, h) is None:  # as `_active`: the predictor's cost
                self.scores(i, h)
            return guess(i, h)[:cap]
        recorder, truncated = self.recorder, self.rec.truncated
        self.recorder = None
        try:
            return self._select(i, h, cap)[0]
        finally:
            self.recorder, self.rec.truncated = recorder, truncated

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if not self.lookahead:
            return self._plain(i, h)
        ahead = self._ahead.pop(i, None)
        if ahead is not None:
            return self._after_guess(i, h, self.caches[i], *ahead)
        waited, loaded, truncated = self.rec.io_s, self.rec.neurons_loaded, self.rec.truncated
        y = self._plain(i, h)
        if h.shape[0] == 1:
            self._learn(i, 0, self.rec.io_s - waited)
            self._read_nothing[i] = self.rec.neurons_loaded == loaded
            self._overfull[i] = self.rec.truncated > truncated
        return y

    def _plain(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's FFN: the step's set selected from `h`, the cache updated, the missing rows read."""
        cache = self.caches[i]
        ids_np, coef = self._select(i, h, cache.capacity)
        t0 = time.perf_counter()
        if not self.options.reuse:
            cache.reset()  # no window: the whole active set is loaded again
        up = cache.update_fill(ids_np) if isinstance(cache, FillingWindowCache) else cache.update(ids_np)
        self.transfer.fence()  # this layer's uploads follow its row moves, not its compute
        self.rec.mem_s += time.perf_counter() - t0
        m = len(up.missing)
        self.rec.neurons_active += len(ids_np)
        self.rec.neurons_loaded += m
        self.rec.cache_hits += up.hits
        live = self._computed(cache, ids_np)
        try:
            if self.fill_in_place:
                return self._filled(i, h, cache, up, coef, live)
            if self.staging is None:
                return self._appended(i, h, cache, up.start, m, up.missing, coef, live)
            return self._staged(i, h, cache, up, coef, live)
        except BaseException:
            cache.reset()  # rows were reserved for bundles that never arrived
            raise

    def _computed(self, cache: WindowCache, ids: np.ndarray) -> torch.Tensor | None:
        """[n_used] 1.0 for the rows the step computes (None: every row), counted in the stats:
        the window's rows (retained rows outside it are kept, not computed) or the active set's."""
        live = cache.live()
        n_window = cache.n_used if live is None else int(np.count_nonzero(live))
        self.rec.cache_rows += n_window
        if self.options.compute == "window":
            self.rec.rows_computed += n_window
            return None if live is None else torch.from_numpy(live.astype(np.float32))
        self.rec.rows_computed += len(ids)
        return self._active_rows(cache, ids)

    def _after_guess(self, i: int, h: torch.Tensor, cache: FillingWindowCache, guess: FillUpdate,
                     pending: PendingRead | None) -> torch.Tensor:
        """The FFN of a step whose reads started before the attention (prefetch): the step's own
        neurons that the guess left out get rows and are read now; the cached rows are computed
        while both reads fly, the arriving rows after."""
        late_pending = None
        try:
            truncated = self.rec.truncated
            ids, coef = self._select(i, h, cache.capacity)
            t0 = time.perf_counter()
            late, took_in_flight = cache.extend(ids, guess.dest)
            # the guess's reads the step needs: extend left the step's neurons marked active this
            # step and gave the guess's others back their earlier activity
            guessed = int(np.count_nonzero(cache.last_active[guess.missing] == cache.step - 1))
            score = self._guess_reads[i]
            score *= SCORE_DECAY
            score += (guessed, len(guess.missing) - guessed)
            # a cache too small for the step's set and the guess: the guesses take rows the step needs
            crowded = took_in_flight or self.rec.truncated > truncated
            self._useful[i] = score[0] >= 1.0 and score[1] <= WASTE_LIMIT * score[0] and not crowded
            self.guessing[i] &= self._useful[i]
            self.rec.mem_s += time.perf_counter() - t0
            self.rec.neurons_active += len(ids)
            self.rec.neurons_loaded += len(guess.missing) + len(late.missing)
            self.rec.late_loaded += len(late.missing)
            self.rec.cache_hits += late.hits - guessed
            cut = len(ids) - late.hits - len(late.missing)  # no row left for them: not computed
            self.rec.truncated += cut
            live = self._computed(cache, ids[cache.slot_of[ids] >= 0] if cut else ids)
            arriving = np.concatenate([guess.dest, late.dest])
            if took_in_flight and pending is not None:  # the cache is full: the step's own neurons took
                self._wait(pending)  # rows of wrong guesses still being read; those reads land first
                pending, arriving = None, late.dest
            if len(late.missing):
                late_pending = self.reader.submit_rows(i, late.missing, cache.matrix, rows=late.dest)
            reads = [p for p in (pending, late_pending) if p is not None]
            if not reads:
                return self._compute(i, h, cache.matrix, 0, cache.n_used, torch.from_numpy(cache.neurons), coef,
                                     keep=live)
            return self._while_arriving(i, h, cache, arriving, reads, coef, live)
        except BaseException:
            _drain(pending, late_pending)  # nothing may land in rows the reset frees
            cache.reset()
            raise

    @staticmethod
    def _active_rows(cache: WindowCache, ids: np.ndarray) -> torch.Tensor | None:
        """[n_used] 1.0 for the cache rows of the step's active set `ids` (None: every row),
        what compute='active' computes."""
        if len(ids) == cache.n_used:
            return None
        keep = np.zeros(cache.n_used, dtype=np.float32)
        keep[cache.slot_of[ids]] = 1.0
        return torch.from_numpy(keep)

    def _read(self, i: int, ids: np.ndarray, dest: torch.Tensor):
        """Start (overlap) or do the reads; returns the pending read or None when done."""
        if not len(ids):
            return None
        if self.options.overlap:
            return self.reader.submit_rows(i, ids, dest, split=self.split)
        self._account(self.reader.read_rows(i, ids, dest, split=self.split))
        return None

    def _wait(self, pending) -> None:
        t1 = time.perf_counter()
        r = pending.result()
        self._account(r, waited_s=time.perf_counter() - t1)

    def _appended(self, i: int, h: torch.Tensor, cache: WindowCache, start: int, m: int,
                  missing: np.ndarray, coef: Coefficients, live: torch.Tensor | None) -> torch.Tensor:
        n = cache.n_used
        (idx,) = self.transfer.indices(cache.neurons)
        rows = cache.matrix[start : start + m]
        land = rows if self.landing is None else self.landing[:m]
        host, slot = self.transfer.staging(m, land) if m else (land, -1)  # CPU: the rows themselves
        pending = self._read(i, missing, host)
        if pending is None:
            self._arrive(slot, host, land, rows)
            return self._compute(i, h, cache.matrix, 0, n, idx, coef, keep=live)
        # overlap: the cached rows are computed while the missing ones are read (and on CUDA
        # uploaded: the copy waits only for the row moves). That compute's padding rows may be
        # rows being written meanwhile: any finite values do, their activations are zeroed
        y = self._compute(i, h, cache.matrix, 0, start, idx[:start], coef, keep=None if live is None else live[:start])
        self._wait(pending)
        self._arrive(slot, host, land, rows)
        return y + self._compute(i, h, cache.matrix, start, n, idx[start:n], coef)

    def _arrive(self, slot: int, host: torch.Tensor, land: torch.Tensor, rows: torch.Tensor) -> None:
        """Read rows to their cache rows: uploaded from the staging (CUDA; nothing to do on the
        CPU) and converted on the device when the cache holds another dtype."""
        if not len(rows):
            return
        self.transfer.upload(slot, host, land)
        self.transfer.before_compute()
        if land is not rows:
            with self.transfer.span():
                rows.copy_(land)

    def _filled(self, i: int, h: torch.Tensor, cache: FillingWindowCache, up: FillUpdate,
                coef: Coefficients, live: torch.Tensor | None) -> torch.Tensor:
        """New rows read straight into their cache rows (up.dest). Overlap: everything cached is
        computed while the reads fly, the arriving rows masked out; then those rows alone."""
        n, m = cache.n_used, len(up.missing)
        idx = torch.from_numpy(cache.neurons)
        if m and not self.options.overlap:
            self._account(self.reader.read_rows(i, up.missing, cache.matrix, rows=up.dest))
        if not m or not self.options.overlap:
            return self._compute(i, h, cache.matrix, 0, n, idx, coef, keep=live)
        pending = self.reader.submit_rows(i, up.missing, cache.matrix, rows=up.dest)
        return self._while_arriving(i, h, cache, up.dest, [pending], coef, live)

    def _while_arriving(self, i: int, h: torch.Tensor, cache: FillingWindowCache, dest: np.ndarray,
                        pending: list[PendingRead], coef: Coefficients, live: torch.Tensor | None) -> torch.Tensor:
        """The FFN over the cache while `pending` reads fill its rows `dest`: everything else is
        computed while they fly (those rows masked out), then those rows (where `live` keeps them)."""
        n, idx = cache.n_used, torch.from_numpy(cache.neurons)
        if h.shape[0] == 1 and kernels.available():  # the kernels read only the rows a mask keeps
            # both masks as float32 arrays (a few numpy ops; torch's ones/index_fill cost more per step)
            kept = np.ones(n, dtype=np.float32) if live is None else live.numpy().copy()
            kept[dest] = 0.0
            y = self._compute(i, h, cache.matrix, 0, n, idx, coef, keep=torch.from_numpy(kept))
            for p in pending:
                self._wait(p)
            fresh = np.zeros(n, dtype=np.float32)
            fresh[dest] = 1.0 if live is None else live.numpy()[dest]
            return y + self._compute(i, h, cache.matrix, 0, n, idx, coef, keep=torch.from_numpy(fresh))
        arriving = torch.from_numpy(dest)
        y = self._compute(i, h, cache.matrix, 0, n, idx, coef, zero=arriving, keep=live)
        for p in pending:
            self._wait(p)
        m = len(dest)
        fresh = self.shared[:m]  # torch's products: the new rows gathered (numpy: see rows_view), then computed
        np.take(rows_view(cache.matrix), dest, axis=0, out=rows_view(fresh))
        return y + self._compute(i, h, self.shared, 0, m, torch.from_numpy(cache.neuron_at[dest]), coef,
                                 keep=None if live is None else live[arriving])

    def _staged(self, i: int, h: torch.Tensor, cache: FillingWindowCache, up: FillUpdate,
                coef: Coefficients, live: torch.Tensor | None) -> torch.Tensor:
        n, m = cache.n_used, len(up.missing)
        idx = torch.from_numpy(cache.neurons)
        stage, fresh, dest = self.staging[:m], self.shared[:m], torch.from_numpy(up.dest)
        pending = self._read(i, up.missing, stage)
        if pending is None:
            self._scatter(cache, stage, None, dest)
            return self._compute(i, h, cache.matrix, 0, n, idx, coef, keep=live)
        # overlap: everything cached is computed while the reads fly, the arriving rows masked
        # out (their slots still hold what left); then the new rows, from the converted buffer
        y = self._compute(i, h, cache.matrix, 0, n, idx, coef, zero=dest, keep=live)
        self._wait(pending)
        self._scatter(cache, stage, fresh, dest)
        return y + self._compute(i, h, self.shared, 0, m, torch.from_numpy(up.missing), coef)

    def _scatter(self, cache: WindowCache, stage: torch.Tensor, fresh: torch.Tensor | None,
                 dest: torch.Tensor) -> None:
        """Convert the staged rows to the compute dtype and put them in their cache rows; also
        into `fresh` (contiguous) when given, else chunk by chunk through a small buffer."""
        if not len(dest):
            return
        t0 = time.perf_counter()
        rows, dest_np = rows_view(cache.matrix), dest.numpy()
        if fresh is not None:
            convert_rows(fresh, stage, self._scratch)
            rows[dest_np] = rows_view(fresh)
        else:  # fused: each chunk converted and scattered while it is in cache
            chunk = rows_view(self._chunk)
            for a in range(0, len(dest_np), CONVERT_ROWS):
                k = min(CONVERT_ROWS, len(dest_np) - a)
                convert_rows(self._chunk[:k], stage[a : a + k], self._scratch)
                rows[dest_np[a : a + k]] = chunk[:k]
        self.rec.mem_s += time.perf_counter() - t0

    def _compute(self, i: int, h: torch.Tensor, matrix: torch.Tensor, lo: int, hi: int, idx: torch.Tensor,
                 coef: Coefficients, zero: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN over rows [lo, hi) of `matrix` (neurons idx), padded to a BUCKET_ROWS multiple
        where oneDNN computes it (bf16/fp16 or quantized rows; CPU fp32 matmuls keep no primitive
        per shape: unpadded, Gemma 3 270M's overlapped step computed up to 2 x 255 rows of 2048 less)."""
        if hi <= lo:
            return torch.zeros_like(h)
        bucket = 1 if matrix.dtype == torch.float32 and matrix.device.type == "cpu" else BUCKET_ROWS
        stop = min(matrix.shape[0], lo + -(-(hi - lo) // bucket) * bucket)
        b_up = None if self.b_up[i] is None else self.b_up[i][idx]
        b_gate = None if self.b_gate[i] is None else self.b_gate[i][idx]
        gate, mask = coef
        mask = None if mask is None else mask[:, idx]
        if keep is not None:  # [hi - lo]: 1 for the rows to compute
            if keep.device != h.device:
                keep = keep.to(h.device, non_blocking=True)
            # one token on the CPU: float32 as the kernels take it (ffn_compute converts it where it must)
            own = h.shape[0] == 1 and h.device.type == "cpu"
            mask = (keep[None] if own else keep[None].to(h.dtype)) if mask is None else mask * keep.to(mask.dtype)
        return self.rows_ffn(h, matrix[lo:stop], b_up, b_gate, zero=zero, n_valid=hi - lo,
                             gate_act=None if gate is None else gate[:, idx], mask=mask)

    def preload(self) -> int:
        """Where every layer's cache holds all its neurons and keeps rows past the window (retain),
        on the CPU with rows kept as stored: read every row now, a layer at a time in large
        sequential reads, so that no step reads (new sequences keep the rows: `reset`). Returns
        the bytes read; 0 where the caches cannot hold the FFN."""
        o = self.options
        if not (o.retain and o.reuse and self.fill_in_place) or any(
                c.capacity < L.n_neurons for c, L in zip(self.caches, self.layers)):
            return 0
        nbytes = 0
        try:
            for i, c in enumerate(self.caches):
                c.fill_all()
                nbytes += self.reader.read_layer(i, c.matrix).bytes_read
        except BaseException:
            for c in self.caches:
                c.reset()
            raise
        self.preloaded = True
        self.lookahead = False  # nothing left to read
        return nbytes

    def close(self) -> None:
        self.reader.register_buffers(())  # before the caches' memory goes (registered pages stay pinned)
        super().close()

    def begin_step(self) -> None:
        super().begin_step()
        self._steps += 1
        if self._ahead:
            self._abandon()
        if self.lookahead:
            self._decide()
        if self.source is not None:
            self.source.begin_step()

    def _abandon(self) -> None:
        """Give up prefetched layers whose FFN never ran (a step that failed in between): their
        reads are waited for and their caches emptied."""
        ahead, self._ahead = self._ahead, {}
        _drain(*(pending for _up, pending in ahead.values()))
        for i in ahead:
            self.caches[i].reset()

    def reset(self) -> None:
        self._abandon()
        for c in self.caches:  # preloaded rows stay (a step that failed reset its own cache)
            if self.preloaded and c.n_used == len(c.slot_of):
                c.forget()
            else:
                c.reset()
        if self.source is not None:
            self.source.reset()


def _drain(*pending: PendingRead | None) -> None:
    """Wait for reads whose rows are being given up (their errors too: the caller is already failing)."""
    for p in pending:
        if p is not None:
            with contextlib.suppress(Exception):
                p.result()
