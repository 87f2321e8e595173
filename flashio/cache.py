"""The per-layer DRAM window cache (LLM in a flash, section 3.3).

A preallocated `[capacity, bundle_width]` matrix holds the bundles of every neuron that was
active in the last `window` steps. Rows `[:n_used]` are in use and compact:

- deletion moves the last used rows into the freed slots (cost: the rows moved, not the cache);
- insertion appends the new neurons' rows at `n_used` (the reader writes them there directly);
- the FFN is computed on `matrix[:n_used]`, with `neuron_at[:n_used]` naming each row's neuron.

No tensor is allocated per step in steady state: moves go through a scratch buffer that only
grows, and the moves' row indices reach the matrix's device through `indices` (on the CPU a
view of the numpy array; on CUDA a preallocated pinned buffer, see flashio.device). The
bookkeeping is numpy on small index arrays.

`FillingWindowCache` is the CPU variant whose arriving neurons take the rows freed in the same
step (used when rows are converted to another dtype on arrival anyway).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_NEVER = np.iinfo(np.int64).min // 2
# np.int64 arrays -> index tensors on the matrix's device, in the same order
Indices = Callable[..., tuple[torch.Tensor, ...]]


def host_indices(*arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    """CPU matrices: the numpy arrays themselves, as tensors (no copy)."""
    return tuple(torch.from_numpy(a) for a in arrays)


@dataclass(frozen=True)
class CacheUpdate:
    missing: np.ndarray  # sorted neuron ids to load, into rows [start, start + len(missing))
    start: int
    hits: int  # neurons of this step already cached
    evicted: int  # neurons that left the cache this step
    moved: int  # rows copied to keep the matrix compact


class WindowCache:
    """Neurons active in the last `window` steps, as compact rows of a preallocated matrix.

    retain=True: neurons whose activity left the window keep their rows while the capacity has
    room (the least recently active leave first when it has not): DRAM the budget gives beyond
    the window saves reads (a model whose FFN fits reads each neuron once). The window still says
    what is computed: `live()` marks the rows of neurons active in the last `window` steps.
    """

    def __init__(self, matrix: torch.Tensor, n_neurons: int, window: int, *,
                 indices: Indices = host_indices,
                 span: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 retain: bool = False):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.matrix = matrix  # [capacity, W]
        self.capacity = matrix.shape[0]
        self.window = window
        self.retain = retain
        self.slot_of = np.full(n_neurons, -1, dtype=np.int64)  # neuron -> row, -1 if absent
        self.neuron_at = np.full(self.capacity, -1, dtype=np.int64)  # row -> neuron
        self.last_active = np.full(n_neurons, _NEVER, dtype=np.int64)
        self.history: deque[np.ndarray] = deque()
        self.n_used = 0
        self.step = 0
        self._scratch = matrix.new_empty((0, matrix.shape[1]))
        self.indices = indices
        self.span = span  # times the row moves on the device (flashio.device.TransferPath.span)

    def reset(self) -> None:
        self.slot_of.fill(-1)
        self.neuron_at.fill(-1)
        self.last_active.fill(_NEVER)
        self.history.clear()
        self.n_used = 0
        self.step = 0

    def fill_all(self) -> None:
        """Hold every neuron, neuron j in row j (the caller reads the layer's rows into
        matrix[:n_neurons]), none of them recently active: a retaining cache then never reads."""
        n = len(self.slot_of)
        if n > self.capacity:
            raise ValueError(f"{n} neurons exceed the cache capacity {self.capacity}")
        self.reset()
        self.slot_of[:] = np.arange(n)
        self.neuron_at[:n] = np.arange(n)
        self.n_used = n

    def forget(self) -> None:
        """A new sequence on the rows as they are: every row keeps its neuron's bundle, and no
        neuron counts as recently active (none is computed until it is active again)."""
        self.last_active.fill(_NEVER)
        self.history.clear()
        self.step = 0

    @property
    def neurons(self) -> np.ndarray:
        return self.neuron_at[: self.n_used]

    def live(self) -> np.ndarray | None:
        """[n_used] bool: the rows whose neuron was active in the last `window` steps (those the
        step computes); None when that is every row (always so without `retain`)."""
        if not self.retain:
            return None
        live = self.last_active[self.neurons] > self.step - 1 - self.window
        return None if live.all() else live

    def update(self, active: np.ndarray) -> CacheUpdate:
        """Advance one step with `active` (sorted unique neuron ids, len <= capacity).

        Expires neurons whose last activity left the window, evicts least recently active
        neurons if the capacity demands it, and reserves rows for the missing ones. The caller
        fills `matrix[start:start + len(missing)]` with their bundles.
        """
        expired, missing = self._advance(active)
        moved = self._remove(expired)
        start = self.n_used
        m = len(missing)
        self.neuron_at[start : start + m] = missing
        self.slot_of[missing] = np.arange(start, start + m)
        self.n_used += m
        return CacheUpdate(missing, start, len(active) - m, len(expired), moved)

    def _advance(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record step `active`; return (neurons leaving the cache, neurons to load): those whose
        last activity left the window, plus the least recently active ones if the capacity demands."""
        if len(active) > self.capacity:
            raise ValueError(f"{len(active)} active neurons exceed the cache capacity {self.capacity}")
        s = self.step
        self.step += 1
        self.last_active[active] = s
        self.history.append(active)
        expired = np.empty(0, dtype=np.int64)
        if len(self.history) > self.window:
            old = self.history.popleft()  # the set of step s - window
            if not self.retain:  # retained: they leave only when the capacity needs their rows
                expired = old[(self.last_active[old] == s - self.window) & (self.slot_of[old] >= 0)]
        missing = active[self.slot_of[active] < 0]
        overflow = self.n_used - len(expired) + len(missing) - self.capacity
        if overflow > 0:  # the window (or what was retained) does not fit: the least recently active leave too
            keep = np.ones(self.n_used, dtype=bool)
            keep[self.slot_of[expired]] = False
            keep[self.slot_of[active[self.slot_of[active] >= 0]]] = False
            candidates = self.neuron_at[: self.n_used][keep]
            oldest = candidates[np.argpartition(self.last_active[candidates], overflow - 1)[:overflow]]
            expired = np.concatenate([expired, oldest])
        return expired, missing

    def _remove(self, neurons: np.ndarray) -> int:
        """Free the rows of `neurons`, filling holes with the last used rows. Returns rows moved."""
        f = len(neurons)
        if f == 0:
            return 0
        freed = self.slot_of[neurons]
        self.slot_of[neurons] = -1
        new_used = self.n_used - f
        is_freed = np.zeros(self.n_used - new_used, dtype=bool)
        tail_freed = freed[freed >= new_used]
        is_freed[tail_freed - new_used] = True
        holes = np.sort(freed[freed < new_used])
        movers = np.arange(new_used, self.n_used)[~is_freed]  # used rows past the new end
        m = len(holes)
        assert m == len(movers), (m, len(movers))
        if m:
            if self._scratch.shape[0] < m:  # grows rarely: amortised, not per step
                self._scratch = self.matrix.new_empty((max(m, 2 * self._scratch.shape[0]), self.matrix.shape[1]))
            buf = self._scratch[:m]
            if self.matrix.device.type == "cpu":  # numpy: on this thread only, and ~3x faster
                rows, moved = rows_view(self.matrix), rows_view(buf)
                np.take(rows, movers, axis=0, out=moved)
                rows[holes] = moved
            else:
                src, dst = self.indices(movers, holes)  # where the matrix lives
                with self.span():
                    torch.index_select(self.matrix, 0, src, out=buf)
                    self.matrix.index_copy_(0, dst, buf)
            moved_neurons = self.neuron_at[movers]
            self.neuron_at[holes] = moved_neurons
            self.slot_of[moved_neurons] = holes
        self.neuron_at[new_used : self.n_used] = -1
        self.n_used = new_used
        return m


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def rows_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a 2-D tensor's rows (as integers of the element size: numpy has no
    bfloat16). Row gathers and scatters through numpy's fancy indexing are ~6x faster than
    torch's index_copy_ on CPU (0.19 vs 1.1 ms for 400 rows of 16 KiB)."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


@dataclass(frozen=True)
class FillUpdate:
    missing: np.ndarray  # sorted neuron ids to load
    dest: np.ndarray  # the row each one goes to
    hits: int
    evicted: int
    moved: int  # rows copied to keep the matrix compact


class FillingWindowCache(WindowCache):
    """A WindowCache whose arriving neurons take the rows freed in the same step.

    The paper deletes by moving the last used rows into the freed slots and appends the new
    ones (at 7B scale ~400 rows, 2 x 6.5 MB of copies per layer and token). In steady state about
    as many neurons arrive as leave, so here they simply take the freed rows; only a surplus of
    leavers is compacted. Rows in use stay compact in [:n_used], but new rows are scattered: the
    engine reads them straight into their rows (flashio.storage reads with `rows=`: rows kept as
    stored), or into a staging buffer that it scatters, fused with a dtype conversion.
    """

    _guessed: tuple[np.ndarray, np.ndarray] | None = None  # update_guess's ids and their previous activity

    def update_fill(self, active: np.ndarray) -> FillUpdate:
        """As WindowCache.update (same window and capacity rules), with new rows in freed slots."""
        self._guessed = None
        expired, missing = self._advance(active)
        freed = np.sort(self.slot_of[expired])
        self.slot_of[expired] = -1
        self.neuron_at[freed] = -1
        m, f = len(missing), len(freed)
        k = min(m, f)
        dest = np.empty(m, dtype=np.int64)
        dest[:k] = freed[:k]  # the lowest freed rows: never in the tail that compaction empties
        if m > f:
            dest[k:] = np.arange(self.n_used, self.n_used + m - f)
            self.n_used += m - f
        self.neuron_at[dest] = missing
        self.slot_of[missing] = dest
        moved = self._compact(freed[k:]) if f > m else 0
        return FillUpdate(missing, dest, len(active) - m, f, moved)

    def update_guess(self, guess: np.ndarray) -> FillUpdate:
        """The lookahead's first update: update_fill with a guess of the step's set (sorted unique
        ids), whose rows the caller starts reading; `extend` then gives the step its own set."""
        prev = self.last_active[guess]  # a copy (fancy indexing): restored by extend where wrong
        up = self.update_fill(guess)
        self._guessed = (guess, prev)
        return up

    def extend(self, active: np.ndarray, in_flight: np.ndarray | None = None) -> tuple[FillUpdate, bool]:
        """Give the step the last update_guess opened its own set `active` (sorted unique ids, at
        most the capacity), without advancing: the lookahead's second update. The guessed
        neurons that `active` lacks lose the guess's activity (they keep their rows, as retained
        rows), so the window, what `live()` computes, is what the step would have without the
        guess (while the capacity holds the window). Neurons of `active` not cached get rows: free
        ones, else those of the least recently active other neurons, those in `in_flight` (rows
        whose reads are still under way) last. Returns the update (`missing` and `dest`: the
        neurons that got a row, all of them unless `active` exceeds the capacity; `hits`: those
        cached before) and whether rows of `in_flight` were taken (the caller must let their reads
        finish before it reads into them)."""
        s = self.step - 1
        if self._guessed is not None:
            guess, prev = self._guessed
            self._guessed = None
            listed = np.zeros(len(self.slot_of), dtype=bool)  # a mask rather than np.isin's sort
            listed[active] = True
            wrong = ~listed[guess]
            self.last_active[guess[wrong]] = prev[wrong]
            self.history[-1] = active
        else:  # an update_fill opened the step: `active` joins its set
            new = active[self.last_active[active] != s]
            self.history[-1] = np.concatenate([self.history[-1], new])
        self.last_active[active] = s
        missing = active[self.slot_of[active] < 0]
        hits = len(active) - len(missing)
        free = self.capacity - self.n_used
        need = len(missing) - free
        freed = np.empty(0, dtype=np.int64)
        took_in_flight = False
        if need > 0:
            used = self.neuron_at[: self.n_used]
            candidates = used[self.last_active[used] < s]
            age = self.last_active[candidates]
            busy = None
            if in_flight is not None and len(in_flight) and len(candidates):  # rows being read rank last
                busy = np.zeros(self.capacity, dtype=bool)
                busy[in_flight] = True
                busy = busy[self.slot_of[candidates]]
                age = age + busy * (s - int(age.min()) + 1)  # age < s: a busy row's key exceeds every idle one's
            k = min(need, len(candidates))
            taken = np.argpartition(age, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
            took_in_flight = busy is not None and bool(busy[taken].any())
            oldest = candidates[taken]
            freed = np.sort(self.slot_of[oldest])
            self.slot_of[oldest] = -1
            self.neuron_at[freed] = -1
            missing = missing[: len(freed) + free]
        dest = np.concatenate([freed, np.arange(self.n_used, self.n_used + len(missing) - len(freed))])
        self.n_used += len(missing) - len(freed)
        self.neuron_at[dest] = missing
        self.slot_of[missing] = dest
        return FillUpdate(missing, dest, hits, len(freed), 0), took_in_flight

    def _compact(self, holes: np.ndarray) -> int:
        """Close empty rows by moving the last used rows into them; returns rows moved."""
        new_used = self.n_used - len(holes)
        inner = holes[holes < new_used]
        tail = np.arange(new_used, self.n_used)
        movers = tail[self.neuron_at[tail] >= 0]
        assert len(movers) == len(inner), (len(movers), len(inner))
        if len(inner):
            rows = rows_view(self.matrix)
            rows[inner] = rows[movers]
            moved = self.neuron_at[movers]
            self.neuron_at[inner] = moved
            self.slot_of[moved] = inner
        self.neuron_at[new_used : self.n_used] = -1
        self.n_used = new_used
        return len(inner)
