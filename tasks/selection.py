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

A sweep point is measured on a few held-out rows only, so the pick is confirmed on every row
before it is published (`confirm_configuration`): when it misses the budget there, the next
cheapest candidate that passed is confirmed, and so on (at most `limit` confirmations); the first
that passes is chosen, else the confirmed one that missed by the least is the closest.

    outcome = confirm_configuration(cands, budget, measure, limit=3)   # measure(c) -> (Comparison, T)
    outcome.selection.chosen, outcome.result, outcome.confirmations
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

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

    def measured(self, m: Comparison) -> Candidate:
        """This configuration with the accuracy figures of `m` (its measurement on every held-out row)."""
        return dataclasses.replace(self, density=m.density, top1_agreement=m.top1_agreement,
                                   perplexity_increase=m.perplexity_increase, mean_kl=m.mean_kl, tokens=m.tokens)

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


def shortfall(c: Candidate | Comparison, budget: AccuracyBudget) -> float:
    """The worst relative miss: 0 when within budget."""
    top1 = max(0.0, budget.min_top1_agreement - c.top1_agreement) / max(1e-6, 1.0 - budget.min_top1_agreement)
    ppl = max(0.0, c.perplexity_increase - budget.max_perplexity_increase) / max(1e-6, budget.max_perplexity_increase)
    return max(top1, ppl)


def cost_order(c: Candidate) -> tuple[float, float, bool]:
    """Cheapest first; ties: the better top-1, then the setting measured on every held-out row ("chosen")."""
    return c.read_fraction_limited, -c.top1_agreement, c.label != "chosen"


def choose_configuration(cands: Sequence[Candidate], budget: AccuracyBudget) -> Selection:
    if not cands:
        raise ValueError("no candidate configurations")
    passing = [c for c in cands if c.passes]
    if passing:
        best = min(passing, key=cost_order)
        others = sorted({c.method for c in passing} - {best.method})
        reason = (f"the fewest FFN bytes per token ({100 * best.read_fraction_limited:.1f}% of naive, DRAM limited) "
                  f"of the {len(passing)} of {len(cands)} configurations within the budget"
                  + (f" (also passing: {', '.join(others)} predictors)" if others else ""))
        return Selection(chosen=best, closest=best, reason=reason)
    closest = min(cands, key=lambda c: (shortfall(c, budget), c.read_fraction_limited))
    return Selection(chosen=None, closest=closest,
                     reason=f"none of the {len(cands)} configurations is within the budget; the closest misses by "
                            f"{'; '.join(closest.violations)}")


T = TypeVar("T")


@dataclass(frozen=True)
class Confirmation:
    """A candidate measured again on every held-out row (a sweep point's figures are a few rows')."""

    candidate: Candidate  # as the sweep measured it
    measured: Comparison  # on every held-out row
    violations: tuple[str, ...]  # of `measured`

    @property
    def passes(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        c, m = self.candidate, self.measured
        return (f"{c.method} / {c.label}: top-1 {m.top1_agreement:.4f}, perplexity {100 * m.perplexity_increase:+.2f}% "
                f"on {m.tokens} held-out tokens (sweep: {c.top1_agreement:.4f}, {100 * c.perplexity_increase:+.2f}% "
                f"on {c.tokens})" + (f": {'; '.join(self.violations)}" if self.violations else ""))


@dataclass(frozen=True)
class Confirmed(Generic[T]):
    """What `confirm_configuration` found: the selection to publish, the measurement of its
    configuration (chosen, else closest), and every confirmation made, in order."""

    selection: Selection
    result: T
    confirmations: tuple[Confirmation, ...]


def confirm_configuration(cands: Sequence[Candidate], budget: AccuracyBudget,
                          measure: Callable[[Candidate], tuple[Comparison, T]], *, limit: int = 3) -> Confirmed[T]:
    """Measure the cheapest passing candidate on every held-out row (`measure`: its comparison
    there and whatever the caller keeps, e.g. the artifact and its evaluation); when it misses the
    budget, the next cheapest passing one, up to `limit` measurements. With no passing candidate,
    the closest is measured alone. The first that passes is chosen; else the measured one with the
    smallest shortfall (on every row) is the closest."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1 confirmation; got {limit}")
    first = choose_configuration(cands, budget)
    order = sorted((c for c in cands if c.passes), key=cost_order) or [first.closest]
    tried: list[tuple[Confirmation, T]] = []
    for c in order[:limit]:
        measured, result = measure(c)
        tried.append((Confirmation(c, measured, violations_of(measured, budget)), result))
        if tried[-1][0].passes:
            break
    confs = tuple(conf for conf, _ in tried)
    failed = [conf for conf in confs if not conf.passes]
    missed = f"{len(failed)} failed on every held-out row ({'; '.join(f.describe() for f in failed)})" if failed else ""
    last, result = tried[-1]
    if last.passes:
        tokens = last.measured.tokens
        if first.chosen is None:  # the closest of the sweep, measured on every row, is within the budget there
            c = last.candidate
            reason = (f"none of the {len(cands)} configurations passed on the sweep rows; the closest, {c.method} / "
                      f"{c.label} ({'; '.join(c.violations)} there), passed on all {tokens} held-out tokens (top-1 "
                      f"{last.measured.top1_agreement:.4f}, perplexity {100 * last.measured.perplexity_increase:+.2f}%)")
        elif not failed:
            reason = f"{first.reason}; confirmed on all {tokens} held-out tokens"
        else:  # first.reason names the cheapest on the sweep, which is not the one published
            n_pass = sum(c.passes for c in cands)
            reason = (f"{n_pass} of {len(cands)} configurations passed on the sweep rows; confirmed in cost order: "
                      f"{missed}; {last.candidate.method} / {last.candidate.label} is the cheapest that passed on "
                      f"all {tokens} held-out tokens (top-1 {last.measured.top1_agreement:.4f}, perplexity "
                      f"{100 * last.measured.perplexity_increase:+.2f}%, "
                      f"{100 * last.candidate.read_fraction_limited:.1f}% of naive FFN bytes per token, DRAM limited)")
        return Confirmed(Selection(chosen=last.candidate, closest=last.candidate, reason=reason), result, confs)
    k = min(range(len(tried)), key=lambda i: (shortfall(tried[i][0].measured, budget), i))
    closest, result = tried[k]
    if first.chosen is None:
        reason = first.reason
    else:
        rest = len(order) - len(tried)
        reason = (f"{first.reason}, but none passed on every held-out row: {missed}"
                  + (f"; {rest} more passing candidate(s) not confirmed (at most {limit} confirmations)" if rest else ""))
    return Confirmed(Selection(chosen=None, closest=closest.candidate, reason=reason), result, confs)


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
