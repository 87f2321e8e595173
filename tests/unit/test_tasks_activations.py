"""Activation statistics: shards merge exactly, the recorded FFN inputs are what the flashio
runtime feeds its predictors, gated thresholds hit their density."""

from __future__ import annotations

import dataclasses
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from flashio.format import Artifact, source_from_checkpoint, write_artifact  # noqa: E402
from flashio.models import architectures  # noqa: E402
from flashio.models.base import ACTIVATIONS, KVCache  # noqa: E402
from tasks.activations import (  # noqa: E402
    ActivationOptions,
    calibrate_gate_thresholds,
    collect_shard,
    ffn_spec,
    load_pairs,
    merge_shards,
    read_stats,
    shard_ranges,
)
from tasks.calibration import load_tokens, prepare_calibration, resolve_spec  # noqa: E402
from tasks.errors import InputError  # noqa: E402
from tasks.source import inspect_source  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402

N_SEQ, SEQ_LEN = 12, 32
FAMILIES = sorted(architectures())  # every family the runtime knows, the pipeline must hook
# a window shorter than the sequences, so that the hooked inputs depend on it
CONFIG = {"mistral": {"sliding_window": 8}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    files = write_corpus(root / "text", n_files=6)
    tok = build_tokenizer(files, root / "tok")
    out = {}
    for family in FAMILIES:
        src = inspect_source(str(build_tiny_model(family, root / family, tok, hidden=32, ffn=64,
                                                  config=CONFIG.get(family))))
        calib = prepare_calibration(src, resolve_spec(str(root / "text")), n_sequences=N_SEQ, seq_len=SEQ_LEN,
                                    n_heldout=1, seed=0, out_dir=root / f"calib-{family}")
        out[family] = (src, calib)
    return out


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_merged_shards_equal_one_pass(tmp_path, tiny, family):
    src, calib = tiny[family]
    opts = ActivationOptions(batch_sequences=4, coactivation_stride=3)
    th = calibrate_gate_thresholds(src, calib, density=0.4, n_sequences=N_SEQ, options=opts)
    single = collect_shard(src, calib, 0, N_SEQ, th, opts, out_dir=tmp_path / "single")
    shards = [collect_shard(src, calib, a, b, th, opts, out_dir=tmp_path / f"s{a}", index=k)
              for k, (a, b) in enumerate(shard_ranges(N_SEQ, 5))]  # 5 + 5 + 2: batches split differently
    merged = merge_shards(shards, out_dir=tmp_path / "merged")
    one = merge_shards([single], out_dir=tmp_path / "one")
    a, meta_a = read_stats(merged.path)
    b, meta_b = read_stats(one.path)
    assert meta_a == meta_b and merged.tokens == one.tokens == N_SEQ * SEQ_LEN
    assert merged.coactivation_tokens == N_SEQ * len(range(0, SEQ_LEN, 3))
    for key in a:
        if key.endswith(("count", "coact")):
            assert torch.equal(a[key], b[key]), key  # counts add exactly
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert merged.density == one.density
    # co-activation diagonal: activity counts on the sampled positions
    assert (a["layers.0.coact"].diagonal() <= a["layers.0.count"]).all()
    for layer in range(src.n_layers):
        xs, ms, ss = load_pairs(merged.shards, layer)
        x1, m1, s1 = load_pairs(one.shards, layer)
        assert torch.equal(ms, m1) and torch.equal(ss, s1) and torch.equal(xs, x1)
        assert int(ms.sum()) == int(a[f"layers.{layer}.count"].sum())


def test_statistics_without_pairs_are_the_same_statistics(tmp_path, tiny):
    """pairs=False (exact-only conversions train no predictor): the same statistics, no pairs to train on."""
    src, calib = tiny["llama"]
    opts = ActivationOptions(batch_sequences=4, coactivation_stride=3)
    th = calibrate_gate_thresholds(src, calib, density=0.4, n_sequences=N_SEQ, options=opts)
    full = collect_shard(src, calib, 0, 4, th, opts, out_dir=tmp_path / "full")
    bare = collect_shard(src, calib, 0, 4, th, dataclasses.replace(opts, pairs=False), out_dir=tmp_path / "bare")
    a, b = read_stats(full.stats_path), read_stats(bare.stats_path)
    assert a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert bare.pairs_path.stat().st_size < full.pairs_path.stat().st_size / 10
    with pytest.raises(InputError, match="holds no predictor pairs"):
        load_pairs([bare], 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pairs_are_the_runtime_ffn_input(tmp_path, tiny, family):
    """x recorded by the hooks == flashio's own `ffn_input` (an independent implementation of the
    model), and the mask == flashio's definition of active (ReLU > 0, |act(gate)| > threshold)."""
    src, calib = tiny[family]
    opts = ActivationOptions(batch_sequences=4, pairs_dtype="float32", label_densities=(0.3,) * src.n_layers)
    th = calibrate_gate_thresholds(src, calib, density=0.3, n_sequences=4, options=opts)
    shard = collect_shard(src, calib, 0, 2, th, opts, out_dir=tmp_path / "s")
    art = Artifact(write_artifact(src.path, tmp_path / "art", dtype="float32", active_thresholds=list(th)))
    model = art.arch.Model(art.args, art.load_resident())
    weights = source_from_checkpoint(src.path, hash_files=False).ffn
    ids = load_tokens(calib, "calibration")[1]  # the second sequence of the shard
    kv = KVCache(art.args.n_layers, art.args.n_kv_heads, art.args.head_dim, max_len=SEQ_LEN, dtype=torch.float32)
    kv.reserve(SEQ_LEN)
    x = model.embed(ids, 0)
    for layer in range(src.n_layers):
        x = model.attention(layer, x, kv, 0)
        h = model.ffn_input(layer, x)  # [L, D]
        xs, ms, seq = load_pairs([shard], layer)
        torch.testing.assert_close(xs[seq == 1], h, rtol=1e-4, atol=1e-4)
        w = weights(layer)
        up = F.linear(h, w.up, w.up_bias)  # [L, N]
        if not art.manifest.gated:  # ReLU
            active, act = up > 0, F.relu(up)
        else:
            gate = ACTIVATIONS[ffn_spec(src).activation](F.linear(h, w.gate, w.gate_bias))  # silu, gelu_tanh...
            active, act = gate.abs() > th[layer], gate * up
        assert (ms[seq == 1] == active).float().mean() > 0.995  # float error flips only boundary values
        if art.manifest.gated:  # contribution labels: per token the top 30% by |act(gate)·up|
            _, cs, _ = load_pairs([shard], layer, "contribution")
            top = torch.zeros_like(act, dtype=torch.bool).scatter_(1, act.abs().topk(round(0.3 * act.shape[1])).indices,
                                                                   True)
            assert (cs[seq == 1] == top).float().mean() > 0.99
        x = model.ffn_output(layer, x, act @ w.down)


def test_gate_thresholds_reach_their_density(tmp_path, tiny):
    src, calib = tiny["llama"]
    opts = ActivationOptions(batch_sequences=4)
    for density in (0.2, 0.6):
        th = calibrate_gate_thresholds(src, calib, density=density, n_sequences=N_SEQ, options=opts)
        stats = merge_shards([collect_shard(src, calib, 0, N_SEQ, th, opts, out_dir=tmp_path / f"d{density}")],
                             out_dir=tmp_path / f"m{density}")
        for d in stats.density:
            assert d == pytest.approx(density, abs=0.02)
    assert calibrate_gate_thresholds(tiny["opt"][0], tiny["opt"][1], density=0.5, n_sequences=2,
                                     options=opts) == (0.0, 0.0)
