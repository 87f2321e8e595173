"""The exact gate's up sketch rearranged once at open for its per-token product x @ up.T.

    sketch = UpSketch.pack(rows, q)    # rows: [N, row_bytes] uint8 as stored; rearranged IN PLACE
    up = sketch.project(x, scratch)    # x: [T, D] -> [T, N] float32, = quant_project(x, rows, q, "up", ...)

The stored sketch (flashio.quant's rows: symmetric int4 or int8 codes, then fp16 scales per group
along d_model) keeps each int4 row's elements in its own bytes, offset by 8; dequantizing a chunk
of such rows (quant_project) takes two masks, two strided float copies, a subtraction and the
scale multiply. The sketch never moves once open, so pack() rewrites each int4 chunk's code bytes,
in the same bytes: pair row i of a chunk of r rows (h = r / 2) holds element j of the chunk's row i
in the low nibble and of its row h + i in the high one, as signed nibbles (code - 8 in two's
complement), the pair row's first D/2 bytes in stored row 2i's codes and the rest in row 2i + 1's.
Per chunk, a left shift and a mask then write 16x the codes of the chunk's first and second halves
into one int8 scratch in row order, one copy makes them float32, one multiply applies the scales
(read where they are stored), one matmul takes x / 16 (the 16 undone exactly): one float pass
fewer than quant_project, the same values. Chunks span up to SCRATCH_ELEMENTS floats, so a small
layer takes few of them (Gemma 3 270M's 2048 x 640: two instead of eight 256-row ones; each torch
op costs ~7 us whatever its size). int8 sketches keep their codes and gain only the larger chunks.

The stored tensor is the sketch's only copy: pack() takes it over (the runtime's resident dict
drops it, see flashio.exact.GateUpEngine), so the DRAM held and the budget's count are the stored
bytes. Odd neuron counts and asymmetric sketches stay on quant_project (`supports`).

Measured by tests/bench/sketch_product.py (one thread, the 2-core development CPU while a model
conversion ran beside it, symmetric int4 in groups of 32, ms per layer, best of 12; the sketch's
values equal quant_project's bit for bit):

    | N x D        | T  | quant_project | UpSketch | _weight_int4pack_mm_for_cpu | int8 codes |
    | 2048 x 640   | 1  | 2.44          | 1.12     | 3.41                        | 0.69       |
    | 2048 x 640   | 16 | 3.30          | 2.05     | 50.3                        | 1.21       |
    | 11008 x 4096 | 1  | 42.1          | 33.9     | 119                         | 26.3       |
    | 11008 x 4096 | 16 | 97.6          | 68.0     | 1773                        | 71.0       |

torch's int4 kernel takes fp32 activations but wants its own tiled packing (N a multiple of 16,
groups of 32-256) and scale-and-zero pairs [D/g, N, 2] in the activation dtype (+33% bytes at
groups of 32; fp16 activations were slower still). 'int8 codes' (one byte per code: twice the
code bytes) is left out for its DRAM. A mixed-dtype multiply (int8 codes times float scales in one
op) ran 4-5x slower than a copy plus an in-place float multiply; chunks of 64K-256K floats (within
L2) were slower than 1M in the forward too (more ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashio.errors import FlashError
from flashio.quant import RowQuant

SCRATCH_ELEMENTS = 1 << 20  # float32 elements dequantized at once (4 MiB); fastest measured at both shapes


def chunk_rows_for(n_rows: int, dim: int, scratch_elements: int = SCRATCH_ELEMENTS) -> int:
    """Rows per chunk: the fewest chunks whose float32 scratch holds at most `scratch_elements`,
    split evenly (2048 x 640: two of 1024, not 1638 + 410), rounded up to an even count."""
    cap = max(2, scratch_elements // dim)
    chunks = -(-n_rows // cap)
    rows = -(-n_rows // chunks)
    return rows + rows % 2


@dataclass(frozen=True)
class UpSketch:
    """One layer's sketch in the product's layout (see the module docstring)."""

    rows: torch.Tensor  # [N, row_bytes] uint8: the stored tensor, int4 codes rearranged
    quant: RowQuant
    chunk_rows: int

    @property
    def nbytes(self) -> int:
        return self.rows.numel()

    @staticmethod
    def supports(q: RowQuant, n_rows: int) -> bool:
        """Symmetric one-part sketches (the writer's) of an even number of rows."""
        return not q.offsets and len(q.parts) == 1 and n_rows % 2 == 0

    @classmethod
    def pack(cls, rows: torch.Tensor, q: RowQuant, chunk_rows: int | None = None) -> UpSketch:
        """Rearrange the stored sketch rows [N, row_bytes] (uint8) in place; one chunk of
        temporaries at a time."""
        n, d = rows.shape[0], q.dim
        if not cls.supports(q, n) or rows.dtype != torch.uint8 or rows.dim() != 2:
            raise FlashError(f"up sketch of {tuple(rows.shape)} {rows.dtype} rows, layout {q.to_json()}: UpSketch "
                             "packs symmetric one-part uint8 rows, an even number of them; compute this one with "
                             "flashio.quant.quant_project")
        c = chunk_rows_for(n, d) if chunk_rows is None else int(chunk_rows) + int(chunk_rows) % 2
        if q.bits == 4:
            p = q.parts[0]
            stored = rows[:, p.codes_start : p.codes_end]  # [N, D/2]: element j low, j + D/2 high, +8
            for a in range(0, n, c):
                b = min(n, a + c)
                h = (b - a) // 2
                signed = torch.cat([stored[a:b] & 15, stored[a:b] >> 4], dim=1) ^ 8  # [r, D] code - 8, 4 bits
                pairs = signed[:h] | (signed[h:] << 4)  # [h, D]
                stored[a:b] = pairs.view(b - a, d // 2)
        return cls(rows, q, c)

    def project(self, x: torch.Tensor, scratch: SketchScratch) -> torch.Tensor:
        """x [T, D] -> [T, N] float32: x @ up.T against the sketch."""
        q, p = self.quant, self.quant.parts[0]
        n, d, c, gs = self.rows.shape[0], q.dim, self.chunk_rows, q.group_size
        codes = self.rows[:, p.codes_start : p.codes_end].view(torch.int8)  # [N, D/2] int4 pairs, [N, D] int8
        scales = self.rows[:, p.scales_start : p.scales_end].view(torch.float16)  # [N, D/g]
        x = x.float() / 16 if q.bits == 4 else x.float()  # int4: the unpacked codes are 16x
        out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
        for a in range(0, n, c):
            b = min(n, a + c)
            r, m = b - a, scratch.buf[: b - a]
            if q.bits == 4:
                unpacked = scratch.codes[: r * d].view(r, d)  # [r, D] int8, chunk rows in order
                half = unpacked.view(2, r, d // 2)  # [2, r, D/2]: the first half's rows, the second's
                torch.bitwise_left_shift(codes[a:b], 4, out=half[0])  # low nibbles: 16 x code
                torch.bitwise_and(codes[a:b], -16, out=half[1])  # high nibbles: 16 x code
                m.copy_(unpacked)
            else:
                m.copy_(codes[a:b])
            s = scratch.scales[:r]
            s.copy_(scales[a:b])
            if gs == d:  # one scale per row: on the [T, r] product instead of the [r, D] rows
                torch.mm(x, m.t(), out=out[:, a:b])
                out[:, a:b] *= s[:, 0]
            else:
                m.view(r, d // gs, gs).mul_(s[:, :, None])
                torch.mm(x, m.t(), out=out[:, a:b])
        return out


class SketchScratch:
    """The reusable buffers of UpSketch.project: a chunk in float32 and int8, its scales."""

    def __init__(self, q: RowQuant, chunk_rows: int, device: torch.device | str = "cpu"):
        self.buf = torch.empty(chunk_rows, q.dim, dtype=torch.float32, device=device)
        self.codes = torch.empty(chunk_rows * q.dim if q.bits == 4 else 0, dtype=torch.int8, device=device)
        self.scales = torch.empty(chunk_rows, q.dim // q.group_size, dtype=torch.float32, device=device)

    @staticmethod
    def nbytes_for(q: RowQuant, chunk_rows: int) -> int:
        return chunk_rows * q.dim * (5 if q.bits == 4 else 4) + chunk_rows * (q.dim // q.group_size) * 4
