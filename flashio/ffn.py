"""The FFN computation on bundle rows, and the row conversions the engines share.

A bundle row holds one neuron's up-projection column (and gate column for gated FFNs) followed
by its down-projection row (`parts` names the slices). `ffn_compute` is the same on every
device; the engines (flashio.engines, flashio.sparse) decide which rows it sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashio import kernels
from flashio.models.base import ACTIVATIONS

CONVERT_ROWS = 128  # rows per chunk of a dtype conversion: few ops, an fp32 scratch of a few MB
# torch runs an element-wise op (a copy, a conversion) on the calling thread alone when it has fewer
# elements than its parallel grain (at::internal::GRAIN_SIZE = 32768), on all its threads above.
SERIAL_ELEMENTS = 32767
# The sparse FFN's row counts change every step; matmuls are padded to a multiple of this many
# rows, because oneDNN (torch's bf16 CPU matmul) caches a primitive of ~1 MB per shape: unpadded,
# the cache grew by ~0.6 GB in a few hundred steps.
BUCKET_ROWS = 256
# the activations flashio.kernels computes itself, by function
KERNEL_ACTIVATIONS = {ACTIVATIONS[name]: name for name in ("relu", "silu", "gelu_pytorch_tanh")}


def ffn_compute(h: torch.Tensor, rows: torch.Tensor, parts: dict[str, slice],
                b_up: torch.Tensor | None, b_gate: torch.Tensor | None,
                zero: torch.Tensor | None = None, n_valid: int | None = None,
                activation: str | None = None, *, gate_act: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """h: [T, D], rows: [R, W] bundles -> [T, D] in h's dtype: the sum over the first n_valid
    rows (default all; biases have n_valid entries), except the rows listed in `zero`. Rows past
    n_valid only pad the matmuls to a fixed shape; their contents are ignored (but must be finite).
    activation: the manifest's (a name of flashio.models.base.ACTIVATIONS, e.g. Gemma's
    "gelu_pytorch_tanh"); None: SiLU for gated rows, ReLU otherwise.
    gate_act: [T, n_valid] act(gate) of these rows computed elsewhere (bundles without a gate part:
    the gate rows are resident, flashio.exact); mask: [T, n_valid], 1 where a token keeps a row."""
    n = rows.shape[0] if n_valid is None else n_valid
    act_fn = ACTIVATIONS[activation] if activation else (F.silu if "gate" in parts else F.relu)
    if h.shape[0] == 1 and kernels.supports(rows) and act_fn in KERNEL_ACTIVATIONS:
        return _one_token(h, rows, parts, b_up, b_gate, zero, n, KERNEL_ACTIVATIONS[act_fn], gate_act, mask)
    x = h.to(rows.dtype)
    pre = F.linear(x, rows[:, parts["up"]])  # [T, R]
    if b_up is not None:  # streamed rows keep the storage dtype: cast the bias to theirs
        pre[:, :n] += b_up.to(rows.dtype)
    if gate_act is not None:
        act = pre
        act[:, :n] *= gate_act.to(rows.dtype)
    elif "gate" in parts:
        gate = F.linear(x, rows[:, parts["gate"]])
        if b_gate is not None:
            gate[:, :n] += b_gate.to(rows.dtype)
        act = act_fn(gate) * pre
    else:
        act = act_fn(pre)
    if n < rows.shape[0]:
        act[:, n:] = 0
    if mask is not None:
        act[:, :n] *= mask.to(rows.dtype)
    if zero is not None and len(zero):
        act.index_fill_(1, zero, 0)
    down = rows[:, parts["down"]]  # [R, D]
    if rows.dtype == torch.float16 and act.shape[0] == 1:
        # torch's CPU fp16 `act @ down` (no-transpose GEMV) is ~10x slower than mv on down.T
        return torch.mv(down.t(), act[0]).unsqueeze(0).to(h.dtype)
    return (act @ down).to(h.dtype)  # [T, D]


def _one_token(h: torch.Tensor, rows: torch.Tensor, parts: dict[str, slice], b_up: torch.Tensor | None,
               b_gate: torch.Tensor | None, zero: torch.Tensor | None, n: int, activation: str,
               gate_act: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """ffn_compute for one token on CPU rows through flashio.kernels: one pass over each of the n
    valid rows (no padding), activations in float32; rows that a mask or `zero` drops are not read,
    and a row whose activation is zero is not read past its up (and gate) part."""
    if zero is not None and len(zero):
        mask = (torch.ones(1, n) if mask is None else mask.float().clone()).index_fill_(1, zero[zero < n], 0)
    y, _ = kernels.kernels().ffn(rows, parts, h[0], activation, n, b_up=b_up, b_gate=b_gate,
                                 gate_act=None if gate_act is None else gate_act[0],
                                 mask=None if mask is None else mask[0])
    return y.to(h.dtype).unsqueeze(0)


def convert_rows(dst: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
    """dst[:] = src in dst's dtype (contiguous tensors), on the calling thread only.

    Through an fp32 scratch of CONVERT_ROWS rows: fp16 -> bf16 in two vectorised steps is ~8x
    faster than torch's direct copy on CPU. On the CPU every copy is cut into pieces below torch's
    parallel grain (SERIAL_ELEMENTS), so that none forks onto torch's other threads: for these
    memory-bound copies a second core gains little, and on a busy 2-core machine the fork/join
    barrier made them ~10x slower (128 ms vs 10 ms for 400 rows of a 7B layer). This changes
    nothing process-wide (torch's thread count is left alone)."""
    if dst.device.type != "cpu":
        dst.copy_(src)
        return
    assert dst.is_contiguous() and src.is_contiguous() and dst.shape == src.shape, (dst.shape, src.shape)
    d, s = dst.view(-1), src.view(-1)
    if dst.dtype == src.dtype:
        _serial_copy(d, s)
        return
    f = scratch.view(-1)  # [CONVERT_ROWS * width] fp32: a chunk stays in cache between its two copies
    step = f.numel()
    for a in range(0, d.numel(), step):
        b = min(d.numel(), a + step)
        _serial_copy(f[: b - a], s[a:b])
        _serial_copy(d[a:b], f[: b - a])


def _serial_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for 1-D tensors, in pieces that torch runs on the calling thread. One
    _foreach_copy_ call copies them all: ~1 us per piece instead of ~5 us per Python-level copy_."""
    torch._foreach_copy_(dst.split(SERIAL_ELEMENTS), src.split(SERIAL_ELEMENTS))
