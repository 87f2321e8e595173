"""The conversion report: a summary for the manifest, a markdown page, a per-layer table.

    report = build_report(stats, predictors, ev, budget=AccuracyBudget(), violations=[])
    files = write_report_files(report, ev, out_dir)     # {"report/report.md": path, ...}
    print(render_markdown(report))

`report["summary"]` is what `flashio inspect` and `flashio convert` print: true and predicted
sparsity, predictor recall, perplexity dense vs sparse, top-1 agreement, bytes read per token
sparse vs naive, and what the perplexity was measured on (`perplexity_measured_on`,
`heldout_documents`: the evaluation's `HeldoutSample`, absent from evaluations made before it).

With the configuration choice (tasks.selection) the report also holds, per model: every
configuration tried (`candidates`: predictor labels x threshold setting) and which was chosen and
why (`configuration`, `configuration_reason`); the density-accuracy frontier per method with the
exact oracles (tasks.frontier) as its bound (`frontier`, plotted in frontier.png); the per-layer
densities of the contribution labels (tasks.allocation); the DRAM the window caches hold; and FFN
bytes per token against naive twice: unlimited (`bytes_per_token_sparse`, measured) and with the
FFN's DRAM limited to `ffn_dram_fraction` of its bytes (`bytes_per_token_limited`, simulated on
the predicted active sets: tasks.windowing; rows needed, while the runtime's read plan may also
read through small gaps between them, which `bytes_per_token_sparse` includes).

A quantized artifact evaluated with its float reference (tasks.evaluation.QuantizationLoss) adds
the loss split (`quantization_summary`): `quantization_perplexity_increase` (dense quantized vs
dense float) and `sparsity_perplexity_increase` (sparse vs dense, both quantized: the gate's
`perplexity_increase`), with `total_perplexity_increase` their product; an unquantized one has
none of these keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from tasks.activations import ActivationStats
from tasks.allocation import Allocation
from tasks.caching import sha256_json, stage_dir
from tasks.evaluation import AccuracyBudget, Evaluation, QuantizationLoss
from tasks.frontier import OracleFrontier
from tasks.predictors import LayerPredictor
from tasks.selection import EXACT_METHODS, Candidate, Selection, method_title
from tasks.windowing import OFF

REPORT_DIR = "report"
FRONTIER_PNG = "frontier.png"


@dataclass(frozen=True)
class Choice:
    """What the configuration step found (everything but `evaluation`'s own figures)."""

    candidates: tuple[Candidate, ...]
    selection: Selection
    ffn_dram_fraction: float
    frontier: OracleFrontier | None = None
    allocation: Allocation | None = None


def build_report(stats: ActivationStats, predictors: Sequence[LayerPredictor], ev: Evaluation, *,
                 budget: AccuracyBudget, violations: Sequence[str], window: int,
                 calibration: dict[str, Any] | None = None, choice: Choice | None = None,
                 published: bool = True) -> dict[str, Any]:
    preds = sorted(predictors, key=lambda p: p.layer)
    m = ev.main
    true_density = sum(stats.density) / len(stats.density)
    recalls = [p.recall for p in preds]  # none: an exact-only conversion trains no predictors
    summary = {
        "true_sparsity": 1.0 - true_density,
        "predicted_sparsity": 1.0 - m.density,
        "predictor_recall_mean": sum(recalls) / len(recalls) if preds else None,
        "predictor_recall_min": min(recalls, default=None),
        "predictor_precision_mean": sum(p.precision for p in preds) / len(preds) if preds else None,
        "perplexity_dense": m.perplexity_dense,
        "perplexity_sparse": m.perplexity_sparse,
        "perplexity_increase": m.perplexity_increase,
        "top1_agreement": m.top1_agreement,
        "mean_kl": m.mean_kl,
        "bytes_per_token_sparse": m.bytes_per_token,
        "bytes_per_token_naive": ev.naive_bytes_per_token,
        "reads_per_token_sparse": m.reads_per_token,
        "ffn_bytes": ev.ffn_bytes,
        "eval_tokens": m.tokens,
        "heldout_spec": ev.heldout.spec if ev.heldout else None,
        "heldout_documents": ev.heldout.documents if ev.heldout else None,
        "perplexity_measured_on": ev.heldout.describe() if ev.heldout else None,
        "heldout_few_documents": ev.heldout.few_documents() if ev.heldout else None,
        "calibration_tokens": stats.tokens,
        "window": window,
        "budget": dataclasses.asdict(budget),
        "gate": ("passed" if not violations else "exceeded (allowed by the caller)" if published
                 else "failed: nothing was published"),
        "violations": list(violations),
    }
    layers = [{"layer": p.layer, "rank": p.rank, "escalations": p.escalations, "threshold": p.threshold,
               "active_threshold": stats.active_thresholds[p.layer],
               "true_density": p.true_density, "predicted_density": p.predicted_density, "recall": p.recall,
               "precision": p.precision, "recall_at_budget": p.recall_at_budget, "met_target": p.met_target}
              for p in preds]
    sweep = [{"recall_target": c.recall_target, "density": c.density, "perplexity_increase": c.perplexity_increase,
              "top1_agreement": c.top1_agreement, "mean_kl": c.mean_kl, "bytes_per_token": c.bytes_per_token,
              "tokens": c.tokens} for c in ev.sweep]
    if ev.quantization is not None:
        summary.update(quantization_summary(ev.quantization))
    report = {"summary": summary, "layers": layers, "sweep": sweep, "zero_shot": list(ev.zero_shot),
              "calibration": calibration or {}}
    if choice is not None:
        _add_choice(report, choice, ev, m.bytes_per_token)
    return report


def quantization_summary(q: QuantizationLoss) -> dict[str, Any]:
    """A quantized artifact's loss in two parts, on the same held-out rows: quantization (dense
    quantized vs dense float) and sparsity (sparse vs dense, both quantized: what the gate judges,
    `perplexity_increase`); `total_*` is the sparse quantized model against the float dense one,
    (1 + quantization) x (1 + sparsity) - 1 in perplexity."""
    return {"quantization_scheme": q.scheme, "quantization_group_size": q.group_size,
            "quantization_resident": q.resident, "perplexity_float": q.perplexity_float,
            "perplexity_quantized_dense": q.perplexity_quantized,
            "quantization_perplexity_increase": q.quantization_increase,
            "quantization_top1_agreement": q.top1_quantized, "quantization_mean_kl": q.mean_kl_quantized,
            "sparsity_perplexity_increase": q.sparsity_increase,
            "total_perplexity_increase": q.total_increase, "total_top1_agreement": q.top1_sparse,
            "total_mean_kl": q.mean_kl_sparse}


def _add_choice(report: dict[str, Any], choice: Choice, ev: Evaluation, measured_bpt: float) -> None:
    s, sel = report["summary"], choice.selection
    c = sel.chosen or sel.closest
    naive = ev.naive_bytes_per_token
    # `ev` measured the configuration on every held-out row (a sweep point was confirmed there):
    # its figures, as the summary's top-1 and perplexity beside it, not the sweep rows'
    s.update({"configuration": c.measured(ev.main).describe(), "configuration_method": c.method, "configuration_passed": sel.chosen
              is not None, "configuration_reason": sel.reason, "window_limited": c.window,
              "window_caching": "off" if c.window == OFF else "on",
              "ffn_dram_fraction": choice.ffn_dram_fraction,
              "bytes_per_token_limited": c.read_fraction_limited * naive,
              "bytes_per_token_unlimited": c.read_fraction_unlimited * naive,
              "dram_held_bytes": c.held_fraction * ev.ffn_bytes,
              "bytes_per_token_sparse": measured_bpt})
    report["candidates"] = [dataclasses.asdict(x) | {"chosen": x == sel.chosen} for x in choice.candidates]
    rows = [{"method": method_title(x.method)
             + ("" if x.label == "chosen" else f" ({x.label})"),
             "density": x.density, "top1_agreement": x.top1_agreement, "mean_kl": x.mean_kl,
             "perplexity_increase": x.perplexity_increase, "tokens": x.tokens} for x in choice.candidates]
    if choice.frontier is not None:
        rows += [dataclasses.asdict(p) for p in choice.frontier.points]
        oracle = oracle_density_at(choice.frontier, "oracle: contribution", c.top1_agreement)
        s["oracle_density_at_top1"] = oracle  # the contribution oracle's density for the chosen top-1
        s["density_vs_oracle"] = c.density / oracle if oracle else None
    report["frontier"] = sorted(rows, key=lambda r: (r["method"], r["density"]))
    if choice.allocation is not None:
        a = choice.allocation
        report["allocation"] = dataclasses.asdict(a)
        for row in report["layers"]:
            row["label_density"] = a.densities[row["layer"]]


def oracle_density_at(frontier: OracleFrontier, method: str, top1: float) -> float | None:
    """The lowest density at which `method`'s oracle reaches `top1` (linear between its points);
    None when it never does."""
    pts = sorted((p.density, p.top1_agreement) for p in frontier.points if p.method == method)
    for i, (d, t) in enumerate(pts):
        if t >= top1:
            if i == 0:
                return d
            d0, t0 = pts[i - 1]
            return d0 + (d - d0) * (top1 - t0) / (t - t0) if t > t0 else d
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The figures that matter, one per line (what `flashio convert` prints)."""
    s = report["summary"]
    b = s["budget"]
    ratio = s["bytes_per_token_naive"] / s["bytes_per_token_sparse"] if s["bytes_per_token_sparse"] else float("inf")
    held = []
    if s.get("heldout_documents") is not None:
        few = " (few: the perplexity describes these documents, not the held-out set)" \
            if s.get("heldout_few_documents") else ""
        held = [f"held-out text    {s['eval_tokens']} tokens from {s['heldout_documents']} document(s) of "
                f"{s['heldout_spec']}{few}"]
    exact = s.get("configuration_method") in EXACT_METHODS  # no predictor chooses the neurons
    where = f"measured in the runtime, {'caching off' if s['window'] == OFF else 'window ' + str(s['window'])}"
    return [
        f"sparsity         true {_pct(s['true_sparsity'])} (calibration), "
        + (f"{_pct(s['predicted_sparsity'])} of the neurons left out per token by the exact selection ({where})"
           if exact else f"predicted {_pct(s['predicted_sparsity'])} ({where})"),
        *([] if exact else [f"predictor recall {s['predictor_recall_mean']:.4f} mean, {s['predictor_recall_min']:.4f} "
                            f"worst layer (held-out pairs), precision {s['predictor_precision_mean']:.3f}"]),
        f"perplexity       dense {s['perplexity_dense']:.3f}, sparse {s['perplexity_sparse']:.3f} "
        f"({100 * s['perplexity_increase']:+.2f}%, budget +{100 * b['max_perplexity_increase']:.2f}%)",
        *_quantization_lines(s),
        *held,
        f"top-1 agreement  {s['top1_agreement']:.4f} (budget >= {b['min_top1_agreement']:.2f}), "
        f"mean KL {s['mean_kl']:.2e}, {s['eval_tokens']} held-out tokens",
        f"bytes per token  sparse {_bytes(s['bytes_per_token_sparse'])}, naive {_bytes(s['bytes_per_token_naive'])} "
        f"({ratio:.1f}x less)",
        *_choice_lines(s),
        f"accuracy gate    {s['gate']}" + (f": {'; '.join(s['violations'])}" if s["violations"] else ""),
    ]


def _quantization_lines(s: dict[str, Any]) -> list[str]:
    if "quantization_scheme" not in s:
        return []
    q = s["quantization_scheme"]
    resident = "float" if s["quantization_resident"] == "none" else s["quantization_resident"]
    return [f"quantization     {q} rows (groups of {s['quantization_group_size']}), {resident} resident matrices: "
            f"dense perplexity float {s['perplexity_float']:.3f} -> {q} {s['perplexity_quantized_dense']:.3f} "
            f"({100 * s['quantization_perplexity_increase']:+.2f}%), top-1 {s['quantization_top1_agreement']:.4f}, "
            f"mean KL {s['quantization_mean_kl']:.2e}",
            f"loss split       quantization {100 * s['quantization_perplexity_increase']:+.2f}% (float dense -> {q} "
            f"dense), sparsity {100 * s['sparsity_perplexity_increase']:+.2f}% ({q} dense -> sparse), together "
            f"{100 * s['total_perplexity_increase']:+.2f}% (float dense -> {q} sparse: top-1 "
            f"{s['total_top1_agreement']:.4f}, mean KL {s['total_mean_kl']:.2e})"]


def _choice_lines(s: dict[str, Any]) -> list[str]:
    if "bytes_per_token_limited" not in s:
        return []
    naive = s["bytes_per_token_naive"] or 1.0
    w = "caching off" if s["window_limited"] == OFF else f"window {s['window_limited']}"
    return [f"rows needed      {_bytes(s['bytes_per_token_unlimited'])} per token ("
            f"{100 * s['bytes_per_token_unlimited'] / naive:.1f}% of naive) with the best window and no DRAM limit",
            f"DRAM limited     {_bytes(s['bytes_per_token_limited'])} per token "
            f"({100 * s['bytes_per_token_limited'] / naive:.1f}% of naive, {w}) with the FFN's DRAM at "
            f"{100 * s['ffn_dram_fraction']:.0f}% of its bytes; it holds {_bytes(s['dram_held_bytes'])} (window "
            f"caches and any resident gate rows)",
            f"configuration    {s['configuration']}: {s['configuration_reason']}",
            *([f"vs the oracle    density {100 * s['oracle_density_at_top1']:.1f}% keeps the same top-1 by exact "
               f"contribution: the configuration uses {s['density_vs_oracle']:.2f}x that"]
              if s.get("density_vs_oracle") else [])]


def frontier_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"method": r["method"], "density": _pct(r["density"]), "top-1": round(r["top1_agreement"], 4),
             "KL": f"{r['mean_kl']:.2e}", "perplexity": f"{100 * r['perplexity_increase']:+.2f}%",
             "tokens": r["tokens"]} for r in report.get("frontier", [])]


def plot_frontier(report: dict[str, Any], path: Path) -> Path | None:
    """Top-1 agreement and perplexity increase against density, one line per method (PNG)."""
    if not report.get("frontier"):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    methods = sorted({r["method"].split(" (")[0] for r in report["frontier"]})
    for ax, key, ylabel in ((axes[0], "top1_agreement", "top-1 agreement with dense"),
                            (axes[1], "perplexity_increase", "perplexity increase")):
        for meth in methods:
            pts = sorted((r["density"], r[key]) for r in report["frontier"] if r["method"].split(" (")[0] == meth)
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], "o-" if "oracle" in meth else "s--",
                    label=meth, ms=4)
        ax.set(xlabel="density (% of FFN neurons per token)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("density-accuracy frontier (oracles: exact top-k, the bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-layer table (rounded for display)."""
    return [{"layer": r["layer"], "rank": r["rank"], "escalations": r["escalations"],
             "true density": round(r["true_density"], 4), "predicted density": round(r["predicted_density"], 4),
             "recall": round(r["recall"], 4), "precision": round(r["precision"], 4),
             "threshold": float(f"{r['threshold']:.4g}"), "met target": r["met_target"]}
            | ({"label density": r["label_density"]} if "label_density" in r else {}) for r in report["layers"]]


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any], *, title: str = "flashio conversion report",
                    plot: str | None = "sparsity_accuracy.png") -> str:
    parts = [f"# {title}\n", "```", *summary_lines(report), "```\n"]
    if measured_on := report["summary"].get("perplexity_measured_on"):
        parts.append(f"Perplexity measured on {measured_on}.\n")
    parts += ["## Per layer\n", _md_table(layer_rows(report))]
    sweep = [{"recall target": p["recall_target"], "density": _pct(p["density"]),
              "perplexity": f"{100 * p['perplexity_increase']:+.2f}%", "top-1": round(p["top1_agreement"], 4),
              "KL": f"{p['mean_kl']:.2e}", "bytes/token": _bytes(p["bytes_per_token"])} for p in report["sweep"]]
    parts += ["## Sparsity vs accuracy (threshold sweep)\n", _md_table(sweep)]
    if plot:
        parts.append(f"![sparsity vs accuracy]({plot})\n")
    if report.get("frontier"):
        parts += ["## Density-accuracy frontier (predictors in the runtime, exact oracles as the bound)\n",
                  _md_table(frontier_rows(report))]
        if plot:
            parts.append(f"![frontier]({FRONTIER_PNG})\n")
    if report.get("candidates"):
        cands = [{"configuration": f"{c['method']} / {c['label']}", "window": c["window"] or "off",
                  "density": _pct(c["density"]), "top-1": round(c["top1_agreement"], 4),
                  "perplexity": f"{100 * c['perplexity_increase']:+.2f}%",
                  "bytes (limited)": _pct(c["read_fraction_limited"]), "DRAM held": _pct(c["held_fraction"]),
                  "passes": not c["violations"], "chosen": c["chosen"]} for c in report["candidates"]]
        parts += ["## Configurations (bytes as a fraction of naive, FFN DRAM limited)\n", _md_table(cands)]
    if report["zero_shot"]:
        zs = [{"task": z["task"], "examples": z["examples"], "dense": round(z["accuracy_dense"], 4),
               "sparse": round(z["accuracy_sparse"], 4), "dense (norm)": round(z["accuracy_norm_dense"], 4),
               "sparse (norm)": round(z["accuracy_norm_sparse"], 4)} for z in report["zero_shot"]]
        parts += ["## Zero-shot multiple choice\n", _md_table(zs)]
    return "\n".join(parts)


def write_report_files(report: dict[str, Any], ev: Evaluation, out_dir: Path) -> dict[str, Path]:
    """report/summary.json, report/report.md and the curve (JSON, PNG): artifact name -> file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(render_markdown(report, plot=ev.curve_png_path.name if ev.curve_png_path else None))
    files = {f"{REPORT_DIR}/summary.json": out_dir / "summary.json", f"{REPORT_DIR}/report.md": out_dir / "report.md",
             f"{REPORT_DIR}/{ev.curve_json_path.name}": ev.curve_json_path}
    if ev.curve_png_path is not None:
        files[f"{REPORT_DIR}/{ev.curve_png_path.name}"] = ev.curve_png_path
    if (png := plot_frontier(report, out_dir / FRONTIER_PNG)) is not None:
        files[f"{REPORT_DIR}/{FRONTIER_PNG}"] = png
    return files


@task(name="report")
def report_task(stats: ActivationStats, predictors: list[LayerPredictor], ev: Evaluation, budget: AccuracyBudget,
                violations: list[str], window: int, calibration: dict[str, Any], work_dir: Path,
                choice: Choice | None = None, published: bool = True) -> tuple[dict, dict]:
    """The report and its files, in a directory named by the report's content."""
    report = build_report(stats, predictors, ev, budget=budget, violations=violations, window=window,
                          calibration=calibration, choice=choice, published=published)
    out = stage_dir(work_dir, "report", sha256_json({"report": report, "curve": ev.curve_json_path}))
    return report, write_report_files(report, ev, out)
