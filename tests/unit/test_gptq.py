"""flashio.gptq: GPTQ codes in the artifact's group layout move a layer's output on correlated
calibration inputs less than round to nearest, and store exactly the values they were solved for."""

from __future__ import annotations

import pytest
import torch

from flashio.errors import FlashError
from flashio.gptq import gptq_neurons, gptq_rows
from flashio.quant import GroupCodes, dequantize_rows, quantize_groups, quantize_rows, row_quant


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
    from tasks.source import SourceModel

    model, path = tiny_llama
    c = model.config
    src = SourceModel(ref=str(path), path=path, revision=None, model_type="llama", n_layers=c.num_hidden_layers,
                      dim=c.hidden_size, ffn_dim=c.intermediate_size, gated=True, max_positions=128,
                      config_dtype="float32", files=(), fingerprint="tiny-llama-hessians")
    ids = torch.randint(3, 320, (5, 12), generator=torch.Generator().manual_seed(0))
    seen: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.gate_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen.setdefault(("in", i), []).append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen.setdefault(("act", i), []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    per_layer = 4 * (src.dim**2 + src.ffn_dim**2)
    hess = CalibrationHessians(src, ids, max_bytes=per_layer, batch_sequences=2)
    assert hess.layers_per_pass == 1
    for i in range(src.n_layers):
        h_in, h_act = hess(i)
        x, a = torch.cat(seen[("in", i)]), torch.cat(seen[("act", i)])
        torch.testing.assert_close(h_in, x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h_act, a.T @ a, rtol=1e-4, atol=1e-4)
    assert hess.passes == src.n_layers
