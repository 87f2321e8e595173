"""Quantized weights (format version 3): group-wise int8 (symmetric) / int4 (asymmetric) bundle
rows, resident matrices as int8 per output channel (QuantizedWeight) or int4 rows laid out as a
one-part bundle row (QuantizedRows), token embeddings as int8 rows in groups (QuantizedRows,
EMBEDDING_ROWS), and the matrix-vector products on them.

    spec = row_quant(("up", "down"), dim=4096, scheme="int4", group_size=4096)
    rows = quantize_rows(bundles, spec)                    # [N, parts*D] float -> [N, row_bytes] uint8
    y = quant_ffn_compute(h, rows[:n], spec, ...)          # as flashio.ffn.ffn_compute on float rows

A quantized bundle row keeps a neuron one read: for each part (up, gate, down) its codes and then
its fp16 scales (one per `group_size` elements), then zeros up to a multiple of ROW_ALIGN_BYTES
when the float row was one and the padding costs at most 1/16 of the row (O_DIRECT reads then land
straight in the window cache), else up to a multiple of 64 bytes (a cache line; the reader then
reads each run's block-aligned superset into scratch and copies the rows out). int8 rows with one
scale per part, the default, store no scale bytes (RowQuant.embedded): the part's fp16 scale is
the parities of its first 16 codes, each rounded to the nearest code of its parity (within one
step instead of half a step; GPTQ spreads the difference like any other error). At the OPT-6.7B
shape (4096 wide, up + down) int8 rows are then 8192 bytes, exactly half of fp16 (8196 -> 8704 with
the scales after the codes, as artifacts before, which still open), and int4 with one scale per
part 4100 -> 4160 bytes (0.254x; padding to 4608 would cost 12%). int4 codes hold
two elements per byte, the part's first half in the low nibbles and its second half in the high
ones (two contiguous unpacks instead of strided ones); they are stored offset by 8 (0..15 for
-8..7; the quantizer uses -7..7, symmetric).

int4 rows are asymmetric by default (RowQuant.offsets, manifest "offsets": true): each group also
stores an fp16 offset after the part's scales, element = code * scale + offset with codes 0..15,
the range [min, max] of the group trimmed at each end where that lowers the squared error (as
llama.cpp's Q4_1 / Q4_K groups). On Gemma 3 270M's FFN rows (groups of 32, held-out perplexity,
round to nearest) symmetric int4 was +27%, asymmetric +13.5% (tests/bench/quant_ppl.py; GPTQ,
flashio.gptq, with importance-weighted ranges: +1.93%). Rows written before have no offsets and still open (symmetric).

Two-level scales (RowQuant.sub_bits, `--two-level-scales`; asymmetric int4 where d_model is a
multiple of 128): a part's scales are 6-bit multiples of an fp16 step per super-block of 256 (or
128) elements and its offsets likewise of a second step, as llama.cpp's Q4_K: 4.5 bits per
weight against 5 (OPT-6.7B rows 4608 bytes, aligned, against 5120). scale = step * multiple,
exact in float32; the kernels decode a row's into float32 before its codes (rows.c qdecode).

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from flashio import kernels
from flashio.errors import FlashError, FormatError
from flashio.kernels import QuantLayout

if TYPE_CHECKING:
    from flashio.format.manifest import ResidentQuant

SCHEMES = {"int8": 8, "int4": 4}  # scheme -> bits per element
ASYMMETRIC = {"int8": False, "int4": True}  # a scheme's default: int4 groups keep an offset (see below)
INT4_GROUP = 32  # int4's default elements per scale (see default_group_size), as llama.cpp's blocks
OFFSET_SEARCH = 4  # asymmetric groups: each end of the [min, max] range trimmed by 0..3 steps of 3% (MSE)
# two-level scales (RowQuant.sub_bits, as llama.cpp's Q4_K): each group's scale and offset are 6-bit
# multiples of an fp16 scale and an fp16 offset step shared by the groups of a super-block
SUB_BITS = 6
SUB_MAX = (1 << SUB_BITS) - 1
SUPER_SIZES = (256, 128)  # elements per super-block: the first that divides d_model
# scales in the codes (RowQuant.embedded): a symmetric int8 part's one fp16 scale held in the least
# significant bits of its first 16 codes, bit k of the scale in code k (see embedded_codes)
EMBED_CODES = 16
RESIDENT_SCHEMES = ("int8", "int4")  # int8 per output channel; int4 in groups along the input, as bundle rows
SCALE_DTYPE = "float16"
ROW_ALIGN_BYTES = 512  # O_DIRECT's block: float rows that were a multiple stay one where it is cheap
MAX_PAD_FRACTION = 1 / 16  # ... i.e. where the padding adds at most this much to the row
MIN_ALIGN_BYTES = 64
CHUNK_ROWS = 256  # rows dequantized at once: an fp32 scratch of 4 MiB at 4096 wide (fastest measured)
# the resident matrices quantized by --quantize-resident int8|int4: attention, the head, resident gate
# rows and the token embeddings. Position embeddings stay in float.
RESIDENT_QUANTIZED = re.compile(r"(^lm_head\.weight$)|(^tok_embeddings\.weight$)|(\.attn\.[qkvo]\.weight$)|(\.ffn\.gate$)")
# The token embeddings, in either scheme: int8 rows in groups of EMBEDDING_GROUP along d_model (as llama.cpp's
# Q8_0 blocks; embedding_row_quant): a token's row is dequantized when it is looked up (`embedding`) and
# a tied head multiplies by the same rows. Gemma 3 270M (tied head; held-out perplexity, top-1, mean KL
# against float embeddings, README "Quantized artifacts"): int8 with one scale per row moved its outputs
# 2.6x as much (KL 9.1e-3 against 3.4e-3 from the rest), int4 in groups of 32 30x (+7.6% perplexity);
# groups of 32 added nothing there (its GGUF source holds them as Q8_0: on its grid), of 64 KL 3.7e-3.
EMBEDDING_ROWS = "tok_embeddings.weight"
EMBEDDING_GROUP = 32


@dataclass(frozen=True)
class PartQuant:
    """Where one part's codes and scales lie in a quantized row, in bytes."""

    name: str
    codes_start: int
    codes_end: int
    scales_start: int
    scales_end: int
    offsets_start: int = 0  # asymmetric rows (RowQuant.offsets): one fp16 offset per group
    offsets_end: int = 0


@dataclass(frozen=True)
class RowQuant:
    """How a layer's bundle rows are quantized (the manifest's per-layer record)."""

    scheme: str  # "int8" | "int4"
    group_size: int  # elements sharing one scale, along d_model; dim = one scale per part
    scale_dtype: str
    row_bytes: int  # stored width of a row (padding included)
    parts: tuple[PartQuant, ...]
    offsets: bool = False  # asymmetric: element = code * scale + offset, codes 0..2^bits-1 (int4 rows)
    # two-level scales: 0, fp16 scales (and offsets) per group; SUB_BITS, per super-block of
    # super_size elements an fp16 step d (and dmin), per group a SUB_BITS-bit multiple of it
    # (scale = d * sc, offset = -dmin * m, exact in float32): the part's "scales" bytes are the super-blocks'
    # d then the groups' sc packed four in three bytes, its "offsets" bytes likewise dmin and m
    sub_bits: int = 0
    super_size: int = 0
    # scales in the codes (manifest "scales_in_codes"): symmetric int8 rows with one scale per part store
    # no scale bytes; the part's fp16 scale is the parity of its first EMBED_CODES codes (bit k in code k),
    # which the quantizer rounds to the nearest code of that parity: a row is exactly the codes' bytes
    embedded: bool = False

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    @property
    def dim(self) -> int:
        p = self.parts[0]
        return (p.codes_end - p.codes_start) * 8 // self.bits

    @property
    def n_groups(self) -> int:
        return self.dim // self.group_size

    @property
    def n_super(self) -> int:
        return self.dim // self.super_size if self.sub_bits else 0

    @property
    def scale_bytes(self) -> int:
        """Bytes of one part's scales (and of its offsets, when it has them); 0 when in the codes."""
        return 0 if self.embedded else scale_block_bytes(self.dim, self.group_size, self.sub_bits, self.super_size)

    def part(self, name: str) -> PartQuant:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    def layout(self, name: str) -> QuantLayout:
        """Part `name` as flashio.kernels takes it."""
        p = self.part(name)
        return QuantLayout(self.row_bytes, self.dim, self.bits, self.group_size, p.codes_start,
                           -1 if self.embedded else p.scales_start, p.offsets_start if self.offsets else -1,
                           self.super_size if self.sub_bits else 0)

    def to_json(self) -> dict:
        d = {"scheme": self.scheme, "group_size": self.group_size, "scale_dtype": self.scale_dtype,
             "row_bytes": self.row_bytes,
             "parts": [[p.name, p.codes_start, p.codes_end, p.scales_start, p.scales_end]
                       + ([p.offsets_start, p.offsets_end] if self.offsets else []) for p in self.parts]}
        if self.sub_bits:
            d.update(sub_bits=self.sub_bits, super_size=self.super_size)
        if self.embedded:
            d.update(scales_in_codes=True)
        return {**d, "offsets": True} if self.offsets else d


def scale_block_bytes(dim: int, group: int, sub_bits: int = 0, super_size: int = 0) -> int:
    """Bytes of one part's scales: an fp16 per group, or (sub_bits) an fp16 per super-block and
    the groups' 6-bit multiples packed four in three bytes, padded to an even length."""
    if not sub_bits:
        return dim // group * 2
    packed = dim // group * SUB_BITS // 8
    return dim // super_size * 2 + packed + packed % 2


def default_super_size(dim: int, group: int) -> int:
    """The super-block of two-level scales for rows of `dim` in groups of `group`: the first of
    SUPER_SIZES that divides dim and holds a multiple of 4 groups (the packing's unit: four 6-bit
    values in three bytes, which the kernels decode with one step); 0 when none does."""
    if (dim // group) % 4 or dim % group:
        return 0
    return next((s for s in SUPER_SIZES if dim % s == 0 and s % group == 0 and (s // group) % 4 == 0), 0)


def check_scheme(scheme: str, *, where: str = "quantize") -> int:
    """Bits per element of `scheme`; FlashError naming the known ones otherwise."""
    if scheme not in SCHEMES:
        raise FlashError(f"{where}: quantization scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def default_group_size(scheme: str, dim: int) -> int:
    """int8: the whole row part (one scale); int4: INT4_GROUP where it divides d_model, else the
    whole part. Measured on Gemma 3 270M (GPTQ, held-out perplexity, README "Quantized artifacts"):
    int8 one scale per part +0.05%; int4 groups of 32 +1.93%, of 128 +7.4% (one scale per part was
    +29% before the weighted ranges)."""
    return INT4_GROUP if scheme == "int4" and dim % INT4_GROUP == 0 else dim


def embeddable(scheme: str, dim: int, group: int, offsets: bool) -> bool:
    """Whether a part's scale can live in its codes (RowQuant.embedded): symmetric int8, one scale
    per part of at least EMBED_CODES elements."""
    return scheme == "int8" and not offsets and group == dim >= EMBED_CODES


def row_quant(parts: tuple[str, ...], *, dim: int, scheme: str, group_size: int | None = None,
              float_itemsize: int = 2, aligned: bool = True, offsets: bool | None = None,
              two_level: bool = False, embed_scales: bool | None = None) -> RowQuant:
    """The row layout for `parts` of `dim` elements each; padded to ROW_ALIGN_BYTES when the
    float row (`float_itemsize` bytes per element) was a multiple of it and that adds at most
    MAX_PAD_FRACTION, else to MIN_ALIGN_BYTES (see the module docstring). aligned=False: rows that
    are never read from flash (the resident up sketch), padded to an even length only.
    offsets: asymmetric groups (a scale and an offset each); None: int4 asymmetric, int8 symmetric
    (see ASYMMETRIC). two_level: asymmetric int4 only, scales and offsets as 6-bit multiples of a
    super-block's fp16 steps (RowQuant.sub_bits; needs dim a multiple of 128 and of 4 groups).
    embed_scales: the scales in the codes (RowQuant.embedded; symmetric int8 with one scale per
    part); None: wherever that applies to rows read from flash (aligned), which are then exactly
    the codes' bytes (OPT-6.7B int8: 8192, half of fp16, against 8704 with the scales after them)."""
    bits = check_scheme(scheme)
    offsets = ASYMMETRIC[scheme] if offsets is None else bool(offsets)
    g = default_group_size(scheme, dim) if group_size is None else int(group_size)
    if g <= 0 or dim % g or (bits == 4 and (dim % 2 or g % 2)):
        raise FlashError(f"group size {group_size} must be a positive divisor of d_model {dim}"
                         + (" (and even, with an even d_model, for int4)" if bits == 4 else ""))
    sub_bits = super_size = 0
    if two_level:
        super_size = default_super_size(dim, g)
        if bits != 4 or not offsets or not super_size:
            raise FlashError(f"two-level scales are for asymmetric int4 rows whose d_model ({dim}) is a multiple of "
                             f"{min(SUPER_SIZES)} and of 4 groups of {g}")
        sub_bits = SUB_BITS
    can_embed = embeddable(scheme, dim, g, offsets)
    embedded = can_embed and aligned if embed_scales is None else bool(embed_scales)
    if embedded and not can_embed:
        raise FlashError(f"scales in the codes are for symmetric int8 rows with one scale per part of at least "
                         f"{EMBED_CODES} elements (got {scheme}, groups of {g} in {dim}, offsets {offsets})")
    code_bytes = dim * bits // 8
    scale_bytes = 0 if embedded else scale_block_bytes(dim, g, sub_bits, super_size)
    out, pos = [], 0
    for name in parts:
        s_end = pos + code_bytes + scale_bytes
        o_end = s_end + scale_bytes if offsets else 0
        out.append(PartQuant(name, pos, pos + code_bytes, pos + code_bytes, s_end, s_end if offsets else 0, o_end))
        pos = o_end or s_end
    block = -(-pos // ROW_ALIGN_BYTES) * ROW_ALIGN_BYTES
    if not aligned:
        pos += pos % 2
    elif (len(parts) * dim * float_itemsize) % ROW_ALIGN_BYTES == 0 and block - pos <= pos * MAX_PAD_FRACTION:
        pos = block
    else:
        pos = -(-pos // MIN_ALIGN_BYTES) * MIN_ALIGN_BYTES
    return RowQuant(scheme, g, SCALE_DTYPE, pos, tuple(out), offsets, sub_bits, super_size, embedded)


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
    if q.sub_bits and (q.sub_bits != SUB_BITS or bits != 4 or not q.offsets
                       or q.super_size != default_super_size(dim, g)):
        raise FormatError(f"{where}: two-level scales (sub_bits {q.sub_bits}, super_size {q.super_size}) are "
                          f"{SUB_BITS}-bit, for asymmetric int4 rows, in super-blocks of "
                          f"{default_super_size(dim, g) or 'none'} for d_model {dim} in groups of {g}")
    if not q.sub_bits and q.super_size:
        raise FormatError(f"{where}: super_size {q.super_size} without sub_bits")
    if q.embedded and not embeddable(q.scheme, dim, g, q.offsets):
        raise FormatError(f"{where}: scales_in_codes is for symmetric int8 rows with one scale per part of at least "
                          f"{EMBED_CODES} elements ({q.scheme}, groups of {g} in {dim}, offsets {q.offsets})")
    nb = q.scale_bytes
    what = (f"{q.n_super} super-blocks' and {dim // g} groups' scales" if q.sub_bits else
            "its scale in the codes" if q.embedded else f"{dim // g} {SCALE_DTYPE} scales")
    end = 0
    for p in q.parts:
        if (p.codes_start < end or p.codes_end - p.codes_start != dim * bits // 8 or p.scales_start < p.codes_end
                or p.scales_end - p.scales_start != nb or p.scales_start % 2):
            raise FormatError(f"{where}: part {p.name!r} codes [{p.codes_start}, {p.codes_end}) scales "
                              f"[{p.scales_start}, {p.scales_end}) do not hold {dim} {q.scheme} codes and "
                              f"{what} after the previous part")
        end = p.scales_end
        if q.offsets:
            if p.offsets_start < end or p.offsets_end - p.offsets_start != nb or p.offsets_start % 2:
                raise FormatError(f"{where}: part {p.name!r} offsets [{p.offsets_start}, {p.offsets_end}) do not "
                                  f"hold {nb} bytes of offsets after its scales")
            end = p.offsets_end
        elif p.offsets_start or p.offsets_end:
            raise FormatError(f"{where}: part {p.name!r} has offsets but the record's 'offsets' is not true")
    if end > q.row_bytes or q.row_bytes % 2:
        raise FormatError(f"{where}: row_bytes {q.row_bytes} is odd or shorter than its parts ({end} bytes)")


# -- quantizing (the writer) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupCodes:
    """One part of N rows quantized: codes [N, D] (symmetric: -qmax..qmax; asymmetric: 0..2^bits-1),
    fp16 scales [N, D/g] and, asymmetric, fp16 offsets [N, D/g] (element = code * scale + offset;
    two-level: float32, exactly the step times its 6-bit multiple).
    What quantize_rows stores; made by quantize_groups (round to nearest) or flashio.gptq."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None
    # two-level scales: the super-blocks' fp16 steps (d [N, D/S], dmin [N, D/S]) of which scales and
    # -offsets are 6-bit multiples (see RowQuant.sub_bits)
    supers: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getitem__(self, index) -> GroupCodes:  # rows, e.g. a neuron order
        return GroupCodes(self.codes[index], self.scales[index],
                          None if self.offsets is None else self.offsets[index],
                          None if self.supers is None else (self.supers[0][index], self.supers[1][index]))


def group_params(wg: torch.Tensor, bits: int, offsets: bool, importance: torch.Tensor | None = None,
                 grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and offsets) [..., 1], rounded to fp16 but as float32, for groups wg [..., g].
    Symmetric: absmax / qmax. Asymmetric: the [min, max] range over 2^bits - 1 steps, each end
    trimmed by the fraction (0, 3, 6 or 9%) of the range that gives the smallest squared error,
    each element's error weighted by `importance` (broadcast to wg; e.g. GPTQ's per-input weight).
    grid (asymmetric): the super-block's steps (d, dmin) [..., 1] of two-level scales: each
    candidate's scale is rounded to d * sc, sc in 1..63, and its offset to -dmin * m, m in 0..63
    (a group whose minimum is above 0 starts its range at 0)."""
    if not offsets:  # fp16 subnormals kept: a group of small weights keeps its own scale
        scale = (wg.abs().amax(dim=-1, keepdim=True) / ((1 << (bits - 1)) - 1)).half().float()
        return scale, None
    qm = (1 << bits) - 1
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    span = hi - lo
    tiny = 2.0 ** -24  # fp16's smallest subnormal: small groups keep a scale of their own size
    best = None
    if grid is not None:
        lo = lo.clamp_max(0)
        span = hi.clamp_min(0) - lo
    for a in range(OFFSET_SEARCH):
        for b in range(OFFSET_SEARCH):
            low = lo + 0.03 * a * span
            s = ((hi - 0.03 * b * span - low) / qm).clamp_min(tiny)
            if grid is None:
                s, z = s.half().float(), low.half().float()
            else:
                s, z = on_grid(s, low, *grid)
            err = (torch.round((wg - z) / s.clamp_min(tiny)).clamp_(0, qm) * s + z - wg).square_()
            err = (err if importance is None else err * importance).sum(dim=-1, keepdim=True)
            if best is None:
                best = [err, s, z]
            else:
                better = err < best[0]
                best = [torch.where(better, e, old) for e, old in zip((err, s, z), best)]
    return best[1], best[2]


def on_grid(scale: torch.Tensor, offset: torch.Tensor, d: torch.Tensor,
            dmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level scales: `scale` as d * sc, sc = round(scale / d) in 1..63 (0 where d is 0), and
    `offset` as -dmin * m, m = round(-offset / dmin) in 0..63; float32, exact (an fp16 step times
    a 6-bit integer needs 17 of float32's 24 bits)."""
    sc = torch.where(d > 0, torch.round(scale / torch.where(d > 0, d, 1)).clamp(1, SUB_MAX), 0)
    m = torch.where(dmin > 0, torch.round(-offset / torch.where(dmin > 0, dmin, 1)).clamp(0, SUB_MAX), 0)
    return d * sc, -(dmin * m)


def super_steps(ws: torch.Tensor, bits: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 steps (d, dmin) [..., 1, 1] (as float32) of super-blocks ws [..., groups, g]: the
    largest of its groups' own scales and -offsets (group_params, offsets at most 0) over 63."""
    scale, offset = group_params(ws, bits, True, importance)
    d = (scale.amax(dim=-2, keepdim=True) / SUB_MAX).half().float()
    dmin = ((-offset).clamp_min(0).amax(dim=-2, keepdim=True) / SUB_MAX).half().float()
    return d, dmin


def group_codes(wg: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of wg [..., g] for group_params' scale and offset (int16: 0..255 fits): divided by
    exactly the scale stored, so that codes x scale (+ offset) is what the runtime computes (a
    scale of 0, an all-zero group, gives codes 0)."""
    s = torch.where(scale > 0, scale, torch.ones_like(scale))
    if offset is None:
        qmax = (1 << (bits - 1)) - 1
        return torch.round(wg / s).clamp_(-qmax, qmax).to(torch.int16)
    return torch.round((wg - offset) / s).clamp_(0, (1 << bits) - 1).to(torch.int16)


def scale_parities(scale: torch.Tensor) -> torch.Tensor:
    """[N] (or [N, 1]) scales -> [N, EMBED_CODES] int16: bit k of each one's fp16 pattern, the
    parity code k carries (RowQuant.embedded)."""
    b = scale.reshape(-1).half().view(torch.int16).to(torch.int32)
    return ((b[:, None] >> torch.arange(EMBED_CODES, device=b.device)) & 1).to(torch.int16)


def embedded_codes(w: torch.Tensor, scale: torch.Tensor, parity: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes of w [N, k] for scale [N, 1], each the nearest of the given parity
    [N, k] (0 or 1): at most one step from the weight instead of half a step."""
    s = torch.where(scale > 0, scale, torch.ones_like(scale))
    par = parity.to(torch.float32)
    hi = 127.0 - (1.0 - par)  # the largest code of that parity (127 odd, 126 even)
    c = 2.0 * torch.round((w.float() / s - par) / 2.0) + par
    return torch.minimum(torch.maximum(c, -hi), hi).to(torch.int16)


def embedded_scale(codes: torch.Tensor) -> torch.Tensor:
    """[R, 1] float32: the fp16 scale a part's codes (uint8 bytes [R, >= EMBED_CODES]) carry in
    the parities of their first EMBED_CODES."""
    bits = (codes[:, :EMBED_CODES] & 1).to(torch.int32)
    v = (bits << torch.arange(EMBED_CODES, device=codes.device, dtype=torch.int32)).sum(dim=1, keepdim=True)
    v = torch.where(v >= 1 << 15, v - (1 << 16), v)  # the fp16 pattern as int16
    return v.to(torch.int16).view(torch.float16).float()


def quantize_groups(w: torch.Tensor, bits: int, g: int, offsets: bool = False, super_size: int = 0,
                    embedded: bool = False) -> GroupCodes:
    """w: [N, D] rounded to nearest in groups of g along D (super_size: two-level scales in
    super-blocks of that many elements, asymmetric int4; embedded: the scale in the parities of the
    first codes, RowQuant.embedded)."""
    n, d = w.shape
    if super_size:
        ws = w.float().view(n, d // super_size, super_size // g, g)
        steps = super_steps(ws, bits)
        scale, offset = group_params(ws, bits, True, grid=steps)
        codes = group_codes(ws, scale, offset, bits).view(n, d)
        return GroupCodes(codes, scale.reshape(n, -1), offset.reshape(n, -1),
                          (steps[0].reshape(n, -1).half(), steps[1].reshape(n, -1).half()))
    wg = w.float().view(n, d // g, g)
    scale, offset = group_params(wg, bits, offsets)
    codes = group_codes(wg, scale, offset, bits).view(n, d)
    if embedded:
        codes[:, :EMBED_CODES] = embedded_codes(w[:, :EMBED_CODES], scale.view(n, 1), scale_parities(scale))
    return GroupCodes(codes, scale[..., 0].half(), None if offset is None else offset[..., 0].half())


def _pack_sub(v: torch.Tensor) -> torch.Tensor:
    """[N, G] integers 0..63 (G % 4 == 0) -> [N, 3G/4] uint8: four 6-bit values in three bytes,
    little-endian (value j of a four at bits 6j..6j+5)."""
    n, g = v.shape
    w = v.to(torch.int32).view(n, g // 4, 4)
    word = w[..., 0] | (w[..., 1] << 6) | (w[..., 2] << 12) | (w[..., 3] << 18)
    return torch.stack([word & 255, (word >> 8) & 255, word >> 16], dim=-1).to(torch.uint8).view(n, g // 4 * 3)


def _unpack_sub(b: torch.Tensor, groups: int) -> torch.Tensor:
    """_pack_sub's inverse: [N, >= 3G/4] uint8 -> [N, G] float32."""
    n = b.shape[0]
    t = b[:, : groups // 4 * 3].to(torch.int32).view(n, groups // 4, 3)
    word = t[..., 0] | (t[..., 1] << 8) | (t[..., 2] << 16)
    return torch.stack([(word >> (6 * j)) & SUB_MAX for j in range(4)], dim=-1).view(n, groups).float()


def _sub_indices(values: torch.Tensor, step: torch.Tensor, q: RowQuant, name: str) -> torch.Tensor:
    """The 6-bit multiples of `step` [N, S] that two-level `values` [N, G] (scales, or -offsets)
    were rounded to; FlashError unless step * index gives the values back exactly."""
    per = q.super_size // q.group_size
    st = step.float().repeat_interleave(per, dim=1)
    idx = torch.where(st > 0, torch.round(values.float() / torch.where(st > 0, st, 1)), 0).clamp(0, SUB_MAX)
    if not torch.equal(st * idx, values.float()):
        raise FlashError(f"{name}: the two-level values are not 6-bit multiples of their super-blocks' steps")
    return idx.to(torch.int32)


def quantize_rows(bundles: torch.Tensor, q: RowQuant, groups: dict[str, GroupCodes] | None = None) -> torch.Tensor:
    """bundles: [N, parts*D] float (parts in q's order) -> [N, row_bytes] uint8. groups: parts
    already quantized (e.g. by flashio.gptq, rows in the bundles' order); the others are rounded
    to nearest here."""
    n, d = bundles.shape[0], q.dim
    out = torch.zeros(n, q.row_bytes, dtype=torch.uint8)
    for k, p in enumerate(q.parts):
        gc = (groups or {}).get(p.name) or quantize_groups(bundles[:, k * d : (k + 1) * d], q.bits, q.group_size,
                                                           q.offsets, q.super_size, q.embedded)
        if gc.codes.shape != (n, d) or (gc.offsets is not None) != q.offsets:
            raise FlashError(f"part {p.name!r}: codes {tuple(gc.codes.shape)} (offsets {gc.offsets is not None}) "
                             f"for rows of {n} x {d} (offsets {q.offsets})")
        if q.embedded and not torch.equal(gc.codes[:, :EMBED_CODES] & 1, scale_parities(gc.scales)):
            raise FlashError(f"part {p.name!r}: the codes do not carry their scales (rows with the scales in the "
                             "codes need codes quantized for them: quantize_groups or flashio.gptq with embedded)")
        codes = gc.codes
        if q.sub_bits:
            _store_two_level(out, p, q, gc)
        if q.bits == 4:
            u = (codes if q.offsets else codes + 8).to(torch.uint8)
            packed = u[:, : d // 2] | (u[:, d // 2 :] << 4)
        else:
            packed = codes.to(torch.uint8) if q.offsets else codes.to(torch.int8).view(torch.uint8)
        out[:, p.codes_start : p.codes_end] = packed
        if not q.sub_bits and not q.embedded:
            out[:, p.scales_start : p.scales_end] = gc.scales.half().contiguous().view(torch.uint8)
            if q.offsets:
                out[:, p.offsets_start : p.offsets_end] = gc.offsets.half().contiguous().view(torch.uint8)
    return out


def _store_two_level(out: torch.Tensor, p: PartQuant, q: RowQuant, gc: GroupCodes) -> None:
    """Part p's two-level scales and offsets into rows `out` (RowQuant.sub_bits)."""
    if gc.supers is None:
        raise FlashError(f"part {p.name!r}: rows with two-level scales need the codes' super-block steps")
    ns, ng = q.n_super, q.n_groups
    for start, step, values in ((p.scales_start, gc.supers[0], gc.scales), (p.offsets_start, gc.supers[1], -gc.offsets.float())):
        out[:, start : start + 2 * ns] = step.half().contiguous().view(torch.uint8)
        out[:, start + 2 * ns : start + 2 * ns + ng * SUB_BITS // 8] = _pack_sub(_sub_indices(values, step, q, p.name))


def dequantize_rows(rows: torch.Tensor, q: RowQuant, part: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The `part` of quantized rows [R, row_bytes] as float32 [R, D] (or into `out`)."""
    p, d, r = q.part(part), q.dim, rows.shape[0]
    out = torch.empty(r, d, dtype=torch.float32, device=rows.device) if out is None else out
    _codes_into(out, rows[:, p.codes_start : p.codes_end], q, centred=True)
    _apply_groups(out, rows, q, p)
    return out


def quantize_resident(w: torch.Tensor, gc: GroupCodes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, in] matrix -> int8 codes [out, in] and fp16 scales [out] (per output channel);
    gc: its codes already solved (GPTQ), else rounded to nearest."""
    gc = quantize_groups(w, 8, w.shape[1]) if gc is None else gc
    return gc.codes.to(torch.int8), gc.scales[:, 0].contiguous()


def resident_row_quant(in_features: int, two_level: bool = False) -> RowQuant:
    """The row layout of an int4 resident matrix: one part ("w") of its input width, int4's
    default groups (32 where they divide it) with offsets, as the FFN's bundle rows (two_level:
    their two-level scales, where the width allows them); padded to an even length only (the rows
    are never read from flash)."""
    two_level = two_level and bool(default_super_size(in_features, default_group_size("int4", in_features)))
    return row_quant(("w",), dim=in_features, scheme="int4", aligned=False, two_level=two_level)


def embedding_row_quant(dim: int) -> RowQuant:
    """The row layout of quantized token embeddings (EMBEDDING_ROWS): symmetric int8 in groups of
    EMBEDDING_GROUP (one per row where that does not divide d_model), fp16 scales after the codes."""
    g = EMBEDDING_GROUP if dim % EMBEDDING_GROUP == 0 else dim
    return row_quant(("w",), dim=dim, scheme="int8", group_size=g, aligned=False, offsets=False, embed_scales=False)


def quantize_resident_rows(w: torch.Tensor, two_level: bool = False,
                           gc: GroupCodes | None = None) -> tuple[torch.Tensor, RowQuant]:
    """A [out, in] matrix -> int4 rows [out, row_bytes] uint8 and their layout; gc: its codes
    already solved (GPTQ), else rounded to nearest."""
    return _resident_rows(w, resident_row_quant(w.shape[1], two_level), gc)


def quantize_embedding_rows(w: torch.Tensor, gc: GroupCodes | None = None) -> tuple[torch.Tensor, RowQuant]:
    """Token embeddings [V, D] -> int8 rows [V, row_bytes] uint8 (embedding_row_quant) and their layout."""
    return _resident_rows(w, embedding_row_quant(w.shape[1]), gc)


def _resident_rows(w: torch.Tensor, q: RowQuant, gc: GroupCodes | None) -> tuple[torch.Tensor, RowQuant]:
    return quantize_rows(w, q, None if gc is None else {"w": gc}), q


# -- computing (the runtime) ---------------------------------------------------------------------------

def _scales(rows: torch.Tensor, p: PartQuant, q: RowQuant) -> torch.Tensor:
    """[R, groups] float32 scales of part p (an fp16 view of the row bytes; two-level: decoded)."""
    if q.sub_bits:
        return _two_level(rows, p.scales_start, q)
    if q.embedded:
        return embedded_scale(rows[:, p.codes_start : p.codes_start + EMBED_CODES])
    return rows[:, p.scales_start : p.scales_end].view(torch.float16).float()


def _offsets(rows: torch.Tensor, p: PartQuant, q: RowQuant) -> torch.Tensor:
    """[R, groups] float32 offsets of part p (asymmetric rows)."""
    if q.sub_bits:
        return -_two_level(rows, p.offsets_start, q)
    return rows[:, p.offsets_start : p.offsets_end].view(torch.float16).float()


def _two_level(rows: torch.Tensor, start: int, q: RowQuant) -> torch.Tensor:
    """[R, groups] float32: step * index of the two-level block at `start` of each row."""
    ns = q.n_super
    step = rows[:, start : start + 2 * ns].view(torch.float16).float()
    idx = _unpack_sub(rows[:, start + 2 * ns :], q.n_groups)
    return step.repeat_interleave(q.super_size // q.group_size, dim=1) * idx


def _apply_groups(m: torch.Tensor, rows: torch.Tensor, q: RowQuant, p: PartQuant) -> None:
    """m [R, D] codes (centred when symmetric) -> values: times each group's scale (+ its offset)."""
    r, d = m.shape
    mg = m.view(r, d // q.group_size, q.group_size)
    mg.mul_(_scales(rows, p, q)[:, :, None])
    if q.offsets:
        mg.add_(_offsets(rows, p, q)[:, :, None])


def _codes_into(dst: torch.Tensor, codes: torch.Tensor, q: RowQuant, *, centred: bool,
                nibble: torch.Tensor | None = None) -> None:
    """dst [R, D] float = the codes (symmetric int4: centred=False leaves them offset by 8;
    asymmetric codes are never centred)."""
    if q.bits == 8:
        dst.copy_(codes if q.offsets else codes.view(torch.int8))
        return
    half = dst.shape[1] // 2
    nib = torch.empty_like(codes) if nibble is None else nibble[: codes.shape[0]]
    torch.bitwise_and(codes, 15, out=nib)
    dst[:, :half].copy_(nib)
    torch.bitwise_right_shift(codes, 4, out=nib)
    dst[:, half:].copy_(nib)
    if centred and not q.offsets:
        dst.sub_(8)


class RowScratch:
    """The reusable fp32 scratch of one engine's quantized products (no allocation per step)."""

    def __init__(self, q: RowQuant, device: torch.device | str = "cpu", rows: int = CHUNK_ROWS):
        self.rows = rows
        self.buf = torch.empty(rows, q.dim, dtype=torch.float32, device=device)
        self.nibble = torch.empty(rows, q.dim // 2, dtype=torch.uint8, device=device) if q.bits == 4 else None


def _part_matrix(rows: torch.Tensor, q: RowQuant, p: PartQuant,
                 s: RowScratch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk's part as float [C, D] in the scratch. Whole-row groups keep the raw codes and
    return the per-row scale and offset [C] to fold into the vectors (element = code * scale +
    offset; symmetric int4 codes keep their +8, so offset = -8 * scale; int8: no offset); smaller
    groups return the values and None, None."""
    c, d = rows.shape[0], q.dim
    m = s.buf[:c]
    whole = q.group_size == d
    _codes_into(m, rows[:, p.codes_start : p.codes_end], q, centred=not whole, nibble=s.nibble)
    if not whole:
        _apply_groups(m, rows, q, p)
        return m, None, None
    scale = _scales(rows, p, q)[:, 0]
    if q.offsets:
        return m, scale, _offsets(rows, p, q)[:, 0]
    return m, scale, (-8 * scale if q.bits == 4 else None)


def _project(x: torch.Tensor, rows: torch.Tensor, q: RowQuant, part: str, s: RowScratch) -> torch.Tensor:
    """x [T, D] float32 . part rows -> [T, C]: the chunk's pre-activations."""
    m, scale, offset = _part_matrix(rows, q, q.part(part), s)
    y = F.linear(x, m)
    if scale is None:
        return y
    y *= scale
    if offset is not None:  # x.(c s + o) = s x.c + o sum(x)
        y += x.sum(dim=1, keepdim=True) * offset
    return y


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
    if h.shape[0] == 1 and rows.device.type == "cpu" and kernels.available():
        return _one_token(h, rows, q, b_up, b_gate, zero, n, act_fn, gated, gate_act, mask)
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
        m, scale, offset = _part_matrix(chunk, q, q.part("down"), scratch)
        if scale is not None:
            if offset is not None:  # sum_r a_r (c_r s_r + o_r) = (a s).C + a.o
                y += act @ offset[:, None]
            act = act * scale
        y.addmm_(act, m)
    return y.to(h.dtype)


def _one_token(h: torch.Tensor, rows: torch.Tensor, q: RowQuant, b_up: torch.Tensor | None,
               b_gate: torch.Tensor | None, zero: torch.Tensor | None, n: int, act_fn, gated: bool,
               gate_act: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """quant_ffn_compute for one token on the CPU through flashio.kernels: each row's codes are
    widened as they are read (nothing dequantized into a scratch), the n valid rows only; rows that
    a mask or `zero` drops are not read, and the down product skips rows whose activation is zero."""
    k = kernels.kernels()
    x = h[0].to(torch.float32)
    keep = None if mask is None else mask[0].float()
    if zero is not None and len(zero):
        keep = (torch.ones(n) if keep is None else keep.clone()).index_fill_(0, zero[zero < n], 0)
    act = k.qdot(rows, q.layout("up"), x, n, mask=keep)
    if b_up is not None:
        act += b_up.float()
    if gate_act is not None:
        act.mul_(gate_act[0].float())
    elif gated:
        g = k.qdot(rows, q.layout("gate"), x, n, mask=keep)
        if b_gate is not None:
            g += b_gate.float()
        act = act_fn(g).mul_(act)
    else:
        act = act_fn(act)
    if keep is not None:
        act.mul_(keep)
    return k.qaxpy(rows, q.layout("down"), act, n).to(h.dtype).unsqueeze(0)


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
        if x.device.type == "cpu" and x.numel() == x.shape[-1] and self.scale.dtype == torch.float16 and kernels.available():
            # one token: flashio.kernels, float32 input (torch's kernel below takes bf16) and a little
            # faster: 4096 x 4096 in 1.30 ms against 1.41 (torch int8) and 1.83 (fp16 F.linear)
            y = kernels.kernels().i8_matvec(self.codes, self.scale, x.reshape(-1)).view(*x.shape[:-1], -1).to(x.dtype)
        elif x.device.type == "cpu":
            xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self.codes, self.scale.to(torch.bfloat16))
            y = y.view(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)
        return y if bias is None else y + bias


@dataclass(frozen=True)
class QuantizedRows:
    """A resident [out, in] matrix as int4 rows (codes, scales and offsets per group of the input,
    laid out by `q`, one part "w"); `linear` as F.linear, the codes dequantized a chunk at a time
    (one token on the CPU: flashio.kernels' integer dot products, nothing dequantized)."""

    rows: torch.Tensor  # [out, row_bytes] uint8
    q: RowQuant

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows.shape[0], self.q.dim))

    @property
    def nbytes(self) -> int:
        return self.rows.numel()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the matrix in float32 (an embedding lookup)."""
        flat = ids.reshape(-1)
        return dequantize_rows(self.rows[flat], self.q, "w").view(*ids.shape, self.q.dim)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        if x.device.type == "cpu" and x.numel() == x.shape[-1] and kernels.available():
            y = kernels.kernels().qdot(self.rows, self.q.layout("w"), x.reshape(-1)).view(*x.shape[:-1], -1)
        else:
            x2 = x.reshape(-1, x.shape[-1])
            y = quant_project(x2, self.rows, self.q, "w", RowScratch(self.q, x.device)).view(*x.shape[:-1], -1)
        y = y.to(x.dtype)
        return y if bias is None else y + bias


# float dtypes whose one-token product goes through flashio.kernels rather than F.linear
KERNEL_LINEAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight | QuantizedRows,
           b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for float or quantized resident weights. One token on the CPU with a contiguous
    float32/float16/bfloat16 matrix, when the kernels have at least torch's threads (flashio.kernels.
    set_threads): flashio.kernels' row-at-a-time dot products (float32 accumulation), which read
    the matrix faster than torch's GEMV: 4096 x 4096, one thread, float16 25-27 GB/s against 23.5,
    bfloat16 24 against 12, float32 46 against 25 (Gemma 3's head, 262144 x 640 float32: 32
    against 16 GB/s; 64 on two threads); the result is rounded to x's dtype as F.linear's is."""
    if isinstance(w, (QuantizedWeight, QuantizedRows)):
        return w.linear(x, b)
    if (x.numel() == x.shape[-1] and w.dtype in KERNEL_LINEAR_DTYPES and x.device.type == "cpu"
            and w.dim() == 2 and w.is_contiguous() and kernels.available()
            and torch.get_num_threads() <= kernels.threads()):
        y = kernels.kernels().dot(w, slice(0, w.shape[1]), x.reshape(-1))
        y = y.to(x.dtype).view(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b
    return F.linear(x, w, b)


def embedding(w: torch.Tensor | QuantizedRows, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an embedding matrix in `dtype`: indexed when float, dequantized when quantized
    (EMBEDDING_ROWS)."""
    if isinstance(w, torch.Tensor):
        return w[ids]
    return w.lookup(ids).to(dtype)


def assemble_resident(resident: dict[str, torch.Tensor], rq: ResidentQuant) -> dict:
    """The resident dict with each quantized matrix (the manifest's record `rq`) replaced by a
    QuantizedWeight (int8: codes under its name, its scale tensor named by the record) or a
    QuantizedRows (rows under its name: int4 matrices, the token embeddings)."""
    out = {k: QuantizedRows(v, rq.rows[k]) if k in rq.rows else v for k, v in resident.items()
           if k not in set(rq.scales.values())}
    for name, scale_name in rq.scales.items():
        out[name] = QuantizedWeight(resident[name], resident[scale_name])
    return out


def weight_bytes(w: torch.Tensor | QuantizedWeight | QuantizedRows) -> int:
    return w.nbytes if isinstance(w, (QuantizedWeight, QuantizedRows)) else w.numel() * w.element_size()
