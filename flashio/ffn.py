"""The FFN computation on bundle rows, and the row conversions the engines share.

A bundle row holds one neuron's up-projection column (and gate column for gated FFNs) followed
by its down-projection row (`parts` names the slices). `ffn_compute` is the same on every
device; the engines (flashio.engines, flashio.sparse) decide which rows it sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

CONVERT_ROWS = 128  # rows per chunk of a dtype conversion: few ops, an fp32 scratch of a few MB
# The sparse FFN's row counts change every step; matmuls are padded to a multiple of this many
# rows, because oneDNN (torch's bf16 CPU matmul) caches a primitive of ~1 MB per shape: unpadded,
# the cache grew by ~0.6 GB in a few hundred steps.
BUCKET_ROWS = 256


def ffn_compute(h: torch.Tensor, rows: torch.Tensor, parts: dict[str, slice],
                b_up: torch.Tensor | None, b_gate: torch.Tensor | None,
                zero: torch.Tensor | None = None, n_valid: int | None = None) -> torch.Tensor:
    """h: [T, D], rows: [R, W] bundles -> [T, D] in h's dtype: the sum over the first n_valid
    rows (default all; biases have n_valid entries), except the rows listed in `zero`. Rows past
    n_valid only pad the matmuls to a fixed shape; their contents are ignored (but must be finite)."""
    n = rows.shape[0] if n_valid is None else n_valid
    x = h.to(rows.dtype)
    pre = F.linear(x, rows[:, parts["up"]])  # [T, R]
    if b_up is not None:  # streamed rows keep the storage dtype: cast the bias to theirs
        pre[:, :n] += b_up.to(rows.dtype)
    if "gate" in parts:
        gate = F.linear(x, rows[:, parts["gate"]])
        if b_gate is not None:
            gate[:, :n] += b_gate.to(rows.dtype)
        act = F.silu(gate) * pre
    else:
        act = F.relu(pre)
    if n < rows.shape[0]:
        act[:, n:] = 0
    if zero is not None and len(zero):
        act.index_fill_(1, zero, 0)
    down = rows[:, parts["down"]]  # [R, D]
    if rows.dtype == torch.float16 and act.shape[0] == 1:
        # torch's CPU fp16 `act @ down` (no-transpose GEMV) is ~10x slower than mv on down.T
        return torch.mv(down.t(), act[0]).unsqueeze(0).to(h.dtype)
    return (act @ down).to(h.dtype)  # [T, D]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on the calling thread only. For the memory-bound copies of cache management
    one core is nearly as fast as two, and on a busy 2-core machine two threads' fork/join
    barriers made them ~8x slower (73 ms vs 9 ms for one layer's conversion at 7B). torch's
    thread count is process-wide: it is restored on exit (and only the runtime's own thread calls
    torch while this holds; the reader threads run no torch ops)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def convert_rows(dst: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
    """dst[:] = src in dst's dtype, through an fp32 scratch of CONVERT_ROWS rows: fp16 -> bf16
    in two vectorised steps is ~8x faster than torch's direct copy on CPU."""
    if dst.dtype == src.dtype:
        dst.copy_(src)
        return
    for a in range(0, src.shape[0], CONVERT_ROWS):
        s = scratch[: min(CONVERT_ROWS, src.shape[0] - a)]
        s.copy_(src[a : a + CONVERT_ROWS])
        dst[a : a + CONVERT_ROWS].copy_(s)
