"""Smoke tests of `flashio bench device`, `flashio synth` and `flashio bench model` at a tiny scale
(seconds). The full-scale run is in the README's Benchmarks section."""

from __future__ import annotations

import json

import pytest
import torch

from flashio.bench.bandwidth import MemoryBenchConfig
from flashio.bench.cgroup import MemoryCgroup, memory_cgroup_support
from flashio.bench.device import DeviceBenchConfig, measure_device, profile_markdown
from flashio.bench.fio import fio_available
from flashio.bench.memplan import SLACK_BYTES
from flashio.bench.model import CONFIG_NAMES, ModelBenchOptions, run_model_bench
from flashio.bench.report import markdown
from flashio.cli import main
from flashio.costmodel import (
    PROFILE_ENV,
    CostModel,
    DeviceProfile,
    default_profile_path,
    find_profile,
)
from flashio.errors import FlashError
from flashio.format import Artifact
from flashio.synth import write_synthetic

BASELINE = 400 << 20  # the interpreter's RSS, fixed here instead of measured in a child (3 s)


@pytest.fixture(scope="module")
def synth_art(tmp_path_factory):
    return write_synthetic("opt-6.7b", tmp_path_factory.mktemp("bench") / "opt", scale=0.05, seed=0)


def test_bench_device_smoke(tmp_path):
    memory = MemoryBenchConfig(threads=(1, 2), buffer_bytes=4 << 20, seconds=0.0, shape=(256, 256))
    cfg = DeviceBenchConfig(tmp_path / "dev", chunks=(4096, 16384), threads=(1, 4), file_bytes=16 << 20,
                            seconds=0.05, fio=False, memory=memory)
    lines = []
    profile = measure_device(cfg, progress=lines.append)
    assert [p.threads for p in profile.dram_read] == [1, 2] and profile.memory_source == "measured"
    assert {(p.dtype, p.threads) for p in profile.matvec} == {(d, t) for d in ("float32", "float16", "bfloat16")
                                                              for t in (1, 2)}
    again = DeviceProfile.from_json(json.loads(profile.dumps()))
    assert (again.dram_read, again.matvec, again.matvec_shape) == (profile.dram_read, profile.matvec, (256, 256))
    assert "Memory bandwidth, GB/s" in profile_markdown(profile) and "matvec bfloat16" in profile_markdown(profile)
    assert {(p.chunk_bytes, p.threads) for p in profile.random} == {(4096, 1), (4096, 4), (16384, 1), (16384, 4)}
    assert all(p.mbps > 0 for p in profile.random) and profile.sequential_mbps > 0
    assert profile.source == "measured" and profile.machine["cpus"] >= 1
    assert not (tmp_path / "dev" / ".flashio-device-test.bin").exists()  # cleaned up
    assert len(lines) >= 5
    cm = CostModel(profile)
    assert cm.read_time_s([16384] * 64, 4) > 0


@pytest.mark.skipif(not fio_available(), reason="fio is not installed")
def test_bench_device_cli_with_fio(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # installs there, not in ~/.config
    out = tmp_path / "out"
    assert main(["bench", "device", str(tmp_path / "d"), "--out", str(out), "--size", "16MiB", "--chunks",
                 "16KiB", "--threads", "2", "--seconds", "0.05", "--fio-seconds", "1"]) == 0
    profile = DeviceProfile.load(out / "device-profile.json")
    assert profile.fio_random and profile.fio_random[0].mbps > 0 and profile.fio_sequential_mbps
    assert (out / "device-profile.png").stat().st_size > 0
    assert "16.00 KiB" in capsys.readouterr().out


def test_bench_device_installs_the_profile_the_runtime_finds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    args = [str(tmp_path / "d"), "--size", "4MiB", "--chunks", "16KiB", "--threads", "1", "--seconds", "0.05",
            "--no-fio", "--no-memory"]
    assert main(["bench", "device", *args, "--out", str(tmp_path / "a"), "--no-install"]) == 0
    assert not default_profile_path().exists() and find_profile() is None
    assert "not installed" in capsys.readouterr().out
    assert main(["bench", "device", *args, "--out", str(tmp_path / "b")]) == 0
    assert str(default_profile_path()) in capsys.readouterr().out
    assert default_profile_path() == tmp_path / "config" / "flashio" / "device-profile.json"
    assert find_profile() == DeviceProfile.load(tmp_path / "b" / "device-profile.json")  # the runtime's choice


def test_bench_model_smoke_all_rows(synth_art, tmp_path):
    opts = ModelBenchOptions(synth_art, tmp_path / "out", tokens=4, baseline_tokens=1, weights_fraction=0.8,
                             in_process=True, process_baseline_bytes=BASELINE, run_bandwidth=False)
    res = run_model_bench(opts)
    rows = {r["name"]: r for r in res["configs"]}
    assert list(rows) == list(CONFIG_NAMES)
    assert all(r["ok"] for r in rows.values()), {n: r.get("error") for n, r in rows.items()}
    assert res["memory"]["cgroup"] is False and "in this process" in res["memory"]["cgroup_reason"]
    row_bytes = 2 * 256 * 2  # fp16 bundle of d_model 256
    for name in ("+predictor", "+windowing", "+bundling", "+reordering"):
        r = rows[name]
        # without gap reads, exactly the bytes the trace requires (no re-reads, no padding)
        if r["max_gap"] == 0:
            assert r["per_token"]["bytes_read"] == pytest.approx(r["required_bytes_per_token"], rel=1e-9), name
        else:
            assert r["per_token"]["bytes_read"] >= r["required_bytes_per_token"]
        assert r["per_token"]["truncated"] == 0
    assert rows["+windowing"]["per_token"]["reads"] == 2 * rows["+windowing"]["per_token"]["neurons_loaded"]
    assert rows["+predictor"]["per_token"]["cache_hits"] == 0
    # naive reads the whole FFN each token; hybrid a part of it
    ffn_per_token = res["memory"]["ffn_bytes"] - 4096  # the file's header
    assert rows["naive"]["per_token"]["bytes_read"] == pytest.approx(ffn_per_token, rel=0.01)
    assert 0 < rows["hybrid"]["per_token"]["bytes_read"] < rows["naive"]["per_token"]["bytes_read"]
    assert res["trace"]["kind"] == "synthetic" and res["trace"]["measured"]["density"] > 0.05
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    for name in CONFIG_NAMES:
        assert f"| {name} |" in table
    assert "synthetic" in table and "Targets" in table
    assert json.loads((out / "results.json").read_text())["targets"]["full_config"] == "+lookahead"
    assert (out / "latency.png").stat().st_size > 0
    assert row_bytes * rows["+bundling"]["per_token"]["neurons_loaded"] == pytest.approx(
        rows["+bundling"]["per_token"]["bytes_read"], rel=1e-9) or rows["+bundling"]["max_gap"] > 0
    # the floor columns: every row, in results.json and the table; dense by hand (its one measured
    # token runs at context 2: after the warm-up token)
    saved = {r["name"]: r for r in json.loads((out / "results.json").read_text())["configs"]}
    for name, r in saved.items():
        assert r["dram_bytes_per_token"] > 0 and r["floor_ms"] > 0, name
        assert r["total_vs_floor"] == pytest.approx(r["per_token"]["total_ms"] / r["floor_ms"]), name
        assert r["floor_ms"] >= r["io_not_hidden_ms"] == pytest.approx(r["per_token"]["io_ms"]), name
        assert r["bandwidth_source"] == "default"  # no profile given: the built-in bandwidth, said so
    a = res["artifact"]
    d, L, N, V = a["dim"], a["layers"], a["ffn_neurons"], 256
    resident = L * (4 * d * d + 4 * d) + L * 4 * d + 2 * d + V * d + 2 * d + L * d  # OPT, tied head
    dense = (resident + L * N * (2 * d + 1) + 2 * L * d * 2) * 2  # fp16: weights, FFN rows + up bias, KV
    assert saved["dense"]["dram_bytes_per_token"] == dense
    assert saved["+bundling"]["dram_bytes_per_token"] < saved["naive"]["dram_bytes_per_token"]
    assert "| floor (ms) |" in table and "BUILT-IN DEFAULTS" in table


def test_bench_model_on_a_quantized_artifact(tmp_path):
    """int8 rows: the bytes the trace requires are rows x Manifest.row_bytes (the codes, which
    carry the scales), what the runtime reads, and the floor's FFN term holds the rows as stored."""
    art = write_synthetic("opt-6.7b", tmp_path / "int8", scale=0.05, seed=0, quantize="int8")
    res = run_model_bench(ModelBenchOptions(art, tmp_path / "out", configs=("+bundling", "dense"), tokens=3, weights_fraction=0.9,
                                            baseline_tokens=1, in_process=True, process_baseline_bytes=BASELINE,
                                            run_bandwidth=False))
    rows = {r["name"]: r for r in res["configs"]}
    assert all(r["ok"] for r in rows.values()), {n: r.get("error") for n, r in rows.items()}
    a = res["artifact"]
    d, L, N = a["dim"], a["layers"], a["ffn_neurons"]
    row_bytes = Artifact(art).manifest.row_bytes
    assert row_bytes == 2 * d  # int8 up + down, the scales in the codes: half of fp16's
    b = rows["+bundling"]
    assert b["required_bytes_per_token"] == pytest.approx(row_bytes * b["per_token"]["neurons_loaded"], rel=1e-9)
    # a row that is not whole 512-byte blocks is read with the blocks around it
    assert row_bytes * b["per_token"]["neurons_loaded"] <= b["per_token"]["bytes_read"] \
        <= (-(-row_bytes // 512) + 1) * 512 * b["per_token"]["neurons_loaded"]
    assert rows["dense"]["dram_terms"]["ffn"] == L * N * (row_bytes + 2)  # rows as stored + the up bias entry
    assert b["preload_bytes"] == 0 and "Preloaded" not in markdown(res)
    # a limit that holds every int8 row: flashio run's defaults (+overlap) read them at open, no token reads
    res = run_model_bench(ModelBenchOptions(art, tmp_path / "out2", configs=("+bundling", "+overlap"), tokens=3,
                                            dram_limit=2 * res["memory"]["model_bytes"] + BASELINE + SLACK_BYTES,
                                            weights_fraction=1.0, baseline_tokens=1, in_process=True,
                                            process_baseline_bytes=BASELINE, run_bandwidth=False))
    rows = {r["name"]: r for r in res["configs"]}
    o, b = rows["+overlap"], rows["+bundling"]
    assert o["capacity"] == N and o["preload_bytes"] >= L * N * row_bytes and o["per_token"]["bytes_read"] == 0
    assert b["preload_bytes"] == 0 and b["per_token"]["bytes_read"] > 0  # no retain: reads on demand
    assert "Preloaded" in markdown(res) and "+overlap " in markdown(res).split("Preloaded")[1]


def test_compute_dtype_is_timed_on_float_rows_of_a_quantized_artifact(tmp_path, monkeypatch):
    """The fp16-vs-bf16 choice times float rows of the layout's width: an int4 row's bundle_width
    (its bytes) is narrower than its up + down elements, and the down part would be cut short."""
    import flashio.bench.memplan as memplan

    art = Artifact(write_synthetic("opt-6.7b", tmp_path / "int4", scale=0.05, seed=0, quantize="int4"))
    m = art.manifest
    assert m.row_bytes < m.bundle_layout[-1][2]
    timed = []
    real = memplan.ffn_compute
    monkeypatch.setattr(memplan, "ffn_compute", lambda x, w, parts, *a: timed.append(w.shape) or real(x, w, parts, *a))
    assert memplan.choose_compute_dtype(art)["chosen"] in ("float16", "bfloat16")
    assert timed and all(shape[1] == m.bundle_layout[-1][2] == 2 * art.args.dim for shape in timed)


def test_bfloat16_must_pay_for_converting_the_reads():
    import flashio.bench.memplan as memplan

    assert memplan.pick_dtype({"float16": 10.0, "bfloat16": 9.0}) == "float16"  # 10% faster: not enough
    assert memplan.pick_dtype({"float16": 10.0, "bfloat16": 5.0}) == "bfloat16"  # torch's slow fp16 GEMV
    assert memplan.pick_dtype({"float16": 9.0, "bfloat16": 10.0}) == "float16"


def test_bench_model_cgroup_fallback(synth_art, tmp_path, monkeypatch):
    """Without a v1 memory controller the benchmark says so and relies on the runtime's budget."""
    import flashio.bench.model as bm

    monkeypatch.setattr(bm, "memory_cgroup_support", lambda: (False, "no cgroup v1 memory controller here"))
    calls = []
    monkeypatch.setattr(bm, "_run_worker", lambda spec, work, name, limit, timeout: calls.append(limit) or
                        bm._run_here(spec))
    res = run_model_bench(ModelBenchOptions(synth_art, tmp_path / "o", configs=("+bundling",), tokens=2,
                                            weights_fraction=0.9, process_baseline_bytes=BASELINE))
    assert calls == [None]  # the child gets no cgroup, only the runtime's dram_budget
    row = res["configs"][0]
    assert row["ok"], row.get("error")
    assert res["memory"]["cgroup"] is False and row.get("cgroup") is None
    table = (tmp_path / "o" / "table.md").read_text()
    assert "NO cgroup: no cgroup v1 memory controller here" in table
    # the floor at the bandwidth measured around the row (run_bandwidth, the default); the
    # built-in one's beside it
    run = row["matvec_run"]
    assert row["bandwidth_source"] == "this run" and run["threads"] == row["bandwidth_threads"]
    assert set(run["before"]) == set(run["after"]) == {"float16"} and min(run["before"].values()) > 0
    gbps = (run["before"]["float16"] + run["after"]["float16"]) / 2
    assert row["bandwidth_gbps"] == {"float16": pytest.approx(gbps, rel=1e-3)}
    assert row["compute_floor_ms"] == pytest.approx(row["dram_bytes_per_token"] / gbps / 1e6, rel=1e-3)
    assert row["bandwidth_source_profile"] == "default"
    assert row["compute_floor_ms"] * gbps == pytest.approx(
        (row["floor_ms_profile"] - row["io_not_hidden_ms"]) * row["bandwidth_gbps_profile"]["float16"], rel=1e-3)
    assert row["total_vs_floor_profile"] == pytest.approx(row["per_token"]["total_ms"] / row["floor_ms_profile"])
    assert "each row's own, measured right before and after it" in table
    assert f"+bundling {row['total_vs_floor_profile']:.2f}" in table


@pytest.mark.skipif(not memory_cgroup_support()[0], reason=memory_cgroup_support()[1])
def test_bench_model_under_a_real_cgroup(synth_art, tmp_path):
    res = run_model_bench(ModelBenchOptions(synth_art, tmp_path / "o", configs=("+overlap",), tokens=2,
                                            weights_fraction=0.9))
    row = res["configs"][0]
    assert row["ok"], row.get("error")
    cg = row["cgroup"]
    assert cg["limit_bytes"] == res["memory"]["limit_bytes"] and 0 < cg["max_usage_bytes"] <= cg["limit_bytes"]


def test_cgroup_support_probe_and_errors(tmp_path):
    ok, why = memory_cgroup_support(tmp_path)
    assert not ok and "no cgroup v1 memory controller" in why
    with pytest.raises(FlashError, match="cannot create a memory cgroup"):
        MemoryCgroup("x", 1 << 30, root=tmp_path)


def test_bench_options_are_checked(synth_art, tmp_path):
    with pytest.raises(FlashError, match="unknown configuration"):
        ModelBenchOptions(synth_art, tmp_path, configs=("turbo",))
    with pytest.raises(FlashError, match="raise --dram-limit"):
        run_model_bench(ModelBenchOptions(synth_art, tmp_path / "x", configs=("+bundling",), dram_limit=1 << 20,
                                          in_process=True, process_baseline_bytes=BASELINE))


def test_bench_model_max_gap_overrides_the_cost_model(synth_art, tmp_path):
    """--max-gap: the tuned configurations read through at most that many unneeded rows, whatever
    the cost model would choose; the results say where the figure came from."""
    res = run_model_bench(ModelBenchOptions(synth_art, tmp_path / "g", configs=("+bundling", "+overlap"), tokens=2,
                                            baseline_tokens=1, in_process=True, process_baseline_bytes=BASELINE,
                                            run_bandwidth=False, max_gap=7))
    rows = {r["name"]: r for r in res["configs"]}
    assert res["cost_model"]["tuned_max_gap"] == 7 and res["cost_model"]["max_gap_source"] == "--max-gap"
    assert rows["+overlap"]["max_gap"] == 7 and rows["+bundling"]["max_gap"] == 0  # untuned rows: no gap reads
    with pytest.raises(FlashError, match="max_gap must be >= 0"):
        ModelBenchOptions(synth_art, tmp_path, max_gap=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_model_on_cuda_without_cuda_is_one_clear_error(synth_art, tmp_path):
    with pytest.raises(FlashError, match="CUDA is not available"):
        run_model_bench(ModelBenchOptions(synth_art, tmp_path / "x", configs=("+bundling",), in_process=True,
                                          process_baseline_bytes=BASELINE, device="cuda"))
    assert not (tmp_path / "x" / "results.json").exists()


def test_cuda_targets_and_labels(synth_art, tmp_path):
    """The GPU table's targets (25x over naive; I/O + memory management under half the token)
    are computed from the rows like the CPU ones."""
    from flashio.bench.report import evaluate_targets, markdown

    res = run_model_bench(ModelBenchOptions(synth_art, tmp_path / "out", configs=("naive", "+bundling"), tokens=2,
                                            baseline_tokens=1, weights_fraction=0.8, in_process=True,
                                            process_baseline_bytes=BASELINE, run_bandwidth=False))
    assert all(r["ok"] for r in res["configs"]), [r.get("error") for r in res["configs"]]
    res["device"] = "cuda:0"  # the same rows read as a GPU run's
    res["machine"]["gpu"] = "a GPU"
    t = evaluate_targets(res)
    full, naive = (next(r for r in res["configs"] if r["name"] == n)["per_token"] for n in ("+bundling", "naive"))
    assert t["speedup_vs_naive"]["target"] == 25.0
    assert t["speedup_vs_naive"]["value"] == pytest.approx(naive["total_ms"] / full["total_ms"])
    assert t["io_and_memory_fraction"]["value"] == pytest.approx((full["io_ms"] + full["mem_ms"]) / full["total_ms"])
    assert full["upload_ms"] == 0.0 and full["device_mem_ms"] == 0.0  # measured on the CPU: no device time
    assert "memory_fraction" not in t
    text = markdown({**res, "targets": t})
    assert "GPU memory limit" in text and "flash->GPU" in text and "a GPU (cuda:0)" in text
    assert "(+0.0 copy)" in text and "(+0.0 device)" in text


def test_cli_help_lists_bench_and_synth(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "device" in text and "model" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "synth" in capsys.readouterr().out
