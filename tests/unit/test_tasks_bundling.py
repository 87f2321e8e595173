"""Neuron orders, and the artifact the bundling step writes through flashio's writer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from flashio.format import Artifact, source_from_checkpoint  # noqa: E402
from tasks.activations import ActivationStats  # noqa: E402
from tasks.bundling import bundle_artifact, choose_orders, coactivation_order, frequency_order  # noqa: E402
from tasks.errors import InputError  # noqa: E402
from tasks.predictors import LayerPredictor  # noqa: E402
from tasks.source import inspect_source  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402


def test_frequency_order_is_hottest_first_and_stable():
    assert frequency_order(np.array([3, 9, 1, 9])).tolist() == [1, 3, 0, 2]


def test_coactivation_order_keeps_co_firing_neurons_adjacent():
    rng = np.random.default_rng(0)
    blocks = [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]  # interleaved in the source order
    masks = np.zeros((600, 12), dtype=bool)
    for t in range(600):
        for b in blocks:
            if rng.random() < 0.3:
                masks[t, b] = rng.random(4) < 0.95
    coact = masks.T.astype(np.int64) @ masks.astype(np.int64)
    order = coactivation_order(masks.sum(0), coact).tolist()
    assert sorted(order) == list(range(12))
    position = {n: i for i, n in enumerate(order)}
    for b in blocks:
        span = max(position[n] for n in b) - min(position[n] for n in b)
        assert span == 3, (order, b)  # each block is contiguous


def stats_file(tmp_path, counts: list[np.ndarray], thresholds=None) -> ActivationStats:
    t = {f"layers.{i}.count": torch.from_numpy(c) for i, c in enumerate(counts)}
    meta = {"tokens": "100", "coactivation_tokens": "0", "thresholds": json.dumps(thresholds or [0.0] * len(counts))}
    save_file(t, str(tmp_path / "stats.safetensors"), metadata=meta)
    return ActivationStats(path=tmp_path / "stats.safetensors", shards=(), tokens=100, n_layers=len(counts),
                           n_neurons=len(counts[0]), active_thresholds=tuple(thresholds or [0.0] * len(counts)),
                           density=(0.1,) * len(counts), coactivation_tokens=0, sha256="")


def test_coactivation_needs_its_statistics(tmp_path):
    with pytest.raises(InputError, match="coactivation_stride"):
        choose_orders(stats_file(tmp_path, [np.arange(8)]), "coactivation")
    with pytest.raises(InputError, match="not one of"):
        choose_orders(stats_file(tmp_path, [np.arange(8)]), "random")


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt")
    tok = build_tokenizer(write_corpus(root / "text", n_files=3), root / "tok")
    return inspect_source(str(build_tiny_model("opt", root / "m", tok, hidden=16, ffn=32, layers=2)))


def test_no_predictors_only_for_the_exact_selections(tmp_path, tiny_opt):
    """An artifact without predictors (exact-only conversions) needs the gate-resident layout; an
    ungated model's predictor selection refuses it (the published one is tested in test_pipeline)."""
    stats = stats_file(tmp_path, [np.arange(tiny_opt.ffn_dim) for _ in range(tiny_opt.n_layers)])
    with pytest.raises(InputError, match="without predictors needs the gate-resident layout"):
        bundle_artifact(tiny_opt, stats, [], order="frequency", out_dir=tmp_path / "out")


def test_artifact_rows_and_predictors_follow_the_order(tmp_path, tiny_opt):
    src = tiny_opt
    rng = np.random.default_rng(1)
    counts = [rng.integers(0, 1000, src.ffn_dim) for _ in range(src.n_layers)]
    stats = stats_file(tmp_path, counts)
    preds = []
    for i in range(src.n_layers):
        a, b, bias = torch.randn(4, src.dim), torch.randn(src.ffn_dim, 4), torch.arange(src.ffn_dim).float()
        path = tmp_path / f"p{i}.safetensors"
        save_file({"A": a, "B": b, "bias": bias}, str(path))
        preds.append(LayerPredictor(i, path, "", 4, 0.3, 0.1, 0.2, 0.99, 0.5, 1.0, True, 0, 10, ()))
    art = bundle_artifact(src, stats, preds, order="frequency", out_dir=tmp_path / "out",
                          lineage={"calibration": {"fingerprint": "abc"}}, report={"summary": {"x": 1}})
    a = Artifact(art.path, verify=True)
    m = a.manifest
    assert m.lineage["source"]["fingerprint"] == src.fingerprint and m.lineage["calibration"]["fingerprint"] == "abc"
    assert m.lineage["neuron_order"] == "frequency" and m.report == {"summary": {"x": 1}}
    loaded = a.load_predictors()
    resident = a.load_resident()
    ffn = source_from_checkpoint(src.path, hash_files=False).ffn
    for i in range(src.n_layers):
        order = np.argsort(-counts[i], kind="stable")
        assert loaded[i].threshold == pytest.approx(0.3)
        assert loaded[i].bias.tolist() == [float(j) for j in order]  # row j predicts source neuron order[j]
        assert resident[f"layers.{i}.ffn.order"].tolist() == order.tolist()
        torch.testing.assert_close(resident[f"layers.{i}.ffn.up_bias"], ffn(i).up_bias[torch.from_numpy(order)])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bundle_is_what_the_runtime_opens(tmp_path, tiny_opt, scheme):
    """`flashio convert --quantize` reaches the writer through bundling: the artifact the gate
    evaluates is the quantized one, and it runs close to the float one."""
    import flashio
    from flows.config import ConvertConfig

    src = tiny_opt
    stats = stats_file(tmp_path, [np.arange(src.ffn_dim) for _ in range(src.n_layers)])
    preds = []
    for i in range(src.n_layers):
        path = tmp_path / f"p{i}.safetensors"
        save_file({"A": torch.randn(4, src.dim), "B": torch.randn(src.ffn_dim, 4), "bias": torch.zeros(src.ffn_dim)},
                  str(path))
        preds.append(LayerPredictor(i, path, "", 4, 0.3, 0.1, 0.2, 0.99, 0.5, 1.0, True, 0, 10, ()))
    quant = ConvertConfig(quantize=scheme).quantization()
    assert quant == {"quantize": scheme, "group_size": None, "quantize_resident": None, "method": "gptq",
                     "two_level_scales": False}
    assert ConvertConfig(quantize="int4", two_level_scales=True).quantization()["two_level_scales"] is True
    assert ConvertConfig().quantization() is None
    with pytest.raises(InputError, match="GPTQ quantization needs the calibration rows"):
        bundle_artifact(src, stats, preds, order="identity", out_dir=tmp_path / "nocalib", quantize=quant)
    quant = ConvertConfig(quantize=scheme, quantize_method="rtn").quantization()  # GPTQ: tests/unit/test_gptq.py
    plain = bundle_artifact(src, stats, preds, order="identity", out_dir=tmp_path / "plain")
    q = bundle_artifact(src, stats, preds, order="identity", out_dir=tmp_path / "q", quantize=quant)
    m = Artifact(q.path, verify=True).manifest
    assert m.format_version == 3 and m.quant is not None and m.quant.scheme == scheme
    ids = list(range(1, 12))
    with flashio.open(plain.path, mode="dense") as a, flashio.open(q.path, mode="dense") as b:
        ref, got = a.forward(ids), b.forward(ids)
    assert not torch.equal(ref, got)  # quantized weights differ...
    err = float((got - ref).abs().max()) / float(ref.abs().max())
    assert err < (0.02 if scheme == "int8" else 0.1)  # ...but not by much (relative to the logits)
