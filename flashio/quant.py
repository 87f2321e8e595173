"""Quantized weights (format version 3): group-wise symmetric int8 / int4 bundle rows, int8
per-output-channel resident matrices, and the matrix-vector products on them.

    spec = row_quant(("up", "down"), dim=4096, scheme="int4", group_size=4096)
    rows = quantize_rows(bundles, spec)                    # [N, parts*D] float -> [N, row_bytes] uint8
    y = quant_ffn_compute(h, rows[:n], spec, ...)          # as flashio.ffn.ffn_compute on float rows

A quantized bundle row keeps a neuron one read: for each part (up, gate, down) its codes and then
its fp16 scales (one per `group_size` elements), then zeros up to a multiple of ROW_ALIGN_BYTES
when the float row was one and the padding costs at most 1/16 of the row (O_DIRECT reads then land
straight in the window cache), else up to a multiple of 64 bytes (a cache line; the reader then
reads each run's block-aligned superset into scratch and copies the rows out). At the OPT-6.7B
shape (4096 wide, up + down) int8 rows are 8196 -> 8704 bytes (0.53x fp16, aligned) and int4
rows 4100 -> 4160 bytes (0.254x; padding to 4608 would cost 12%). int4 codes hold
two elements per byte, the part's first half in the low nibbles and its second half in the high
ones (two contiguous unpacks instead of strided ones); they are stored offset by 8 (0..15 for
-8..7; the quantizer uses -7..7, symmetric).

Why the product dequantizes chunks of rows instead of calling torch's weight-only kernels
(measured on this project's 2-core CPU, one thread, 4096-wide rows, one token, up + down):
rows 820 / 2458 / 4915: fp16 rows 2.7 / 7.5 / 16.7 ms; int8 in chunks of 256 rows through an
fp32 scratch 2.1 / 4.9 / 10.9 ms; `_weight_int8pack_mm` for up (+ chunks for down) 1.2 / 4.4 /
9.1 ms, but it needs the up codes contiguous (a copy out of the bundle rows) and bf16 inputs;
`_weight_int4pack_mm_for_cpu` needs its own tiled packing of the whole matrix (N a multiple of
16), which a window cache whose rows move every step cannot keep; int4 chunks 2.8 / 8.0 / 15.6 ms.
Scales of whole-row groups are folded into the [T, R] activations (no multiply over the matrix);
smaller groups multiply each chunk (several times slower: 128-wide groups were 3-7x). For the
resident matrices `_weight_int8pack_mm` with bf16 inputs wins: 4096 x 4096 in 2.9 ms against
4.1 (fp16) and 4.9 (fp32); chunked dequantization 6.4.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashio.errors import FlashError, FormatError

SCHEMES = {"int8": 8, "int4": 4}  # scheme -> bits per element
RESIDENT_SCHEMES = ("int8",)  # per-output-channel
SCALE_DTYPE = "float16"
ROW_ALIGN_BYTES = 512  # O_DIRECT's block: float rows that were a multiple stay one where it is cheap
MAX_PAD_FRACTION = 1 / 16  # ... i.e. where the padding adds at most this much to the row
MIN_ALIGN_BYTES = 64
CHUNK_ROWS = 256  # rows dequantized at once: an fp32 scratch of 4 MiB at 4096 wide (fastest measured)
# the resident matrices quantized by --quantize-resident int8: attention, untied head, resident gate
# rows. Embeddings stay in float: they are gathered, not multiplied, and a tied head shares them.
RESIDENT_QUANTIZED = re.compile(r"(^lm_head\.weight$)|(\.attn\.[qkvo]\.weight$)|(\.ffn\.gate$)")


@dataclass(frozen=True)
class PartQuant:
    """Where one part's codes and scales lie in a quantized row, in bytes."""

    name: str
    codes_start: int
    codes_end: int
    scales_start: int
    scales_end: int


@dataclass(frozen=True)
class RowQuant:
    """How a layer's bundle rows are quantized (the manifest's per-layer record)."""

    scheme: str  # "int8" | "int4"
    group_size: int  # elements sharing one scale, along d_model; dim = one scale per part
    scale_dtype: str
    row_bytes: int  # stored width of a row (padding included)
    parts: tuple[PartQuant, ...]

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    @property
    def dim(self) -> int:
        p = self.parts[0]
        return (p.codes_end - p.codes_start) * 8 // self.bits

    def part(self, name: str) -> PartQuant:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size, "scale_dtype": self.scale_dtype,
                "row_bytes": self.row_bytes,
                "parts": [[p.name, p.codes_start, p.codes_end, p.scales_start, p.scales_end] for p in self.parts]}


def check_scheme(scheme: str, *, where: str = "quantize") -> int:
    """Bits per element of `scheme`; FlashError naming the known ones otherwise."""
    if scheme not in SCHEMES:
        raise FlashError(f"{where}: quantization scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def row_quant(parts: tuple[str, ...], *, dim: int, scheme: str, group_size: int | None = None,
              float_itemsize: int = 2, aligned: bool = True) -> RowQuant:
    """The row layout for `parts` of `dim` elements each; padded to ROW_ALIGN_BYTES when the
    float row (`float_itemsize` bytes per element) was a multiple of it and that adds at most
    MAX_PAD_FRACTION, else to MIN_ALIGN_BYTES (see the module docstring). aligned=False: rows that
    are never read from flash (the resident up sketch), padded to an even length only."""
    bits = check_scheme(scheme)
    g = dim if group_size is None else int(group_size)
    if g <= 0 or dim % g or (bits == 4 and (dim % 2 or g % 2)):
        raise FlashError(f"group size {group_size} must be a positive divisor of d_model {dim}"
                         + (" (and even, with an even d_model, for int4)" if bits == 4 else ""))
    code_bytes, scale_bytes = dim * bits // 8, dim // g * 2
    out, pos = [], 0
    for name in parts:
        out.append(PartQuant(name, pos, pos + code_bytes, pos + code_bytes, pos + code_bytes + scale_bytes))
        pos += code_bytes + scale_bytes
    block = -(-pos // ROW_ALIGN_BYTES) * ROW_ALIGN_BYTES
    if not aligned:
        pos += pos % 2
    elif (len(parts) * dim * float_itemsize) % ROW_ALIGN_BYTES == 0 and block - pos <= pos * MAX_PAD_FRACTION:
        pos = block
    else:
        pos = -(-pos // MIN_ALIGN_BYTES) * MIN_ALIGN_BYTES
    return RowQuant(scheme, g, SCALE_DTYPE, pos, tuple(out))


def check_row_quant(q: RowQuant, parts: tuple[str, ...], dim: int, where: str) -> None:
    """FormatError unless `q` is a layout this flashio computes with for `parts` of `dim` elements."""
    if q.scheme not in SCHEMES:
        raise FormatError(f"{where}: quantization scheme {q.scheme!r} is not one this flashio reads "
                          f"({', '.join(SCHEMES)}); the artifact comes from a newer flashio: upgrade flashio "
                          "or rebuild the artifact")
    if q.scale_dtype != SCALE_DTYPE:
        raise FormatError(f"{where}: scale_dtype {q.scale_dtype!r}, expected {SCALE_DTYPE!r}")
    if tuple(p.name for p in q.parts) != parts:
        raise FormatError(f"{where}: quantized parts {[p.name for p in q.parts]}, the bundle layout has {list(parts)}")
    g, bits = q.group_size, SCHEMES[q.scheme]
    if g <= 0 or dim % g or (bits == 4 and g % 2):
        raise FormatError(f"{where}: group_size {g} does not divide d_model {dim} (int4: even)")
    end = 0
    for p in q.parts:
        if (p.codes_start < end or p.codes_end - p.codes_start != dim * bits // 8 or p.scales_start < p.codes_end
                or p.scales_end - p.scales_start != dim // g * 2 or p.scales_start % 2):
            raise FormatError(f"{where}: part {p.name!r} codes [{p.codes_start}, {p.codes_end}) scales "
                              f"[{p.scales_start}, {p.scales_end}) do not hold {dim} {q.scheme} codes and "
                              f"{dim // g} {SCALE_DTYPE} scales after the previous part")
        end = p.scales_end
    if end > q.row_bytes or q.row_bytes % 2:
        raise FormatError(f"{where}: row_bytes {q.row_bytes} is odd or shorter than its parts ({end} bytes)")


# -- quantizing (the writer) ---------------------------------------------------------------------------

def _quantize_groups(w: torch.Tensor, bits: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, D] -> codes [N, D] int8 in [-qmax, qmax], scales [N, D/g] fp16 (symmetric, absmax)."""
    qmax = (1 << (bits - 1)) - 1
    n, d = w.shape
    wg = w.float().view(n, d // g, g)
    scale = (wg.abs().amax(dim=2) / qmax).to(torch.float16)
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
    codes = torch.round(wg / s[:, :, None]).clamp_(-qmax, qmax).to(torch.int8).view(n, d)
    return codes, scale


def quantize_rows(bundles: torch.Tensor, q: RowQuant) -> torch.Tensor:
    """bundles: [N, parts*D] float (parts in q's order) -> [N, row_bytes] uint8."""
    n, d = bundles.shape[0], q.dim
    out = torch.zeros(n, q.row_bytes, dtype=torch.uint8)
    for k, p in enumerate(q.parts):
        codes, scale = _quantize_groups(bundles[:, k * d : (k + 1) * d], q.bits, q.group_size)
        if q.bits == 4:
            u = (codes + 8).to(torch.uint8)
            codes = (u[:, : d // 2] | (u[:, d // 2 :] << 4)).view(torch.int8)
        out[:, p.codes_start : p.codes_end] = codes.view(torch.uint8)
        out[:, p.scales_start : p.scales_end] = scale.contiguous().view(torch.uint8)
    return out


def dequantize_rows(rows: torch.Tensor, q: RowQuant, part: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The `part` of quantized rows [R, row_bytes] as float32 [R, D] (or into `out`)."""
    p, d, r = q.part(part), q.dim, rows.shape[0]
    out = torch.empty(r, d, dtype=torch.float32, device=rows.device) if out is None else out
    _codes_into(out, rows[:, p.codes_start : p.codes_end], q.bits, centred=True)
    ng = d // q.group_size
    out.view(r, ng, q.group_size).mul_(_scales(rows, p)[:, :, None])
    return out


def quantize_resident(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, in] matrix -> int8 codes [out, in] and fp16 scales [out] (per output channel)."""
    codes, scale = _quantize_groups(w, 8, w.shape[1])
    return codes, scale[:, 0].contiguous()


# -- computing (the runtime) ---------------------------------------------------------------------------

def _scales(rows: torch.Tensor, p: PartQuant) -> torch.Tensor:
    """[R, groups] float32 scales of part p (an fp16 view of the row bytes)."""
    return rows[:, p.scales_start : p.scales_end].view(torch.float16).float()


def _codes_into(dst: torch.Tensor, codes: torch.Tensor, bits: int, *, centred: bool,
                nibble: torch.Tensor | None = None) -> None:
    """dst [R, D] float = the codes (int4: unpacked; centred=False leaves them offset by 8)."""
    if bits == 8:
        dst.copy_(codes.view(torch.int8))
        return
    half = dst.shape[1] // 2
    nib = torch.empty_like(codes) if nibble is None else nibble[: codes.shape[0]]
    torch.bitwise_and(codes, 15, out=nib)
    dst[:, :half].copy_(nib)
    torch.bitwise_right_shift(codes, 4, out=nib)
    dst[:, half:].copy_(nib)
    if centred:
        dst.sub_(8)


class RowScratch:
    """The reusable fp32 scratch of one engine's quantized products (no allocation per step)."""

    def __init__(self, q: RowQuant, device: torch.device | str = "cpu", rows: int = CHUNK_ROWS):
        self.rows = rows
        self.buf = torch.empty(rows, q.dim, dtype=torch.float32, device=device)
        self.nibble = torch.empty(rows, q.dim // 2, dtype=torch.uint8, device=device) if q.bits == 4 else None


def _part_matrix(rows: torch.Tensor, q: RowQuant, p: PartQuant, s: RowScratch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's part as float [C, D] in the scratch; returns it and the per-row scale [C] when
    the scale is folded into the vectors (whole-row groups; int4 then also keeps its offset 8)."""
    c, d = rows.shape[0], q.dim
    m = s.buf[:c]
    whole = q.group_size == d
    _codes_into(m, rows[:, p.codes_start : p.codes_end], q.bits, centred=not whole, nibble=s.nibble)
    sc = _scales(rows, p)
    if whole:
        return m, sc[:, 0]
    m.view(c, d // q.group_size, q.group_size).mul_(sc[:, :, None])
    return m, None


def _project(x: torch.Tensor, rows: torch.Tensor, q: RowQuant, part: str, s: RowScratch) -> torch.Tensor:
    """x [T, D] float32 . part rows -> [T, C]: the chunk's pre-activations."""
    m, scale = _part_matrix(rows, q, q.part(part), s)
    y = F.linear(x, m)
    if scale is None:
        return y
    if q.bits == 4:  # codes offset by 8: x.(c - 8) = x.c - 8 sum(x)
        y -= 8 * x.sum(dim=1, keepdim=True)
    return y * scale


def quant_project(x: torch.Tensor, rows: torch.Tensor, q: RowQuant, part: str, scratch: RowScratch) -> torch.Tensor:
    """x [T, D] . the `part` of quantized rows [R, row_bytes] -> [T, R] float32, `scratch.rows`
    rows dequantized at a time (the exact gate's up sketch: every neuron's x @ up, approximately)."""
    x = x.float()
    out = torch.empty(x.shape[0], rows.shape[0], dtype=torch.float32, device=x.device)
    for a in range(0, rows.shape[0], scratch.rows):
        b = min(rows.shape[0], a + scratch.rows)
        out[:, a:b] = _project(x, rows[a:b], q, part, scratch)
    return out


def quant_ffn_compute(h: torch.Tensor, rows: torch.Tensor, q: RowQuant, scratch: RowScratch,
                      b_up: torch.Tensor | None, b_gate: torch.Tensor | None, zero: torch.Tensor | None = None,
                      n_valid: int | None = None, act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                      gate_act: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """flashio.ffn.ffn_compute on quantized rows [R, row_bytes]: the same arguments and result
    (act_fn: the activation function itself), computed chunk by chunk (CHUNK_ROWS rows dequantized
    into `scratch`, then multiplied), so no more than one chunk is ever in floating point."""
    n = rows.shape[0] if n_valid is None else n_valid
    gated = any(p.name == "gate" for p in q.parts)
    act_fn = act_fn or (F.silu if gated else F.relu)
    x = h.float()
    y = torch.zeros(h.shape[0], q.dim, dtype=torch.float32, device=h.device)
    zero_mask = None
    if zero is not None and len(zero):
        zero_mask = torch.ones(n, dtype=torch.float32, device=h.device)
        zero_mask[zero] = 0
    for a in range(0, n, scratch.rows):
        b = min(n, a + scratch.rows)
        chunk = rows[a:b]
        act = _project(x, chunk, q, "up", scratch)  # [T, C]
        if b_up is not None:
            act += b_up[a:b].float()
        if gate_act is not None:
            act *= gate_act[:, a:b].float()
        elif gated:
            g = _project(x, chunk, q, "gate", scratch)
            if b_gate is not None:
                g += b_gate[a:b].float()
            act = act_fn(g) * act
        else:
            act = act_fn(act)
        if mask is not None:
            act *= mask[:, a:b].float()
        if zero_mask is not None:
            act *= zero_mask[a:b]
        m, scale = _part_matrix(chunk, q, q.part("down"), scratch)
        if scale is not None:
            act = act * scale
            if q.bits == 4:  # sum_r a_r (c_r - 8) = a.C - 8 sum(a)
                y -= 8 * act.sum(dim=1, keepdim=True)
        y.addmm_(act, m)
    return y.to(h.dtype)


@dataclass(frozen=True)
class QuantizedWeight:
    """A resident [out, in] matrix as int8 codes and per-output-channel scales; `linear` as F.linear."""

    codes: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * self.scale.element_size()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> [T, out]; on the CPU torch's weight-only int8 kernel (bf16 in, fastest
        measured), elsewhere the codes converted in x's dtype."""
        if x.device.type == "cpu":
            xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self.codes, self.scale.to(torch.bfloat16))
            y = y.view(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)
        return y if bias is None else y + bias


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for float or quantized resident weights."""
    return w.linear(x, b) if isinstance(w, QuantizedWeight) else F.linear(x, w, b)


def assemble_resident(resident: dict[str, torch.Tensor], scales: dict[str, str]) -> dict:
    """The resident dict with each quantized matrix (codes under its name, scale tensor named by
    `scales`, the manifest's record) replaced by a QuantizedWeight."""
    out = {k: v for k, v in resident.items() if k not in set(scales.values())}
    for name, scale_name in scales.items():
        out[name] = QuantizedWeight(resident[name], resident[scale_name])
    return out


def weight_bytes(w: torch.Tensor | QuantizedWeight) -> int:
    return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
