"""The exact-gate layout and selections (flashio.exact): gate rows resident, up + down on flash,
checked against transformers' Llama with the same neurons zeroed per token."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flashio
from flashio.budget import MemoryBudget
from flashio.config import FlashConfig
from flashio.errors import BudgetError, FlashError, FormatError
from flashio.exact import (
    ContributionOracleEngine,
    GateEngine,
    GatePredictorEngine,
    GateUpEngine,
    OracleEngine,
    kept_count,
)
from flashio.format import Artifact, parse_manifest, write_artifact
from flashio.predictor import PredictorWeights

PROMPT = [2, 17, 101, 55, 9, 240, 33, 78, 12, 5, 99, 301]
N, D, LAYERS = 192, 64, 2  # tests/conftest.py's tiny Llama


@pytest.fixture(scope="module")
def orders():
    rng = np.random.default_rng(0)
    return [rng.permutation(N) for _ in range(LAYERS)]


@pytest.fixture(scope="module")
def gate_artifact(tiny_llama, orders, tmp_path_factory):
    """The tiny Llama with its gate rows resident and a shuffled neuron order."""
    return write_artifact(tiny_llama[1], tmp_path_factory.mktemp("gate") / "art", orders=orders, gate_resident=True)


def zeroed_logits(hf, ids, density: float, by: str, up_rows: list[torch.Tensor] | None = None) -> torch.Tensor:
    """transformers' logits with, per token and layer, every neuron outside the top-k zeroed before
    down_proj: ranked by |act(gate)| (by='gate'), by |act(gate) * up| (by='contribution'), or by
    |act(gate) * (x @ up_rows[layer].T)| (by='sketch': other up weights, [N, D] in source order)."""
    handles = []
    for i, layer in enumerate(hf.model.layers):
        mlp = layer.mlp

        def pre(module, args, mlp=mlp, i=i):
            (h,) = args  # [1, T, N] = act(gate) * up
            x = module._x
            if by == "sketch":
                score = (mlp.act_fn(mlp.gate_proj(x)) * (x @ up_rows[i].T)).abs()
            else:
                score = mlp.act_fn(mlp.gate_proj(x)).abs() if by == "gate" else h.abs()
            k = kept_count(density, h.shape[-1])
            mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1).indices, True)
            return (h * mask,)

        def keep_input(module, args, down=mlp.down_proj):
            down._x = args[0]

        handles += [mlp.register_forward_pre_hook(keep_input), mlp.down_proj.register_forward_pre_hook(pre)]
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def test_layout_keeps_gate_rows_resident(gate_artifact, tiny_llama, orders, llama_artifact):
    a = Artifact(gate_artifact, verify=True)
    m = a.manifest
    raw = json.loads((gate_artifact / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["gate_resident"] is True
    assert [list(s) for s in m.bundle_layout] == [["up", 0, D], ["down", D, 2 * D]]
    assert all(L.bundle_width == 2 * D and L.gate_tensor == f"layers.{i}.ffn.gate" for i, L in enumerate(m.ffn_layers))
    resident = load_file(str(gate_artifact / "resident.safetensors"))
    hf = tiny_llama[0].model.layers[1].mlp
    assert torch.equal(resident["layers.1.ffn.gate"], hf.gate_proj.weight[torch.as_tensor(orders[1])])
    # an artifact without the option is written exactly as before: version 1, no new keys
    old = json.loads((llama_artifact / "manifest.json").read_text())
    assert old["format_version"] == 1 and "gate_resident" not in old and "gate_tensor" not in old["ffn_layers"][0]
    assert not Artifact(llama_artifact).manifest.gate_resident


@pytest.mark.parametrize("mode", ["dense", "naive", "oracle", "sparse"])
def test_every_mode_matches_transformers(gate_artifact, tiny_llama, mode):
    ref = zeroed_logits(tiny_llama[0], PROMPT, 1.0, "gate")  # density 1: nothing zeroed
    with torch.no_grad():
        assert (ref - tiny_llama[0](torch.tensor([PROMPT])).logits[0]).abs().max() == 0
    with flashio.open(gate_artifact, mode=mode, window=2) as model:
        assert (model.forward(PROMPT) - ref).abs().max().item() <= 1e-4
        assert (model.forward(PROMPT, token_by_token=True) - ref).abs().max().item() <= 1e-4


def test_density_one_and_a_threshold_every_neuron_clears_equal_dense(gate_artifact, tiny_llama, tmp_path):
    with flashio.open(gate_artifact, mode="dense") as dense, \
            flashio.open(gate_artifact, selection="gate", density=1.0) as gate:
        assert isinstance(gate.engine, GateEngine)
        want = dense.forward(PROMPT)
        assert (gate.forward(PROMPT) - want).abs().max().item() <= 1e-5
        assert (gate.forward(PROMPT, token_by_token=True) - want).abs().max().item() <= 1e-5
    low = write_artifact(tiny_llama[1], tmp_path / "low", gate_resident=True, active_thresholds=[-1.0, -1.0])
    with flashio.open(low) as model:  # mode sparse on a gate-resident artifact: the exact gate by default
        assert isinstance(model.engine, GateEngine)
        assert (model.forward(PROMPT) - want).abs().max().item() <= 1e-5
        assert all(s.neurons_active == LAYERS * N for s in model.stats)


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_density_equals_top_k_by_gate_per_token(gate_artifact, tiny_llama, density):
    want = zeroed_logits(tiny_llama[0], PROMPT, density, "gate")
    dense = zeroed_logits(tiny_llama[0], PROMPT, 1.0, "gate")
    assert (want - dense).abs().max().item() > 1e-3  # the zeroing does change the logits
    for kw in ({"mode": "sparse", "selection": "gate"}, {"mode": "oracle"}):
        with flashio.open(gate_artifact, density=density, window=3, **kw) as model:
            assert (model.forward(PROMPT) - want).abs().max().item() <= 1e-4
            assert (model.forward(PROMPT, token_by_token=True) - want).abs().max().item() <= 1e-4
            steps = model.stats[1:]
            assert all(s.neurons_active == LAYERS * kept_count(density, N) for s in steps)


def test_gate_oracle_on_a_version_1_artifact(llama_artifact, tiny_llama):
    """The oracle's gate rows loaded from bundles that hold them: the same selection."""
    want = zeroed_logits(tiny_llama[0], PROMPT, 0.5, "gate")
    with flashio.open(llama_artifact, mode="oracle", density=0.5) as model:
        assert type(model.engine) is OracleEngine
        assert (model.forward(PROMPT) - want).abs().max().item() <= 1e-4
        assert (model.forward(PROMPT, token_by_token=True) - want).abs().max().item() <= 1e-4


def test_contribution_oracle(gate_artifact, llama_artifact, tiny_llama):
    want = zeroed_logits(tiny_llama[0], PROMPT, 0.3, "contribution")
    assert (want - zeroed_logits(tiny_llama[0], PROMPT, 0.3, "gate")).abs().max().item() > 1e-4
    for art in (gate_artifact, llama_artifact):
        with flashio.open(art, mode="oracle", selection="contribution", density=0.3) as model:
            assert isinstance(model.engine, ContributionOracleEngine)
            assert (model.forward(PROMPT) - want).abs().max().item() <= 1e-4
            assert (model.forward(PROMPT, token_by_token=True) - want).abs().max().item() <= 1e-4
    with pytest.raises(FlashError, match="selection='contribution' keeps the top fraction"):
        flashio.open(llama_artifact, mode="oracle", selection="contribution")


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("kernel_tokens", [16, 0])  # the CPU's kernels path, and the packed sketch
def test_gate_up_ranks_by_contribution_against_the_sketch(tiny_llama, orders, tmp_path, scheme, kernel_tokens,
                                                          monkeypatch):
    import flashio.exact
    from flashio import kernels
    monkeypatch.setattr(flashio.exact, "SKETCH_KERNEL_TOKENS", kernel_tokens)
    from flashio.quant import RowScratch, dequantize_rows, quant_project

    art = write_artifact(tiny_llama[1], tmp_path / "gu", orders=orders, gate_resident=True, up_sketch=scheme,
                         selection="gate+up", densities=[0.3, 0.3])
    m = Artifact(art, verify=True).manifest
    raw = json.loads((art / "manifest.json").read_text())
    assert raw["format_version"] == 3 and raw["selection"] == "gate+up" and raw["up_sketch"]["scheme"] == scheme
    q = m.up_sketch
    assert q.group_size == 32 and q.row_bytes == (D // 2 if scheme == "int4" else D) + 2 * D // 32  # unpadded
    resident = load_file(str(art / "resident.safetensors"))
    hf = tiny_llama[0]
    sketch = []  # the sketch's up rows, dequantized, back in source neuron order
    for i, layer in enumerate(hf.model.layers):
        codes = resident[f"layers.{i}.ffn.up_sketch"]
        assert codes.dtype == torch.uint8 and codes.shape == (N, q.row_bytes)
        rows = dequantize_rows(codes, q, "up")
        back = torch.empty_like(rows)
        back[torch.as_tensor(orders[i])] = rows
        err = (back - layer.mlp.up_proj.weight).abs().max() / layer.mlp.up_proj.weight.abs().max()
        assert 0 < err <= (0.08 if scheme == "int4" else 0.005)
        sketch.append(back)
    want = zeroed_logits(hf, PROMPT, 0.3, "sketch", sketch)
    assert (want - zeroed_logits(hf, PROMPT, 0.3, "gate")).abs().max().item() > 1e-4  # not the gate's ranking
    with flashio.open(art, window=3) as model:  # the manifest's selection and densities
        assert isinstance(model.engine, GateUpEngine)
        # the kernels rank against x rounded to int8 in blocks of 32 where the CPU has VNNI (their
        # product on quantized rows, as a generated token's FFN): near-ties may then rank the other
        # way; the product itself is checked exactly below
        k = kernels.kernels() if model.engine.kernel_tokens else None
        tol = 2e-2 * float(want.abs().max()) if k and k.int8_activations(q.dim, q.bits, q.group_size) else 1e-4
        assert (model.forward(PROMPT) - want).abs().max().item() <= tol
        assert (model.forward(PROMPT, token_by_token=True) - want).abs().max().item() <= tol
        assert all(s.neurons_active == LAYERS * kept_count(0.3, N) for s in model.stats[1:])
        sketch_bytes = LAYERS * N * q.row_bytes
        assert model.memory_bytes()["ffn_resident"] == LAYERS * N * D * 4 + sketch_bytes  # the FFN's DRAM
        eng = model.engine
        h = torch.randn(4, D)
        if eng.kernel_tokens:  # the stored rows, a token at a time through the kernels (short prompts too)
            assert not eng.packed and sum(s.numel() for s in eng.sketch) == sketch_bytes
            k = kernels.kernels()
            xq = (torch.stack([kernels.int8_activations(r) for r in h])
                  if k.int8_activations(q.dim, q.bits, q.group_size) else h)  # the product the kernels take
            long = torch.randn(eng.kernel_tokens + 1, D)
            for i in range(LAYERS):
                stored = resident[f"layers.{i}.ffn.up_sketch"]
                want_up = quant_project(xq, stored, q, "up", RowScratch(q))
                torch.testing.assert_close(eng.sketch_up(i, h), want_up, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(eng.sketch_up(i, long), quant_project(long, stored, q, "up", RowScratch(q)),
                                           rtol=1e-6, atol=1e-6)  # longer prompts: dequantized chunks
        else:  # the sketch rearranged in place at open (flashio.sketch): the stored rows' product, the stored bytes
            assert len(eng.packed) == LAYERS and sum(s.nbytes for s in eng.packed) == sketch_bytes
            for i in range(LAYERS):
                stored = resident[f"layers.{i}.ffn.up_sketch"]
                want_up = quant_project(h, stored, q, "up", RowScratch(q))
                assert not torch.equal(eng.packed[i].rows, stored) or scheme == "int8"
                torch.testing.assert_close(eng.sketch_up(i, h), want_up, rtol=1e-6, atol=1e-6)
    est = MemoryBudget.estimate(Artifact(art), "sparse", torch.float32, 64)
    assert est.gate_bytes == LAYERS * N * D * 4 + sketch_bytes
    with flashio.open(art, density=1.0) as full, flashio.open(art, mode="dense") as dense:
        assert (full.forward(PROMPT) - dense.forward(PROMPT)).abs().max().item() <= 1e-5


def test_gate_up_needs_the_sketch(gate_artifact, tiny_llama, tmp_path):
    with pytest.raises(FlashError, match="lacks; pack it with `flashio pack --gate-resident --up-sketch int4`"):
        flashio.open(gate_artifact, selection="gate+up", density=0.5)
    with pytest.raises(FlashError, match="up_sketch ranks the exact gate's neurons: pass gate_resident=True"):
        write_artifact(tiny_llama[1], tmp_path / "x", up_sketch="int4")
    with pytest.raises(FlashError, match="selection 'gate\\+up' ranks neurons against the up sketch"):
        write_artifact(tiny_llama[1], tmp_path / "x", gate_resident=True, selection="gate+up")
    with pytest.raises(FlashError, match="quantization scheme 'int3'"):
        write_artifact(tiny_llama[1], tmp_path / "x", gate_resident=True, up_sketch="int3")
    assert not (tmp_path / "x").exists()
    art = write_artifact(tiny_llama[1], tmp_path / "s", gate_resident=True, up_sketch="int4")

    def edited(fn) -> Exception:
        m = json.loads((art / "manifest.json").read_text())
        fn(m)
        try:
            parse_manifest(json.dumps(m))
        except FormatError as exc:
            return exc
        raise AssertionError("accepted")

    assert "needs gate_resident and format_version 3" in str(edited(lambda m: m.update(format_version=2)))
    assert "row_bytes" in str(edited(lambda m: m["up_sketch"].update(row_bytes=3)))
    assert "needs the up sketch" in str(edited(lambda m: (m.pop("up_sketch"), m.update(selection="gate+up"))))


def test_bytes_read_are_two_thirds_of_the_density(gate_artifact, llama_artifact):
    def per_token(art, **kw) -> float:
        with flashio.open(art, max_gap=0, threads=2, **kw) as model:
            model.forward(PROMPT, token_by_token=True)
            return sum(s.bytes_read for s in model.stats[1:]) / len(model.stats[1:])

    naive = per_token(llama_artifact, mode="naive")
    assert naive == LAYERS * N * 3 * D * 4
    k = kept_count(0.4, N)
    loaded = per_token(gate_artifact, selection="gate", density=0.4, reuse=False)
    assert loaded == pytest.approx(naive * (2 / 3) * k / N)
    cached = per_token(gate_artifact, selection="gate", density=0.4, window=1)
    assert cached <= loaded  # a window of 1 reuses what the last token kept


@pytest.mark.parametrize("lookahead", [False, True])
def test_window_cache_across_tokens(gate_artifact, tiny_llama, lookahead):
    want = zeroed_logits(tiny_llama[0], PROMPT, 0.3, "gate")
    with flashio.open(gate_artifact, selection="gate", density=0.3, window=4, lookahead=lookahead) as model:
        got = model.forward(PROMPT, token_by_token=True)
        steps = model.stats[1:]
        hits = sum(s.cache_hits for s in steps)
        loaded = sum(s.neurons_loaded for s in steps)
        active = sum(s.neurons_active for s in steps)
        assert (got - want).abs().max().item() <= 1e-4
        assert hits > 0 and loaded < active
        if lookahead:  # rows read for wrong guesses count as loaded, not as hits
            assert loaded + hits >= active
        else:
            assert loaded + hits == active
        assert max(s.cache_rows for s in steps) > LAYERS * kept_count(0.3, N)  # the window holds more than one token


def test_gate_and_predictor(gate_artifact, tiny_llama, tmp_path):
    def preds(bias: float) -> list[PredictorWeights]:
        return [PredictorWeights(torch.zeros(4, D), torch.zeros(N, 4), torch.full((N,), bias), 0.5)
                for _ in range(LAYERS)]

    art = write_artifact(tiny_llama[1], tmp_path / "gp", gate_resident=True, predictors=preds(5.0),
                         active_thresholds=[0.01, 0.01], selection="gate+predictor")
    with flashio.open(art) as both, flashio.open(art, selection="gate") as gate:
        assert isinstance(both.engine, GatePredictorEngine) and isinstance(gate.engine, GateEngine)
        assert (both.forward(PROMPT) - gate.forward(PROMPT)).abs().max().item() <= 1e-6  # the predictor agrees
        assert 0 < sum(s.neurons_active for s in gate.stats) < LAYERS * N * len(PROMPT)
        both.set_predictor_thresholds([0.999, 0.999])  # now it rejects every neuron
        both.forward(PROMPT)
        assert both.stats[-1].neurons_active == 0 and both.stats[-1].bytes_read == 0
    with flashio.open(art, selection="gate+predictor", density=0.5) as ranked:  # ranked by |g| x probability
        assert (ranked.forward(PROMPT) - zeroed_logits(tiny_llama[0], PROMPT, 0.5, "gate")).abs().max() <= 1e-4


def test_config_and_artifact_checks(gate_artifact, llama_artifact, opt_artifact, tiny_opt, tiny_llama, tmp_path):
    with pytest.raises(FlashError, match="pack it with `flashio pack --gate-resident`"):
        flashio.open(llama_artifact, selection="gate")
    with pytest.raises(FlashError, match="needs predictors and this artifact has none"):
        flashio.open(llama_artifact)  # older artifacts behave as before
    with pytest.raises(FlashError, match="is not for mode='dense'"):
        FlashConfig(mode="dense", selection="gate")
    with pytest.raises(FlashError, match="density applies to the exact selections"):
        FlashConfig(selection="predictor", density=0.5)
    with pytest.raises(FlashError, match="density has 3 values for a model of 2 layers"):
        flashio.open(gate_artifact, density=[0.5, 0.5, 0.5])
    with pytest.raises(FlashError, match="active_source"):
        flashio.open(gate_artifact, active_source=object())
    assert FlashConfig.from_dict(FlashConfig(selection="gate", density=[0.5, 0.25]).to_dict()).density == (0.5, 0.25)
    with pytest.raises(FlashError, match="opt FFNs have no gate"):
        write_artifact(tiny_opt[1], tmp_path / "x", gate_resident=True)
    with pytest.raises(FlashError, match="pass gate_resident=True"):
        write_artifact(tiny_llama[1], tmp_path / "x", selection="gate")
    with pytest.raises(FlashError, match="densities must be fractions"):
        write_artifact(tiny_llama[1], tmp_path / "x", gate_resident=True, densities=[0.5, 0.0])
    assert not (tmp_path / "x").exists()
    with flashio.open(opt_artifact, mode="oracle", density=0.5) as relu:  # the oracle's density on ReLU FFNs
        relu.forward(PROMPT[:3])
        assert relu.stats[-1].neurons_active <= LAYERS * 3 * 128


def test_manifest_densities_and_engine_setter(tiny_llama, tmp_path):
    art = write_artifact(tiny_llama[1], tmp_path / "d", gate_resident=True, densities=[0.25, 0.5])
    assert [L.density for L in Artifact(art).manifest.ffn_layers] == [0.25, 0.5]
    with flashio.open(art) as model:
        model.forward(PROMPT[:1])
        assert model.stats[-1].neurons_active == kept_count(0.25, N) + kept_count(0.5, N)
        model.engine.set_densities([1.0, 1.0])
        model.forward(PROMPT[:1])
        assert model.stats[-1].neurons_active == 2 * N
        with pytest.raises(FlashError, match="densities must be fractions"):
            model.engine.set_densities([1.5, None])


def test_budget_counts_gate_rows_as_ffn_memory(gate_artifact):
    art = Artifact(gate_artifact)
    gate_bytes = LAYERS * N * D * 4
    with flashio.open(gate_artifact, selection="gate", density=0.5, max_context=64) as model:
        assert sum(t.numel() * t.element_size() for t in model.engine.gate_w) == gate_bytes
    est = MemoryBudget.estimate(art, "sparse", torch.float32, 64)
    assert est.gate_bytes == gate_bytes and est.engine.fixed_bytes == 0
    assert est.ffn_dram_bytes(10) == gate_bytes + 10 * est.engine.per_row_bytes
    ffn_bytes = sum(L.length_bytes for L in art.manifest.ffn_layers) + gate_bytes
    cap = est.capacity_for_ffn_dram(ffn_bytes // 2)  # the report's limit: half the FFN
    assert est.ffn_dram_bytes(cap) <= ffn_bytes // 2 < est.ffn_dram_bytes(cap + 1)
    with pytest.raises(BudgetError, match=r"the gate rows take 96.00 KiB"):
        est.capacity_for_ffn_dram(gate_bytes)
    with pytest.raises(BudgetError, match=r"FFN .* of which resident gate rows 96.00 KiB\); raise the budget"):
        flashio.open(gate_artifact, selection="gate", dram_budget=est.fixed_bytes, max_context=64)
    oracle = MemoryBudget.estimate(art, "oracle", torch.float32, 64, selection="contribution")
    assert oracle.engine.fixed_bytes == LAYERS * N * D * 4  # the up rows; the gate rows are resident


def _edit(path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(gate_resident=False), r"bundle_layout parts \['up', 'down'\] with gated=True, "
                                              "gate_resident=False is not a layout this flashio reads"),
    (lambda m: m.update(bundle_layout=[["up", 0, 64], ["gate", 64, 128]]), "not a layout this flashio reads"),
    (lambda m: m.update(bundle_layout=[["up", 0, 32], ["down", 32, 128]]), "must tile the row in equal"),
    (lambda m: m.update(format_version=1), "gate_resident needs format_version 2"),
    (lambda m: m["ffn_layers"][1].pop("gate_tensor"), r"ffn_layers\[1\] names no gate_tensor"),
    (lambda m: m["ffn_layers"][0].update(gate_tensor="layers.1.ffn.gate"), r"ffn_layers\[1\].gate_tensor 'layers.1.ffn.gate' "
                                                                           r"is also ffn_layers\[0\]'s"),
    (lambda m: m["ffn_layers"][0].update(gate_tensor="nope"), r"gate rows 'nope' of ffn_layers\[0\] are"),
    (lambda m: m["ffn_layers"][0].update(density=1.5), r"ffn_layers\[0\].density = 1.5 is not a fraction"),
    (lambda m: m.update(selection="magic"), "selection 'magic' is not one of"),
    (lambda m: m.update(selection="gate+predictor"), "needs predictors"),
    (lambda m: m.update(gate_resident="yes"), "gate_resident = 'yes' has the wrong type"),
    (lambda m: m.update(format_version=4), r"format_version 4 is not supported \(this flashio reads versions 1, 2, 3\)"),
])
def test_damaged_gate_manifests_are_refused(gate_artifact, tmp_path, edit, message):
    art = shutil.copytree(gate_artifact, tmp_path / "art")
    _edit(art, edit)
    with pytest.raises(FormatError, match=message):
        Artifact(art)


def test_gate_fields_survive_mutation(gate_artifact, tmp_path):
    """Every value in every new field ends in a valid artifact or a FormatError (the fuzz test's
    rule, on the fields it cannot reach from a version-1 artifact)."""
    art = shutil.copytree(gate_artifact, tmp_path / "art")
    good = json.loads((art / "manifest.json").read_text())
    values = [None, True, False, 0, -1, 0.5, 2.5, float("nan"), "", "x", "../x", [], {}, [1], {"a": 1}]
    outcomes = {"ok": 0, "refused": 0}
    targets = [("gate_resident",), ("selection",), ("format_version",), ("bundle_layout",),
               *[("ffn_layers", i, k) for i in range(LAYERS) for k in ("gate_tensor", "density")]]
    for path in targets:
        for v in values:
            m = json.loads(json.dumps(good))
            node = m
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = v
            raw = json.dumps(m, allow_nan=True)
            (art / "manifest.json").write_text(raw)
            try:
                Artifact(art)
                parse_manifest(raw)
                outcomes["ok"] += 1
            except FormatError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and outcomes["ok"] >= 4  # e.g. density 0.5, selection null


def test_pack_gate_resident(tiny_llama, tmp_path):
    from flashio.cli import main

    out = tmp_path / "packed"
    assert main(["pack", str(tiny_llama[1]), str(out), "--gate-resident"]) == 0
    assert Artifact(out).manifest.gate_resident
    with flashio.open(out, density=1.0) as model, flashio.open(out, mode="dense") as dense:
        assert (model.forward(PROMPT[:4]) - dense.forward(PROMPT[:4])).abs().max().item() <= 1e-5
    sketched = tmp_path / "sketched"
    assert main(["pack", str(tiny_llama[1]), str(sketched), "--gate-resident", "--up-sketch", "int8"]) == 0
    m = Artifact(sketched).manifest
    assert m.selection == "gate+up" and m.up_sketch.scheme == "int8"
    with flashio.open(sketched, density=0.5) as model:
        assert isinstance(model.engine, GateUpEngine)
