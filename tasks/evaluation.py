"""Check sparsity against accuracy: the flashio runtime on held-out text, dense vs sparse.

    ev = evaluate_artifact(art.path, calib, predictors, EvalOptions(window=5), out_dir=Path("work/eval"))
    ev.main.perplexity_increase, ev.main.top1_agreement, ev.main.bytes_per_token
    enforce_budget(ev, AccuracyBudget(max_perplexity_increase=0.02, min_top1_agreement=0.97))

Everything is measured with the runtime that users run, on the artifact itself:
- dense: `flashio.open(path, mode="dense").forward(ids)` (every FFN weight in DRAM: the reference);
- sparse: `mode="sparse"`, `forward(ids, token_by_token=True)`, so that the predictor and the
  window cache act per token exactly as in generation (each sequence starts with a cold cache);
- naive: a few tokens in `mode="naive"` give the bytes per token of reading the whole FFN.
Metrics: perplexity of the held-out next tokens, top-1 next-token agreement, mean KL(dense ||
sparse), measured density (neurons the sparse FFN used / all neurons, per token and layer) and
bytes read from flash per token. A sweep over predictor thresholds (one per recall target,
calibrated per layer by the predictors step) gives the sparsity-accuracy curve (JSON + PNG).
Optional zero-shot multiple-choice tasks are scored dense and sparse (tasks.zeroshot).

A quantized artifact is also measured against the float weights it was made from: given
`reference` (an unquantized artifact of the same source, opened `mode="dense"`), the same rows
give dense float, dense quantized and sparse quantized (`Evaluation.quantization`), so that the
report separates the loss from quantization (dense quantized vs dense float) from the loss from
sparsity (sparse vs dense, both quantized: `Evaluation.main`, what the gate judges).

What the perplexity is measured on (`Evaluation.heldout`, logged, and in evaluation.json): the
held-out rows of the calibration step, L tokens each, cut from the concatenated token stream of
the held-out documents in their seeded shuffled order and spread over documents: one row from each
of the first M documents when there are M, more per document only when there are fewer (see
tasks.calibration; with the defaults, 16 x 256 tokens: on `stdlib:heldout`, one 256-token passage
from each of 16 of its 31 files). Each row is scored on its own, without the text before it: its
first token is context only, and the other L-1 are scored (summed over all rows, averaged per
token); when the tokenizer puts a bos before every text, every row starts with it (in place of
the first token of a row cut mid-document, as llama.cpp's perplexity does). It is a figure of those rows, not of
the whole held-out set: the demo model's training report (all 31 held-out files) is another
measurement; see tasks/demo/README.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import get_run_logger, task

import flashio
from flashio.config import FlashConfig
from flashio.stats import StepStats
from tasks.caching import run_stage, stage_cache
from tasks.calibration import CalibrationData, load_tokens
from tasks.errors import AccuracyBudgetError, InputError
from tasks.predictors import LayerPredictor
from tasks.progress import StageProgress
from tasks.scoring import NextTokenTally, QuantizationLoss, check_reference, quantization_loss
from tasks.threads import torch_threads

log = logging.getLogger(__name__)

CURVE_JSON = "sparsity_accuracy.json"
CURVE_PNG = "sparsity_accuracy.png"


@dataclass(frozen=True)
class AccuracyBudget:
    max_perplexity_increase: float = 0.02  # relative: sparse perplexity <= dense x 1.02
    min_top1_agreement: float = 0.97

    def __post_init__(self) -> None:
        if self.max_perplexity_increase < 0 or not 0.0 <= self.min_top1_agreement <= 1.0:
            raise InputError(f"accuracy budget needs max_perplexity_increase >= 0 and min_top1_agreement in "
                             f"[0, 1]; got {self.max_perplexity_increase}, {self.min_top1_agreement}")


@dataclass(frozen=True)
class EvalOptions:
    window: int = 5
    reuse: bool = True  # False: caching off (tasks.windowing's window 0)
    sweep_recalls: tuple[float, ...] = ()  # recall targets with per-layer thresholds (LayerPredictor.sweep)
    sweep_sequences: int = 4  # held-out sequences per sweep point (the main point uses all)
    naive_tokens: int = 8
    # the exact selections' reads per token: the runtime token by token on this many tokens of the first
    # held-out row (their accuracy is measured a row per step, tasks.exactgate)
    bytes_tokens: int = 64
    zero_shot: tuple[str, ...] = ()  # specs, see tasks.zeroshot
    zero_shot_limit: int = 100
    # The evaluation measures accuracy and bytes read, not latency: buffered reads on one reader
    # thread give the same bytes and are 2-3x faster here than O_DIRECT on the runtime's pool
    # (3.4 vs 7.5-9.3 ms per token on the demo model). `flashio bench` measures latency.
    threads: int | None = 1
    direct: bool = False
    torch_threads: int | None = 1  # while the runtime steps token by token (see tasks.threads)

    def flash_config(self) -> FlashConfig:
        """How the evaluation opens the artifact (each mode overrides `mode`). No gap reads: the
        report's bytes per token are the bundles the method needs, not what a read plan tuned to
        the converting machine reads through (at the demo's 1 KiB rows the built-in cost model
        reads through up to 60 rows: 14x the bytes). No lookahead either: its guesses' extra reads
        depend on the machine's timing (it changes no output)."""
        return FlashConfig(window=self.window, threads=self.threads, direct=self.direct, reuse=self.reuse,
                           max_gap=0, lookahead=False)


@dataclass(frozen=True)
class Comparison:
    """Dense vs sparse on the same sequences."""

    label: str
    recall_target: float | None
    thresholds: tuple[float, ...]
    sequences: int
    tokens: int
    perplexity_dense: float
    perplexity_sparse: float
    perplexity_increase: float  # relative
    top1_agreement: float
    mean_kl: float
    density: float  # neurons used by the sparse FFN / all neurons, per token and layer
    bytes_per_token: float
    reads_per_token: float
    cache_rows_per_token: float  # rows held by the window caches (all layers)


@dataclass(frozen=True)
class HeldoutSample:
    """The text the main comparison's perplexity is measured on."""

    spec: str  # where the held-out documents came from
    documents: int  # documents the rows were cut from (each in part: a row is a passage)
    sequences: int
    seq_len: int

    @property
    def targets(self) -> int:
        """Scored next tokens: all but the first of each row."""
        return self.sequences * (self.seq_len - 1)

    @classmethod
    def of(cls, calib: CalibrationData, sequences: int) -> HeldoutSample:
        spec = calib.heldout_spec or f"{calib.spec} (the documents after the calibration part)"
        return cls(spec=spec, documents=calib.heldout_documents, sequences=sequences, seq_len=calib.seq_len)

    def few_documents(self) -> bool:
        """Rows from so few documents that the perplexity describes them, not the held-out set."""
        return self.documents < min(self.sequences, 8)

    def describe(self) -> str:
        return (f"{self.sequences} sequences of {self.seq_len} tokens cut from {self.documents} document(s) of "
                f"{self.spec}, each scored on its own (no context before it, bos first where the tokenizer adds one): "
                f"{self.targets} next tokens, all but the first of each sequence, averaged per token")


@dataclass(frozen=True)
class Evaluation:
    main: Comparison
    sweep: tuple[Comparison, ...]
    naive_bytes_per_token: float
    ffn_bytes: int
    zero_shot: tuple[dict, ...]
    json_path: Path
    curve_json_path: Path
    curve_png_path: Path | None
    heldout: HeldoutSample | None = None  # what main's perplexity is measured on
    quantization: QuantizationLoss | None = None  # quantized artifacts evaluated with a float reference


def _sum_stats(steps: Sequence[StepStats]) -> StepStats:
    return sum(steps, StepStats())


def compare(dense_logits: Callable[[int], torch.Tensor], sparse, ids: torch.Tensor, *, label: str,
            recall_target: float | None, thresholds: Sequence[float], n_neurons_total: int,
            progress: Callable[[int], None] | None = None, token_by_token: bool = True) -> Comparison:
    """Run the sparse model token by token on each row of `ids` and compare with the dense logits
    of that row (`dense_logits(k)`: [L, V]). token_by_token=False: each row in one step (selections
    that keep per token exactly what they select, flashio.exact: the same logits up to the order of
    float sums; the step's statistics then count each row's union of neurons, not a token's)."""
    return _compare(dense_logits, sparse, ids, label=label, recall_target=recall_target, thresholds=thresholds,
                    n_neurons_total=n_neurons_total, progress=progress, token_by_token=token_by_token)[0]


def _compare(dense_logits: Callable[[int], torch.Tensor], sparse, ids: torch.Tensor, *, label: str,
             recall_target: float | None, thresholds: Sequence[float], n_neurons_total: int,
             progress: Callable[[int], None] | None = None,
             float_logits: Callable[[int], torch.Tensor] | None = None,
             token_by_token: bool = True) -> tuple[Comparison, tuple[NextTokenTally, NextTokenTally] | None]:
    """`compare`, and with `float_logits(k)` (a float reference's dense logits of row k) the
    tallies of the dense and of the sparse model against that reference."""
    main, vs_float = NextTokenTally(), (NextTokenTally(), NextTokenTally()) if float_logits else None
    total = StepStats()
    for k, row in enumerate(ids):
        s_logits = sparse.forward(row, token_by_token=token_by_token)  # [L, V]
        total = total + _sum_stats(sparse.stats)
        d_logits = dense_logits(k)
        main.add(d_logits, s_logits, row)
        if vs_float:
            f_logits = float_logits(k)
            vs_float[0].add(f_logits, d_logits, row)
            vs_float[1].add(f_logits, s_logits, row)
        if progress:
            progress(k + 1)
    n_tok = main.n_tok
    ppl_d, ppl_s = main.perplexities()
    return Comparison(label=label, recall_target=recall_target, thresholds=tuple(float(t) for t in thresholds),
                      sequences=len(ids), tokens=n_tok, perplexity_dense=ppl_d, perplexity_sparse=ppl_s,
                      perplexity_increase=ppl_s / ppl_d - 1.0, top1_agreement=main.agree / n_tok,
                      mean_kl=main.kl / n_tok,
                      density=total.neurons_active / (n_tok * n_neurons_total),  # all layers' neurons
                      bytes_per_token=total.bytes_read / n_tok, reads_per_token=total.reads / n_tok,
                      cache_rows_per_token=total.cache_rows / n_tok), vs_float


def evaluate_artifact(artifact: Path, calib: CalibrationData, predictors: Sequence[LayerPredictor],
                      options: EvalOptions, *, out_dir: Path,
                      progress: Callable[[int, int], None] | None = None,
                      reference: Path | None = None) -> Evaluation:
    """Dense vs sparse on the held-out sequences, the threshold sweep and the optional zero-shot
    tasks; writes evaluation.json and the curve (JSON + PNG) under `out_dir`. reference: the
    unquantized artifact of the same source, when `artifact` is quantized: the main comparison's
    rows are also scored on its dense model (`Evaluation.quantization`)."""
    ids = load_tokens(calib, "heldout")
    if len(ids) == 0:
        raise InputError("evaluation needs held-out sequences (n_heldout >= 1)")
    preds = sorted(predictors, key=lambda p: p.layer)
    heldout = HeldoutSample.of(calib, len(ids))
    if heldout.few_documents():
        log.warning("the held-out perplexity is measured on %s: it describes that text, not the held-out set as "
                    "a whole; more held-out sequences spread it over more documents", heldout.describe())
    sweep_ids = ids[: max(1, min(options.sweep_sequences, len(ids)))]
    steps_total = len(ids) + len(options.sweep_recalls) * len(sweep_ids)
    done = 0

    def tick(_k: int) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps_total)

    with torch_threads(options.torch_threads):
        return _evaluate(artifact, ids, preds, options, out_dir, tick, heldout, reference)


def _evaluate(artifact: Path, ids: torch.Tensor, preds: Sequence[LayerPredictor], options: EvalOptions,
              out_dir: Path, tick: Callable[[int], None], heldout: HeldoutSample | None = None,
              reference: Path | None = None) -> Evaluation:
    sweep_ids = ids[: max(1, min(options.sweep_sequences, len(ids)))]
    config = options.flash_config()
    with flashio.open(artifact, config, mode="naive") as naive:
        row = ids[0][: max(1, options.naive_tokens)]
        naive.forward(row, token_by_token=True)
        naive_bpt = _sum_stats(naive.stats).bytes_read / len(row)
    with contextlib.ExitStack() as stack:
        dense = stack.enter_context(flashio.open(artifact, config, mode="dense"))
        sparse = stack.enter_context(flashio.open(artifact, config, mode="sparse"))
        m = dense.artifact.manifest
        float_dense = None
        if reference is not None:  # held in DRAM beside the quantized model while the main rows run
            float_dense = stack.enter_context(flashio.open(reference, config, mode="dense"))
            check_reference(m, float_dense.artifact.manifest)
        total_neurons = sum(L.n_neurons for L in m.ffn_layers)
        ffn_bytes = sum(L.length_bytes for L in m.ffn_layers)
        kept: dict[int, torch.Tensor] = {}  # dense logits of the sweep's rows, [L, V] each

        def dense_logits(k: int) -> torch.Tensor:
            if k in kept:
                return kept[k]
            out = dense.forward(ids[k])
            if k < len(sweep_ids):
                kept[k] = out
            return out

        chosen = sparse.predictor_thresholds
        main, vs_float = _compare(dense_logits, sparse, ids, label="chosen", recall_target=None, thresholds=chosen,
                                  n_neurons_total=total_neurons, progress=tick,
                                  float_logits=(lambda k: float_dense.forward(ids[k])) if float_dense else None)
        quant = quantization_loss(m, vs_float) if vs_float else None
        sweep = []
        for r in options.sweep_recalls:
            th = [p.threshold_for(r) for p in preds]
            sparse.set_predictor_thresholds(th)
            sweep.append(compare(dense_logits, sparse, sweep_ids, label=f"recall {r:g}", recall_target=r,
                                 thresholds=th, n_neurons_total=total_neurons, progress=tick))
    zero_shot: list[dict] = []
    if options.zero_shot:
        from tasks.zeroshot import evaluate_zero_shot

        zero_shot = evaluate_zero_shot(artifact, options.zero_shot, limit=options.zero_shot_limit, config=config)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = {"dense_perplexity_on_sweep": sweep[0].perplexity_dense if sweep else main.perplexity_dense,
             "points": [dataclasses.asdict(c) for c in sweep], "chosen": dataclasses.asdict(main)}
    curve_json = out_dir / CURVE_JSON
    curve_json.write_text(json.dumps(curve, indent=1))
    png = plot_curve(main, sweep, out_dir / CURVE_PNG)
    ev = Evaluation(main=main, sweep=tuple(sweep), naive_bytes_per_token=naive_bpt, ffn_bytes=ffn_bytes,
                    zero_shot=tuple(zero_shot), json_path=out_dir / "evaluation.json", curve_json_path=curve_json,
                    curve_png_path=png, heldout=heldout, quantization=quant)
    measured_on = heldout.describe() if heldout else None
    ev.json_path.write_text(json.dumps({**dataclasses.asdict(ev), "window": options.window,
                                        "perplexity_measured_on": measured_on}, indent=1, default=str))
    return ev


def plot_curve(main: Comparison, sweep: Sequence[Comparison], path: Path) -> Path | None:
    """Perplexity increase and top-1 agreement against measured density (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the pipeline extra, but the curve is optional
        log.warning("matplotlib is not installed: no sparsity-accuracy plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    pts = sorted(sweep, key=lambda c: c.density)
    xs = [100 * c.density for c in pts]
    panels = ((lambda c: 100 * c.perplexity_increase, "perplexity increase (%)"),
              (lambda c: 100 * c.top1_agreement, "top-1 agreement with dense (%)"))
    for ax, (metric, ylabel) in zip(axes, panels):
        ys = [metric(c) for c in pts]
        if pts:
            ax.plot(xs, ys, "o-", label=f"threshold sweep ({pts[0].tokens} tokens)")
        ax.plot([100 * main.density], [metric(main)], "r*", ms=12, label=f"chosen ({main.tokens} tokens)")
        for c, x, y in zip(pts, xs, ys):
            ax.annotate(f"{c.recall_target:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="measured density (% of FFN neurons)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("sparsity vs accuracy (labels: predictor recall target)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def budget_violations(ev: Evaluation, budget: AccuracyBudget) -> list[str]:
    m = ev.main
    out = []
    if m.perplexity_increase > budget.max_perplexity_increase:
        out.append(f"perplexity increase {100 * m.perplexity_increase:+.2f}% (dense {m.perplexity_dense:.3f} -> "
                   f"sparse {m.perplexity_sparse:.3f}) exceeds the budget of +{100 * budget.max_perplexity_increase:.2f}%")
    if m.top1_agreement < budget.min_top1_agreement:
        out.append(f"top-1 agreement {m.top1_agreement:.4f} is below the budget of {budget.min_top1_agreement:.4f}")
    return out


def enforce_budget(ev: Evaluation, budget: AccuracyBudget, *, allow_loss: bool = False) -> list[str]:
    """Raise AccuracyBudgetError when the sparse model is outside the budget (unless allowed);
    returns the violations (empty when within budget)."""
    bad = budget_violations(ev, budget)
    if bad and not allow_loss:
        raise AccuracyBudgetError(
            "accuracy gate failed, nothing was published: " + "; ".join(bad) +
            f" (measured on {ev.main.tokens} held-out tokens at density {100 * ev.main.density:.1f}%). Raise the "
            "predictor recall target or rank, relax the budget, or allow the loss explicitly", bad)
    return bad


@task(name="evaluate", cache_key_fn=stage_cache("evaluate", __name__, "tasks.zeroshot"))
def evaluate_task(artifact_sha256: str, artifact: Path, calib: CalibrationData, predictors: list[LayerPredictor],
                  options: EvalOptions, work_dir: Path, reference: Path | None = None) -> Evaluation:
    """reference: the unquantized artifact of the same source when `artifact` is quantized."""

    def compute(out: Path) -> Evaluation:
        total = calib.n_heldout + len(options.sweep_recalls) * min(options.sweep_sequences, calib.n_heldout)
        with StageProgress("evaluating dense vs sparse", total, unit="seq") as p:
            return evaluate_artifact(artifact, calib, predictors, options, out_dir=out, progress=p.update,
                                     reference=reference)

    ev = run_stage("evaluate", [__name__, "tasks.zeroshot"], compute)
    m = ev.main
    get_run_logger().info("perplexity dense %.3f sparse %.3f (%+.2f%%), top-1 agreement %.4f, density %.3f, "
                          "%.0f bytes/token (naive %.0f); perplexity on %s", m.perplexity_dense,
                          m.perplexity_sparse, 100 * m.perplexity_increase, m.top1_agreement, m.density,
                          m.bytes_per_token, ev.naive_bytes_per_token,
                          ev.heldout.describe() if ev.heldout else f"{m.tokens} held-out tokens")
    log_quantization(ev)
    return ev


def log_quantization(ev: Evaluation) -> None:
    """The run log's line of a quantized artifact's loss split (nothing without a float reference)."""
    if (q := ev.quantization) is not None:
        get_run_logger().info("perplexity dense float %.3f, dense %s %.3f (quantization %+.2f%%), sparse %.3f "
                              "(sparsity %+.2f%%)", q.perplexity_float, q.scheme, q.perplexity_quantized,
                              100 * q.quantization_increase, q.perplexity_sparse, 100 * q.sparsity_increase)


@task(name="accuracy-gate")
def gate_task(ev: Evaluation, budget: AccuracyBudget, allow_loss: bool) -> list[str]:
    """The budget's violations (empty: passed). It does not raise: the flow writes the report
    first, then refuses to publish (see flows.convert)."""
    bad = budget_violations(ev, budget)
    if bad and allow_loss:
        get_run_logger().warning("accuracy budget exceeded but allowed by the caller: %s", "; ".join(bad))
    elif bad:
        get_run_logger().warning("accuracy budget exceeded, nothing will be published: %s", "; ".join(bad))
    return bad


def sample_generation(ref: str, *, registry: str | None, prompt: str, max_new_tokens: int, window: int) -> dict:
    """Generate a short continuation with the (published) artifact; text and per-token figures."""
    with flashio.open(ref, mode="sparse", window=window, registry=registry) as model:
        gen = model.generate(prompt, max_new_tokens=max_new_tokens)
        n = max(len(gen.decode), 1)
        t = gen.decode_total
        return {"prompt": prompt, "text": gen.text, "tokens": len(gen.token_ids),
                "tokens_per_s": gen.tokens_per_s(), "bytes_per_token": t.bytes_read / n, "summary": gen.summary()}


@task(name="sample-generation")
def sample_task(ref: str, registry: str | None, prompt: str, max_new_tokens: int, window: int) -> dict:
    return sample_generation(ref, registry=registry, prompt=prompt, max_new_tokens=max_new_tokens, window=window)
