"""Page-aligned memory for O_DIRECT reads.

O_DIRECT needs the destination address, the file offset and the length to be multiples of the
device's logical block size (512 or 4096 bytes). An anonymous ``mmap`` is page-aligned (4096), so
every row of a tensor carved out of it at a block-multiple offset is a valid O_DIRECT target and
``os.preadv`` can fill the tensor's memory with no copy. ``torch.empty`` gives no such guarantee.

    arena = AlignedArena(capacity * row_bytes)
    cache = arena.tensor(torch.float16, (capacity, bundle_width))   # a view on the arena
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os

import torch

log = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
# Arenas of at least this size ask the kernel for transparent huge pages (madvise: the default
# THP mode of many distributions backs only regions that ask). Weights are read with few TLB
# misses: a one-token FFN over 7B-layer-sized rows read 15-18% faster (15.2 -> 17.6 GB/s, one
# thread, 2-vCPU AMD EPYC). The cost: a huge-page fault backs up to 2 MiB at once, so rows of an
# arena never written (unused cache capacity) may be resident sooner than with 4 KiB pages.
HUGE_PAGE_MIN_BYTES = 4 << 20
_FALLBACK_BLOCK_BYTES = 4096  # when sysfs cannot tell: every device accepts 4096-aligned I/O


class AlignedArena:
    """Page-aligned anonymous mmap memory owned by an object (``close()`` releases it).

    Tensors made by :meth:`tensor` are views on the arena: they keep the mapping alive, so
    ``close()`` unmaps at once when no view is left and otherwise when the last view is freed
    (never under a live tensor, which would turn its reads into segfaults).
    """

    def __init__(self, nbytes: int, *, huge: bool | None = None):
        """huge: advise transparent huge pages (None: when nbytes >= HUGE_PAGE_MIN_BYTES)."""
        if nbytes < 0:
            raise ValueError(f"AlignedArena size must be >= 0 bytes, got {nbytes}")
        self._nbytes = int(nbytes)
        # mmap refuses length 0: map one page and expose none of it.
        mapped_bytes = max(PAGE_BYTES, math.ceil(self._nbytes / PAGE_BYTES) * PAGE_BYTES)
        self._mmap: mmap.mmap | None = mmap.mmap(
            -1, mapped_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        if (nbytes >= HUGE_PAGE_MIN_BYTES if huge is None else huge) and hasattr(mmap, "MADV_HUGEPAGE"):
            # before the first touch: faults then map 2 MiB pages where the kernel has them (THP
            # disabled in this kernel: OSError, plain pages)
            with contextlib.suppress(OSError):
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
        self._view: memoryview | None = memoryview(self._mmap)[: self._nbytes]

    @property
    def nbytes(self) -> int:
        """Usable size in bytes (the mapping is rounded up to whole pages)."""
        return self._nbytes

    @property
    def memoryview(self) -> memoryview:
        """A writable, 1-D, format 'B' view of the arena's ``nbytes`` bytes."""
        if self._view is None:
            raise ValueError("AlignedArena is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._view is None

    def tensor(
        self, dtype: torch.dtype, shape: tuple[int, ...], offset_bytes: int = 0
    ) -> torch.Tensor:
        """A tensor of ``dtype`` and ``shape`` viewing the arena from ``offset_bytes`` (no copy)."""
        view = self.memoryview
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = math.prod(shape)
        nbytes = numel * itemsize
        if offset_bytes < 0 or offset_bytes % itemsize:
            raise ValueError(
                f"offset_bytes={offset_bytes} must be >= 0 and a multiple of {dtype}'s "
                f"{itemsize}-byte element size"
            )
        if offset_bytes + nbytes > self._nbytes:
            raise ValueError(
                f"a {dtype} tensor of shape {tuple(shape)} ({nbytes} bytes) at offset "
                f"{offset_bytes} does not fit in this {self._nbytes}-byte arena: make the arena larger"
            )
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        # frombuffer on a memoryview slice: the tensor holds the slice, the slice holds an export
        # of the mmap, so the mapping cannot be unmapped under the tensor.
        flat = torch.frombuffer(view[offset_bytes : offset_bytes + nbytes], dtype=dtype)
        return flat.view(shape)

    def close(self) -> None:
        """Release the arena: unmapped now if no tensor views it, else when the last one dies."""
        if self._mmap is None:
            return
        mapping, self._mmap = self._mmap, None
        view, self._view = self._view, None
        try:
            view.release()
            mapping.close()
        except BufferError:
            log.debug("AlignedArena of %d bytes still viewed by tensors: unmapped when they die",
                      self._nbytes)

    def __enter__(self) -> AlignedArena:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"AlignedArena(nbytes={self._nbytes}, {state})"


def private_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype), from an arena (huge pages) when it is large: for weights
    kept in DRAM and read every token. The memory is freed with the last view of the tensor."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    arena = AlignedArena(nbytes)
    t = arena.tensor(dtype, tuple(shape))
    arena.close()  # unmapped when t and its views die
    return t


def logical_block_size(fd: int) -> int:
    """The O_DIRECT alignment of the device under ``fd``, from sysfs; 4096 when it cannot tell."""
    dev = os.fstat(fd).st_dev
    sys_dev = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    # a partition has no queue/ of its own: its parent directory (the disk) has
    for queue in (f"{sys_dev}/queue", os.path.join(os.path.realpath(sys_dev), "..", "queue")):
        try:
            with open(os.path.join(queue, "logical_block_size")) as f:
                block = int(f.read())
        except (OSError, ValueError):
            continue
        if block >= 512 and block & (block - 1) == 0:
            return block
    return _FALLBACK_BLOCK_BYTES


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def byte_view(out: torch.Tensor, nbytes: int) -> memoryview:
    """A writable 1-D uint8 memoryview of out's memory, which must be exactly nbytes long."""
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a C-contiguous CPU tensor, got device {out.device}, "
                         f"strides {out.stride()}")
    have = out.numel() * out.element_size()
    if have != nbytes:
        raise ValueError(f"out holds {have} bytes ({tuple(out.shape)} {out.dtype}), the read "
                         f"needs exactly {nbytes}")
    return memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
