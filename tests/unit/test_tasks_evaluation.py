"""The accuracy gate's decisions and messages, the multiple-choice formats, the report, and the
perplexity scoring against transformers' own loss on the same token ids."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
from tasks.activations import ActivationStats
from tasks.calibration import CalibrationData
from tasks.errors import AccuracyBudgetError, InputError
from tasks.evaluation import (
    AccuracyBudget,
    Comparison,
    Evaluation,
    HeldoutSample,
    budget_violations,
    compare,
    enforce_budget,
)
from tasks.predictors import LayerPredictor
from tasks.report import build_report, layer_rows, render_markdown, summary_lines
from tasks.zeroshot import parse_example


def comparison(ppl_dense=10.0, ppl_sparse=10.1, top1=0.99, recall=None) -> Comparison:
    return Comparison(label="x", recall_target=recall, thresholds=(0.5,), sequences=2, tokens=512,
                      perplexity_dense=ppl_dense, perplexity_sparse=ppl_sparse,
                      perplexity_increase=ppl_sparse / ppl_dense - 1, top1_agreement=top1, mean_kl=1e-3,
                      density=0.2, bytes_per_token=1000.0, reads_per_token=3.0, cache_rows_per_token=40.0)


def evaluation(**kw) -> Evaluation:
    return Evaluation(main=comparison(**kw), sweep=(comparison(recall=0.9), comparison(recall=0.99)),
                      naive_bytes_per_token=8000.0, ffn_bytes=10_000, zero_shot=(), json_path=Path("e.json"),
                      curve_json_path=Path("c.json"), curve_png_path=None)


def test_within_budget_passes():
    assert enforce_budget(evaluation(), AccuracyBudget()) == []


def test_perplexity_over_budget_names_metric_value_and_budget():
    ev = evaluation(ppl_sparse=10.5)
    with pytest.raises(AccuracyBudgetError) as err:
        enforce_budget(ev, AccuracyBudget(max_perplexity_increase=0.02))
    msg = str(err.value)
    assert "perplexity increase +5.00% (dense 10.000 -> sparse 10.500) exceeds the budget of +2.00%" in msg
    assert "nothing was published" in msg and len(err.value.violations) == 1


def test_top1_below_budget_and_both_reported():
    bad = budget_violations(evaluation(ppl_sparse=11.0, top1=0.9), AccuracyBudget(min_top1_agreement=0.97))
    assert len(bad) == 2 and "top-1 agreement 0.9000 is below the budget of 0.9700" in bad[1]


def test_allowing_the_loss_returns_the_violations():
    ev = evaluation(top1=0.5)
    assert enforce_budget(ev, AccuracyBudget(), allow_loss=True) == budget_violations(ev, AccuracyBudget())


def test_budget_is_validated():
    with pytest.raises(InputError):
        AccuracyBudget(min_top1_agreement=1.5)


@pytest.mark.parametrize(("row", "context", "choices", "label"), [
    ({"question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"},
     "Question: 2+2?\nAnswer:", ("3", "4"), 1),
    ({"ctx": "He opened the", "endings": ["door", "sky", "sea", "tree"], "label": "0"}, "He opened the",
     ("door", "sky", "sea", "tree"), 0),
    ({"goal": "Boil water", "sol1": "Use a pot", "sol2": "Use a sieve", "label": 0},
     "Question: Boil water\nAnswer:", ("Use a pot", "Use a sieve"), 0),
    ({"context": "x =", "choices": ["1", "2"], "answer": 1}, "x =", ("1", "2"), 1),
])
def test_multiple_choice_formats(row, context, choices, label):
    ex = parse_example(row)
    assert (ex.context, ex.choices, ex.label) == (context, choices, label)


def test_unknown_multiple_choice_format():
    with pytest.raises(InputError, match="no known format"):
        parse_example({"prompt": "x"})


def test_report_summary_and_tables():
    stats = ActivationStats(path=Path("s"), shards=(), tokens=4096, n_layers=2, n_neurons=8,
                            active_thresholds=(0.0, 0.0), density=(0.1, 0.3), coactivation_tokens=0, sha256="")
    preds = [LayerPredictor(i, Path("p"), "", 16, 0.2, d, 2 * d, 0.99, 0.6, 0.995, True, 0, 100, ())
             for i, d in enumerate((0.1, 0.3))]
    report = build_report(stats, preds, evaluation(), budget=AccuracyBudget(), violations=[], window=5)
    s = report["summary"]
    assert s["true_sparsity"] == pytest.approx(0.8) and s["predicted_sparsity"] == pytest.approx(0.8)
    assert s["gate"] == "passed" and s["bytes_per_token_naive"] == 8000.0
    assert not any(k.startswith(("quantization", "sparsity_", "total_")) or k == "perplexity_float" for k in s)
    lines = summary_lines(report)
    assert any("sparse 1000 B, naive 7.81 KiB (8.0x less)" in line for line in lines)
    assert layer_rows(report)[1]["predicted density"] == 0.6
    md = render_markdown(report)
    assert "| layer | rank |" in md and "sparsity_accuracy.png" in md
    assert "loss split" not in md and "quantization" not in md


class _LogitsOf:
    """Stands in for the runtime in `compare`: a transformers model's logits of a row, no stats."""

    def __init__(self, model):
        self.model, self.stats = model, []

    def forward(self, row, token_by_token: bool = False):
        import torch

        with torch.no_grad():
            return self.model(input_ids=row[None]).logits[0]


@pytest.fixture(scope="module")
def demo_heldout_rows():
    """The demo model and held-out rows cut the way the calibration step cuts them: the token
    stream of whole documents (each starting with bos) in rows of 96, the rows cut mid-document
    given bos in place of their first token (the demo's tokenizer adds one), and one row holding
    a document boundary."""
    transformers = pytest.importorskip("transformers")
    import torch

    from tasks.calibration import _encoder, _fill, _open_with_bos
    from tasks.demo import DEMO_CHECKPOINT_DIR, stdlib_text_files

    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_CHECKPOINT_DIR, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_CHECKPOINT_DIR)
    tokenizer.model_max_length = 1 << 62
    sizes = [(p.stat().st_size, p) for p in stdlib_text_files("heldout")]
    small = [p for size, p in sorted(sizes, key=lambda t: t[0]) if size > 400][:2]  # two short files
    texts = (p.read_text(encoding="utf-8") for p in small)
    encode, bos = _encoder(tokenizer)
    rows, n_docs, _ = _fill(texts, encode, 6, 96)
    assert rows.shape == (6, 96) and n_docs == 2 and bos == tokenizer.bos_token_id, (rows.shape, n_docs, bos)
    ids = torch.from_numpy(_open_with_bos(rows, bos)).long()
    assert (ids[:, 0] == bos).all() and (ids[:, 1:] == bos).sum() == 1
    return model, ids


def test_perplexity_is_transformers_loss_on_the_same_ids(demo_heldout_rows):
    """The pipeline's perplexity (per-token mean NLL of all but each row's first token, rows scored
    on their own) equals exp of transformers' labels=input_ids loss on the same rows, dense and
    sparse alike (on these rows a mean of per-row perplexities would give 41.3 instead of 34.1)."""
    import torch

    model, ids = demo_heldout_rows
    other = copy.deepcopy(model)  # a "sparse" model that differs: last FFN layer switched off
    with torch.no_grad():
        other.model.decoder.layers[-1].fc2.weight.zero_()
        want_dense = math.exp(model(input_ids=ids, labels=ids).loss.item())
        want_sparse = math.exp(other(input_ids=ids, labels=ids).loss.item())
    dense = _LogitsOf(model)
    c = compare(lambda k: dense.forward(ids[k]), _LogitsOf(other), ids, label="x", recall_target=None,
                thresholds=(), n_neurons_total=1)
    assert c.sequences == 6 and c.tokens == 6 * 96
    assert c.perplexity_dense == pytest.approx(want_dense, rel=1e-5)
    assert c.perplexity_sparse == pytest.approx(want_sparse, rel=1e-5)
    assert c.perplexity_sparse != pytest.approx(c.perplexity_dense, rel=1e-3)


def calibration_data(*, documents: int, heldout_spec: str | None = "stdlib:heldout") -> CalibrationData:
    return CalibrationData(path=Path("t.safetensors"), fingerprint="f", spec="stdlib:train", heldout_spec=heldout_spec,
                           n_sequences=128, n_heldout=16, seq_len=256, seed=0, documents=40,
                           heldout_documents=documents)


def test_heldout_sample_says_what_the_perplexity_is_measured_on():
    # `flashio convert` with its defaults: 16 x 256 tokens, all from one held-out file.
    sample = HeldoutSample.of(calibration_data(documents=1), 16)
    assert sample.targets == 16 * 255
    text = sample.describe()
    assert "16 sequences of 256 tokens cut from 1 document(s) of stdlib:heldout" in text
    assert "4080 next tokens, all but the first of each sequence, averaged per token" in text
    assert "bos first where the tokenizer adds one" in text
    assert sample.few_documents()
    assert not HeldoutSample.of(calibration_data(documents=31), 16).few_documents()
    after = HeldoutSample.of(calibration_data(documents=12, heldout_spec=None), 16)
    assert "of stdlib:train (the documents after the calibration part)" in after.describe()


def _report(ev: Evaluation) -> dict:
    stats = ActivationStats(path=Path("s"), shards=(), tokens=4096, n_layers=2, n_neurons=8,
                            active_thresholds=(0.0, 0.0), density=(0.1, 0.3), coactivation_tokens=0, sha256="")
    preds = [LayerPredictor(i, Path("p"), "", 16, 0.2, d, 2 * d, 0.99, 0.6, 0.995, True, 0, 100, ())
             for i, d in enumerate((0.1, 0.3))]
    return build_report(stats, preds, ev, budget=AccuracyBudget(), violations=[], window=5)


@pytest.mark.parametrize("documents", [16, 1])
def test_report_says_what_the_perplexity_is_measured_on(documents):
    sample = HeldoutSample.of(calibration_data(documents=documents), 16)
    report = _report(dataclasses.replace(evaluation(), heldout=sample))
    s = report["summary"]
    assert s["perplexity_measured_on"] == sample.describe() and s["heldout_documents"] == documents
    assert s["heldout_spec"] == "stdlib:heldout" and s["heldout_few_documents"] is (documents == 1)
    line = next(line for line in summary_lines(report) if line.startswith("held-out text"))
    assert f"512 tokens from {documents} document(s) of stdlib:heldout" in line
    assert ("not the held-out set" in line) is (documents == 1)
    assert f"Perplexity measured on {sample.describe()}." in render_markdown(report)


def test_report_without_a_heldout_sample():
    """Evaluations cached before HeldoutSample existed have none: the report says nothing of it."""
    report = _report(evaluation())
    assert report["summary"]["perplexity_measured_on"] is None
    assert not any(line.startswith("held-out text") for line in summary_lines(report))
    assert "Perplexity measured on" not in render_markdown(report)


@pytest.fixture(scope="module")
def float_and_int4(tmp_path_factory):
    """A tiny OPT written twice from the same checkpoint: float32 and int4 rows (int8 resident),
    both with the same random predictors, and four held-out rows of its token ids."""
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import save_file

    from flashio.format import write_artifact
    from flashio.predictor import PredictorWeights
    from tasks.testing import build_tiny_model, build_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("quant-eval")
    tok = build_tokenizer(write_corpus(root / "text", n_files=2), root / "tok")
    ckpt = build_tiny_model("opt", root / "m", tok, hidden=32, ffn=64, layers=2)
    gen = torch.Generator().manual_seed(0)
    preds = [PredictorWeights(torch.randn(4, 32, generator=gen), torch.randn(64, 4, generator=gen), torch.zeros(64))
             for _ in range(2)]
    plain = write_artifact(ckpt, root / "float", dtype="float32", predictors=preds)
    quant = write_artifact(ckpt, root / "int4", dtype="float32", predictors=preds, quantize="int4")
    ids = torch.randint(3, len(tok), (4, 24), generator=gen)
    ids[:, 0] = tok.bos_token_id
    save_file({"calibration": ids[:1].clone(), "heldout": ids}, str(root / "tokens.safetensors"))
    calib = CalibrationData(path=root / "tokens.safetensors", fingerprint="f", spec="test", heldout_spec="test",
                            n_sequences=1, n_heldout=4, seq_len=24, seed=0, documents=1, heldout_documents=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return plain, quant, calib, model, ids, root


def test_quantized_evaluation_separates_quantization_from_sparsity(float_and_int4):
    """With the float artifact as reference, the same held-out rows give dense float (transformers'
    own loss on them), dense int4 and sparse int4; the report's quantization and sparsity losses
    are each measured, and together make the total."""
    import torch

    from tasks.evaluation import EvalOptions, evaluate_artifact
    from tasks.resultfile import read_result, write_result

    plain, quant, calib, model, ids, root = float_and_int4
    ev = evaluate_artifact(quant, calib, [], EvalOptions(naive_tokens=2), out_dir=root / "ev", reference=plain)
    q, m = ev.quantization, ev.main
    with torch.no_grad():
        want_float = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert q.scheme == "int4" and q.resident == "int8" and q.tokens == m.tokens == 4 * 24
    assert q.perplexity_float == pytest.approx(want_float, rel=1e-4)
    assert q.perplexity_quantized == pytest.approx(m.perplexity_dense, rel=1e-9)
    assert q.perplexity_sparse == pytest.approx(m.perplexity_sparse, rel=1e-9)
    assert abs(q.quantization_increase) > 1e-3  # int4 moves the dense model...
    assert abs(m.perplexity_increase) > 1e-3  # ...and the random predictors' sparsity moves it again
    assert q.top1_quantized < 1.0 and q.mean_kl_quantized > 0 and q.mean_kl_sparse > 0
    (root / "stored").mkdir(exist_ok=True)  # the evaluate stage's cached result keeps the split
    assert read_result(write_result(root / "stored", ev).parent, Evaluation).quantization == q

    s = _report(ev)["summary"]
    assert s["quantization_perplexity_increase"] == pytest.approx(q.perplexity_quantized / want_float - 1, rel=1e-3)
    assert s["sparsity_perplexity_increase"] == pytest.approx(s["perplexity_increase"])
    together = (1 + s["quantization_perplexity_increase"]) * (1 + s["sparsity_perplexity_increase"]) - 1
    assert s["total_perplexity_increase"] == pytest.approx(together, abs=1e-12)
    assert s["total_perplexity_increase"] == pytest.approx(m.perplexity_sparse / want_float - 1, rel=1e-3)
    lines = summary_lines(_report(ev))
    split = next(line for line in lines if line.startswith("loss split"))
    assert f"quantization {100 * s['quantization_perplexity_increase']:+.2f}%" in split
    assert f"sparsity {100 * s['sparsity_perplexity_increase']:+.2f}%" in split


def test_float_reference_must_be_the_unquantized_form(float_and_int4):
    from tasks.evaluation import EvalOptions, evaluate_artifact

    plain, quant, calib, _, _, root = float_and_int4
    with pytest.raises(InputError, match="not quantized"):
        evaluate_artifact(plain, calib, [], EvalOptions(naive_tokens=2), out_dir=root / "a", reference=plain)
    with pytest.raises(InputError, match="is not the unquantized form"):
        evaluate_artifact(quant, calib, [], EvalOptions(naive_tokens=2), out_dir=root / "b", reference=quant)
