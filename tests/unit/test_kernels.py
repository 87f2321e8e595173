"""flashio.kernels: the one-token products on strided bundle rows, in each of rows.c's builds,
against float64 references; and flashio.ffn's one-token path against torch's products."""

from __future__ import annotations

import platform
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from flashio import ffn, kernels
from flashio.kernels import FLAGS, Kernels, build, load

BASE = ("-O3", "-fPIC", "-shared", "-std=c11")
VARIANTS = {"native": FLAGS, "portable": BASE}
if platform.machine() in ("x86_64", "AMD64"):
    VARIANTS["avx2"] = (*BASE, "-mavx2", "-mf16c", "-mfma", "-mno-avx512f")


def _cpu_has(*flags: str) -> bool:
    line = kernels._cpu_flags().split()
    return all(f in line for f in flags)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def built(request, tmp_path_factory) -> Kernels:
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    if request.param == "avx2" and not _cpu_has("avx2", "f16c", "fma"):
        pytest.skip("the CPU has no AVX2/F16C/FMA")
    k = Kernels(load(build(VARIANTS[request.param], out_dir=tmp_path_factory.mktemp("kernels"))))
    expected = {"portable": 0, "avx2": 256}.get(request.param)
    if expected is not None:
        assert k.vector_bits == expected
    return k


def _rows(n: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, length", [(1, 5), (7, 64), (37, 200), (130, 1027)])
def test_dot_and_axpy_match_float64_on_strided_rows(built, dtype, n, length):
    # a bundle of three parts of `length` plus 3 odd elements: rows are strided, parts unaligned
    rows = _rows(n, 3 * length + 3, dtype)
    part = slice(length + 3, 2 * length + 3)
    g = torch.Generator().manual_seed(1)
    x, a = torch.randn(length, generator=g), torch.randn(n, generator=g)
    a[::3] = 0.0
    sub = rows[:, part].double()
    want_dot = sub @ x.double()
    want_axpy = a.double() @ sub
    got_dot = built.dot(rows, part, x)
    got_axpy = built.axpy(rows, part, a)
    assert got_dot.dtype == got_axpy.dtype == torch.float32
    tol = 1e-5 * (1 + length ** 0.5)
    torch.testing.assert_close(got_dot.double(), want_dot, rtol=0, atol=tol * float(want_dot.abs().max()))
    torch.testing.assert_close(got_axpy.double(), want_axpy, rtol=0, atol=tol * float(want_axpy.abs().max()))
    # the first m rows only
    m = max(1, n // 2)
    torch.testing.assert_close(built.dot(rows, part, x, m).double(), want_dot[:m], rtol=0,
                               atol=tol * float(want_dot.abs().max()))
    torch.testing.assert_close(built.axpy(rows, part, a[:m], m).double(), a[:m].double() @ sub[:m], rtol=0,
                               atol=tol * float(want_axpy.abs().max()))


def test_half_special_values_widen_exactly(built):
    # subnormals, the largest half, signed zeros, infinities: the portable path's own widening
    vals = torch.tensor([2.0 ** -24, -(2.0 ** -20), 6.1e-5, 65504.0, -0.0, 0.0, 1.0, -2.5, float("inf")],
                        dtype=torch.float16)
    rows = vals.reshape(-1, 1).contiguous()
    got = built.dot(rows, slice(0, 1), torch.ones(1))
    assert torch.equal(got, vals.float())
    nan_row = torch.tensor([[float("nan")]], dtype=torch.float16)
    assert torch.isnan(built.dot(nan_row, slice(0, 1), torch.ones(1))).all()


def test_axpy_does_not_read_rows_with_zero_coefficient(built):
    rows = _rows(9, 16, torch.float16)
    rows[4] = float("nan")  # a row whose neuron did not fire: never read, so it cannot poison the sum
    a = torch.ones(9)
    a[4] = 0.0
    got = built.axpy(rows, slice(0, 16), a)
    assert torch.isfinite(got).all()
    keep = torch.tensor([i != 4 for i in range(9)])
    torch.testing.assert_close(got, rows[keep].float().sum(0), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused(built):
    rows = _rows(4, 8, torch.float16)
    with pytest.raises(ValueError, match="contiguous rows"):
        built.dot(rows.t(), slice(0, 2), torch.ones(2))
    with pytest.raises(ValueError, match="rows asked"):
        built.dot(rows, slice(0, 8), torch.ones(8), n=5)
    with pytest.raises(ValueError, match="expected"):
        built.axpy(rows, slice(0, 8), torch.ones(3))
    with pytest.raises(ValueError, match="kernels take"):
        built.dot(rows.to(torch.int16), slice(0, 8), torch.ones(8))
    with pytest.raises(ValueError, match="contiguous slice"):
        built.dot(rows, slice(0, 8, 2), torch.ones(4))


def test_a_broken_compiler_says_why(tmp_path, monkeypatch):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake && exit 0\necho 'no such target' >&2\nexit 3\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    with pytest.raises(RuntimeError, match="no such target"):
        build(out_dir=tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # no half-written library left behind
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        build(out_dir=tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["relu", "gated", "gated-gelu", "gate_act+mask", "bias+zero"])
def test_one_token_ffn_equals_torch_products(dtype, case, monkeypatch):
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    D, R, n = 96, 70, 61  # rows past n pad the matmul and are ignored
    names = ("up", "gate", "down") if case.startswith("gated") else ("up", "down")
    parts = {p: slice(j * D, (j + 1) * D) for j, p in enumerate(names)}
    rows = _rows(R, len(names) * D, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, D, generator=g).to(dtype)
    kw = {}
    b_up = b_gate = zero = None
    if case == "gate_act+mask":
        kw = dict(gate_act=torch.rand(1, n, generator=g).to(dtype), mask=(torch.rand(1, n, generator=g) > 0.5).to(dtype))
    if case == "bias+zero":
        b_up = (torch.randn(n, generator=g) * 0.1).to(dtype)
        zero = torch.tensor([0, 5, 60])
    activation = {"gated": "silu", "gated-gelu": "gelu_pytorch_tanh"}.get(case, "relu")
    got = ffn.ffn_compute(h, rows, parts, b_up, b_gate, zero, n, activation, **kw)
    monkeypatch.setattr(kernels, "supports", lambda rows: False)
    want = ffn.ffn_compute(h.double(), rows.double(), parts, None if b_up is None else b_up.double(), None, zero, n,
                           activation, **{k: v.double() for k, v in kw.items()})
    assert got.dtype == dtype and got.shape == (1, D)
    scale = float(want.abs().max())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale)


QUANT_CASES = [  # scheme, dim, group size, offsets
    ("int8", 96, None, None), ("int8", 96, 32, None), ("int8", 64, 16, True),
    ("int4", 128, 32, None), ("int4", 128, 32, False), ("int4", 192, 192, None),  # a group across both halves
    ("int4", 96, 16, None), ("int4", 40, 8, None), ("int4", 36, 36, False),  # the last two: scalar (half not vector-wide)
    # int8 activations where the build has them (AVX-512 VNNI): groups of 32, of 64 and more, across both halves
    ("int8", 128, None, None), ("int8", 128, 32, None), ("int8", 128, 64, True), ("int4", 256, 64, None),
    ("int4", 256, 256, None), ("int4", 256, 32, False),
]


def _qdot_reference(built, rows: torch.Tensor, q, part: str, x: torch.Tensor) -> torch.Tensor:
    """float64 [n]: the part's rows times x as the kernels compute it: x rounded to int8 blocks
    (kernels.int8_activations) where the build takes that path"""
    from flashio.quant import dequantize_rows
    w = dequantize_rows(rows, q, part).double()
    if built.int8_activations(q.dim, q.bits, q.group_size):
        x = kernels.int8_activations(x)
    return w @ x.double()


@pytest.mark.parametrize("scheme, dim, group, offsets", QUANT_CASES)
def test_quantized_products_match_dequantized_rows(built, scheme, dim, group, offsets):
    from flashio.quant import row_quant
    _check_quantized_products(built, row_quant(("up", "gate", "down"), dim=dim, scheme=scheme, group_size=group,
                                               offsets=offsets))


@pytest.mark.parametrize("dim", [128, 256, 384, 640])  # super-blocks of 128, 256, 128 (384), 128 (640)
def test_two_level_products_match_dequantized_rows(built, dim):
    """int4 rows with two-level scales (6-bit multiples of each super-block's fp16 steps): each
    row's scales are decoded before its codes are read, on every path (VNNI, four rows, one row)."""
    from flashio.quant import row_quant
    q = row_quant(("up", "gate", "down"), dim=dim, scheme="int4", two_level=True)
    assert q.sub_bits == 6 and q.super_size == (256 if dim % 256 == 0 else 128)
    _check_quantized_products(built, q)


def _check_quantized_products(built, q):
    from flashio.quant import dequantize_rows, quantize_rows
    dim = q.dim
    n = 23  # not a multiple of 4: the four-row paths and the single-row tail
    g = torch.Generator().manual_seed(5)
    rows = quantize_rows(torch.randn(n, 3 * dim, generator=g) * 0.05, q)
    x, a = torch.randn(dim, generator=g), torch.randn(n, generator=g)
    a[1::4] = 0.0
    for part in ("up", "gate", "down"):
        w = dequantize_rows(rows, q, part).double()
        want_dot, want_axpy = _qdot_reference(built, rows, q, part, x), a.double() @ w
        # int8 activations or not, the product is near the float one
        torch.testing.assert_close(want_dot, w @ x.double(), rtol=0, atol=0.02 * float(want_dot.abs().max()))
        got_dot = built.qdot(rows, q.layout(part), x)
        got_axpy = built.qaxpy(rows, q.layout(part), a)
        tol = 2e-6 * dim
        torch.testing.assert_close(got_dot.double(), want_dot, rtol=0, atol=tol * float(want_dot.abs().max()))
        torch.testing.assert_close(got_axpy.double(), want_axpy, rtol=0, atol=tol * float(want_axpy.abs().max()))
        m = 6
        torch.testing.assert_close(built.qaxpy(rows, q.layout(part), a[:m], m).double(), a[:m].double() @ w[:m],
                                   rtol=0, atol=tol * float(want_axpy.abs().max()))
        keep = (torch.arange(n) % 3 != 1).float()  # rows at 0 are not read and give 0
        masked = built.qdot(rows, q.layout(part), x, mask=keep)
        assert (masked[keep == 0] == 0).all()
        torch.testing.assert_close(masked[keep == 1].double(), want_dot[keep == 1], rtol=0,
                                   atol=tol * float(want_dot.abs().max()))


@pytest.mark.parametrize("dim, group", [(640, 32), (128, 64), (96, 32), (128, 128)])
def test_one_part_int8_rows_read_in_order_match_the_batched_path(built, dim, group):
    """Resident int8 rows of one part (the token embeddings) with every row read go a row at a
    time in order (VNNI builds); with a mask they go four at a time: the same products, row for
    row, and both the dequantized rows times x as the kernels round it."""
    from flashio.quant import embedding_row_quant, quantize_rows, row_quant
    q = row_quant(("w",), dim=dim, scheme="int8", group_size=group, aligned=False, offsets=False, embed_scales=False)
    if group == 32:
        assert q == embedding_row_quant(dim)
    g = torch.Generator().manual_seed(6)
    n = 37  # four-row batches and a tail
    rows = quantize_rows(torch.randn(n, dim, generator=g) * 0.05, q)
    x = torch.randn(dim, generator=g)
    in_order = built.qdot(rows, q.layout("w"), x)
    batched = built.qdot(rows, q.layout("w"), x, mask=torch.ones(n))
    torch.testing.assert_close(in_order, batched, rtol=0, atol=1e-6 * float(batched.abs().max()))
    want = _qdot_reference(built, rows, q, "w", x)
    torch.testing.assert_close(in_order.double(), want, rtol=0, atol=2e-6 * dim * float(want.abs().max()))


@pytest.mark.parametrize("dim", [16, 128, 640])
@pytest.mark.parametrize("embed", [True, False])
def test_int8_scales_in_the_codes_or_after_them(built, dim, embed):
    """int8 rows with one scale per part: the scale assembled from the first 16 codes' parities
    (the default for rows read from flash) or read after the codes, on every path."""
    from flashio.quant import row_quant
    q = row_quant(("up", "gate", "down"), dim=dim, scheme="int8", embed_scales=embed)
    assert q.embedded == embed and (q.layout("up").scales < 0) == embed
    _check_quantized_products(built, q)


def test_quantized_arguments_are_refused(built):
    from flashio.quant import row_quant
    q = row_quant(("up", "down"), dim=64, scheme="int8")
    rows = torch.zeros(4, q.row_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        built.qdot(rows.float(), q.layout("up"), torch.ones(64))
    with pytest.raises(ValueError, match="bytes asked"):
        built.qdot(rows[:, :-1], q.layout("up"), torch.ones(64))
    with pytest.raises(ValueError, match="expected"):
        built.qaxpy(rows, q.layout("down"), torch.ones(5))
    with pytest.raises(ValueError, match="unsupported"):
        kernels.QuantLayout(q.row_bytes, 64, 3, 64, 0, 64, -1)
    with pytest.raises(ValueError, match="scales in the codes"):  # int4, or groups smaller than the part
        kernels.QuantLayout(q.row_bytes, 64, 4, 64, 0, -1, -1)
    with pytest.raises(ValueError, match="scales in the codes"):
        kernels.QuantLayout(q.row_bytes, 64, 8, 32, 0, -1, -1)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-two-level"])
@pytest.mark.parametrize("case", ["gated", "gate_act+mask+zero", "bias"])
def test_one_token_quantized_ffn_equals_chunked_products(scheme, case, monkeypatch):
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    import torch.nn.functional as F

    from flashio.quant import RowScratch, quant_ffn_compute, quantize_rows, row_quant
    D, R, n = 128, 50, 45
    names = ("up", "gate", "down") if case == "gated" else ("up", "down")
    q = row_quant(names, dim=D, scheme=scheme.removesuffix("-two-level"), two_level=scheme.endswith("-two-level"))
    g = torch.Generator().manual_seed(6)
    rows = quantize_rows(torch.randn(R, len(names) * D, generator=g) * 0.05, q)
    h = torch.randn(1, D, generator=g)
    kw, b_up, zero = {}, None, None
    if case == "gate_act+mask+zero":
        kw = dict(gate_act=torch.rand(1, n, generator=g), mask=(torch.rand(1, n, generator=g) > 0.5).float())
        zero = torch.tensor([2, 44])
    if case == "bias":
        b_up = torch.randn(n, generator=g) * 0.1
    scratch = RowScratch(q, rows=16)
    got = quant_ffn_compute(h, rows, q, scratch, b_up, None, zero, n, F.silu, **kw)
    if kernels.kernels().int8_activations(D, q.bits, q.group_size):  # the up and gate products take h in int8 blocks
        h = kernels.int8_activations(h[0])[None]
    monkeypatch.setattr(kernels, "available", lambda: False)
    want = quant_ffn_compute(h, rows, q, scratch, b_up, None, zero, n, F.silu, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("n, length", [(1, 7), (9, 64), (33, 300), (6, 256)])
def test_int8_matvec_matches_float64(built, n, length):
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-127, 128, (n, length), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, generator=g) * 0.01 + 1e-4).half()
    x = torch.randn(length, generator=g)
    w = codes.double() * scales.double()[:, None]
    want = w @ (kernels.int8_activations(x) if built.int8_activations(length, 8, length) else x).double()
    torch.testing.assert_close(want, w @ x.double(), rtol=0, atol=0.02 * float(want.abs().max()))
    got = built.i8_matvec(codes, scales, x)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="int8"):
        built.i8_matvec(codes[:, ::2], scales, x[::2].contiguous())
    with pytest.raises(ValueError, match="scales"):
        built.i8_matvec(codes, scales.float(), x)


def test_quantized_resident_linear_one_token_equals_torch_kernel(monkeypatch):
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    from flashio.quant import QuantizedWeight, quantize_resident
    g = torch.Generator().manual_seed(8)
    codes, scales = quantize_resident(torch.randn(48, 80, generator=g) * 0.05)
    w = QuantizedWeight(codes, scales)
    x, b = torch.randn(1, 80, generator=g), torch.randn(48, generator=g)
    got = w.linear(x, b)
    monkeypatch.setattr(kernels, "available", lambda: False)
    want = w.linear(x, b)  # torch's int8 kernel (bf16 input: its rounding is the tolerance)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))
    exact = x.double() @ (codes.double() * scales.double()[:, None]).T + b.double()
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_resident_linear_one_token_takes_the_kernels(dtype, monkeypatch):
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    from flashio.quant import linear
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(70, 96, generator=g) * 0.1).to(dtype)
    x, b = torch.randn(1, 96, generator=g).to(dtype), torch.randn(70, generator=g).to(dtype)
    calls = []
    dot = kernels.Kernels.dot
    monkeypatch.setattr(kernels.Kernels, "dot", lambda self, *a, **k: calls.append(1) or dot(self, *a, **k))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    got = linear(x, w, b)
    assert calls and got.dtype == dtype and got.shape == (1, 70)
    exact = x.double() @ w.double().T
    # the kernels accumulate in float32: only the final rounding to dtype (and the bias add) differ
    eps = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), exact + b.double(), rtol=0, atol=eps * float(exact.abs().max() + 1))
    calls.clear()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # torch's GEMV has more threads than the kernels
    monkeypatch.setattr(kernels, "threads", lambda: 1)
    torch.testing.assert_close(linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert not calls
    monkeypatch.setattr(kernels, "threads", lambda: 2)  # as many: the kernels
    linear(x, w, b)
    assert calls


def test_rows_with_strided_elements_are_not_taken():
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    rows = torch.randn(24, 2)[:, :1].t()  # one row whose elements are 2 apart
    assert not kernels.supports(rows)
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.kernels().dot(rows, slice(0, 24), torch.ones(24))
    parts = {"up": slice(0, 12), "down": slice(12, 24)}
    h = torch.randn(1, 12)
    got = ffn.ffn_compute(h, rows, parts, None, None)  # torch's products: the right values
    want = _relu_ffn(h, rows.contiguous(), parts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _relu_ffn(h: torch.Tensor, rows: torch.Tensor, parts: dict[str, slice]) -> torch.Tensor:
    return torch.relu(h @ rows[:, parts["up"]].T) @ rows[:, parts["down"]]


def test_a_compiler_that_hangs_is_a_failed_build(tmp_path, monkeypatch):
    import subprocess
    real = subprocess.run

    def run(cmd, *a, **kw):
        if "--version" in cmd:
            return real(cmd, *a, **kw)
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))

    monkeypatch.setattr(kernels.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="timed out"):
        build(out_dir=tmp_path)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_why", None)
    monkeypatch.setattr(kernels, "cache_dir", lambda: tmp_path / "fresh")
    assert kernels.library() is None and "timed out" in kernels.why_not()  # once, then torch's products


# ---- the kernels' threads (rows.c's pool): a call's rows cut into chunks, taken by the caller and workers ----

def _products(k: Kernels, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every kernel once on inputs large enough to be split (over 256 KiB of rows), masks and
    zero coefficients included."""
    from flashio.quant import quantize_resident, quantize_rows, row_quant
    g = torch.Generator().manual_seed(seed)
    n, d = 700, 256
    rows = (torch.randn(n, 3 * d, generator=g) * 0.05).half()
    parts = {"gate": slice(0, d), "up": slice(d, 2 * d), "down": slice(2 * d, 3 * d)}
    x, a = torch.randn(d, generator=g), torch.randn(n, generator=g)
    a[::3] = 0.0
    mask = (torch.rand(n, generator=g) < 0.6).float()
    q = row_quant(("up", "down"), dim=d, scheme="int4", group_size=32)
    qrows = quantize_rows(torch.randn(4 * n, 2 * d, generator=g) * 0.05, q)
    qa = torch.randn(4 * n, generator=g)
    qa[1::4] = 0.0
    codes, scales = quantize_resident(torch.randn(2 * n, 4 * d, generator=g) * 0.05)
    y, act = k.ffn(rows, parts, x, "silu", mask=mask)
    return {"dot": k.dot(rows, parts["up"], x), "axpy": k.axpy(rows, parts["down"], a), "ffn": y, "ffn_a": act,
            "qdot": k.qdot(qrows, q.layout("up"), x, mask=(qa != 0).float()), "qaxpy": k.qaxpy(qrows, q.layout("down"), qa),
            "i8": k.i8_matvec(codes, scales, torch.randn(4 * d, generator=g))}


def test_threads_split_calls_with_the_same_results(built):
    lib = built.lib
    try:
        assert lib.flashio_set_threads(1) == 1
        one = _products(built)
        for n in (2, 3, 5):  # 3 and 5: more threads than this machine's cores
            assert lib.flashio_set_threads(n) == n and lib.flashio_threads() == n
            split = _products(built)
            again = _products(built)
            for name, want in one.items():
                # the same run to run; from one thread only the sums' rounding differs (chunks
                # of the down products are added in order), rows' own products are unchanged
                assert torch.equal(split[name], again[name]), name
                if name in ("dot", "ffn_a", "qdot", "i8"):
                    assert torch.equal(split[name], want), name
                else:
                    torch.testing.assert_close(split[name], want, rtol=0, atol=1e-5 * float(want.abs().max()))
                    assert not torch.equal(split[name], torch.zeros_like(want))
    finally:
        lib.flashio_set_threads(1)


@pytest.fixture
def two_threads(built) -> Iterator[Kernels]:
    """`built` with its calls split over two threads (one again afterwards)."""
    built.lib.flashio_set_threads(2)
    yield built
    built.lib.flashio_set_threads(1)


def test_threads_two_callers_at_once(two_threads):
    import threading
    want = _products(two_threads)
    got: list[dict] = []
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(5):
                got.append(_products(two_threads))
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and len(got) == 15
    for r in got:  # a call that finds the workers busy computes its chunks alone: the same chunks
        for name in want:
            assert torch.equal(r[name], want[name]), name


def test_threads_after_fork_the_child_computes_alone(two_threads):
    import multiprocessing
    want = _products(two_threads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child_products, args=(two_threads, queue))
    p.start()
    threads, got = queue.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and threads == 1
    for name in want:  # one thread in the child: only the chunks' sums' rounding may differ
        torch.testing.assert_close(torch.from_numpy(got[name]), want[name], rtol=0, atol=1e-5 * float(want[name].abs().max()))


def _child_products(k: Kernels, queue) -> None:
    queue.put((k.lib.flashio_threads(), {name: v.numpy() for name, v in _products(k).items()}))


def test_set_threads_api():
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    before = kernels.threads()
    try:
        assert kernels.set_threads(3) == 3 == kernels.threads()
        assert kernels.set_threads(1) == 1 == kernels.threads()
        with pytest.raises(ValueError, match=">= 1"):
            kernels.set_threads(0)
        with pytest.raises(ValueError, match=">= 1"):
            kernels.set_threads(True)
    finally:
        kernels.set_threads(before)
    assert kernels.default_threads(1) == 1 and kernels.default_threads(2) == 2
    assert kernels.default_threads(64) == kernels.MAX_DEFAULT_THREADS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_predictor_one_token_logits_equal_the_batched_ones(dtype, monkeypatch):
    from flashio.predictor import PredictorWeights
    g = torch.Generator().manual_seed(10)
    p = PredictorWeights((torch.randn(24, 96, generator=g) * 0.1).to(dtype), (torch.randn(300, 24, generator=g) * 0.1).to(dtype),
                         (torch.randn(300, generator=g) * 0.1).to(dtype))
    x = torch.randn(3, 96, generator=g).to(dtype)
    calls = []
    if kernels.available():
        dot = kernels.Kernels.dot
        monkeypatch.setattr(kernels.Kernels, "dot", lambda self, *a, **k: calls.append(1) or dot(self, *a, **k))
    batched = p.logits(x)  # [3, 300]: torch's addmm
    one = torch.cat([p.logits(x[t : t + 1]) for t in range(3)])  # a token at a time: the resident matrices' path
    assert one.shape == batched.shape == (3, 300) and one.dtype == dtype
    assert bool(calls) == kernels.available()  # one token: the kernels
    eps = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(one.float(), batched.float(), rtol=0, atol=eps * float(batched.float().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h, hk, dh, s", [(1, 1, 5, 1), (4, 2, 24, 9), (8, 1, 64, 37), (6, 3, 128, 700)])
@pytest.mark.parametrize("threads", [1, 2])
def test_attend1_matches_float64_over_a_kv_cache(built, dtype, h, hk, dh, s, threads):
    """One query's attention over the first s positions of a [Hk, cap, Dh] cache (grouped-query
    heads, odd head sizes; split over threads where the keys are large enough)."""
    g = torch.Generator().manual_seed(h * 1000 + s)
    cap = s + 11
    k, v = torch.randn(hk, cap, dh, generator=g).to(dtype), torch.randn(hk, cap, dh, generator=g).to(dtype)
    q = torch.randn(h, dh, generator=g).to(dtype)
    scale = dh ** -0.5
    kk = k[:, :s].double().repeat_interleave(h // hk, 0)  # [H, S, Dh]: head i reads kv head i // (h // hk)
    vv = v[:, :s].double().repeat_interleave(h // hk, 0)
    p = torch.softmax((kk @ q.double()[:, :, None])[..., 0] * scale, dim=-1)  # [H, S]
    want = (p[:, None, :] @ vv)[:, 0].reshape(-1)
    assert built.lib.flashio_set_threads(threads) == threads
    try:
        got = built.attend1(q, k[:, :s], v[:, :s], scale)
    finally:
        built.lib.flashio_set_threads(1)
    assert got.dtype == torch.float32 and got.shape == (h * dh,)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * (1 + dh ** 0.5) * float(want.abs().max()))


def test_attend1_refuses_what_it_cannot_read(built):
    q, k = torch.randn(4, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="attend1"):
        built.attend1(q, k, k.half(), 1.0)  # two dtypes
    with pytest.raises(ValueError, match="attend1"):
        built.attend1(torch.randn(3, 8), k, k, 1.0)  # 3 heads over 2 kv heads
    with pytest.raises(ValueError, match="attend1"):
        built.attend1(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, 1.0)  # keys not contiguous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_of_one_query_takes_the_kernels(dtype, window, monkeypatch):
    """flashio.models.base.attend with one query (decoding) goes through attend1 and gives what
    torch's path gives, within the rounding torch's path adds (it rounds scores and probabilities
    to dtype); the kernels' result is at least as close to float64."""
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    from flashio.models.base import attend
    g = torch.Generator().manual_seed(10)
    h, hk, dh, s = 8, 2, 32, 12
    k, v = torch.randn(hk, s + 4, dh, generator=g).to(dtype), torch.randn(hk, s + 4, dh, generator=g).to(dtype)
    q = torch.randn(h, 1, dh, generator=g).to(dtype)
    calls = []
    attend1 = kernels.Kernels.attend1
    monkeypatch.setattr(kernels.Kernels, "attend1", lambda self, *a: calls.append(1) or attend1(self, *a))
    got = attend(q, k[:, :s], v[:, :s], s - 1, dh ** -0.5, window=window)
    assert calls == [1] and got.dtype == dtype and got.shape == (1, h * dh)
    exact = attend(q.double(), k[:, :s].double(), v[:, :s].double(), s - 1, dh ** -0.5, window=window)
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch_path = attend(q, k[:, :s], v[:, :s], s - 1, dh ** -0.5, window=window)
    assert calls == [1]
    eps = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), torch_path.double(), rtol=0, atol=eps)
    assert (got.double() - exact).abs().max() <= (torch_path.double() - exact).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, n", [(1, 5), (3, 64), (1, 4096), (4, 640)])
def test_rms_rounds_as_llamas_norm(built, dtype, rows, n):
    """flashio_rms against transformers' LlamaRMSNorm formula in torch: the same values but where
    the mean's summation order moves r by an ulp and a rounding with it (at most one unit in the
    last place, rarely); weights over nine decades, so that fp16 products reach its subnormals."""
    g = torch.Generator().manual_seed(rows * n)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    w = (torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-7, 2, generator=g)).to(dtype)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = built.rms(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    mant, tiny = {torch.float32: (23, 2.0 ** -149), torch.float16: (10, 2.0 ** -24), torch.bfloat16: (7, 2.0 ** -133)}[dtype]
    diff = (got.double() - want.double()).abs()
    assert bool((diff <= want.double().abs() * 2.0 ** -mant + tiny).all())
    assert float((got != want).float().mean()) <= (0.75 if dtype == torch.float32 else 0.01)
    with pytest.raises(ValueError, match="rms takes"):
        built.rms(x, w.float() if dtype != torch.float32 else w.half(), 1e-6)


def test_llama_norm_takes_the_kernels(monkeypatch):
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    from flashio.models.llama import Model
    calls = []
    rms = kernels.Kernels.rms
    monkeypatch.setattr(kernels.Kernels, "rms", lambda self, *a: calls.append(1) or rms(self, *a))
    model = Model.__new__(Model)
    model.args = type("A", (), {"norm_eps": 1e-5})()
    x, w = torch.randn(2, 48).half(), torch.randn(48).half()
    got = model._rms(x, w)
    assert calls == [1]
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch.testing.assert_close(got, model._rms(x, w), rtol=2e-3, atol=1e-5)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, dh", [(1, 2), (8, 64), (32, 128), (4, 256)])
def test_rope_equals_torchs_rotation(built, dtype, rows, dh):
    """flashio_rope against flashio.models.llama.apply_rope (transformers' formula) at one
    position: equal, every rounding included."""
    from flashio.models.llama import apply_rope, rope_table
    g = torch.Generator().manual_seed(rows + dh)
    x = (torch.randn(rows, 1, dh, generator=g) * 4).to(dtype)
    inv = 1.0 / (10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    cos, sin = rope_table(inv.float(), 37, 1, dtype)
    want = apply_rope(x, cos, sin)
    got = built.rope(x.reshape(rows, dh), cos[0], sin[0]).view(rows, 1, dh)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="rope takes"):
        built.rope(x.reshape(rows, dh), cos[0].double(), sin[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_predictor_active_equals_the_logits_selection(dtype, threads):
    """PredictorWeights.active (one native call) picks exactly the neurons that the logits path
    picks (logits - logit_threshold > 0 after torch's roundings), scores crowded around the
    threshold so that the roundings decide some of them; the rank-1024 shape splits over threads."""
    from flashio.predictor import PredictorWeights
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    before = kernels.threads()
    kernels.set_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        for r, d, n in ((24, 96, 300), (1024, 512, 2000)):
            A = (torch.randn(r, d, generator=g) * d ** -0.5).to(dtype)
            B = (torch.randn(n, r, generator=g) * 1e-3).to(dtype)  # small products: the bias decides near the threshold
            p = PredictorWeights(A, B, torch.zeros(n, dtype=dtype), threshold=0.6)
            p = PredictorWeights(A, B, (p.logit_threshold + torch.randn(n, generator=g) * 2e-3).to(dtype), threshold=0.6)
            for _ in range(4):
                x = torch.randn(1, d, generator=g).to(dtype)
                s = (p.logits(x) - p.logit_threshold)[0]
                want = torch.nonzero(s > 0).flatten().numpy()
                got = p.active(x)
                assert got is not None and got.dtype == np.int64
                np.testing.assert_array_equal(got, want)
                near = int((s.float().abs() < 4e-3).sum())
                assert 0 < len(want) < n and near > n // 20  # a real mix, many at the threshold
    finally:
        kernels.set_threads(before)
    assert PredictorWeights(A, B, p.bias).active(torch.randn(2, d).to(dtype)) is None  # two tokens: logits
