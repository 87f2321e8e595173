"""The accuracy gate's decisions and messages, the multiple-choice formats, the report."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
from tasks.activations import ActivationStats
from tasks.errors import AccuracyBudgetError, InputError
from tasks.evaluation import (
    AccuracyBudget,
    Comparison,
    Evaluation,
    budget_violations,
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
    lines = summary_lines(report)
    assert any("sparse 1000 B, naive 7.81 KiB (8.0x less)" in line for line in lines)
    assert layer_rows(report)[1]["predicted density"] == 0.6
    md = render_markdown(report)
    assert "| layer | rank |" in md and "sparsity_accuracy.png" in md
