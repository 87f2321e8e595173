"""The configuration a conversion publishes: the cheapest within the budget; when none is, the
closest and the flags that would publish it; the report carries both byte figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.evaluation import AccuracyBudget, Comparison, Evaluation
from tasks.selection import Candidate, choose_configuration, list_candidates, publish_flags
from tasks.windowing import WindowChoice, WindowPlan, WindowPoint

BUDGET = AccuracyBudget(max_perplexity_increase=0.02, min_top1_agreement=0.97)


def comparison(label, recall, top1, ppl, density):
    return Comparison(label=label, recall_target=recall, thresholds=(0.5,), sequences=2, tokens=128,
                      perplexity_dense=10.0, perplexity_sparse=10.0 * (1 + ppl), perplexity_increase=ppl,
                      top1_agreement=top1, mean_kl=0.01, density=density, bytes_per_token=density * 1000,
                      reads_per_token=1.0, cache_rows_per_token=1.0)


def evaluation(main, *sweep):
    return Evaluation(main=main, sweep=tuple(sweep), naive_bytes_per_token=1000.0, ffn_bytes=4000, zero_shot=(),
                      json_path=Path("e"), curve_json_path=Path("c"), curve_png_path=None)


def plan(labels, reads):
    """reads: label -> (window, read fraction, held fraction)."""
    pts = tuple(WindowPoint(label, None if label == "chosen" else float(label.split()[1]),
                            WindowChoice(w, r, h, 0.5, ((w, r, h), (8, r / 2, 0.9))))
                for label, (w, r, h) in reads.items())
    return WindowPlan(labels=labels, tokens=100, points=pts)


def candidates(top1_contrib=0.98):
    evs = {"active": evaluation(comparison("chosen", None, 0.99, 0.001, 0.9), comparison("recall 0.9", 0.9, 0.95,
                                                                                        0.03, 0.6)),
           "contribution": evaluation(comparison("chosen", None, top1_contrib, 0.01, 0.7))}
    plans = {"active": plan("active", {"chosen": (0, 0.9, 0.0), "recall 0.9": (1, 0.5, 0.45)}),
             "contribution": plan("contribution", {"chosen": (0, 0.7, 0.0)})}
    return list_candidates(evs, plans, BUDGET)


def test_the_cheapest_configuration_within_the_budget_is_chosen():
    cands = candidates()
    assert len(cands) == 3 and sum(c.passes for c in cands) == 2
    pick = choose_configuration(cands, BUDGET)
    assert pick.chosen is not None and pick.chosen.method == "contribution"
    assert pick.chosen.read_fraction_limited == 0.7 and pick.chosen.read_fraction_unlimited == 0.35
    assert "the fewest FFN bytes per token (70.0% of naive" in pick.reason and "also passing: active" in pick.reason


def test_without_a_passing_configuration_the_closest_and_its_flags_are_named():
    cands = [c for c in candidates(top1_contrib=0.96) if c.label == "chosen" and c.method == "contribution"]
    cands += [c for c in candidates() if c.label != "chosen"]
    pick = choose_configuration(cands, BUDGET)
    assert pick.chosen is None and pick.closest.method == "contribution"  # 0.96: a smaller miss than 0.95, +3%
    assert "none of the 2 configurations" in pick.reason and "top-1 0.9600 < 0.9700" in pick.reason
    assert publish_flags(pick.closest, BUDGET) == "--methods contribution --min-top1 0.960"
    sweep_point: Candidate = next(c for c in cands if c.label == "recall 0.9")
    assert publish_flags(sweep_point, BUDGET) == "--methods active --recall 0.9 --min-top1 0.950 --max-ppl-increase 0.030"
    assert "caching off" in pick.closest.describe() and "window 1" in sweep_point.describe()


def test_report_has_both_byte_figures_and_the_frontier(tmp_path):
    from tasks.activations import ActivationStats
    from tasks.frontier import FrontierPoint, OracleFrontier
    from tasks.predictors import LayerPredictor
    from tasks.report import (
        Choice,
        build_report,
        render_markdown,
        summary_lines,
        write_report_files,
    )

    cands = candidates()
    ev = evaluation(comparison("chosen", None, 0.98, 0.01, 0.7))
    stats = ActivationStats(path=Path("s"), shards=(), tokens=100, n_layers=1, n_neurons=8, active_thresholds=(0.1,),
                            density=(0.5,), coactivation_tokens=0, sha256="")
    preds = [LayerPredictor(0, Path("p"), "", 16, 0.2, 0.5, 0.7, 0.99, 0.6, 0.995, True, 0, 100, (), "contribution")]
    frontier = OracleFrontier(points=(FrontierPoint("oracle: contribution", 0.5, 0.96, 0.02, 0.03, 128),
                                      FrontierPoint("oracle: gate", 0.5, 0.9, 0.1, 0.2, 128)),
                              perplexity_dense=10.0, tokens=128)
    choice = Choice(candidates=tuple(cands), selection=choose_configuration(cands, BUDGET), ffn_dram_fraction=0.5,
                    frontier=frontier)
    report = build_report(stats, preds, ev, budget=BUDGET, violations=[], window=0, choice=choice)
    s = report["summary"]
    assert s["bytes_per_token_limited"] == pytest.approx(700.0) and s["bytes_per_token_unlimited"] == 350.0
    assert s["ffn_dram_fraction"] == 0.5 and s["bytes_per_token_sparse"] == pytest.approx(700.0)
    assert {r["method"] for r in report["frontier"]} == {"oracle: contribution", "oracle: gate", "predictor: active",
                                                         "predictor: active (recall 0.9)", "predictor: contribution"}
    assert any("70.0% of naive, caching off) with the FFN's DRAM at 50%" in line for line in summary_lines(report))
    md = render_markdown(report)
    assert "## Density-accuracy frontier" in md and "## Configurations" in md
    files = write_report_files(report, ev, tmp_path)
    assert "report/frontier.png" in files and files["report/frontier.png"].stat().st_size > 0


def test_oracle_density_at_a_top1_interpolates_the_frontier():
    from tasks.frontier import FrontierPoint, OracleFrontier
    from tasks.report import oracle_density_at

    fr = OracleFrontier(points=tuple(FrontierPoint("oracle: contribution", d, t, 0.0, 0.0, 10)
                                     for d, t in ((0.5, 0.9), (0.7, 0.97), (0.9, 1.0))), perplexity_dense=1.0, tokens=10)
    assert oracle_density_at(fr, "oracle: contribution", 0.97) == pytest.approx(0.7)
    assert oracle_density_at(fr, "oracle: contribution", 0.99) == pytest.approx(0.7 + 0.2 * 2 / 3)
    assert oracle_density_at(fr, "oracle: contribution", 0.5) == 0.5
    assert oracle_density_at(fr, "oracle: gate", 0.9) is None
