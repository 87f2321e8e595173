"""Quantized artifacts (flashio.quant, format version 3): the row layout, the chunked products
against a plain float computation on the dequantized rows, every mode on tiny OPT and Llama
artifacts packed int8 and int4, the budget's bytes per row, and what the reader refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flashio
from flashio.budget import MemoryBudget
from flashio.errors import FlashError, FormatError
from flashio.ffn import ffn_compute
from flashio.format import Artifact, write_artifact
from flashio.predictor import PredictorWeights
from flashio.quant import (
    EMBED_CODES,
    QuantizedRows,
    QuantizedWeight,
    RowScratch,
    dequantize_rows,
    embedded_scale,
    quant_ffn_compute,
    quantize_groups,
    quantize_resident,
    quantize_resident_rows,
    quantize_rows,
    row_quant,
    scale_parities,
)

PROMPT = [2, 17, 101, 55, 9, 240, 33, 78, 12, 5, 99, 301]


@pytest.mark.parametrize("scheme,bound", [("int8", 1 / 127), ("int4", 1 / 7)])
@pytest.mark.parametrize("group", [None, 16])
def test_rows_round_trip_within_half_a_step(scheme, bound, group):
    torch.manual_seed(0)
    q = row_quant(("up", "gate", "down"), dim=64, scheme=scheme, group_size=group, offsets=False)
    w = torch.randn(50, 3 * 64)
    rows = quantize_rows(w, q)
    assert rows.dtype == torch.uint8 and rows.shape == (50, q.row_bytes)
    for k, p in enumerate(("up", "gate", "down")):
        part = w[:, k * 64 : (k + 1) * 64]
        g = q.group_size
        absmax = part.view(50, 64 // g, g).abs().amax(dim=2, keepdim=True).expand(50, 64 // g, g).reshape(50, 64)
        err = (dequantize_rows(rows, q, p) - part).abs()
        steps = torch.full((64,), 0.5)  # half a step (fp16 scale rounding aside)...
        if q.embedded:  # ...but int8 with one scale per part: its first 16 codes carry it, each within a step
            steps[:EMBED_CODES] = 1.0 + 127 * 2.0**-11  # (the largest clamped to 126 of a scale rounded down)
        assert (err <= absmax * bound * steps * 1.01 + 1e-6).all()


@pytest.mark.parametrize("bits,offsets,group,bound", [(8, False, 32, 0.01), (8, False, 640, 0.01), (4, True, 32, 0.1),
                                                      (4, False, 32, 0.12)])
@pytest.mark.parametrize("std", [1e-3, 2e-4])
def test_small_weights_keep_their_scale(bits, offsets, group, bound, std):
    """Groups whose scale is below fp16's smallest normal (int8: absmax < 7.7e-3) are stored with a
    subnormal scale and their codes divided by exactly that scale: the values come back, not shrunk
    (the codes were once taken against the smallest normal and decoded with the smaller stored one)."""
    w = torch.randn(64, 640, generator=torch.Generator().manual_seed(0)) * std
    gc = quantize_groups(w, bits, group, offsets)
    n, d = w.shape
    deq = gc.codes.float().view(n, d // group, group) * gc.scales.float()[..., None]
    if offsets:
        deq += gc.offsets.float()[..., None]
    err = (deq.view(n, d) - w).norm() / w.norm()
    assert err < bound
    codes, scales = quantize_resident(w)
    assert ((codes.float() * scales.float()[:, None] - w).norm() / w.norm()) < 0.01


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("group", [None, 16])
def test_asymmetric_rows_beat_plain_min_max_rounding(scheme, group):
    """Asymmetric groups: codes 0..2^bits-1 between an offset and offset + (2^bits-1) * scale; the
    searched range's squared error is at most plain min/max rounding's (one of the candidates), and
    well below the symmetric rows' on skewed weights."""
    torch.manual_seed(0)
    bits = 8 if scheme == "int8" else 4
    q = row_quant(("up", "down"), dim=64, scheme=scheme, group_size=group, offsets=True)
    assert q.offsets and q.to_json()["offsets"] is True and len(q.to_json()["parts"][0]) == 7
    w = torch.randn(50, 2 * 64) * 0.1 + 0.05  # skewed: the symmetric grid wastes half its codes
    rows = quantize_rows(w, q)
    qs = row_quant(("up", "down"), dim=64, scheme=scheme, group_size=group, offsets=False)
    sym_rows = quantize_rows(w, qs)
    g = q.group_size
    for k, p in enumerate(("up", "down")):
        part = w[:, k * 64 : (k + 1) * 64].reshape(50, 64 // g, g)
        lo, hi = part.amin(2, keepdim=True), part.amax(2, keepdim=True)
        s = ((hi - lo) / ((1 << bits) - 1)).half().float()
        z = lo.half().float()
        plain = torch.round((part - z) / s).clamp(0, (1 << bits) - 1) * s + z
        got = dequantize_rows(rows, q, p).view(50, 64 // g, g)
        err, plain_err = (got - part).square().sum(2), (plain - part).square().sum(2)
        assert (err <= plain_err * 1.001 + 1e-12).all()
        sym_err = (dequantize_rows(sym_rows, qs, p).view(50, 64 // g, g) - part).square().sum()
        assert err.sum() < 0.8 * sym_err


def test_row_layout_keeps_opt_6_7b_rows_near_a_half_and_a_quarter():
    fp16 = 2 * 4096 * 2
    q8 = row_quant(("up", "down"), dim=4096, scheme="int8")
    q4 = row_quant(("up", "down"), dim=4096, scheme="int4", group_size=4096)
    assert q8.embedded and q8.row_bytes == fp16 // 2  # the scales in the codes: exactly half, aligned
    q8s = row_quant(("up", "down"), dim=4096, scheme="int8", embed_scales=False)
    assert q8s.row_bytes == 8704 and q8s.row_bytes % 512 == 0  # 8196 padded: aligned O_DIRECT reads
    assert q4.row_bytes == 4160  # 4104 to a cache line: 512 would add 12%
    # int4's default: asymmetric groups of 32, a scale and an offset each: 2048 + 2 x 256 bytes a part
    q4d = row_quant(("up", "down"), dim=4096, scheme="int4")
    assert q4d.group_size == 32 and q4d.offsets and q4d.row_bytes == 5120
    assert row_quant(("up", "down"), dim=4010, scheme="int4").group_size == 4010  # 32 does not divide it
    assert abs(q8.row_bytes / fp16 - 0.5) / 0.5 < 0.07 and abs(q4.row_bytes / fp16 - 0.25) / 0.25 < 0.05
    with pytest.raises(FlashError, match="positive divisor"):
        row_quant(("up", "down"), dim=4096, scheme="int4", group_size=100)
    with pytest.raises(FlashError, match="not one of int8, int4"):
        row_quant(("up", "down"), dim=4096, scheme="int3")


def test_int8_scales_in_the_codes():
    """Symmetric int8 rows with one scale per part hold it in the parities of the part's first 16
    codes: the rows are exactly the codes (half of fp16), the scale comes back exactly, and only
    those 16 codes differ from rows with the scales after the codes (each the nearest code of its
    parity)."""
    torch.manual_seed(3)
    w = torch.randn(40, 2 * 640) * torch.rand(40, 1)
    w[3] = 0  # an all-zero neuron: scale 0, every parity 0
    emb = row_quant(("up", "down"), dim=640, scheme="int8")
    plain = row_quant(("up", "down"), dim=640, scheme="int8", embed_scales=False)
    assert emb.embedded and emb.row_bytes == 2 * 640 and emb.to_json()["scales_in_codes"] is True
    assert not plain.embedded and plain.row_bytes == 1344 and "scales_in_codes" not in plain.to_json()
    a, b = quantize_rows(w, emb), quantize_rows(w, plain)
    for k, name in enumerate(("up", "down")):
        pe, pp = emb.part(name), plain.part(name)
        ca, cb = a[:, pe.codes_start : pe.codes_end].view(torch.int8), b[:, pp.codes_start : pp.codes_end].view(torch.int8)
        scale = b[:, pp.scales_start : pp.scales_end].view(torch.float16)
        assert torch.equal(embedded_scale(ca.view(torch.uint8)), scale.float())
        assert torch.equal(ca[:, EMBED_CODES:], cb[:, EMBED_CODES:])
        parity = scale_parities(scale)
        assert torch.equal((ca[:, :EMBED_CODES].to(torch.int16) & 1), parity)
        # the nearest code of that parity: within one step, and never farther than the other one of it
        x = w[:, k * 640 : k * 640 + EMBED_CODES] / torch.where(scale > 0, scale, 1).float()
        err = (ca[:, :EMBED_CODES].float() - x).abs()
        assert (err <= 1 + 127 * 2.0**-11).all() and (err[cb[:, :EMBED_CODES] == ca[:, :EMBED_CODES]] <= 0.5).all()
        assert torch.equal(dequantize_rows(a, emb, name)[:, EMBED_CODES:], dequantize_rows(b, plain, name)[:, EMBED_CODES:])
    assert (a[3] == 0).all()
    with pytest.raises(FlashError, match="scales in the codes"):
        row_quant(("up", "down"), dim=640, scheme="int4", embed_scales=True)
    with pytest.raises(FlashError, match="scales in the codes"):
        row_quant(("up", "down"), dim=640, scheme="int8", group_size=32, embed_scales=True)
    assert not row_quant(("up",), dim=640, scheme="int8", aligned=False).embedded  # the up sketch's rows
    gc = quantize_groups(w[:, :640], 8, 640)  # rounded without the parities: refused, not stored wrong
    with pytest.raises(FlashError, match="do not carry their scales"):
        quantize_rows(w, emb, {"up": gc})


@pytest.mark.parametrize("scheme,offsets", [("int8", False), ("int4", False), ("int4", True), ("int8", True)])
@pytest.mark.parametrize("group", [None, 16, 64])  # 64 = d: one scale (and offset) per part of a row
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_product_equals_float_product_on_dequantized_rows(scheme, offsets, group, gated):
    torch.manual_seed(1)
    parts = ("up", "gate", "down") if gated else ("up", "down")
    d, n, valid = 64, 300, 290
    q = row_quant(parts, dim=d, scheme=scheme, group_size=group, offsets=offsets)
    rows = quantize_rows(torch.randn(n, len(parts) * d) * 0.1, q)
    deq = torch.cat([dequantize_rows(rows, q, p) for p in parts], dim=1)
    layout = {p: slice(k * d, (k + 1) * d) for k, p in enumerate(parts)}
    h = torch.randn(3, d)
    b_up = torch.randn(valid) * 0.1
    mask = (torch.rand(3, valid) > 0.3).float()
    zero = torch.tensor([0, 7, 280])
    scratch = RowScratch(q, rows=128)  # 300 rows: three chunks, the last one short
    got = quant_ffn_compute(h, rows, q, scratch, b_up, None, zero, valid, mask=mask)
    want = ffn_compute(h, deq, layout, b_up, None, zero, valid, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if gated:  # the gate computed elsewhere (a gate-resident artifact's rows)
        g_act = torch.rand(3, valid)
        got = quant_ffn_compute(h, rows, q, scratch, None, None, n_valid=valid, gate_act=g_act)
        want = ffn_compute(h, deq, layout, None, None, n_valid=valid, gate_act=g_act)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("group,chunk", [(32, None), (32, 300), (96, 16), (16, 10)])  # 96: one scale per row
def test_up_sketch_product_equals_the_stored_rows_product(scheme, group, chunk):
    """flashio.sketch: the sketch rearranged in place gives quant_project's x @ up.T on the stored
    rows (the same float operations up to an exact factor 16), in chunks whose last one is short,
    in the stored bytes; what it cannot rearrange it refuses."""
    from flashio.quant import quant_project
    from flashio.sketch import SketchScratch, UpSketch

    torch.manual_seed(2)
    n, d = 2048 if chunk == 300 else 194, 96
    q = row_quant(("up",), dim=d, scheme=scheme, group_size=group, aligned=False, offsets=False)
    rows = quantize_rows(torch.randn(n, d) * 0.05, q)
    x = torch.randn(5, d)
    want = quant_project(x, rows, q, "up", RowScratch(q))
    deq = dequantize_rows(rows, q, "up")
    packed = rows.clone()
    sketch = UpSketch.pack(packed, q, chunk)
    assert sketch.rows.data_ptr() == packed.data_ptr() and sketch.nbytes == rows.numel()  # in place
    if scheme == "int4":
        assert not torch.equal(packed, rows)  # codes rearranged ...
        p = q.parts[0]
        assert torch.equal(packed[:, p.scales_start :], rows[:, p.scales_start :])  # ... scales where they were
        assert (packed.view(torch.int8)[:, : p.codes_end] < 0).any()  # signed nibbles
    got = sketch.project(x, SketchScratch(q, sketch.chunk_rows))
    assert got.shape == (5, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    torch.testing.assert_close(got, x @ deq.t(), rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if group == 32:  # groups of 32: the same operations as quant_project, bit for bit
        assert torch.equal(got, want)
        one = quant_project(x[:1], rows, q, "up", RowScratch(q))  # one token: a matrix-vector product
        assert torch.equal(sketch.project(x[:1], SketchScratch(q, sketch.chunk_rows)), one)
    with pytest.raises(FlashError, match="an even number of them"):
        UpSketch.pack(rows[:-1].clone(), q)
    asym = row_quant(("up",), dim=d, scheme=scheme, group_size=group, aligned=False, offsets=True)
    with pytest.raises(FlashError, match="quant_project"):
        UpSketch.pack(quantize_rows(torch.randn(n, d), asym), asym)


def test_resident_weight_linear_matches_float_linear():
    torch.manual_seed(2)
    w, x, b = torch.randn(96, 64), torch.randn(5, 64), torch.randn(96)
    codes, scale = quantize_resident(w)
    qw = QuantizedWeight(codes, scale)
    ref = F.linear(x, codes.float() * scale.float()[:, None], b)
    # bf16 inputs and outputs on the CPU (torch's int8 kernel): within bf16's rounding of the largest output
    assert (qw.linear(x, b) - ref).abs().max() < 1e-2 * ref.abs().max()
    assert (F.linear(x, w, b) - qw.linear(x, b)).abs().max() < 0.05 * ref.abs().max()
    assert qw.nbytes == 96 * 64 + 96 * 2


@pytest.mark.parametrize("d_in", [64, 80, 96])
def test_resident_int4_rows_linear_matches_their_dequantized_matrix(d_in):
    """An int4 resident matrix (rows of codes, scales and offsets per group of its input): prompt
    products equal F.linear on the dequantized matrix; one token (flashio.kernels' integer dot
    products on CPUs with VNNI) equals it on the int8-rounded input where that path is taken."""
    from flashio import kernels

    torch.manual_seed(5)
    w, x, b = torch.randn(72, d_in) * 0.1, torch.randn(4, d_in), torch.randn(72)
    rows, q = quantize_resident_rows(w)
    assert rows.dtype == torch.uint8 and rows.shape == (72, q.row_bytes) and q.group_size == (32 if d_in % 32 == 0 else d_in)
    qr = QuantizedRows(rows, q)
    deq = dequantize_rows(rows, q, "w")
    assert qr.shape == w.shape and qr.nbytes == rows.numel()
    assert (deq - w).norm() / w.norm() < 0.1  # int4: within a few percent of the weights
    torch.testing.assert_close(qr.linear(x, b), F.linear(x, deq, b), rtol=1e-4, atol=1e-4)
    one = qr.linear(x[:1], b)
    k = kernels.kernels()
    xin = x[0]
    if k is not None and k.int8_activations(d_in, 4, q.group_size):
        xin = kernels.int8_activations(x[0])
    torch.testing.assert_close(one[0], F.linear(xin, deq, b), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def opt_quant(tiny_opt, tmp_path_factory):
    base = tmp_path_factory.mktemp("quant-opt")
    out = {q: write_artifact(tiny_opt[1], base / q, dtype="float32", quantize=None if q == "none" else q)
           for q in ("none", "int8", "int4")}
    out["int4-resident"] = write_artifact(tiny_opt[1], base / "int4r", dtype="float32", quantize="int4",
                                          quantize_resident="int4")
    return out


def test_int8_rows_with_the_scales_after_the_codes_still_open(opt_quant, tiny_opt, tmp_path):
    """int8 artifacts from before the scales moved into the codes (embed_scales=False) open and
    compute as the default ones do, up to the 16 codes a part rounds to their parity."""
    old = write_artifact(tiny_opt[1], tmp_path / "old", dtype="float32", quantize="int8", embed_scales=False)
    m_old, m_new = Artifact(old).manifest, Artifact(opt_quant["int8"]).manifest
    assert not m_old.ffn_layers[0].quant.embedded and m_new.ffn_layers[0].quant.embedded
    assert m_new.ffn_layers[0].quant.row_bytes < m_old.ffn_layers[0].quant.row_bytes
    with flashio.open(opt_quant["none"], mode="dense") as ref:
        want = ref.forward(PROMPT)
    for path in (old, opt_quant["int8"]):
        for mode in ("dense", "naive", "oracle"):  # every neuron in DRAM; read per token; read as the oracle selects
            with flashio.open(path, mode=mode) as model:
                torch.testing.assert_close(model.forward(PROMPT), want, rtol=0, atol=0.02 * float(want.abs().max()))
                one = model.forward(PROMPT, token_by_token=True)  # the one-token kernels
                torch.testing.assert_close(one, want, rtol=0, atol=0.02 * float(want.abs().max()))


def _stored(path, name):
    from safetensors.torch import load_file

    return load_file(str(Artifact(path).file(Artifact(path).manifest.resident_file)))[name]


def _by_hand_int8(rows, q):
    """Symmetric int8 rows of one part "w" decoded here: signed codes times each group's fp16 scale."""
    p = q.part("w")
    codes = rows[:, p.codes_start : p.codes_end].contiguous().view(torch.int8).float()
    scale = rows[:, p.scales_start : p.scales_end].contiguous().view(torch.float16).float()
    return (codes.view(len(rows), -1, q.group_size) * scale[..., None]).view(len(rows), -1)


def test_token_embeddings_are_quantized_with_the_resident_matrices(opt_quant):
    """--quantize-resident int8 / int4 holds the token embeddings as int8 rows in groups of 32
    (either scheme): a token's row is the stored codes dequantized (decoded here by hand), the tied
    head multiplies by the same quantized matrix, and the position embeddings stay float."""
    tokens = torch.tensor(PROMPT)
    with flashio.open(opt_quant["none"], mode="dense") as ref:
        want = ref.model.embed(tokens, 3)
        pos = ref.model.pos
    for key in ("int4", "int4-resident"):  # int8 resident (the default with --quantize), int4 resident
        path = opt_quant[key]
        rq = Artifact(path).manifest.resident_quant
        with flashio.open(path, mode="dense") as model:
            got = model.model.embed(tokens, 3)
            assert model.model.lm_head is model.model.tok and not isinstance(model.model.tok, torch.Tensor)
            torch.testing.assert_close(model.model.pos, pos, rtol=0, atol=0)
        q = rq.rows["tok_embeddings.weight"]
        assert (q.scheme, q.group_size, q.offsets, q.row_bytes) == ("int8", 32, False, pos.shape[1] + pos.shape[1] // 16)
        rows = _by_hand_int8(_stored(path, "tok_embeddings.weight")[tokens], q)
        torch.testing.assert_close(got, rows + pos[torch.arange(3, 3 + len(PROMPT)) + 2], rtol=1e-6, atol=1e-6)
        assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_artifacts_with_float_token_embeddings_still_open(opt_quant, tiny_opt, tmp_path, monkeypatch):
    """Quantized artifacts written before the embeddings were quantized (their resident record
    without them) open with float embeddings and compute as the current ones do, up to the
    embeddings' rounding."""
    import re

    import flashio.format.writer as writer

    monkeypatch.setattr(writer, "RESIDENT_QUANTIZED", re.compile(r"(^lm_head\.weight$)|(\.attn\.[qkvo]\.weight$)"))
    old = write_artifact(tiny_opt[1], tmp_path / "old", dtype="float32", quantize="int8")
    rq = Artifact(old).manifest.resident_quant
    assert "layers.0.attn.q.weight" in rq.matrices and "tok_embeddings.weight" not in rq.matrices
    with flashio.open(old, mode="dense") as model:
        assert isinstance(model.model.tok, torch.Tensor) and model.model.tok.dtype == torch.float32
        got = model.forward(PROMPT)
    with flashio.open(opt_quant["int8"], mode="dense") as model:
        want = model.forward(PROMPT)
    assert 0 < (got - want).abs().max() < 0.01 * want.abs().max()


def test_int4_resident_matrices(opt_quant):
    """--quantize-resident int4: attention and head as int4 rows (embeddings int8 rows), a quarter of
    int8's resident codes plus their scales; the model computes close to the float one."""
    m = Artifact(opt_quant["int4-resident"]).manifest
    assert m.resident_quant.scheme == "int4" and not m.resident_quant.scales
    assert {"layers.0.attn.q.weight", "tok_embeddings.weight"} <= set(m.resident_quant.rows)
    assert m.resident_quant.rows["tok_embeddings.weight"].scheme == "int8"  # the embeddings: int8 in either
    with flashio.open(opt_quant["none"], mode="dense") as ref:
        want = ref.forward(PROMPT)
    with flashio.open(opt_quant["int4"], mode="dense") as int8_resident:
        r8 = int8_resident.memory_bytes()["resident"]
    with flashio.open(opt_quant["int4-resident"], mode="dense") as dense:
        got = dense.forward(PROMPT)
        one = dense.forward(PROMPT, token_by_token=True)
        r4 = dense.memory_bytes()["resident"]
    assert (got - want).abs().max() < 0.25 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.6
    assert (one - got).abs().max() < 0.02 * got.abs().max()  # the kernels' int8 activations
    assert r4 < r8
    est = MemoryBudget.estimate(Artifact(opt_quant["int4-resident"]), "dense", torch.float32, 64)
    assert 0 <= est.resident_bytes - r4 <= 4096  # the file's header aside, what the model holds
    with flashio.open(opt_quant["int4-resident"], mode="naive") as naive:
        torch.testing.assert_close(naive.forward(PROMPT, token_by_token=True), one, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scheme,tol", [("int8", 0.02), ("int4", 0.15)])
def test_opt_modes_agree_on_quantized_artifacts(opt_quant, scheme, tol):
    path = opt_quant[scheme]
    m = Artifact(path).manifest
    assert m.format_version == 3 and m.quant.scheme == scheme and m.resident_quant is not None
    assert "tok_embeddings.weight" in m.resident_quant.rows  # the embeddings (and tied head): int8 rows
    with flashio.open(opt_quant["none"], mode="dense") as ref:
        want = ref.forward(PROMPT)
    with flashio.open(path, mode="dense") as dense:
        got = dense.forward(PROMPT)
        one = dense.forward(PROMPT, token_by_token=True)  # one token at a time: flashio's kernels
        assert dense.memory_bytes()["ffn_engine"] == m.n_layers * m.ffn_layers[0].n_neurons * m.quant.row_bytes
    assert (got - want).abs().max() < tol * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.7
    # the kernels' int8 activations (AVX-512 VNNI, flashio.kernels.int8_activations) round x to 1/254
    # of each block's largest value: the products differ from the prompt's float ones by that much
    assert (one - got).abs().max() < 0.01 * got.abs().max()
    # ReLU: the exact active set is the dense result; the oracle's products over the active rows
    # alone sum in another order, which can move an int8 activation of the next layer by a step
    for mode in ("naive", "oracle"):
        with flashio.open(path, mode=mode) as model:
            torch.testing.assert_close(model.forward(PROMPT, token_by_token=True), one, rtol=0,
                                       atol=0.005 * float(one.abs().max()))
    with flashio.open(path, mode="naive", pinned_fraction=0.5) as model:
        torch.testing.assert_close(model.forward(PROMPT), got, rtol=1e-3, atol=1e-3)


def test_sparse_mode_caches_quantized_rows(tiny_opt, tmp_path):
    """Predictors that call every neuron active: sparse equals dense on int4 rows, its window cache
    holds uint8 rows, and a budget buys 4x the rows of an fp32 cache (at this tiny width)."""
    art = Artifact(write_artifact(tiny_opt[1], tmp_path / "f", dtype="float32"))
    n, d = art.manifest.ffn_layers[0].n_neurons, art.args.dim
    preds = [PredictorWeights(torch.zeros(2, d), torch.zeros(n, 2), torch.full((n,), 9.0), 0.5)
             for _ in range(art.manifest.n_layers)]
    path = write_artifact(tiny_opt[1], tmp_path / "q", dtype="float32", quantize="int4", predictors=preds)
    with flashio.open(path, mode="dense") as dense:
        want = dense.forward(PROMPT)
    with flashio.open(path, mode="sparse", window=2) as sparse:
        got = sparse.forward(PROMPT, token_by_token=True)
        assert sparse.engine.caches[0].matrix.dtype == torch.uint8
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    q = MemoryBudget.estimate(Artifact(path), "sparse", torch.float32, 64)
    f = MemoryBudget.estimate(art, "sparse", torch.float32, 64)
    # int4 rows of 2 x (32 + 2) = 68 bytes, padded to a 64-byte line: 128 B, against 512 B of fp32
    assert q.engine.row_bytes == Artifact(path).manifest.row_bytes * 3 and 4 * q.engine.row_bytes == f.engine.row_bytes
    with pytest.raises(FlashError, match="bundled=True"):
        flashio.open(path, mode="sparse", bundled=False)


def test_gated_exact_gate_and_oracle_on_int8(tiny_llama, tmp_path):
    ref_path = write_artifact(tiny_llama[1], tmp_path / "f", dtype="float32", gate_resident=True)
    path = write_artifact(tiny_llama[1], tmp_path / "q", dtype="float32", gate_resident=True, quantize="int8")
    m = Artifact(path).manifest
    assert m.gate_resident and "layers.0.ffn.gate" in m.resident_quant.scales
    with flashio.open(ref_path, mode="dense") as ref:
        want = ref.forward(PROMPT)
    with flashio.open(path, mode="dense") as dense:
        got = dense.forward(PROMPT)
        one = dense.forward(PROMPT, token_by_token=True)  # the kernels' int8 activations: see above
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert (one - got).abs().max() < 0.01 * got.abs().max()
    for cfg in ({"mode": "sparse", "selection": "gate", "density": 1.0}, {"mode": "oracle", "density": 1.0}):
        with flashio.open(path, **cfg) as model:  # every neuron kept: the dense result
            torch.testing.assert_close(model.forward(PROMPT, token_by_token=True), one, rtol=1e-3, atol=1e-3)
    gate4 = write_artifact(tiny_llama[1], tmp_path / "g4", dtype="float32", gate_resident=True, quantize="int4",
                           quantize_resident="int4")  # resident gate rows as int4 rows too
    rq = Artifact(gate4).manifest.resident_quant
    assert "layers.0.ffn.gate" in rq.rows
    with flashio.open(gate4, mode="dense") as dense4, flashio.open(gate4, mode="sparse", selection="gate",
                                                                    density=1.0) as gate:
        one4 = dense4.forward(PROMPT, token_by_token=True)
        torch.testing.assert_close(gate.forward(PROMPT, token_by_token=True), one4, rtol=1e-3, atol=1e-3)
        est = MemoryBudget.estimate(Artifact(gate4), "sparse", torch.float32, 64, selection="gate")
        assert est.gate_bytes == sum(L.n_neurons for L in Artifact(gate4).manifest.ffn_layers) * rq.rows[
            "layers.0.ffn.gate"].row_bytes
    assert (one4 - want).abs().max() < 0.3 * want.abs().max()
    bundled = write_artifact(tiny_llama[1], tmp_path / "b", dtype="float32", quantize="int4", group_size=16,
                             quantize_resident="none")
    assert Artifact(bundled).manifest.resident_quant is None
    with flashio.open(bundled, mode="oracle", density=1.0) as oracle, flashio.open(bundled, mode="dense") as dense:
        torch.testing.assert_close(oracle.forward(PROMPT), dense.forward(PROMPT), rtol=1e-3, atol=1e-3)


def _edit(path, fn):
    mp = path / "manifest.json"
    m = json.loads(mp.read_text())
    fn(m)
    mp.write_text(json.dumps(m))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["ffn_layers"][0]["quant"].update(scheme="int3"), "scheme 'int3' is not one this flashio reads"),
    (lambda m: m["ffn_layers"][1]["quant"].update(scheme="nf4"), "scheme 'nf4' is not one this flashio reads"),
    (lambda m: m.update(format_version=2), "quantized rows need format_version 3"),
    (lambda m: m["ffn_layers"][0]["quant"].update(group_size=7), "group_size 7 does not divide"),
    (lambda m: m["ffn_layers"][0]["quant"].update(scale_dtype="float32"), "scale_dtype 'float32'"),
    (lambda m: m["ffn_layers"][0]["quant"]["parts"][1].__setitem__(2, 1), "do not hold"),
    (lambda m: m["ffn_layers"][0]["quant"].update(row_bytes=2), "row_bytes 2"),
    # as wide as layer 0's rows (128 bytes) but int4 groups: decoded with layer 0's record
    (lambda m: m["ffn_layers"][1].update(quant=row_quant(("up", "down"), dim=64, scheme="int4", group_size=32).to_json()),
     "quant records differ"),
    (lambda m: m["ffn_layers"][0].pop("quant"), "length_bytes = 32768 but"),  # codes read as floats
    (lambda m: m["resident_quant"].update(scheme="int3"), "resident_quant scheme 'int3'"),
    (lambda m: m["resident_quant"].update(scheme="int4"), "must be the row layout of a quantized matrix"),
    (lambda m: m["resident_quant"]["tensors"].update({"layers.0.attn.q.weight": "layers.0.attn.k.scale"}),
     "its own scale tensor"),
    (lambda m: m["resident_quant"]["tensors"].update({"layers.0.attn.q.weight": "tok_embeddings.weight"}),
     "its own scale tensor"),  # a matrix's scales cannot be the embeddings' rows
    (lambda m: m["resident_quant"]["tensors"]["tok_embeddings.weight"].update(scheme="int4"),
     "is int4, the record says int8"),
    (lambda m: m["resident_quant"]["tensors"]["tok_embeddings.weight"].update(group_size=5), "group_size 5"),
])
def test_damaged_quantized_manifests_are_refused(opt_quant, tmp_path, edit, message):
    _assert_refused(opt_quant["int8"], tmp_path, edit, message)


def _assert_refused(path, tmp_path, edit, message):
    """A copy of the artifact at `path`, its manifest edited, is refused with `message`."""
    art = shutil.copytree(path, tmp_path / "art")
    _edit(art, edit)
    with pytest.raises(FormatError, match=message):
        Artifact(art)


def _q_record(m):
    return m["resident_quant"]["tensors"]["layers.0.attn.q.weight"]


@pytest.mark.parametrize("edit,message", [
    (lambda m: _q_record(m).update(scheme="int8"), "is int8, the record says int4"),
    (lambda m: _q_record(m).update(row_bytes=_q_record(m)["row_bytes"] + 2), "expected uint8 rows of"),
    (lambda m: _q_record(m).update(parts=[]), "must be one part's"),
    (lambda m: _q_record(m)["parts"][0].__setitem__(0, "up"), "quantized parts"),
    (lambda m: _q_record(m).update(group_size=6), "group_size 6 does not divide"),
    (lambda m: m["resident_quant"]["tensors"].update({"layers.0.attn.q.weight": "layers.0.attn.q.scale"}),
     "must be the row layout of a quantized matrix"),
])
def test_damaged_int4_resident_records_are_refused(opt_quant, tmp_path, edit, message):
    _assert_refused(opt_quant["int4-resident"], tmp_path, edit, message)


def test_versions_1_and_2_still_open(opt_quant, tiny_llama, tmp_path):
    assert Artifact(opt_quant["none"]).manifest.format_version == 1
    gate = write_artifact(tiny_llama[1], tmp_path / "g", gate_resident=True)
    assert Artifact(gate).manifest.format_version == 2
    assert np.isfinite(flashio.open(gate, mode="dense").forward(PROMPT[:3]).numpy()).all()


# -- two-level scales (RowQuant.sub_bits: 6-bit multiples of a super-block's fp16 steps, as Q4_K) --------

def test_two_level_rows_are_aligned_at_4_5_bits_where_d_model_allows():
    """OPT-6.7B's rows (up + down of 4096): 2048 codes + 2 x (16 fp16 steps + 128 six-bit multiples)
    a part = 4608 bytes, a multiple of 512 (0.281x fp16, against 0.3125x with fp16 scales and
    offsets); Llama's three parts pad 6912 to 7168; Gemma 3 270M's 640 takes super-blocks of 128."""
    opt = row_quant(("up", "down"), dim=4096, scheme="int4", two_level=True)
    assert (opt.sub_bits, opt.super_size, opt.row_bytes) == (6, 256, 4608) and opt.row_bytes % 512 == 0
    assert opt.scale_bytes == 16 * 2 + 96 and opt.to_json()["sub_bits"] == 6 and opt.to_json()["super_size"] == 256
    assert row_quant(("up", "gate", "down"), dim=4096, scheme="int4", two_level=True).row_bytes == 7168
    gemma = row_quant(("up", "down"), dim=640, scheme="int4", two_level=True)
    assert gemma.super_size == 128 and gemma.scale_bytes == 5 * 2 + 15 + 1  # 20 groups: 15 bytes, even
    assert gemma.row_bytes < row_quant(("up", "down"), dim=640, scheme="int4").row_bytes
    for kw in (dict(dim=96, scheme="int4"), dict(dim=4096, scheme="int8"), dict(dim=4096, scheme="int4", offsets=False),
               dict(dim=4096, scheme="int4", group_size=4096)):
        with pytest.raises(FlashError, match="two-level scales"):
            row_quant(("up", "down"), two_level=True, **kw)


@pytest.mark.parametrize("dim", [128, 640])
def test_two_level_rows_store_what_they_dequantize_to(dim):
    """Every group's scale is d * sc and offset -dmin * m (exact in float32), sc and m in 0..63 of its
    super-block's steps; the rows decode to codes * scale + offset, close to the fp16-scaled rows'
    error, and packing the 6-bit values is lossless."""
    from flashio.quant import _pack_sub, _unpack_sub

    v = torch.randint(0, 64, (7, 20), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_unpack_sub(_pack_sub(v), 20), v.float())
    w = torch.randn(40, 2 * dim, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3, :dim] = 0.0  # an all-zero part: zero steps
    w[5, dim:] += 0.2  # a part whose groups all lie above 0: offsets 0
    q = row_quant(("up", "down"), dim=dim, scheme="int4", two_level=True)
    q1 = row_quant(("up", "down"), dim=dim, scheme="int4")
    rows, rows1 = quantize_rows(w, q), quantize_rows(w, q1)
    for k, p in enumerate(("up", "down")):
        part = w[:, k * dim : (k + 1) * dim]
        gc = quantize_groups(part, 4, 32, True, q.super_size)
        d, dmin = (t.float().repeat_interleave(q.super_size // 32, dim=1) for t in gc.supers)
        sc = torch.where(d > 0, gc.scales.float() / torch.where(d > 0, d, 1), 0).round()
        m = torch.where(dmin > 0, -gc.offsets.float() / torch.where(dmin > 0, dmin, 1), 0).round()
        assert 0 <= sc.min() <= sc.max() <= 63 and 0 <= m.min() <= m.max() <= 63
        assert torch.equal(d * sc, gc.scales) and torch.equal(-(dmin * m), gc.offsets)
        want = (gc.codes.float().view(40, -1, 32) * gc.scales.float()[..., None] + gc.offsets.float()[..., None]).view(40, dim)
        torch.testing.assert_close(dequantize_rows(rows, q, p), want, rtol=0, atol=0)
        plain = [r for r in range(40) if r not in (3, 5)]  # rows of centred weights
        err = (dequantize_rows(rows, q, p) - part)[plain].square().sum()
        err1 = (dequantize_rows(rows1, q1, p) - part)[plain].square().sum()
        assert err < 1.05 * err1  # the 6-bit scales cost little against fp16 ones
    assert (dequantize_rows(rows, q, "up")[3] == 0).all()
    assert (gc.offsets[5] == 0).all()


@pytest.fixture(scope="module")
def llama128(tmp_path_factory):
    from tests.conftest import make_llama

    path = tmp_path_factory.mktemp("llama128") / "ckpt"
    return make_llama(path, hidden_size=128, intermediate_size=256), path


def test_two_level_artifacts_open_and_compute_in_every_mode(llama128, tmp_path):
    """write_artifact(two_level_scales=True): FFN rows and int4 resident matrices with two-level
    scales, recorded in the manifest (sub_bits, super_size); dense, sparse one token (the kernels)
    and naive agree, near the float model; damaged records are refused."""
    ref = write_artifact(llama128[1], tmp_path / "f", dtype="float32")
    path = write_artifact(llama128[1], tmp_path / "q", dtype="float32", quantize="int4", quantize_resident="int4",
                          two_level_scales=True)
    m = Artifact(path).manifest
    assert m.quant.sub_bits == 6 and m.quant.super_size == 128
    assert all(r.sub_bits == 6 for k, r in m.resident_quant.rows.items() if k != "tok_embeddings.weight")
    assert json.loads((path / "manifest.json").read_text())["ffn_layers"][0]["quant"]["sub_bits"] == 6
    with flashio.open(ref, mode="dense") as f:
        want = f.forward(PROMPT)
    with flashio.open(path, mode="dense") as dense:
        got = dense.forward(PROMPT)
        one = dense.forward(PROMPT, token_by_token=True)
    with flashio.open(path, mode="naive") as naive:
        torch.testing.assert_close(naive.forward(PROMPT, token_by_token=True), one, rtol=1e-3, atol=1e-3)
    assert (got - want).abs().max() < 0.25 * want.abs().max()
    assert (one - got).abs().max() < 0.02 * got.abs().max()  # the kernels' int8 activations
    with pytest.raises(FlashError, match="two_level_scales applies to int4 rows"):
        write_artifact(llama128[1], tmp_path / "q8", quantize="int8", two_level_scales=True)
    for edit, message in [(lambda d: d["ffn_layers"][0]["quant"].update(sub_bits=5), "two-level scales"),
                          (lambda d: d["ffn_layers"][0]["quant"].update(super_size=256), "two-level scales"),
                          (lambda d: d["ffn_layers"][0]["quant"].pop("sub_bits"), "super_size 128 without sub_bits")]:
        _assert_refused(path, tmp_path / str(id(edit)), edit, message)
