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


def sweep_candidates():
    """Exact-method sweep points as Gemma 3 270M measured them on 4 sweep rows: cheaper = lower density."""
    ev = evaluation(comparison("chosen", None, 0.99, 0.003, 0.9),
                    *(comparison(f"density {d:g}", None, top1, 0.01, d)
                      for d, top1 in ((0.6, 0.95), (0.7, 0.965), (0.75, 0.9707), (0.8, 0.975), (0.85, 0.98))))
    reads = {"chosen": (0, 0.9, 0.0), **{f"density {d:g}": (0, d, 0.0) for d in (0.6, 0.7, 0.75, 0.8, 0.85)}}
    pts = tuple(WindowPoint(label, None, WindowChoice(w, r, h, 0.5, ((w, r, h),))) for label, (w, r, h) in reads.items())
    return list_candidates({"exact-gate": ev}, {"exact-gate": WindowPlan("exact-gate", 100, pts)}, BUDGET)


def on_every_row(top1_by_label):
    """A fake confirmation: the top-1 each label measures on every held-out row; records the order."""
    asked = []

    def measure(c):
        asked.append(c.label)
        m = comparison("chosen", c.recall_target, top1_by_label[c.label], c.perplexity_increase, c.density)
        return m, f"artifact of {c.label}"

    return measure, asked


def test_a_pick_that_fails_on_every_row_falls_back_to_the_next_cheapest_that_passed_the_sweep():
    from tasks.selection import confirm_configuration

    cands = sweep_candidates()
    assert choose_configuration(cands, BUDGET).chosen.label == "density 0.75"  # the sweep's pick
    measure, asked = on_every_row({"density 0.75": 0.9658, "density 0.8": 0.968, "density 0.85": 0.9741,
                                   "chosen": 0.99})
    out = confirm_configuration(cands, BUDGET, measure, limit=3)
    assert asked == ["density 0.75", "density 0.8", "density 0.85"]  # cost order, stops at the first that passes
    assert out.selection.chosen.label == "density 0.85" and out.result == "artifact of density 0.85"
    assert [c.passes for c in out.confirmations] == [False, False, True]
    assert "top-1 0.9658, perplexity +1.00% on 128 held-out tokens (sweep: 0.9707" in out.selection.reason
    assert "2 failed on every held-out row" in out.selection.reason
    assert "exact-gate / density 0.85 is the cheapest that passed on all 128 held-out tokens (top-1 0.9741" \
        in out.selection.reason
    c85 = next(c for c in cands if c.label == "density 0.85")  # its bytes, not the failed sweep pick's
    assert f"{100 * c85.read_fraction_limited:.1f}% of naive FFN bytes per token" in out.selection.reason
    assert "the fewest FFN bytes" not in out.selection.reason


def test_the_confirmations_are_bounded_and_the_closest_confirmed_is_named():
    from tasks.selection import confirm_configuration

    measure, asked = on_every_row({"density 0.75": 0.9658, "density 0.8": 0.968, "density 0.85": 0.9641,
                                   "chosen": 0.99})
    out = confirm_configuration(sweep_candidates(), BUDGET, measure, limit=2)
    assert asked == ["density 0.75", "density 0.8"]
    assert out.selection.chosen is None and out.selection.closest.label == "density 0.8"  # 0.968: the smaller miss
    assert out.result == "artifact of density 0.8"
    assert "none passed on every held-out row" in out.selection.reason
    assert "2 more passing candidate(s) not confirmed (at most 2 confirmations)" in out.selection.reason


def test_a_confirmed_pick_is_published_after_one_measurement():
    from tasks.selection import confirm_configuration

    measure, asked = on_every_row({"density 0.75": 0.972})
    out = confirm_configuration(sweep_candidates(), BUDGET, measure)
    assert asked == ["density 0.75"] and out.selection.chosen.label == "density 0.75"
    assert out.selection.reason.endswith("confirmed on all 128 held-out tokens")
    # with nothing passing on the sweep, the closest alone is measured, and published if it passes on every row
    failing = [c for c in candidates() if not c.passes]
    measure, asked = on_every_row({"recall 0.9": 0.98})
    out = confirm_configuration(failing, BUDGET, measure)
    assert asked == ["recall 0.9"] and out.selection.chosen is None  # +3% perplexity on every row too
    closest = [c for c in candidates(top1_contrib=0.96) if c.method == "contribution"]
    measure, asked = on_every_row({"chosen": 0.975})
    out = confirm_configuration(closest, BUDGET, measure)
    assert asked == ["chosen"] and out.selection.chosen == closest[0] and out.result == "artifact of chosen"


def test_the_report_names_the_confirmed_figures_of_a_sweep_point():
    """A sweep point measured on a few rows (top-1 0.99 there) is published with its measurement on
    every held-out row (0.975): the summary's configuration line gives those, as its top-1 does."""
    from tasks.activations import ActivationStats
    from tasks.report import Choice, build_report

    evs = {"active": evaluation(comparison("chosen", None, 0.99, 0.001, 0.9), comparison("recall 0.9", 0.9, 0.99,
                                                                                        0.005, 0.6))}
    cands = list_candidates(evs, {"active": plan("active", {"chosen": (0, 0.9, 0.0), "recall 0.9": (1, 0.5, 0.45)})},
                            BUDGET)
    sel = choose_configuration(cands, BUDGET)
    assert sel.chosen.label == "recall 0.9"
    every_row = comparison("chosen", None, 0.975, 0.015, 0.61)
    stats = ActivationStats(path=Path("s"), shards=(), tokens=100, n_layers=1, n_neurons=8, active_thresholds=(0.1,),
                            density=(0.5,), coactivation_tokens=0, sha256="")
    report = build_report(stats, [], evaluation(every_row), budget=BUDGET, violations=[], window=1,
                          choice=Choice(candidates=tuple(cands), selection=sel, ffn_dram_fraction=0.5))
    line = report["summary"]["configuration"]
    assert "recall 0.9" in line and "top-1 0.9750, perplexity +1.50%" in line and "density 61.0%" in line
    assert "0.9900" not in line


def test_the_closest_that_passes_on_every_row_is_published_with_a_reason_that_says_so():
    from tasks.selection import confirm_configuration

    cands = [c for c in sweep_candidates() if c.label in ("density 0.6", "density 0.7")]  # none passes on the sweep
    assert choose_configuration(cands, BUDGET).chosen is None
    measure, asked = on_every_row({"density 0.7": 0.971})
    out = confirm_configuration(cands, BUDGET, measure)
    assert asked == ["density 0.7"] and out.selection.chosen.label == "density 0.7"
    r = out.selection.reason
    assert r.startswith("none of the 2 configurations passed on the sweep rows; the closest, exact-gate / density 0.7 "
                        "(top-1 0.9650 < 0.9700 there), passed on all 128 held-out tokens (top-1 0.9710")
    assert "misses by" not in r
