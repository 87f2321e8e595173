"""The floor columns of `flashio bench model`: the DRAM bytes a token touches, hand-computed from
a tiny synthetic artifact's shapes, and the floor at the device profile's memory bandwidth."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flashio.bench.bandwidth import (
    MemoryBenchConfig,
    measure_dram_read,
    measure_matvec,
    memory_markdown,
)
from flashio.bench.floor import TokenTraffic, floor_ms, summarise_floor
from flashio.costmodel import (
    DEFAULT_DRAM_READ,
    DEFAULT_MATVEC,
    BandwidthPoint,
    DeviceProfile,
    ThroughputPoint,
    default_profile,
)
from flashio.errors import FormatError
from flashio.format import Artifact
from flashio.synth import write_synthetic


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    return Artifact(write_synthetic("opt-6.7b", tmp_path_factory.mktemp("floor") / "opt", scale=0.05, seed=0))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return Artifact(write_synthetic("llama-2-7b", tmp_path_factory.mktemp("floor") / "llama", scale=0.05, seed=0))


@pytest.fixture(scope="module")
def opt_int4(tmp_path_factory):
    return Artifact(write_synthetic("opt-6.7b", tmp_path_factory.mktemp("floor") / "int4", scale=0.05, seed=0,
                                    quantize="int4"))


def step(active=0, loaded=0, cache_rows=0, io_ms=0.0, total_ms=10.0) -> dict:
    return {"tokens": 1, "neurons_active": active, "neurons_loaded": loaded, "cache_rows": cache_rows,
            "io_ms": io_ms, "total_ms": total_ms}


def opt_resident_bytes(a, item: int) -> int:
    """OPT: q/k/v/o with biases, 2 layer norms (+ final), down bias; tied head; token + position rows."""
    d, L, V = a.dim, a.n_layers, a.vocab_size
    attention = L * (4 * d * d + 4 * d)
    norms = L * 2 * 2 * d + 2 * d
    head, rows, down_bias = V * d, 2 * d, L * d
    return (attention + norms + head + rows + down_bias) * item


def test_dense_token_bytes_are_the_hand_computed_sum(opt):
    a = opt.args
    d, L, N = a.dim, a.n_layers, a.ffn_dim
    t = TokenTraffic.of(opt, "dense", "float16")
    out = t.step_bytes(step(active=L * N), context=7)
    ffn = L * N * (2 * d * 2 + 2)  # up + down row, fp16, plus the up bias entry
    kv = 2 * L * d * 7 * 2
    assert out["terms"]["head"] == a.vocab_size * d * 2  # tied: the whole embedding matrix
    assert out["terms"]["embeddings"] == 2 * d * 2
    assert out["terms"]["ffn"] == ffn and out["terms"]["kv"] == kv and out["terms"]["predictors"] == 0
    assert out["total"] == opt_resident_bytes(a, 2) + ffn + kv
    assert out["by_dtype"] == {"float16": out["total"]}


def test_sparse_token_bytes_use_the_window_rows_and_the_predictors(opt):
    a, m = opt.args, opt.manifest
    d, L, N = a.dim, a.n_layers, a.ffn_dim
    t = TokenTraffic.of(opt, "sparse", "bfloat16")  # compute dtype: every resident term at 2 bytes
    out = t.step_bytes(step(active=120, loaded=30, cache_rows=300), context=3)
    preds = sum(P.rank * d + N * P.rank + N for P in m.predictor_layers) * 2
    ffn = 300 * (2 * d * 2 + 2)
    assert out["terms"]["predictors"] == preds and out["terms"]["ffn"] == ffn
    assert out["total"] == opt_resident_bytes(a, 2) + ffn + preds + 2 * L * d * 3 * 2
    assert out["ffn_active"] == 120 * (2 * d * 2 + 2)
    # in float32 every term held in the compute dtype doubles; the KV cache too
    t32 = TokenTraffic.of(opt, "sparse", "float32").step_bytes(step(active=120, loaded=30, cache_rows=300), 3)
    assert t32["total"] == 2 * out["total"]
    # a lookahead that guessed in half the layers ran their predictors a second time
    guessed = t.step_bytes({**step(active=120, loaded=30, cache_rows=300), "guesses": L / 2}, context=3)
    assert guessed["terms"]["predictors"] == 1.5 * preds
    assert guessed["total"] == out["total"] + 0.5 * preds


def test_naive_streams_in_the_storage_dtype_and_llama_has_no_biases(llama):
    a = llama.args
    d, L, N = a.dim, a.n_layers, a.ffn_dim
    t = TokenTraffic.of(llama, "naive", "bfloat16")  # storage float16
    out = t.step_bytes(step(active=L * N, loaded=L * N - 100), context=1)
    resident = (L * (4 * d * d + 2 * d) + d + a.vocab_size * d + d) * 2  # q/k/v/o, 2 norms (+ final), head, token row
    kv = 2 * L * a.n_kv_heads * a.head_dim * 2
    assert out["terms"]["head"] == a.vocab_size * d * 2 and out["terms"]["embeddings"] == d * 2
    assert out["by_dtype"]["float16"] == (L * N - 100) * 3 * d * 2  # up, gate, down of the streamed rows
    assert out["by_dtype"]["bfloat16"] == resident + 100 * 3 * d * 2 + kv
    assert out["total"] == sum(out["by_dtype"].values())
    mmap = TokenTraffic.of(llama, "mmap", "bfloat16").step_bytes(step(active=L * N), context=1)
    assert mmap["by_dtype"]["float16"] == L * N * 3 * d * 2


def test_quantized_rows_and_resident_codes_count_as_held(opt, opt_int4):
    """int4 rows are held as stored in every mode (row_bytes: codes + scales), not bundle_width
    elements of the compute dtype; the attention's int8 codes are 1 byte each, plus their scales."""
    a, m = opt_int4.args, opt_int4.manifest
    d, L, N = a.dim, a.n_layers, a.ffn_dim
    assert m.row_bytes == m.ffn_layers[0].bundle_width < 2 * d * 2 / 3  # about a quarter of fp16's row
    out = TokenTraffic.of(opt_int4, "sparse", "bfloat16").step_bytes(step(active=120, cache_rows=300), context=3)
    assert out["terms"]["ffn"] == 300 * (m.row_bytes + 2) and out["ffn_active"] == 120 * (m.row_bytes + 2)
    naive = TokenTraffic.of(opt_int4, "naive", "bfloat16").step_bytes(step(active=L * N, loaded=L * N - 100), 1)
    assert naive["terms"]["ffn"] == L * N * (m.row_bytes + 2) and set(naive["by_dtype"]) == {"bfloat16"}
    plain = TokenTraffic.of(opt, "sparse", "bfloat16").step_bytes(step(active=120, cache_rows=300), context=3)
    assert plain["terms"]["attention"] == L * (4 * d * d + 4 * d) * 2
    assert out["terms"]["attention"] == L * (4 * d * d * 1 + 4 * d * 2 + 4 * d * 2)  # codes, scales, biases
    # tied: the embedding matrix as int8 rows, codes and an fp16 scale per 32; a token's row, the float position row
    row = d + d // 32 * 2
    assert out["terms"]["head"] == a.vocab_size * row and plain["terms"]["head"] == a.vocab_size * d * 2
    assert out["terms"]["embeddings"] == row + d * 2


def mem_profile(**kw) -> DeviceProfile:
    return DeviceProfile(random=(ThroughputPoint(16384, 1, 500.0),), sequential_mbps=1000.0, **kw)


def test_floor_uses_the_profile_bandwidth_and_adds_unhidden_io():
    p = mem_profile(matvec=(BandwidthPoint(1, 10.0, "float16"), BandwidthPoint(2, 20.0, "float16")),
                    dram_read=(BandwidthPoint(1, 30.0),))
    f = floor_ms({"float16": 1e9}, p, threads=1, io_ms=5.0)
    assert f["floor_ms"] == pytest.approx(100.0 + 5.0) and f["source"] == "measured"
    assert floor_ms({"float16": 1e9}, p, threads=2, io_ms=0.0)["floor_ms"] == pytest.approx(50.0)
    assert floor_ms({"float16": 1e9}, p, threads=8, io_ms=0.0)["floor_ms"] == pytest.approx(50.0)  # clamped
    # a dtype the profile did not measure: the built-in default, said so
    g = floor_ms({"float16": 1e9, "bfloat16": 1e9}, p, threads=1, io_ms=0.0)
    assert g["source"] == "mixed"
    assert g["floor_ms"] == pytest.approx(100.0 + 1e3 / DEFAULT_MATVEC["bfloat16"][0][1])


def test_summary_means_over_steps_and_ratios(opt):
    p = mem_profile(matvec=(BandwidthPoint(1, 4.0, "float16"),))
    t = TokenTraffic.of(opt, "dense", "float16")
    n = opt.args.n_layers * opt.args.ffn_dim
    steps = [step(active=n, io_ms=1.0, total_ms=9.0), step(active=n, io_ms=3.0, total_ms=11.0)]
    s = summarise_floor(t, steps, [4, 5], p, threads=1)
    per = [t.step_bytes(st, c)["total"] for st, c in zip(steps, [4, 5])]
    assert s["dram_bytes_per_token"] == pytest.approx(sum(per) / 2)
    assert s["floor_ms"] == pytest.approx(sum(b / 4e9 * 1e3 for b in per) / 2 + 2.0)
    assert s["total_vs_floor"] == pytest.approx(10.0 / s["floor_ms"])
    assert s["achieved_gbps"] == pytest.approx(s["dram_bytes_per_token"] / 8.0 / 1e6)
    assert s["bandwidth_source"] == "measured" and sum(s["dram_terms"].values()) == pytest.approx(sum(per) / 2)


def test_old_profiles_load_with_marked_defaults(tmp_path):
    d = json.loads(mem_profile(device="old").dumps())
    for key in ("dram_read", "matvec", "memory_buffer_bytes", "matvec_shape"):
        d.pop(key)  # a profile written before the memory side was measured
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    old = DeviceProfile.load(path)
    assert old.memory_source == "default" and old.device == "old"
    bw = old.memory_bandwidth(2, "float16")
    assert (bw.gbps, bw.source) == (DEFAULT_MATVEC["float16"][1][1], "default")
    assert old.memory_bandwidth(1).gbps == DEFAULT_DRAM_READ[0][1]
    assert "NOT measured" in memory_markdown(old) and "(default)" in memory_markdown(old)
    assert default_profile().memory_source == "default"
    new = mem_profile(dram_read=(BandwidthPoint(1, 12.5),), matvec=(BandwidthPoint(1, 9.0, "bfloat16"),),
                      memory_buffer_bytes=1 << 20, matvec_shape=(64, 32))
    again = DeviceProfile.from_json(json.loads(new.dumps()))
    assert again == new and again.memory_bandwidth(1, "bfloat16").gbps == 9.0
    with pytest.raises(FormatError, match="bench device"):
        DeviceProfile.from_json({**json.loads(new.dumps()), "matvec": [{"threads": 1, "gbps": 0, "dtype": "float16"}]})


def test_memory_measurement_points_and_threads_restored():
    before = torch.get_num_threads()
    cfg = MemoryBenchConfig(threads=(1, 2), buffer_bytes=2 << 20, seconds=0.0, min_calls=2, shape=(256, 128),
                            dtypes=("float32", "bfloat16"))
    dram, mv = measure_dram_read(cfg), measure_matvec(cfg)
    assert [p.threads for p in dram] == [1, 2] and all(p.gbps > 0 for p in dram)
    assert [(p.dtype, p.threads) for p in mv] == [("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    assert all(p.gbps > 0 for p in mv) and torch.get_num_threads() == before


def test_kv_reads_stop_at_the_sliding_window_of_windowed_layers(opt):
    a = opt.args
    base = TokenTraffic.of(opt, "dense", "float16")
    per_layer = 2 * a.n_kv_heads * a.head_dim * 2
    assert base.step_bytes(step(), context=50)["terms"]["kv"] == a.n_layers * per_layer * 50
    mistral_like = dataclasses.replace(base, sliding_window=8, windowed_layers=a.n_layers)
    assert mistral_like.step_bytes(step(), context=50)["terms"]["kv"] == a.n_layers * per_layer * 8
    one_local = dataclasses.replace(base, sliding_window=8, windowed_layers=1)  # gemma3-like: local + global
    assert one_local.step_bytes(step(), context=50)["terms"]["kv"] == per_layer * (8 + (a.n_layers - 1) * 50)
    assert one_local.step_bytes(step(), context=5)["terms"]["kv"] == a.n_layers * per_layer * 5
