"""The configuration a conversion publishes: the cheapest that passes the accuracy budget.

    cands = list_candidates({"contribution": ev_c, "active": ev_a}, {"contribution": plan_c, ...}, budget)
    pick = choose_configuration(cands, budget)
    pick.chosen, pick.closest, pick.reason

A candidate is one predictor set (its labels: "active", "contribution") at one threshold setting
(the recall target it was calibrated to, "chosen", or a sweep point), measured in the runtime by
the evaluation (top-1, perplexity, KL) and costed by the window simulation with the FFN's DRAM
limited (tasks.windowing): FFN bytes read per token as a fraction of naive. Cheapest = fewest
bytes read per token under that limit. When none passes, the closest is the one whose worst
shortfall, relative to its budget's slack, is smallest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasks.evaluation import AccuracyBudget, Comparison, Evaluation
from tasks.predictors import LayerPredictor
from tasks.windowing import OFF, WindowPlan, unlimited_choice

EXACT_GATE = "exact-gate"  # tasks.exactgate's method names (defined here: exactgate imports the runtime)
EXACT_GATE_UP = "exact-gate-up"


@dataclass(frozen=True)
class ExactMethod:
    """An exact selection the flow evaluates: gate rows resident, up + down bundles read."""

    selection: str  # the runtime's (flashio.config.Selection)
    up_sketch: str | None  # the artifact's up sketch scheme (flashio.format.write_artifact)
    ranking: str  # the layer errors its per-layer densities are allocated by (tasks.allocation)
    title: str


EXACT_METHODS = {
    EXACT_GATE: ExactMethod("gate", None, "gate", "exact gate (gate rows resident)"),
    EXACT_GATE_UP: ExactMethod("gate+up", "int4", "contribution",
                               "exact gate + int4 up sketch (gate rows and a 4-bit copy of the up rows resident)"),
}


def method_title(method: str) -> str:
    """How the report names a method."""
    return EXACT_METHODS[method].title if method in EXACT_METHODS else f"predictor: {method}"


@dataclass(frozen=True)
class Candidate:
    method: str  # the predictors' labels
    label: str  # "chosen" or "recall 0.99"
    recall_target: float | None
    density: float  # measured in the runtime (neurons used / all)
    top1_agreement: float
    perplexity_increase: float
    mean_kl: float
    tokens: int
    bytes_per_token: float  # measured in the runtime (window of the evaluation, no DRAM limit)
    window: int  # the window that fits the DRAM limit for this setting (0: caching off)
    read_fraction_limited: float  # FFN bytes read per token / naive, DRAM limited
    held_fraction: float  # window caches / FFN bytes
    read_fraction_unlimited: float  # FFN bytes read per token / naive with the best window, no DRAM limit
    violations: tuple[str, ...]

    @property
    def passes(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        w = "caching off" if self.window == OFF else f"window {self.window}"
        if self.method in EXACT_METHODS:
            what = f"{EXACT_METHODS[self.method].title} at " + (
                "per-layer densities of mean " + self.label.removeprefix("density ") if self.label != "chosen"
                else "the per-layer densities")
        else:
            at = f"recall {self.recall_target:g}" if self.recall_target is not None else "its recall target"
            what = f"{self.method} predictors at {at}"
        return (f"{what}, {w} (density {100 * self.density:.1f}%, top-1 "
                f"{self.top1_agreement:.4f}, perplexity {100 * self.perplexity_increase:+.2f}%, "
                f"{100 * self.read_fraction_limited:.1f}% of naive bytes with DRAM limited)")


@dataclass(frozen=True)
class Selection:
    chosen: Candidate | None  # None: no candidate passes
    closest: Candidate
    reason: str


def violations_of(c: Comparison, budget: AccuracyBudget) -> tuple[str, ...]:
    out = []
    if c.perplexity_increase > budget.max_perplexity_increase:
        out.append(f"perplexity {100 * c.perplexity_increase:+.2f}% > +{100 * budget.max_perplexity_increase:.2f}%")
    if c.top1_agreement < budget.min_top1_agreement:
        out.append(f"top-1 {c.top1_agreement:.4f} < {budget.min_top1_agreement:.4f}")
    return tuple(out)


def list_candidates(evaluations: Mapping[str, Evaluation], plans: Mapping[str, WindowPlan],
                    budget: AccuracyBudget, *, sweep: bool = True) -> list[Candidate]:
    """Every method's evaluated setting; `sweep` False: only the thresholds the predictors were
    calibrated to (a fixed threshold, or an exactly sparse model whose recall target the user set)."""
    out = []
    for method, ev in evaluations.items():
        plan = plans[method]
        for c in (ev.main, *(ev.sweep if sweep else ())):
            choice = plan.point(c.label) or plan.chosen
            out.append(Candidate(method=method, label=c.label, recall_target=c.recall_target, density=c.density,
                                 top1_agreement=c.top1_agreement, perplexity_increase=c.perplexity_increase,
                                 mean_kl=c.mean_kl, tokens=c.tokens, bytes_per_token=c.bytes_per_token,
                                 window=choice.window, read_fraction_limited=choice.read_fraction,
                                 held_fraction=choice.held_fraction,
                                 read_fraction_unlimited=unlimited_choice(choice)[1],
                                 violations=violations_of(c, budget) + (() if choice.fits else (
                                     f"resident gate rows and sketch ({100 * choice.resident_fraction:.0f}% of the FFN) exceed "
                                     f"the DRAM limit of {100 * choice.ffn_dram_fraction:.0f}%",))))
    return out


def shortfall(c: Candidate, budget: AccuracyBudget) -> float:
    """The worst relative miss: 0 when within budget."""
    top1 = max(0.0, budget.min_top1_agreement - c.top1_agreement) / max(1e-6, 1.0 - budget.min_top1_agreement)
    ppl = max(0.0, c.perplexity_increase - budget.max_perplexity_increase) / max(1e-6, budget.max_perplexity_increase)
    return max(top1, ppl)


def choose_configuration(cands: Sequence[Candidate], budget: AccuracyBudget) -> Selection:
    if not cands:
        raise ValueError("no candidate configurations")
    passing = [c for c in cands if c.passes]
    if passing:
        # ties: the better top-1, then the setting measured on every held-out row ("chosen")
        best = min(passing, key=lambda c: (c.read_fraction_limited, -c.top1_agreement, c.label != "chosen"))
        others = sorted({c.method for c in passing} - {best.method})
        reason = (f"the fewest FFN bytes per token ({100 * best.read_fraction_limited:.1f}% of naive, DRAM limited) "
                  f"of the {len(passing)} of {len(cands)} configurations within the budget"
                  + (f" (also passing: {', '.join(others)} predictors)" if others else ""))
        return Selection(chosen=best, closest=best, reason=reason)
    closest = min(cands, key=lambda c: (shortfall(c, budget), c.read_fraction_limited))
    return Selection(chosen=None, closest=closest,
                     reason=f"none of the {len(cands)} configurations is within the budget; the closest misses by "
                            f"{'; '.join(closest.violations)}")


def predictors_at(predictors: Sequence[LayerPredictor], recall_target: float | None) -> list[LayerPredictor]:
    """The predictors with the thresholds of a sweep point (unchanged for None: their own)."""
    if recall_target is None:
        return list(predictors)
    return [dataclasses.replace(p, threshold=p.threshold_for(recall_target)) for p in predictors]


def publish_flags(c: Candidate, budget: AccuracyBudget) -> str:
    """The `flashio convert` flags that would publish candidate `c` as it measured."""
    flags = [f"--methods {c.method}"]
    if c.method in EXACT_METHODS and c.label.startswith("density "):
        flags.append(f"--gated-density {c.label.removeprefix('density ')}")
    if c.recall_target is not None:
        flags.append(f"--recall {c.recall_target:g}")
    relax = []
    if c.top1_agreement < budget.min_top1_agreement:
        relax.append(f"--min-top1 {int(c.top1_agreement * 1000) / 1000:.3f}")
    if c.perplexity_increase > budget.max_perplexity_increase:
        relax.append(f"--max-ppl-increase {-(-c.perplexity_increase * 1000 // 1) / 1000:.3f}")
    return " ".join(flags + (relax or ["--allow-accuracy-loss"]))
