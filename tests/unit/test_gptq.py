"""flashio.gptq: GPTQ codes in the artifact's group layout move a layer's output on correlated
calibration inputs less than round to nearest, and store exactly the values they were solved for."""

from __future__ import annotations

import pytest
import torch

from flashio.errors import FlashError
from flashio.gptq import gptq_neurons, gptq_rows
from flashio.quant import (
    EMBED_CODES,
    GroupCodes,
    dequantize_rows,
    quantize_groups,
    quantize_rows,
    row_quant,
    scale_parities,
)


def _inputs(n_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """Correlated inputs, a few of them loud (as in LLMs); one distribution per dim, samples by seed."""
    g = torch.Generator().manual_seed(dim)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    scale = torch.logspace(-1, 0.7, dim)[torch.randperm(dim, generator=g)]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_tokens, dim, generator=g) @ mix + 0.3 * torch.randn(n_tokens, dim, generator=g)) * scale


def _values(gc: GroupCodes, bits: int, g: int) -> torch.Tensor:
    n, d = gc.codes.shape
    c = gc.codes.float().view(n, d // g, g)
    v = c * gc.scales.float()[:, :, None]
    return (v + gc.offsets.float()[:, :, None] if gc.offsets is not None else v).view(n, d)


@pytest.mark.parametrize("bits,offsets", [(4, True), (4, False), (8, False)])
def test_gptq_rows_beat_round_to_nearest_on_the_calibration_outputs(bits, offsets):
    torch.manual_seed(0)
    n, d, g = 48, 64, 16
    w = torch.randn(n, d) * 0.05
    x = _inputs(512, d, 1)
    gc = gptq_rows(w, x.T @ x, bits=bits, group_size=g, offsets=offsets)
    rtn = quantize_groups(w, bits, g, offsets)
    out_err = lambda v: (x @ (v - w).T).square().sum().item()  # noqa: E731
    assert out_err(_values(gc, bits, g)) < 0.85 * out_err(_values(rtn, bits, g))
    held = _inputs(512, d, 2)  # and on other inputs of the same distribution
    assert (held @ (_values(gc, bits, g) - w).T).square().sum() < (held @ (_values(rtn, bits, g) - w).T).square().sum()


@pytest.mark.parametrize("g", [16, 64])
def test_ranges_weighted_by_what_each_input_costs_move_the_outputs_less(g):
    """An asymmetric group's range chosen for its costly inputs (1 / [H^-1]_ii) rather than for
    all its weights alike: the calibration outputs move less, and held-out outputs too."""
    n, d = 48, 64
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.05
    x, held = _inputs(512, d, 1), _inputs(512, d, 2)
    err = {}
    for weighted in (True, False):
        v = _values(gptq_rows(w, x.T @ x, bits=4, group_size=g, offsets=True, weighted_ranges=weighted), 4, g)
        err[weighted] = [(inp @ (v - w).T).square().sum().item() for inp in (x, held)]
    assert err[True][0] < 0.95 * err[False][0] and err[True][1] < err[False][1]


@pytest.mark.parametrize("offsets", [True, False])
def test_gptq_neurons_beat_round_to_nearest_and_store_what_they_solved(offsets):
    torch.manual_seed(0)
    n, d, g = 80, 32, 16  # 80 neurons, down rows of 32
    down = torch.randn(n, d) * 0.05
    act = _inputs(1024, n, 3)
    gc = gptq_neurons(down, act.T @ act, bits=4, group_size=g, offsets=offsets)
    rtn = quantize_groups(down, 4, g, offsets)
    out_err = lambda v: (act @ (v - down)).square().sum().item()  # noqa: E731
    assert out_err(_values(gc, 4, g)) < 0.85 * out_err(_values(rtn, 4, g))
    q = row_quant(("up", "down"), dim=d, scheme="int4", group_size=g, offsets=offsets)
    order = torch.randperm(n)
    rows = quantize_rows(torch.cat([torch.zeros(n, d), down], 1)[order], q, {"down": gc[order]})
    torch.testing.assert_close(dequantize_rows(rows, q, "down"), _values(gc, 4, g)[order], rtol=0, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_int8_gptq_with_the_scales_in_the_codes(act_order):
    """int8 with one scale per part held in the first 16 codes' parities (RowQuant.embedded): GPTQ
    rounds those inputs to the nearest code of their parity and spreads the larger errors, so its
    outputs still move less than rounding to nearest; the rows store exactly what it solved."""
    n, d = 48, 64
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.05
    x = _inputs(512, d, 1)
    gc = gptq_rows(w, x.T @ x, bits=8, group_size=d, offsets=False, embedded=True, act_order=act_order)
    rtn = quantize_groups(w, 8, d, embedded=True)
    assert torch.equal(gc.codes[:, :EMBED_CODES] & 1, scale_parities(gc.scales))
    out_err = lambda v: (x @ (v - w).T).square().sum().item()  # noqa: E731
    assert out_err(_values(gc, 8, d)) < 0.85 * out_err(_values(rtn, 8, d))
    act = _inputs(1024, n, 3)
    down = torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 0.05
    gd = gptq_neurons(down, act.T @ act, bits=8, group_size=d, offsets=False, embedded=True)
    assert torch.equal(gd.codes[:, :EMBED_CODES] & 1, scale_parities(gd.scales))
    q = row_quant(("up", "down"), dim=d, scheme="int8")
    assert q.embedded
    rows = quantize_rows(torch.cat([w, down], 1), q, {"up": gc, "down": gd})
    torch.testing.assert_close(dequantize_rows(rows, q, "up"), _values(gc, 8, d), rtol=0, atol=0)
    torch.testing.assert_close(dequantize_rows(rows, q, "down"), _values(gd, 8, d), rtol=0, atol=0)
    with pytest.raises(FlashError, match="scales in the codes"):
        gptq_rows(w, x.T @ x, bits=8, group_size=16, offsets=False, embedded=True)


def test_gptq_refuses_mismatched_shapes():
    with pytest.raises(FlashError, match="calibration matrix"):
        gptq_rows(torch.randn(4, 32), torch.eye(16), bits=4, group_size=16, offsets=True)
    with pytest.raises(FlashError, match="does not divide"):
        gptq_neurons(torch.randn(4, 30), torch.eye(4), bits=4, group_size=16, offsets=True)


def test_calibration_hessians_are_the_ffn_inputs_gram_matrices_in_bounded_passes(tiny_llama):
    """tasks.hessians: H of each layer's FFN input and of its down projection's input, equal to the
    Gram matrices of those inputs captured from transformers directly; with room for one layer's
    matrices each pass fills one layer."""
    from tasks.hessians import CalibrationHessians

    model, path = tiny_llama
    src = _source(model, path)
    ids = torch.randint(3, 320, (5, 12), generator=torch.Generator().manual_seed(0))
    seen: dict = {}
    hooks = []

    def record(key, module):
        hooks.append(module.register_forward_pre_hook(
            lambda m, a: seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))

    for i, layer in enumerate(model.model.layers):
        record(("in", i), layer.mlp.gate_proj)
        record(("act", i), layer.mlp.down_proj)
        record(("qkv", i), layer.self_attn.k_proj)
        record(("o", i), layer.self_attn.o_proj)
    record("head", model.lm_head)
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    gram = {k: torch.cat(v).T @ torch.cat(v) for k, v in seen.items()}
    per_layer = 4 * (src.dim**2 + src.ffn_dim**2)
    hess = CalibrationHessians(src, ids, max_bytes=per_layer, batch_sequences=2)
    assert hess.layers_per_pass == 1
    for i in range(src.n_layers):
        h_in, h_act = hess(i)
        torch.testing.assert_close(h_in, gram[("in", i)], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h_act, gram[("act", i)], rtol=1e-4, atol=1e-4)
        for x in "qkv":  # the attention's three projections share their input
            torch.testing.assert_close(hess.resident(f"layers.{i}.attn.{x}.weight"), gram[("qkv", i)],
                                       rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hess.resident(f"layers.{i}.attn.o.weight"), gram[("o", i)], rtol=1e-4, atol=1e-4)
    assert hess.passes == src.n_layers  # asked for after their layer's FFN: no pass of their own
    torch.testing.assert_close(hess.resident("lm_head.weight"), gram["head"], rtol=1e-4, atol=1e-4)
    assert hess.passes == src.n_layers  # the untied head's input was recorded in the first pass
    assert hess.resident("tok_embeddings.weight") is None and hess.resident("layers.9.attn.q.weight") is None
    assert CalibrationHessians(src, ids, resident_inputs=False).resident("layers.0.attn.q.weight") is None


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_resident_matrices_quantized_by_gptq_move_their_calibration_outputs_less(tiny_llama, tmp_path, scheme):
    """write_artifact with resident_hessians: the attention matrices, the untied head and the
    resident gate rows are quantized by GPTQ on their inputs' calibration matrices, which moves
    each one's outputs on those inputs (tr(dW H dW^T)) less than round to nearest does."""
    from flashio.format import Artifact, write_artifact
    from flashio.quant import assemble_resident
    from tasks.hessians import CalibrationHessians

    model, path = tiny_llama
    ids = torch.randint(3, 320, (8, 24), generator=torch.Generator().manual_seed(1))
    src = _source(model, path)
    ref = CalibrationHessians(src, ids)
    hs = {f"layers.{i}.attn.{x}.weight": ref.resident(f"layers.{i}.attn.{x}.weight")
          for i in range(src.n_layers) for x in "qkvo"}
    hs["lm_head.weight"] = ref.resident("lm_head.weight")
    hs.update({f"layers.{i}.ffn.gate": ref(i)[0] for i in range(src.n_layers)})
    err = {}
    for method in ("gptq", "rtn"):
        hess = CalibrationHessians(src, ids)
        out = write_artifact(path, tmp_path / method, dtype="float32", quantize="int4", quantize_resident=scheme,
                             gate_resident=True, hessians=hess,
                             resident_hessians=hess.resident if method == "gptq" else None)
        art = Artifact(out)
        res = art.load_resident()
        quant = assemble_resident(res, art.manifest.resident_quant)
        err[method] = {}
        for name, h in hs.items():
            q = quant[name]
            w = _dense(q)
            if name.endswith(".ffn.gate"):  # stored in the artifact's neuron order
                i = int(name.split(".")[1])
                ref_w = model.model.layers[i].mlp.gate_proj.weight.detach()[res[f"layers.{i}.ffn.order"]]
            else:
                ref_w = dict(model.named_parameters())[_hf_name(name)].detach()
            dw = (w - ref_w).double()
            err[method][name] = float(((dw @ h.double()) * dw).sum())
    for name in hs:
        assert err["gptq"][name] < err["rtn"][name], (name, err["gptq"][name], err["rtn"][name])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_tied_head_is_quantized_by_gptq_on_its_input(tmp_path, scheme):
    """A tied head: CalibrationHessians records its input (the decoder's normed output) as for an
    untied one, and the writer quantizes the token embeddings it shares by GPTQ on it, which moves
    the head's calibration outputs (tr(dW H dW^T)) less than round to nearest does."""
    from flashio.format import Artifact, write_artifact
    from flashio.quant import assemble_resident
    from tasks.hessians import CalibrationHessians
    from tests.conftest import make_llama

    path = tmp_path / "ckpt"
    model = make_llama(path, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(3, 320, (8, 24), generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    hook.remove()
    src = _source(model, path)
    h = CalibrationHessians(src, ids).resident("lm_head.weight")
    torch.testing.assert_close(h, torch.cat(seen).T @ torch.cat(seen), rtol=1e-4, atol=1e-4)
    ref_w = model.model.embed_tokens.weight.detach()
    err = {}
    for method in ("gptq", "rtn"):
        hess = CalibrationHessians(src, ids)
        art = Artifact(write_artifact(path, tmp_path / method, dtype="float32", quantize="int4",
                                      quantize_resident=scheme, hessians=hess,
                                      resident_hessians=hess.resident if method == "gptq" else None))
        assert "lm_head.weight" not in art.load_resident()
        dw = (_dense(assemble_resident(art.load_resident(), art.manifest.resident_quant)["tok_embeddings.weight"])
              - ref_w).double()
        err[method] = float(((dw @ h.double()) * dw).sum())
    assert err["gptq"] < 0.9 * err["rtn"], err


def _source(model, path):
    from tasks.source import SourceModel

    c = model.config
    return SourceModel(ref=str(path), path=path, revision=None, model_type="llama", n_layers=c.num_hidden_layers,
                       dim=c.hidden_size, ffn_dim=c.intermediate_size, gated=True, max_positions=128,
                       config_dtype="float32", files=(), fingerprint="tiny-llama-hessians")


def _hf_name(name: str) -> str:
    if name == "lm_head.weight":
        return name
    i, x = name.split(".")[1], name.split(".")[3]
    return f"model.layers.{i}.self_attn.{x}_proj.weight"


def _dense(q) -> torch.Tensor:
    """A quantized resident matrix (QuantizedWeight or QuantizedRows) as float32 [out, in]."""
    from flashio.quant import QuantizedWeight

    if isinstance(q, QuantizedWeight):
        return q.codes.float() * q.scale.float()[:, None]
    return dequantize_rows(q.rows, q.q, "w")


def test_two_level_gptq_beats_round_to_nearest_and_stores_what_it_solved():
    """GPTQ with two-level scales (each super-block's steps chosen from its weights as updated so
    far, each group's scale and offset on their 6-bit grid): less calibration output error than
    two-level round to nearest, and the rows hold exactly the values it solved for."""
    n, d, s = 24, 256, 128
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.05
    x = _inputs(1024, d, 1)
    q = row_quant(("up", "down"), dim=d, scheme="int4", two_level=True)
    assert q.super_size == 256
    for sup in (128, 256):
        gc = gptq_rows(w, x.T @ x, bits=4, group_size=32, offsets=True, super_size=sup)
        rtn = quantize_groups(w, 4, 32, True, sup)
        out_err = lambda v: (x @ (v - w).T).square().sum().item()  # noqa: E731
        assert out_err(_values(gc, 4, 32)) < 0.85 * out_err(_values(rtn, 4, 32))
    act = _inputs(512, n, 3)
    down = gptq_neurons(w, act.T @ act, bits=4, group_size=32, offsets=True, super_size=256)
    assert (act @ (_values(down, 4, 32) - w)).square().sum() < (act @ (_values(rtn, 4, 32) - w)).square().sum()
    rows = quantize_rows(torch.cat([w, w], 1), q, {"up": gc, "down": down})
    torch.testing.assert_close(dequantize_rows(rows, q, "up"), _values(gc, 4, 32), rtol=0, atol=0)
    torch.testing.assert_close(dequantize_rows(rows, q, "down"), _values(down, 4, 32), rtol=0, atol=0)
    with pytest.raises(FlashError, match="two-level"):
        gptq_rows(w, x.T @ x, bits=4, group_size=32, offsets=True, super_size=s, act_order=True)
