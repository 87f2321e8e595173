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
from tasks.errors import InputError
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


def test_quantized_exact_gate_separates_quantization_from_sparsity(held_out, tiny_llama, monkeypatch):
    """A quantized gate-resident artifact evaluated with its float form as reference: the main rows
    give dense float (transformers' own loss on them), dense int4 and sparse int4, so the report
    splits the loss; the sweep's rows are not scored against the reference, which is closed (out of
    DRAM) before the sweep's models open."""
    import contextlib
    import math

    from tasks.report import quantization_summary

    model, ckpt = tiny_llama
    _, calib, ids, root = held_out
    quant = write_artifact(ckpt, root / "int4", dtype="float32", gate_resident=True, up_sketch="int4",
                           quantize="int4")
    plain = write_artifact(ckpt, root / "float", dtype="float32")
    options = EvalOptions(window=1, naive_tokens=2, bytes_tokens=4, sweep_sequences=1)
    settings = [("chosen", (0.5, 0.5)), ("density 0.25", (0.25, 0.25))]
    events: list[tuple[str, str, str]] = []
    real_open = flashio.open

    @contextlib.contextmanager
    def recording_open(path, config=None, *, mode):
        events.append(("open", str(path), mode))
        with real_open(path, config, mode=mode) as fm:
            yield fm
        events.append(("close", str(path), mode))

    monkeypatch.setattr(flashio, "open", recording_open)
    ev, _ = evaluate_exact_gate(quant, calib, settings, options, ffn_dram_fraction=0.5, out_dir=root / "q",
                                method=EXACT_GATE_UP, reference=plain)
    monkeypatch.undo()
    sparse_opens = [i for i, e in enumerate(events) if e[0] == "open" and e[2] == "sparse"]
    assert len(sparse_opens) == 4  # two per setting: reads per token, then the scored rows
    assert events.index(("close", str(plain), "dense")) < sparse_opens[2]  # before the sweep setting's
    assert events.index(("open", str(plain), "dense")) < sparse_opens[0]
    q, m = ev.quantization, ev.main
    with torch.no_grad():
        want_float = math.exp(model.float()(input_ids=ids, labels=ids).loss.item())
    assert q.scheme == "int4" and q.tokens == m.tokens == ids.numel()
    assert q.perplexity_float == pytest.approx(want_float, rel=1e-4)
    assert q.perplexity_quantized == pytest.approx(m.perplexity_dense, rel=1e-9)
    assert q.perplexity_sparse == pytest.approx(m.perplexity_sparse, rel=1e-9)
    assert abs(q.quantization_increase) > 1e-4 and q.top1_quantized <= 1.0 and q.mean_kl_quantized > 0
    assert ev.sweep[0].tokens == ids[:1].numel()
    s = quantization_summary(q)
    together = (1 + s["quantization_perplexity_increase"]) * (1 + s["sparsity_perplexity_increase"]) - 1
    assert 1 + s["total_perplexity_increase"] == pytest.approx(m.perplexity_sparse / want_float, rel=1e-6)
    assert s["total_perplexity_increase"] == pytest.approx(together, abs=1e-12)

    with pytest.raises(InputError, match="not quantized"):  # the reference must be the float form
        evaluate_exact_gate(plain, calib, settings[:1], options, ffn_dram_fraction=0.5, out_dir=root / "p",
                            reference=plain)
