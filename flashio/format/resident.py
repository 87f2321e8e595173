"""The resident weights (embeddings, attention, norms, head, FFN biases), read into private memory.

Read with plain preads in file order, each tensor's pages dropped from the page cache once
copied: the weights then live in memory once, as the runtime's budget counts them (a
memory-mapped file is page cache that the kernel may evict and re-read at any time, and mapped
pages are what a memory-limited cgroup reclaims worst). Converted tensors go through one reusable
staging arena, so no large temporary is ever freed to the allocator (which keeps freed blocks
below its mmap threshold: hundreds of MB at 7B scale). The file's sha256 is computed in the same
single pass.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from flashio.arena import AlignedArena, private_tensor
from flashio.dtypes import SAFETENSORS_TORCH
from flashio.errors import ChecksumError, FormatError
from flashio.ffn import CONVERT_ROWS, convert_rows
from flashio.format.ffnfile import read_safetensors_header

_STAGING_BYTES = 64 << 20  # the conversion buffer


def read_resident(path: Path, dtype: torch.dtype | None, want_sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path` in private memory, floating ones in `dtype`
    (None: as stored); with want_sha256, the file's digest must match (ChecksumError)."""
    out: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    with open(path, "rb") as f, AlignedArena(_STAGING_BYTES) as arena:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        infos = read_safetensors_header(f, size, str(path))
        staging = arena.memoryview
        pos = 0  # bytes of the file hashed so far

        def skip_to(offset: int) -> None:  # hash what lies between tensors (header, padding)
            nonlocal pos
            while pos < offset:
                k = min(offset - pos, len(staging))
                _pread_full(fd, staging[:k], pos, path, "(header)")
                digest.update(staging[:k])
                pos += k

        for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):
            if info.dtype not in SAFETENSORS_TORCH:
                raise FormatError(f"{path}: tensor {name!r} has dtype {info.dtype}, not a weight dtype")
            skip_to(info.start)
            src_dtype = SAFETENSORS_TORCH[info.dtype]
            target = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype
            t = private_tensor(tuple(info.shape), target)
            n = info.end - info.start
            if n and target == src_dtype:
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                _pread_full(fd, view, info.start, path, name)
                digest.update(view)
            elif n:  # row chunks: read into staging, convert into place
                width = info.shape[-1] if info.shape else 1
                flat = t.view(-1, width)
                row_bytes = width * src_dtype.itemsize
                step = max(1, _STAGING_BYTES // row_bytes)
                scratch = torch.empty(min(CONVERT_ROWS, step), width)
                for a in range(0, flat.shape[0], step):
                    k = min(step, flat.shape[0] - a)
                    chunk = staging[: k * row_bytes]
                    _pread_full(fd, chunk, info.start + a * row_bytes, path, name)
                    digest.update(chunk)
                    src = torch.frombuffer(chunk, dtype=src_dtype).view(k, width)
                    convert_rows(flat[a : a + k], src, scratch)
                    del src
            pos = info.end
            if n:
                os.posix_fadvise(fd, info.start, n, os.POSIX_FADV_DONTNEED)
            out[name] = t
        skip_to(size)
    if want_sha256 is not None and digest.hexdigest() != want_sha256:
        raise ChecksumError(f"{path}: sha256 is {digest.hexdigest()}, the manifest says {want_sha256}; "
                            "the file is corrupt or was modified")
    return out


def _pread_full(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise FormatError(f"{path}: the file ends inside tensor {name!r} (truncated?)")
        done += got
