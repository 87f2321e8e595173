"""GPTQ: quantized FFN rows whose rounding errors are compensated on calibration inputs.

    codes = gptq_rows(up, h_in, bits=4, group_size=32, offsets=True)        # up/gate [N, D], h_in [D, D]
    codes = gptq_neurons(down, h_act, bits=4, group_size=32, offsets=True)  # down rows [N, D], h_act [N, N]
    rows = quantize_rows(bundles, q, {"up": codes_up[order], ...})          # flashio.quant

Round to nearest quantizes each weight on its own; GPTQ (Frantar et al., 2023) quantizes the
inputs of a linear map one at a time and spreads each one's error over the inputs not yet
quantized, through the inverse of H = sum over calibration tokens of x x^T, so that the layer's
output on those inputs moves as little as possible. The groups are the artifact's (flashio.quant):

- up and gate rows are a neuron's weights over the D model inputs: the inputs are the columns,
  quantized in order; a group's scale (and offset) is chosen when its first column comes, from the
  group's weights as updated so far (`gptq_rows`);
- a neuron's down row is one input (the neuron) of the down projection, over the D outputs: the
  neurons are the columns, each quantized in groups along D by its own scales (`gptq_neurons`).

Measured on Gemma 3 270M (GGUF Q4_K_M source; tests/bench/quant_ppl.py, resident matrices int8):
int4 groups of 32 on 16 held-out rows of 256 tokens, calibration 128 x 256 tokens: round to nearest
+13.5% perplexity, GPTQ +3.08%, GPTQ with importance-weighted ranges (WEIGHTED_RANGES) +1.93%; int8
groups of 32 on 8 x 128 held-out tokens, calibration 32 x 128: +0.20% and -0.01%.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flashio.errors import FlashError
from flashio.quant import (
    EMBED_CODES,
    GroupCodes,
    embeddable,
    embedded_codes,
    group_codes,
    group_params,
    scale_parities,
    super_steps,
)

DAMP = 0.01  # added to H's diagonal, times its mean: keeps the inverse defined (GPTQ's default)
BLOCK = 128  # columns whose updates are applied to the rest at once (GPTQ's lazy batch)
# quantize the loudest inputs first (GPTQ's act order; see gptq_rows): off, Gemma 3 270M's int4 groups
# of 32 were +4.5% with it against +3.7% without (held-out perplexity; static groups lose more than
# the order gains there)
ACT_ORDER = False
# an asymmetric group's range chosen for the inputs whose errors cost most (see gptq_rows): Gemma 3
# 270M's int4 groups of 32 went from +3.08% to +1.93% held-out perplexity (128 x 256 calibration rows,
# 16 x 256 held-out tokens, resident int8; tests/bench/quant_ppl.py)
WEIGHTED_RANGES = True


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 (damped; never-seen inputs get a unit diagonal)."""
    h = h.double().clone()
    n = h.shape[0]
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    diag += DAMP * diag.mean()
    try:
        inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inv, upper=True).float()
    except torch.linalg.LinAlgError as exc:
        raise FlashError(f"GPTQ: the calibration inputs' {n} x {n} matrix is not positive definite after "
                         f"damping ({exc}); quantize with round to nearest (no calibration)") from None


def _gptq(w: torch.Tensor, h: torch.Tensor, quantize: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
          perm: torch.Tensor | None = None) -> None:
    """GPTQ over the columns of w [R, C] (C inputs, H [C, C]), in place: quantize(c, col, block)
    returns column c's quantized values (block: the current block's columns from c on, as updated).
    perm: the order the columns are quantized in (w and quantize's c are then in that order)."""
    cols = w.shape[1]
    _check_inputs(h, cols)
    hinv = _inverse_cholesky(h if perm is None else h[perm][:, perm])
    for a in range(0, cols, BLOCK):
        b = min(a + BLOCK, cols)
        blk = w[:, a:b].clone()
        err = torch.empty_like(blk)
        hb = hinv[a:b, a:b]
        for i in range(b - a):
            col = blk[:, i]
            q = quantize(a + i, col, blk[:, i:])
            e = (col - q) / hb[i, i]
            blk[:, i:] -= e[:, None] * hb[i, i:][None, :]
            blk[:, i] = q
            err[:, i] = e
        w[:, a:b] = blk
        w[:, b:] -= err @ hinv[a:b, b:]


def _check_inputs(h: torch.Tensor, cols: int) -> None:
    if h.shape != (cols, cols):
        raise FlashError(f"GPTQ: calibration matrix {tuple(h.shape)} for {cols} inputs")


def _loudest_first(h: torch.Tensor) -> torch.Tensor:
    """The inputs by decreasing calibration energy (H's diagonal): GPTQ's act order."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def gptq_rows(w: torch.Tensor, h: torch.Tensor, *, bits: int, group_size: int, offsets: bool,
              act_order: bool = ACT_ORDER, weighted_ranges: bool = WEIGHTED_RANGES, super_size: int = 0,
              embedded: bool = False) -> GroupCodes:
    """Rows [N, D] over D inputs (up or gate), H [D, D] of those inputs: codes in groups of
    `group_size` along D, as flashio.quant.quantize_groups lays them out. act_order: the inputs
    are quantized loudest first, each group's scale (and offset) fixed beforehand from the
    unquantized weights; else in order, a group's parameters chosen when its first input comes
    from its weights as updated so far, each input's error weighted by what it costs
    (weighted_ranges, asymmetric groups). super_size: two-level scales (flashio.quant.RowQuant.sub_bits),
    each super-block's steps chosen when its first input comes, from its weights as updated so far.
    embedded: the scale in the parities of the first codes (flashio.quant.RowQuant.embedded): those
    inputs are rounded to the nearest code of their parity, their larger errors spread as any other."""
    n, d = w.shape
    g = group_size
    if d % g:
        raise FlashError(f"GPTQ: group size {g} does not divide {d}")
    _check_embedded(embedded, bits, d, g, offsets)
    _check_inputs(h, d)
    w = w.float().clone()
    codes = torch.empty(n, d, dtype=torch.int16)
    scales = torch.empty(n, d // g)
    offs = torch.empty(n, d // g) if offsets else None
    if super_size and (act_order or not offsets or super_size % BLOCK or d % super_size):
        raise FlashError(f"GPTQ: two-level scales need asymmetric groups in order, in super-blocks of a multiple "
                         f"of {BLOCK} dividing {d} (got {super_size})")
    steps = (torch.empty(n, d // super_size), torch.empty(n, d // super_size)) if super_size else None
    perm = _loudest_first(h) if act_order else None
    # what an input's rounding error costs on the calibration outputs, once the inputs before it are
    # quantized: 1 / [H^-1]_ii of the rest (the Cholesky factor's diagonal, squared): a group's range
    # is chosen for the inputs that matter (as llama.cpp's importance-weighted quantization)
    importance = torch.diagonal(_inverse_cholesky(h)).square().reciprocal() if offsets and weighted_ranges else None
    if perm is not None:
        s, o = group_params(w.view(n, d // g, g), bits, offsets)
        scales[:] = s[..., 0]
        if offs is not None:
            offs[:] = o[..., 0]

    def quantize(c: int, col: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        if perm is not None:
            j = int(perm[c])
            s, o = scales[:, j // g], None if offs is None else offs[:, j // g]
        else:
            j = c
            grid = None
            if steps is not None:
                k = c // super_size
                if c % super_size == 0:  # a block's first column: w[:, c:] is as updated so far
                    sw = w[:, c : c + super_size].view(n, super_size // g, g)
                    imp = None if importance is None else importance[c : c + super_size].view(super_size // g, g)
                    st = super_steps(sw, bits, imp)
                    steps[0][:, k], steps[1][:, k] = st[0][:, 0, 0], st[1][:, 0, 0]
                grid = (steps[0][:, k : k + 1], steps[1][:, k : k + 1])
            if c % g == 0:  # the group's parameters from its columns as updated so far
                grp = rest[:, :g] if rest.shape[1] >= g else w[:, c : c + g]
                s, o = group_params(grp, bits, offsets, None if importance is None else importance[c : c + g], grid)
                scales[:, c // g] = s[:, 0]
                if offs is not None:
                    offs[:, c // g] = o[:, 0]
            s, o = scales[:, c // g], None if offs is None else offs[:, c // g]
        k = group_codes(col, s, o, bits)
        if embedded and j < EMBED_CODES:
            k = embedded_codes(col[:, None], s[:, None], scale_parities(s)[:, j : j + 1])[:, 0]
        codes[:, j] = k
        return k * s + (0 if o is None else o)

    _gptq(w if perm is None else w[:, perm].contiguous(), h, quantize, perm)
    return _codes(codes, scales, offs, steps)


def _check_embedded(embedded: bool, bits: int, d: int, g: int, offsets: bool) -> None:
    if embedded and not embeddable(f"int{bits}", d, g, offsets):
        raise FlashError(f"GPTQ: scales in the codes need symmetric int8 with one scale per row of at least "
                         f"{EMBED_CODES} (got int{bits}, groups of {g} in {d}, offsets {offsets})")


def _codes(codes: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor | None,
           steps: tuple[torch.Tensor, torch.Tensor] | None) -> GroupCodes:
    """GroupCodes of what GPTQ solved: fp16 scales and offsets, or (two-level) float32 ones, exact
    multiples of their super-blocks' fp16 steps."""
    if steps is not None:
        return GroupCodes(codes, scales, offs, (steps[0].half(), steps[1].half()))
    return GroupCodes(codes, scales.half(), None if offs is None else offs.half())


def gptq_neurons(w: torch.Tensor, h: torch.Tensor, *, bits: int, group_size: int, offsets: bool,
                 act_order: bool = ACT_ORDER, super_size: int = 0, embedded: bool = False) -> GroupCodes:
    """Down rows [N, D] (neuron n's weights onto the D outputs), H [N, N] of the neurons'
    activations: each neuron's row in groups of `group_size` along D, errors spread over the
    neurons after it (act_order: the most active neurons first; super_size: two-level scales;
    embedded: the scale in the parities of the row's first codes)."""
    n, d = w.shape
    g = group_size
    if d % g:
        raise FlashError(f"GPTQ: group size {g} does not divide {d}")
    _check_embedded(embedded, bits, d, g, offsets)
    _check_inputs(h, n)
    perm = _loudest_first(h) if act_order else None
    wt = w.float().t()  # [D, N]: the neurons are the columns
    wt = (wt if perm is None else wt[:, perm]).contiguous()
    codes = torch.empty(n, d, dtype=torch.int16)
    scales = torch.empty(n, d // g)
    offs = torch.empty(n, d // g) if offsets else None
    if super_size and (not offsets or d % super_size or super_size % g):
        raise FlashError(f"GPTQ: two-level scales need asymmetric groups of {g} in super-blocks dividing {d}")
    steps = (torch.empty(n, d // super_size), torch.empty(n, d // super_size)) if super_size else None

    def quantize(c: int, col: torch.Tensor, _rest: torch.Tensor) -> torch.Tensor:
        j = c if perm is None else int(perm[c])
        if steps is not None:
            grp = col.view(d // super_size, super_size // g, g)
            st = super_steps(grp, bits)
            steps[0][j], steps[1][j] = st[0].view(-1), st[1].view(-1)
            s, o = group_params(grp, bits, True, grid=st)
        else:
            grp = col.view(d // g, g)
            s, o = group_params(grp, bits, offsets)
        k = group_codes(grp, s, o, bits)
        if embedded:
            k[:, :EMBED_CODES] = embedded_codes(grp[:, :EMBED_CODES], s.view(1, 1), scale_parities(s))
        codes[j] = k.view(d)
        scales[j] = s.view(-1)
        if offs is not None:
            offs[j] = o.view(-1)
        return (k * s + (0 if o is None else o)).view(d)

    _gptq(wt, h, quantize, perm)
    return _codes(codes, scales, offs, steps)
