"""The safetensors header of ffn.safetensors: written with aligned offsets, read defensively.

ffn.safetensors is a valid safetensors file (any reader opens it), laid out for O_DIRECT: the
header is padded with spaces (allowed by the format) so the data starts at a multiple of 4096
bytes, and small `_pad.{i}` byte tensors fill the space between layers so that every layer's
bundle block also starts at a multiple of 4096 (safetensors forbids holes in the data buffer).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from flashio.dtypes import SAFETENSORS_ITEMSIZE
from flashio.errors import FormatError

ALIGN = 4096
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the data
    end: int


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout_ffn_file(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
                    ) -> tuple[bytes, dict[str, TensorInfo], int]:
    """Plan ffn.safetensors. `tensors`: (name, safetensors dtype, shape) in file order.

    Returns the header bytes (length prefix included, padded to a multiple of ALIGN), the absolute
    placement of every tensor, and the total file size.
    """
    entries: dict[str, dict] = {}
    rel = 0
    for i, (name, dtype, shape) in enumerate(tensors):
        if rel % ALIGN:
            pad = ALIGN - rel % ALIGN
            entries[f"_pad.{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [rel, rel + pad]}
            rel += pad
        n = SAFETENSORS_ITEMSIZE[dtype]
        for s in shape:
            n *= s
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [rel, rel + n]}
        rel += n
    body = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header_len = _align(8 + len(body)) - 8
    header = struct.pack("<Q", header_len) + body + b" " * (header_len - len(body))
    base = 8 + header_len
    placed = {k: TensorInfo(v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0],
                            base + v["data_offsets"][1]) for k, v in entries.items()}
    return header, placed, base + rel


def read_safetensors_header(f, file_size: int, name: str) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header from an open binary file of `file_size` bytes.

    Every entry must have a known dtype, a non-negative shape whose byte size matches its offsets,
    and offsets inside the file; otherwise FormatError names the file and the entry.
    """
    if file_size < 8:
        raise FormatError(f"{name}: {file_size} bytes is too short for a safetensors file (need >= 8)")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER_BYTES, file_size - 8):
        raise FormatError(f"{name}: header length {n} exceeds the file ({file_size} bytes) or the "
                          f"{MAX_HEADER_BYTES}-byte limit; the file is truncated or not safetensors")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"{name}: header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{name}: header is not a JSON object")
    base, data_size = 8 + n, file_size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(e, dict):
            raise FormatError(f"{name}: entry {key!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise FormatError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in shape)):
            raise FormatError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_size):
            raise FormatError(f"{name}: tensor {key!r} has data_offsets {offs!r} outside the data "
                              f"buffer of {data_size} bytes (file truncated?)")
        nbytes = SAFETENSORS_ITEMSIZE[dtype]
        for s in shape:
            nbytes *= s
        if offs[1] - offs[0] != nbytes:
            raise FormatError(f"{name}: tensor {key!r} spans {offs[1] - offs[0]} bytes but its shape "
                              f"{shape} of {dtype} needs {nbytes}")
        out[key] = TensorInfo(dtype, tuple(shape), base + offs[0], base + offs[1])
    return out
