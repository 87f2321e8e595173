"""Devices: where the model runs, and how flash bytes reach the window caches there.

    dev = resolve_device("cuda")            # one clear error when CUDA is absent
    path = transfer_path(dev, staging_bytes=capacity * row_bytes, index_capacity=3 * capacity)
    host, slot = path.staging(m, cache_rows)  # the reader writes m bundles here (O_DIRECT)
    path.upload(slot, host, cache_rows)       # async, on the copy stream
    path.before_compute()                     # the compute stream waits for the uploads (events)
    src, dst = path.indices(movers, holes)    # row ids where the matrix lives, no allocation
    times = path.finish_step()                # device time of the step's copies and cache moves

This is the one interface the engines use, whatever the device. On the CPU (`HostTransfer`) the
cache rows are themselves the read destination: no staging, no copy, numpy ids viewed as tensors.
On CUDA (`CudaTransfer`), reads land in pinned, page-aligned host buffers (an anonymous mmap
registered with cudaHostRegister, so O_DIRECT works on it), double-buffered so that the next
layer's reads can fill one buffer while the other is still being copied; a dedicated stream
carries the host-to-device copies and CUDA events order the compute stream after them: no
global synchronisation inside a step, no device allocation per token (index ids travel through
a preallocated pinned ring to a preallocated device buffer).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from flashio.arena import PAGE_BYTES, AlignedArena, round_up
from flashio.cache import host_indices
from flashio.errors import FlashError

log = logging.getLogger(__name__)


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device (without checking that it is present), or a
    FlashError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FlashError(f"device {device!r} is not a device name ({exc}); use 'cpu' or 'cuda[:N]'") from None
    if dev.type not in ("cpu", "cuda"):
        raise FlashError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a present torch.device, or a FlashError saying why not."""
    dev = parse_device(device)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise FlashError(f"device={str(device)!r} requested but CUDA is not available on this machine "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device='cpu'")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise FlashError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class DeviceTimes:
    """Device-side time of one step's work that the host cannot time itself (asynchronous)."""

    upload_s: float = 0.0  # host-to-device copies of flash reads (copy stream)
    mem_s: float = 0.0  # cache management kernels: row moves, dtype conversion (compute stream)


class TransferPath(Protocol):
    device: torch.device
    # True: reads land in the destination rows themselves (host memory: the CPU); the engines
    # then keep O_DIRECT-aligned host buffers. False: reads land in a staging buffer and are
    # uploaded; the engines keep device buffers (zeroed) and convert dtypes on the device.
    in_place: bool

    def staging(self, m: int, dest: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A host tensor shaped like `dest` (m rows) for the reader to fill, and its slot."""
        ...

    def fence(self) -> None:
        """The device work that the next uploads must follow (e.g. row moves out of the rows they
        overwrite) has been launched; compute launched later may run alongside those uploads."""
        ...

    def upload(self, slot: int, host: torch.Tensor, dest: torch.Tensor) -> None:
        """Start moving what the reader put in `host` to `dest`, after the last fence (or after
        everything launched so far, without one)."""
        ...

    def before_compute(self) -> None:
        """Order the compute after every upload started so far."""
        ...

    def indices(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        """int64 row ids as tensors on the device (valid until the same call comes round again)."""
        ...

    def span(self) -> contextlib.AbstractContextManager[None]:
        """Times the device work of cache management launched inside it."""
        ...

    def begin_step(self) -> None:
        """Forget the timings of a step that did not finish (an error); a new step starts."""
        ...

    def finish_step(self) -> DeviceTimes:
        """Wait for the step's device work; return its device-side times."""
        ...

    def host_bytes(self) -> int:
        """Host memory the path holds (pinned staging), outside the device budget."""
        ...

    def close(self) -> None: ...


class HostTransfer:
    """CPU: the reader fills the cache rows directly; nothing is asynchronous."""

    device = torch.device("cpu")
    in_place = True

    def staging(self, m: int, dest: torch.Tensor) -> tuple[torch.Tensor, int]:
        return dest, -1

    def fence(self) -> None:
        pass

    def upload(self, slot: int, host: torch.Tensor, dest: torch.Tensor) -> None:
        assert host.data_ptr() == dest.data_ptr(), "the CPU path reads straight into the rows"

    def before_compute(self) -> None:
        pass

    def indices(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        return host_indices(*arrays)

    def span(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def begin_step(self) -> None:
        pass

    def finish_step(self) -> DeviceTimes:
        return DeviceTimes()

    def host_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not only the current one


def pin(arena: AlignedArena, device: torch.device) -> None:
    """Page-lock an arena for DMA (cudaHostRegister); it stays mmap memory, so O_DIRECT works."""
    ptr = torch.frombuffer(arena.memoryview, dtype=torch.uint8).data_ptr()
    with torch.cuda.device(device):
        err = torch.cuda.cudart().cudaHostRegister(ptr, arena.nbytes, _HOST_REGISTER_PORTABLE)
        if int(err) != 0:
            # the failed call left CUDA's "last error" set; the next kernel launch would report it
            # as its own failure: consume it here with one harmless launch
            with contextlib.suppress(RuntimeError):
                torch.zeros(1, device=device).add_(1)
    if int(err) != 0:
        raise FlashError(f"cudaHostRegister of {arena.nbytes} bytes failed (error {int(err)}); "
                         "the locked-memory limit (ulimit -l) may be too low")


def unpin(arena: AlignedArena) -> None:
    ptr = torch.frombuffer(arena.memoryview, dtype=torch.uint8).data_ptr()
    torch.cuda.cudart().cudaHostUnregister(ptr)


class _SlotRing:
    """n reusable pinned host slots, taken in turn; a slot is free again once the copy recorded
    on its event has run (waited for only if it has not)."""

    def __init__(self, n: int):
        self.done = [torch.cuda.Event() for _ in range(n)]  # reused: recorded per copy
        self._used = [False] * n
        self._next = 0

    def take(self) -> int:
        k = self._next
        self._next = (k + 1) % len(self.done)
        if self._used[k]:
            self.done[k].synchronize()  # its previous copy must be done before we overwrite it
        return k

    def record(self, k: int, stream: torch.cuda.Stream) -> None:
        self.done[k].record(stream)
        self._used[k] = True


class CudaTransfer:
    """Pinned double-buffered staging + a copy stream + events; a pinned ring for row ids."""

    in_place = False

    def __init__(self, device: torch.device, *, staging_bytes: int, index_capacity: int,
                 buffers: int = 2, index_slots: int = 4):
        self.device = device
        self.slot_bytes = round_up(max(staging_bytes, 1), PAGE_BYTES)
        self.index_capacity = max(index_capacity, 1)
        ids_bytes = index_slots * self.index_capacity * 8
        # one registered arena: the staging buffers, then the row-id ring
        self.arena = AlignedArena(buffers * self.slot_bytes + ids_bytes)
        try:
            pin(self.arena, device)
        except BaseException:
            self.arena.close()
            raise
        try:
            self._setup(buffers, index_slots)
        except BaseException:  # e.g. out of device memory: never leave the pages locked
            unpin(self.arena)
            self.arena.close()
            raise

    def _setup(self, buffers: int, index_slots: int) -> None:
        device = self.device
        self._bufs = [self.arena.tensor(torch.uint8, (self.slot_bytes,), offset_bytes=k * self.slot_bytes)
                      for k in range(buffers)]
        self._slots = _SlotRing(buffers)
        self._pending: list[int] = []
        self.stream = torch.cuda.Stream(device)
        self._compute_mark = torch.cuda.Event()  # the copy stream's wait on compute (reused)
        self._fenced = False  # a fence was recorded since the last upload
        # row ids: one pinned host row and one device row per slot, both preallocated
        self._ids_host = self.arena.tensor(torch.int64, (index_slots, self.index_capacity),
                                           offset_bytes=buffers * self.slot_bytes)
        self._ids_np = [row.numpy() for row in self._ids_host]
        self._ids_dev = torch.empty(index_slots, self.index_capacity, dtype=torch.int64, device=device)
        self._id_slots = _SlotRing(index_slots)
        # timing events, reused step after step
        self._timers: list[torch.cuda.Event] = []
        self._n_timers = 0
        self._upload_spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._mem_spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _timer_pair(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        while len(self._timers) < self._n_timers + 2:
            self._timers.append(torch.cuda.Event(enable_timing=True))
        pair = self._timers[self._n_timers], self._timers[self._n_timers + 1]
        self._n_timers += 2
        return pair

    def staging(self, m: int, dest: torch.Tensor) -> tuple[torch.Tensor, int]:
        nbytes = dest.numel() * dest.element_size()
        if nbytes > self.slot_bytes:
            raise FlashError(f"{m} rows ({nbytes} bytes) exceed the {self.slot_bytes}-byte staging buffer")
        slot = self._slots.take()
        return self._bufs[slot][:nbytes].view(dest.dtype).view(dest.shape), slot

    def fence(self) -> None:
        self._compute_mark.record(torch.cuda.current_stream(self.device))
        self._fenced = True

    def upload(self, slot: int, host: torch.Tensor, dest: torch.Tensor) -> None:
        # the copy must not start before the compute stream is done with the rows it overwrites
        # (the window cache's row moves read the tail rows that new bundles land on): it waits
        # for the last fence, so compute launched after the fence (the cached rows' FFN, with
        # overlap) runs alongside the copy
        if not self._fenced:
            self.fence()
        self.stream.wait_event(self._compute_mark)  # a queued wait keeps the state of its enqueue
        self._fenced = False
        start, end = self._timer_pair()
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            dest.copy_(host, non_blocking=True)
            end.record(self.stream)
            self._slots.record(slot, self.stream)
        self._upload_spans.append((start, end))
        self._pending.append(slot)

    def before_compute(self) -> None:
        current = torch.cuda.current_stream(self.device)
        for slot in self._pending:
            current.wait_event(self._slots.done[slot])
        self._pending.clear()

    def indices(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        total = sum(len(a) for a in arrays)
        if total > self.index_capacity:
            raise FlashError(f"{total} row ids exceed the {self.index_capacity}-entry index buffer")
        k = self._id_slots.take()  # the host row is free once its last copy ran
        host, spans, pos = self._ids_np[k], [], 0
        for a in arrays:
            host[pos : pos + len(a)] = a
            spans.append((pos, pos + len(a)))
            pos += len(a)
        dev = self._ids_dev[k]
        if pos:  # on the compute stream: the kernels that use the ids come after it
            dev[:pos].copy_(self._ids_host[k, :pos], non_blocking=True)
        self._id_slots.record(k, torch.cuda.current_stream(self.device))
        return tuple(dev[a:b] for a, b in spans)

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        start, end = self._timer_pair()
        start.record(torch.cuda.current_stream(self.device))
        try:
            yield
        finally:
            end.record(torch.cuda.current_stream(self.device))
            self._mem_spans.append((start, end))

    def begin_step(self) -> None:
        self._upload_spans.clear()
        self._mem_spans.clear()
        self._n_timers = 0

    def finish_step(self) -> DeviceTimes:
        torch.cuda.synchronize(self.device)  # the step's work is done: its events are final
        up = sum(a.elapsed_time(b) for a, b in self._upload_spans)
        mem = sum(a.elapsed_time(b) for a, b in self._mem_spans)
        self.begin_step()
        return DeviceTimes(upload_s=up / 1e3, mem_s=mem / 1e3)

    def host_bytes(self) -> int:
        return self.arena.nbytes

    def close(self) -> None:
        if self.arena.closed:
            return
        try:
            torch.cuda.synchronize(self.device)  # no copy may still read the pages
        finally:
            unpin(self.arena)
            self._bufs.clear()
            self._ids_np.clear()
            self._ids_host = None
            self.arena.close()


def transfer_path(device: torch.device, *, staging_bytes: int, index_capacity: int) -> TransferPath:
    """The transfer path for `device`: staging for reads of up to staging_bytes at once, and
    up to index_capacity row ids per `indices` call."""
    if device.type == "cuda":
        return CudaTransfer(device, staging_bytes=staging_bytes, index_capacity=index_capacity)
    return HostTransfer()
