"""Stage outputs in safetensors files that are byte for byte reproducible.

    save_tensors({"layers.0.count": count}, out / "stats.safetensors", metadata={"tokens": "512"})

safetensors' `save_file` writes the `__metadata__` of the header from a Rust HashMap, whose
iteration order changes from process to process: the same tensors and metadata written by the
flow's process and by a Dask worker gave files with different sha256s (seen with the activation
statistics). Here the header is rewritten with its keys sorted after the file is written, in
place when its length is unchanged (always, for the compact JSON both sides write), so equal
content means equal bytes whatever process wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

_ALIGN = 8  # safetensors pads the header with spaces to a multiple of 8 bytes


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text + b" " * (n - len(text)))
            return
    _rewrite(path, n, text)


def _rewrite(path: Path, old_header_bytes: int, text: bytes) -> None:
    """The file with a longer header: tensor offsets are relative to the end of the header, so
    the data is copied unchanged after the new one."""
    text += b" " * (-len(text) % _ALIGN)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(text)))
        dst.write(text)
        src.seek(8 + old_header_bytes)
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, path)
