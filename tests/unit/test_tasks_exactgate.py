"""tasks.exactgate: the exact selections measured a held-out row per step equal the runtime token
by token (accuracy and density over every row, reads per token on the first tokens)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import flashio
from flashio.exact import kept_count
from flashio.format import write_artifact
from tasks.calibration import CalibrationData
from tasks.evaluation import EvalOptions, _sum_stats, compare
from tasks.exactgate import evaluate_exact_gate
from tasks.selection import EXACT_GATE, EXACT_GATE_UP, EXACT_METHODS

N, LAYERS, ROWS, LEN = 192, 2, 3, 20  # tests/conftest.py's tiny Llama


@pytest.fixture(scope="module")
def held_out(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("exactgate")
    ids = torch.randint(3, 320, (ROWS, LEN), generator=torch.Generator().manual_seed(1))
    save_file({"calibration": ids[:1].clone(), "heldout": ids}, str(root / "tokens.safetensors"))
    calib = CalibrationData(path=root / "tokens.safetensors", fingerprint="f", spec="test", heldout_spec="test",
                            n_sequences=1, n_heldout=ROWS, seq_len=LEN, seed=0, documents=1, heldout_documents=ROWS)
    art = write_artifact(tiny_llama[1], root / "art", gate_resident=True, up_sketch="int4")
    return art, calib, ids, root


@pytest.mark.parametrize("method", [EXACT_GATE, EXACT_GATE_UP])
def test_a_row_per_step_equals_token_by_token(held_out, method):
    art, calib, ids, root = held_out
    options = EvalOptions(window=1, naive_tokens=2, bytes_tokens=7, sweep_sequences=2)
    settings = [("chosen", (0.5, 0.25)), ("density 0.75", (0.75, 0.75))]
    ev, plan = evaluate_exact_gate(art, calib, settings, options, ffn_dram_fraction=0.5, out_dir=root / method,
                                   method=method)
    assert [c.label for c in (ev.main, *ev.sweep)] == ["chosen", "density 0.75"]
    assert [p.label for p in plan.points] == ["chosen", "density 0.75"]
    base = dataclasses.replace(options.flash_config(), window=1, reuse=True)
    with flashio.open(art, base, mode="dense") as dense:
        want_dense = [dense.forward(row) for row in ids]
    for (label, dens), got, rows in zip(settings, (ev.main, *ev.sweep), (ids, ids[:2]), strict=True):
        cfg = dataclasses.replace(base, density=dens, selection=EXACT_METHODS[method].selection)
        with flashio.open(art, cfg, mode="sparse") as sparse:
            want = compare(lambda k: want_dense[k], sparse, rows, label=label, recall_target=None, thresholds=(),
                           n_neurons_total=LAYERS * N)
            sparse.forward(ids[0][:7], token_by_token=True)
            first = _sum_stats(sparse.stats)
        assert got.tokens == want.tokens == rows.numel()
        assert got.top1_agreement == want.top1_agreement
        assert got.perplexity_sparse == pytest.approx(want.perplexity_sparse, rel=1e-5)
        assert got.mean_kl == pytest.approx(want.mean_kl, rel=1e-3, abs=1e-7)
        # every token keeps exactly its top-k: the density over all rows, not a step's union
        assert got.density == pytest.approx(want.density, abs=1e-12)
        assert got.density == pytest.approx(sum(kept_count(d, N) for d in dens) / (LAYERS * N), abs=1e-12)
        assert got.mean_kl > 0 and got.density < 1  # the selection does change the logits
        assert got.bytes_per_token == pytest.approx(first.bytes_read / 7) and got.bytes_per_token > 0
        assert got.reads_per_token == pytest.approx(first.reads / 7)
