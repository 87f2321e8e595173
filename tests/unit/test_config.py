"""FlashConfig: the one place where open()'s options are checked, its overrides and its JSON form;
the engine table and the one memory formula; and that opening and running a model changes
nothing process-wide (torch's thread count, the environment)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import flashio
from flashio.budget import MemoryBudget
from flashio.config import FlashConfig, Mode, field_names
from flashio.costmodel import default_profile
from flashio.errors import FlashError
from flashio.ffn import SERIAL_ELEMENTS, convert_rows
from flashio.format import Artifact, write_artifact
from flashio.modes import ENGINES, engine_class
from flashio.predictor import PredictorWeights

PROMPT = [2, 17, 101, 55, 9, 240, 33, 78]


def test_defaults_and_normalised_values():
    cfg = FlashConfig()
    assert cfg.mode is Mode.SPARSE and cfg.window == 5 and cfg.dram_budget is None and cfg.device == "cpu"
    cfg = FlashConfig(mode="dense", dram_budget="2GiB", compute_dtype=torch.bfloat16, device="cuda:1",
                      device_profile=Path("/tmp/p.json"), pinned_fraction=0, window=np.int64(3))
    assert cfg.mode is Mode.DENSE and cfg.mode == "dense"  # a Mode equals its name
    assert cfg.dram_budget == 2 << 30 and cfg.compute_dtype == "bfloat16" and cfg.device == "cuda:1"
    assert cfg.device_profile == "/tmp/p.json" and cfg.window == 3 and type(cfg.window) is int
    assert FlashConfig(compute_dtype="torch.float16").compute_dtype == "float16"
    with pytest.raises(AttributeError):
        cfg.window = 4  # frozen


@pytest.mark.parametrize(("kw", "message"), [
    ({"mode": "fast"}, r"mode 'fast' is not one of dense, naive, sparse, oracle, mmap"),
    ({"window": 0}, "window must be at least 1 token, got 0"),
    ({"window": "5"}, "window must be an integer, got '5'"),
    ({"window": True}, "window must be an integer"),
    ({"threads": 0}, "threads=0 must be >= 1"),
    ({"max_gap": -1}, "max_gap=-1 >= 0"),
    ({"max_context": 0}, "max_context must be at least 1"),
    ({"torch_threads": 0}, "torch_threads must be at least 1"),
    ({"compute_threads": 0}, "compute_threads must be at least 1"),
    ({"compute_threads": 1.5}, "compute_threads must be an integer"),
    ({"dram_budget": "lots"}, "cannot read 'lots' as a size"),
    ({"dram_budget": -5}, "size -5 is negative"),
    ({"pinned_fraction": 0.5}, "pinned_fraction=0.5 must be in \\[0, 1\\] and is for mode='naive' only"),
    ({"mode": "naive", "pinned_fraction": 1.5}, "pinned_fraction=1.5 must be in \\[0, 1\\]"),
    ({"mode": "naive", "pinned_fraction": "half"}, "pinned_fraction must be a number"),
    ({"mode": "mmap", "device": "cuda"}, "mode='mmap' runs on the CPU only"),
    ({"device": "warp-drive"}, "not a device name"),
    ({"device": "meta"}, "not supported"),
    ({"compute_dtype": "int8"}, "compute_dtype 'int8' is not one of"),
    ({"verify": "yes"}, "verify must be True or False"),
    ({"preload": 1}, "preload must be True or False"),
    ({"compute": "all"}, "compute 'all' is not one of window, active"),
    ({"device_profile": 3}, "device_profile must be a file path or a DeviceProfile"),
])
def test_invalid_options_are_refused_when_the_config_is_built(kw, message):
    with pytest.raises(FlashError, match=message):
        FlashConfig(**kw)


def test_replace_validates_again_and_names_the_valid_options():
    cfg = FlashConfig(mode="naive", pinned_fraction=0.3)
    assert cfg.replace(window=2) == FlashConfig(mode="naive", pinned_fraction=0.3, window=2)
    with pytest.raises(FlashError, match=r"pinned_fraction=0.3 .* mode='naive' only"):
        cfg.replace(mode="sparse")
    with pytest.raises(FlashError, match=r"unknown option\(s\) windw; the options are mode, window, dram_budget"):
        cfg.replace(windw=3)
    assert "torch_threads" in field_names() and "active_source" not in field_names()


def test_to_dict_from_dict_round_trip():
    cfg = FlashConfig(mode="oracle", window=2, dram_budget="1MiB", threads=3, max_gap=1, compute_dtype="bfloat16",
                      device_profile=default_profile(), overlap=True, reuse=False, record_trace=True, torch_threads=2)
    d = json.loads(json.dumps(cfg.to_dict()))  # plain JSON
    assert d["mode"] == "oracle" and d["dram_budget"] == 1 << 20 and d["device_profile"]["random"]
    assert FlashConfig.from_dict(d) == cfg
    assert FlashConfig.from_dict(FlashConfig(device_profile="p.json").to_dict()).device_profile == "p.json"
    with pytest.raises(FlashError, match="unknown option\\(s\\) colour"):
        FlashConfig.from_dict({**d, "colour": "blue"})
    with pytest.raises(FlashError, match="window must be at least 1"):
        FlashConfig.from_dict({**d, "window": 0})


def test_open_takes_a_config_and_keyword_overrides(opt_artifact):
    cfg = FlashConfig(mode="oracle", window=2, max_context=64)
    with flashio.open(opt_artifact, cfg, window=3) as model:
        assert model.config == cfg.replace(window=3) and model.window == 3 and model.mode is Mode.ORACLE
        assert model.kv.max_len == 64
    with flashio.open(opt_artifact, mode="dense", dram_budget="64MiB") as model:  # keywords alone
        assert model.config == FlashConfig(mode="dense", dram_budget=64 << 20)
        assert model.engine.__class__ is engine_class("dense")
    with pytest.raises(FlashError, match=r"unknown option\(s\) windw; the options are .*window"):
        flashio.open(opt_artifact, mode="dense", windw=3)
    with pytest.raises(FlashError, match="config must be a FlashConfig, got dict"):
        flashio.open(opt_artifact, {"mode": "dense"})


def test_every_mode_has_an_engine_stating_its_memory(opt_artifact):
    assert set(ENGINES) == set(Mode)
    m = Artifact(opt_artifact).manifest
    row = 2 * 64 * 4  # float32 bundle of d_model 64
    assert engine_class("dense").memory(m, torch.float32).fixed_bytes == 2 * 256 * row
    naive = engine_class("naive").memory(m, torch.float32, pinned_fraction=0.25)
    assert (naive.fixed_bytes, naive.stream_rows) == (2 * 64 * row + 192 * row, 192)
    sparse = engine_class("sparse").memory(m, torch.bfloat16)
    assert sparse.row_bytes == 3 * 2 * 64 * 2 and sparse.staging_row_bytes == row  # layers + scratch; landing
    assert sparse.min_rows == 13  # ceil(5% of 256)
    assert engine_class("oracle").memory(m, torch.float32).fixed_bytes == 2 * 256 * 64 * 4  # the up parts
    assert engine_class("mmap").memory(m, torch.float32).fixed_bytes == 0


def test_budget_estimate_before_loading_agrees_with_the_opened_model(opt_artifact):
    """The benchmark's plan (file sizes) and the runtime (what it loaded) use one formula."""
    art = Artifact(opt_artifact)
    budget = 700_000
    with flashio.open(opt_artifact, mode="oracle", dram_budget=budget, max_context=64) as model:
        est = MemoryBudget.estimate(art, "oracle", torch.float32, 64)
        held = model.memory_bytes()
        assert est.kv_bytes == held["kv_cache"]
        # the file's header is counted in the estimate, nothing else differs
        assert 0 <= est.resident_bytes - held["resident"] <= 4096
        assert 0 <= model.capacity - est.capacity(budget) <= -(-4096 // est.engine.per_row_bytes)
        assert sum(held.values()) <= budget


def test_convert_rows_is_exact_in_pieces_below_the_grain():
    width = SERIAL_ELEMENTS // 3 + 5  # pieces that do not fall on row boundaries
    src = (torch.randn(300, width) * 3).half()
    dst = torch.empty(300, width, dtype=torch.bfloat16)
    convert_rows(dst, src, torch.empty(128, width))
    assert torch.equal(dst.view(torch.int16), src.float().bfloat16().view(torch.int16))
    same = torch.empty_like(src)
    convert_rows(same, src, torch.empty(128, width))
    assert torch.equal(same, src)


def _all_active(n_layers: int, dim: int, n: int) -> list[PredictorWeights]:
    return [PredictorWeights(torch.zeros(4, dim), torch.zeros(n, 4), torch.full((n,), 20.0), 0.5)
            for _ in range(n_layers)]


def test_opening_and_running_changes_nothing_process_wide(tiny_opt, tmp_path, monkeypatch):
    """No torch.set_num_threads and no environment write, in every mode and on the conversion
    paths (float16 rows computed in bfloat16); only torch_threads, when asked, sets the count once."""
    art = write_artifact(tiny_opt[1], tmp_path / "fp16", dtype="float16", predictors=_all_active(2, 64, 256))
    before_threads = torch.get_num_threads()
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or real(n))
    real(2)  # a toggle to 1 and back would be seen by `calls`
    env = dict(os.environ)
    try:
        for mode, kw in (("sparse", {}), ("oracle", {"overlap": True}), ("dense", {}),
                         ("naive", {"pinned_fraction": 0.5}), ("mmap", {})):
            with flashio.open(art, mode=mode, compute_dtype="bfloat16", window=2, **kw) as model:
                model.forward(PROMPT, token_by_token=True)
                model.generate(PROMPT[:3], max_new_tokens=3)
        assert calls == [] and torch.get_num_threads() == 2
        assert dict(os.environ) == env
        with flashio.open(art, mode="dense", torch_threads=1) as model:  # asked for: once, at open
            model.forward(PROMPT, token_by_token=True)
        assert calls == [1] and torch.get_num_threads() == 1
    finally:
        real(before_threads)


def test_open_sets_the_kernels_threads(tiny_opt, tmp_path):
    from flashio import kernels
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    art = write_artifact(tiny_opt[1], tmp_path / "fp16", dtype="float16", predictors=_all_active(2, 64, 256))
    before = kernels.threads()
    try:
        kernels.set_threads(1)
        with flashio.open(art, mode="dense", compute_threads=3) as model:
            assert kernels.threads() == 3
            three = model.forward(PROMPT, token_by_token=True)
        with flashio.open(art, mode="dense") as model:  # the default: every CPU, at most 8
            assert kernels.threads() == kernels.default_threads()
            default = model.forward(PROMPT, token_by_token=True)
        torch.testing.assert_close(three, default, rtol=0, atol=1e-3 * float(default.abs().max()))
    finally:
        kernels.set_threads(before)


def test_kernel_threads_end_to_end(tmp_path):
    """A model whose products are large enough to be split (Llama-2-7B shape at a tenth: a 410 x
    410 fp16 projection is over two chunks), on one kernel thread and on two: the FFN's down
    products add the chunks' sums in order, so only float rounding differs. The sparse run on two
    threads replays the neurons the one-thread run's predictor picked: a score within rounding of
    its threshold may otherwise pick another set (seen: one neuron of ~390 at two steps), which
    changes the output by more than rounding."""
    from flashio import kernels
    from flashio.synth import write_synthetic
    from flashio.trace import TraceReplay
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    art = write_synthetic("llama-2-7b", tmp_path / "llama", scale=0.1, seed=0)
    before, before_torch = kernels.threads(), torch.get_num_threads()
    tokens = list(range(5, 13))
    try:
        got, picked = {}, None
        for mode in ("dense", "sparse"):
            for n in (1, 2):
                record, source = mode == "sparse" and n == 1, None
                if mode == "sparse" and n == 2:
                    source = TraceReplay(picked)
                with flashio.open(art, mode=mode, compute_threads=n, torch_threads=1, record_trace=record,
                                  active_source=source) as model:  # as the CLI
                    assert kernels.threads() == n
                    got[mode, n] = model.forward(tokens, token_by_token=True).float()
                    if record:
                        picked = model.trace()
        for mode in ("dense", "sparse"):
            ref = got[mode, 1]
            torch.testing.assert_close(got[mode, 2], ref, rtol=0, atol=2e-3 * float(ref.abs().max()))
            assert (got[mode, 2].argmax(-1) == ref.argmax(-1)).all()
    finally:
        kernels.set_threads(before)
        torch.set_num_threads(before_torch)
