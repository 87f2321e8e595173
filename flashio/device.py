"""Devices: where the model runs, and how flash bytes reach the window caches there.

    dev = resolve_device("cuda")            # one clear error when CUDA is absent
    path = transfer_path(dev, max_rows=capacity, row_width=bundle_width, dtype=torch.float16)
    host, slot = path.staging(m)            # the reader writes m bundles here (O_DIRECT)
    path.upload(slot, host, cache.matrix[start:start + m])   # async, on the copy stream
    path.before_compute()                   # the compute stream waits for the uploads (events)

On the CPU the cache rows are themselves the read destination (no staging, no copy). On CUDA,
reads land in pinned, page-aligned host buffers (an anonymous mmap registered with
cudaHostRegister, so O_DIRECT works on it), double-buffered so that the next layer's reads can
fill one buffer while the other is still being copied; a dedicated stream carries the
host-to-device copies and CUDA events order the compute stream after them — no global
synchronisation, no allocation per token.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from flashio.arena import AlignedArena
from flashio.errors import FlashError

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device, or a FlashError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FlashError(f"device {device!r} is not a device name ({exc}); use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise FlashError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise FlashError(f"device={str(device)!r} requested but CUDA is not available on this machine "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device='cpu'")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise FlashError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", index)


class TransferPath(Protocol):
    def staging(self, m: int, dest: torch.Tensor) -> tuple[torch.Tensor, int]: ...
    def upload(self, slot: int, host: torch.Tensor, dest: torch.Tensor) -> None: ...
    def before_compute(self) -> None: ...
    def close(self) -> None: ...


class HostTransfer:
    """CPU: the reader fills the cache rows directly."""

    def staging(self, m: int, dest: torch.Tensor) -> tuple[torch.Tensor, int]:
        return dest, -1

    def upload(self, slot: int, host: torch.Tensor, dest: torch.Tensor) -> None:
        assert host.data_ptr() == dest.data_ptr()

    def before_compute(self) -> None:
        pass

    def close(self) -> None:
        pass


def pin(arena: AlignedArena) -> None:
    """Page-lock an arena for DMA (cudaHostRegister); it stays mmap memory, so O_DIRECT works."""
    ptr = torch.frombuffer(arena.memoryview, dtype=torch.uint8).data_ptr()
    err = torch.cuda.cudart().cudaHostRegister(ptr, arena.nbytes, 0)
    if int(err) != 0:
        raise FlashError(f"cudaHostRegister of {arena.nbytes} bytes failed (error {int(err)}); "
                         "the locked-memory limit (ulimit -l) may be too low")


def unpin(arena: AlignedArena) -> None:
    ptr = torch.frombuffer(arena.memoryview, dtype=torch.uint8).data_ptr()
    torch.cuda.cudart().cudaHostUnregister(ptr)


class CudaTransfer:
    """Pinned double-buffered staging + a copy stream + events."""

    def __init__(self, device: torch.device, *, max_rows: int, row_width: int, dtype: torch.dtype,
                 buffers: int = 2):
        self.device = device
        row_bytes = row_width * dtype.itemsize
        self.arena = AlignedArena(max(buffers * max_rows * row_bytes, 1))
        pin(self.arena)
        self.bufs = [self.arena.tensor(dtype, (max_rows, row_width), offset_bytes=k * max_rows * row_bytes)
                     for k in range(buffers)]
        self.events = [torch.cuda.Event() for _ in range(buffers)]  # reused: recorded per upload
        self.in_use = [False] * buffers
        self.stream = torch.cuda.Stream(device)
        self.next = 0
        self.pending: list[int] = []

    def staging(self, m: int, dest: torch.Tensor) -> tuple[torch.Tensor, int]:
        slot = self.next
        self.next = (slot + 1) % len(self.bufs)
        if self.in_use[slot]:
            self.events[slot].synchronize()  # its previous copy must be done before we overwrite it
        return self.bufs[slot][:m], slot

    def upload(self, slot: int, host: torch.Tensor, dest: torch.Tensor) -> None:
        # the copy must not start before the compute stream is done with what it overwrites
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dest.copy_(host, non_blocking=True)
            self.events[slot].record(self.stream)
        self.in_use[slot] = True
        self.pending.append(slot)

    def before_compute(self) -> None:
        current = torch.cuda.current_stream(self.device)
        for slot in self.pending:
            current.wait_event(self.events[slot])
        self.pending.clear()

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        unpin(self.arena)
        self.bufs.clear()
        self.arena.close()


def transfer_path(device: torch.device, *, max_rows: int, row_width: int, dtype: torch.dtype) -> TransferPath:
    if device.type == "cuda":
        return CudaTransfer(device, max_rows=max_rows, row_width=row_width, dtype=dtype)
    return HostTransfer()
