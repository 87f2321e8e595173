"""The `convert` flow: a Hugging Face checkpoint -> a checked, published flash-ready artifact.

    from flows.config import ConvertConfig
    from flows.convert import run_convert
    result = run_convert(ConvertConfig(model="tasks/demo/opt-stdlib", registry="./flashio-registry"))
    print(result.reference, *result.summary_lines(), sep="\\n")

The flow only orders the tasks (tasks/): inspect the source and resolve the data specs (cheap:
bad input fails here) -> calibration -> [gated thresholds] -> activations mapped over shards ->
merge -> predictors mapped over layers -> bundle -> evaluate -> accuracy gate -> report ->
bundle with the report -> publish -> [sample generation]. Every heavy task is cached on a
content key (source file hashes, calibration fingerprint, options, code), so a re-run after a
failure in a late stage reuses the early ones.

Gated FFNs (issue 16) add, before the activations: each layer's FFN-output error against density
(tasks.allocation) -> per-layer densities as accurate as `gated_density` everywhere with fewer
bytes -> the exact oracles' frontier (tasks.frontier). Then one predictor set per predictor method
(`methods`: "active" labels, i.e. the gate's magnitude, and "contribution" labels, top-k by
|act(gate)·up| at the per-layer densities), each with its window chosen from the calibration trace
under the DRAM limit (tasks.windowing), bundled and evaluated, and the exact methods swept over
per-layer densities (tasks.exactgate); a conversion of exact methods only trains no predictors (its
shards keep no predictor pairs, its artifacts hold no predictors). The cheapest configuration within
the budget on the sweep rows (tasks.selection) is confirmed on every held-out row, falling back to the
next cheapest when it misses there; the first confirmed is published, and the report says which and
why. A failed gate still writes the report (frontier table and plot), then ends the flow run Failed
with one AccuracyBudgetError naming the closest configuration and the flags that would publish it.

Two conversions of one model name never run at once: the flow holds the Prefect global
concurrency limit `flashio-convert-<name>` (created with one slot; see flows/locks.py), and a
second one waits. The published lineage carries a `lineage_key` (source revision and file hashes,
calibration fingerprint, pipeline config, package version), known after the cheap stages: with
`skip_published` a conversion whose key the registry already holds stops there (scheduled runs).

With `force` (`flashio convert --force`) every cached stage runs again: its task runs with
Prefect's `refresh_cache`, which makes Prefect ignore and overwrite its cached result and makes
`tasks.caching.run_stage` recompute and rewrite the stage directory instead of reusing it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import ConvertConfig
from flows.locks import conversion_lock
from tasks.activations import (
    activations_task,
    gate_thresholds_task,
    merge_task,
    shard_ranges,
)
from tasks.allocation import allocation_task, layer_errors_task
from tasks.bundling import bundle_task, finalize_task
from tasks.caching import sha256_json
from tasks.calibration import CalibrationData, calibration_task, resolve_spec_task
from tasks.errors import AccuracyBudgetError
from tasks.evaluation import AccuracyBudget, Evaluation, evaluate_task, gate_task, sample_task
from tasks.exactgate import exact_gate_task
from tasks.frontier import DENSITIES as FRONTIER_DENSITIES
from tasks.frontier import frontier_task
from tasks.predictors import predictor_task
from tasks.progress import StageProgress
from tasks.publish import LINEAGE_KEY, find_published_task, publish_task
from tasks.report import REPORT_DIR, Choice, layer_rows, render_markdown, report_task, summary_lines
from tasks.selection import (
    EXACT_METHODS,
    Candidate,
    confirm_configuration,
    list_candidates,
    predictors_at,
    publish_flags,
)
from tasks.source import SourceModel, inspect_source_task
from tasks.windowing import window_task

# the exact methods' sweep: per-layer densities allocated at each of these means, beside gated_density's.
# A sweep point is measured on the sweep rows only and the pick is then confirmed on every held-out row;
# on Gemma 3 270M mean 0.75 passed on the 4 sweep rows (top-1 0.9707) and failed on all 8 (0.9658). With
# one confirmation that published nothing (the grid was 0.1 steps then, publishing 0.9: 0.9775 on all 8);
# now a failed confirmation falls back to the next cheapest that passed the sweep (confirm_configuration,
# up to `confirmations`, 3 by default), so a sweep point that passes by luck costs one more evaluation on
# every row instead of the conversion; only `confirmations` lucky points in a row still publish nothing.
EXACT_DENSITIES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
STAGES = ("source", "calibration", "activations", "predictors", "bundle", "evaluate", "report", "publish")


@dataclass(frozen=True)
class ConvertResult:
    registry: str
    name: str
    version: str
    created: bool
    artifact_dir: str  # the local artifact in the work directory (the published copy is in the registry)
    report: dict[str, Any]  # empty when skipped
    sample: dict[str, Any] | None = None
    lineage_key: str = ""
    skipped: bool = False  # skip_published found this lineage in the registry: nothing was converted

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"

    def summary_lines(self) -> list[str]:
        if self.skipped:
            return [f"up to date       {self.reference} holds lineage {self.lineage_key[:16]}: nothing converted"]
        return summary_lines(self.report)


def package_version() -> str:
    try:
        return metadata.version("flashio")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def registry_name(text: str) -> str:
    """A valid registry model name from a directory or hub id ('My Model' -> 'My-Model')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"
    return name[:128]


def model_name(config: ConvertConfig) -> str:
    """The registry name a conversion publishes under: `name`, else the source's last path part
    (a GGUF file's without `.gguf` or `.gguf.partNN`)."""
    base = re.sub(r"\.gguf(\.part\d+)?$", "", Path(config.model.rstrip("/")).name, flags=re.IGNORECASE)
    return config.name or registry_name(base or "model")


def lineage_key(source: SourceModel, calib: CalibrationData, config: ConvertConfig) -> str:
    """sha256 of everything that decides an artifact's content, known before the heavy stages:
    the source's revision and file hashes, the calibration fingerprint (spec, data, seed, tokens),
    the pipeline config and the package version."""
    return sha256_json({"source": {"revision": source.revision, "files": dict(source.files)},
                        "calibration": calib.fingerprint, "pipeline": config.lineage(),
                        "package": package_version()})


@flow(name="flashio-convert", task_runner=ThreadPoolTaskRunner(max_workers=1))
def convert(config: ConvertConfig) -> ConvertResult:
    name = model_name(config)
    with conversion_lock(name):
        return _convert(config, name)


def refreshed(stage_task: Task, force: bool) -> Task:
    """`stage_task`, set to recompute and overwrite its cached result when `force` is on."""
    return stage_task.with_options(refresh_cache=True) if force else stage_task


def _convert(config: ConvertConfig, name: str) -> ConvertResult:
    """The flow's body, run while holding the model's conversion slot."""
    log = get_run_logger()
    work = config.work_dir.expanduser().resolve()
    force = config.force  # every task cached on a content key runs through refreshed(task, force)
    with StageProgress("convert", len(STAGES), unit="stage") as stages:
        src = inspect_source_task(config.model, config.revision)
        spec = resolve_spec_task(config.calibration)
        held_text = config.heldout_spec()
        held = resolve_spec_task(held_text) if held_text else None
        stages.advance()

        calib = refreshed(calibration_task, force)(src, spec, held, config.samples, config.seq_len,
                                                   config.heldout_samples, config.seed, config.text_field, work)
        stages.advance()
        key = lineage_key(src, calib, config)
        if config.skip_published and (found := find_published_task(
                config.registry, name, key, list(config.aliases), config.registry_endpoint)) is not None:
            return ConvertResult(registry=config.registry, name=found.name, version=found.version, created=False,
                                 artifact_dir="", report={}, lineage_key=key, skipped=True)

        act = shard_act = config.activation_options(src.ffn_dim)  # shards: + the contribution label densities
        methods = config.methods_for(src.gated)
        trained = [m for m in methods if m not in EXACT_METHODS]  # predictor sets; exact-only conversions: none
        budget = config.accuracy_budget()
        allocation = frontier = None
        exact_allocs = {}  # exact method -> setting label -> per-layer densities (tasks.allocation)
        if src.gated:  # per-layer densities and the exact oracles: measured densely on the source model
            errs = refreshed(layer_errors_task, force)(src, calib, min(config.samples, 16), act, work)
            allocation = allocation_task(errs, config.gated_density, src.n_layers, src.ffn_dim,
                                         config.per_layer_density)

            def allocated(density: float, ranking: str):
                if ranking == "contribution" and density == config.gated_density:
                    return allocation
                return allocation_task(errs, density, src.n_layers, src.ffn_dim, config.per_layer_density, ranking)

            for method in (m for m in methods if m in EXACT_METHODS):
                ranking = EXACT_METHODS[method].ranking
                exact_allocs[method] = {"chosen": allocated(config.gated_density, ranking),
                                        **{f"density {d:g}": allocated(d, ranking) for d in EXACT_DENSITIES
                                           if d != config.gated_density}}
            if config.frontier_samples:
                frontier = refreshed(frontier_task, force)(src, calib, FRONTIER_DENSITIES, config.frontier_samples,
                                                           allocation.densities, act, work)
            if "contribution" in methods:
                shard_act = replace(act, label_densities=allocation.densities)
        if not trained:  # nothing trains on the predictor pairs: the shards keep the statistics only
            shard_act = replace(shard_act, pairs=False)
        thresholds = refreshed(gate_thresholds_task, force)(
            src, calib, config.gated_density, min(config.samples, 16), act, work) if src.gated else (0.0,) * src.n_layers
        ranges = shard_ranges(config.samples, config.shard_samples)
        shards = refreshed(activations_task, force).map(
            unmapped(src), unmapped(calib), list(range(len(ranges))), [a for a, _ in ranges],
            [b for _, b in ranges], unmapped(len(ranges)), unmapped(thresholds), unmapped(shard_act),
            unmapped(work)).result()  # .result() raises the first failed shard's error
        stats = refreshed(merge_task, force)(shards, work)
        stages.advance()

        predictors, plans = {}, {}
        for method in trained:
            popts = config.predictor_options(src.n_layers, src.dim, src.ffn_dim, labels=method, gated=src.gated)
            predictors[method] = refreshed(predictor_task, force).map(
                unmapped(stats), list(range(src.n_layers)), unmapped(popts), unmapped(work)).result()
            plans[method] = refreshed(window_task, force)(stats, predictors[method], config.ffn_dram_fraction, work)
        stages.advance()

        lineage = {"calibration": {"spec": calib.spec, "heldout_spec": calib.heldout_spec,
                                   "fingerprint": calib.fingerprint, "sequences": calib.n_sequences,
                                   "heldout_sequences": calib.n_heldout, "seq_len": calib.seq_len,
                                   "seed": calib.seed},
                   "pipeline": {"flow": "flashio-convert", "package": "flashio", "version": package_version(),
                                "config": config.lineage()},
                   LINEAGE_KEY: key}

        # the exact selections' artifacts carry the first predictor set (selection 'gate+predictor' can use
        # it); none when no predictor was trained
        exact_preds = predictors[trained[0]] if trained else []

        # a quantized conversion's float reference: the same weights unquantized (only its dense model is used:
        # each method's evaluation scores its main rows on it, to split the loss into quantization and sparsity;
        # without predictors, the gate-resident layout of the exact selections)
        reference = refreshed(bundle_task, force)(src, stats, exact_preds, config.order, config.dtype,
                                                  {"calibration": lineage["calibration"]}, None, None, work,
                                                  not trained).path if config.quantization() else None

        quant_calib = calib if config.quantization() else None  # GPTQ's rows (unquantized bundles: no input)

        def bundled_and_evaluated(method: str, preds: list, window: int):
            # The candidate that is evaluated carries only content lineage, so that changing what does not
            # change its bytes (budget, sweep...) reuses it and its evaluation from the cache.
            cand = refreshed(bundle_task, force)(src, stats, preds, config.order, config.dtype,
                                                 {"calibration": lineage["calibration"]}, None, None, work,
                                                 quantize=config.quantization(), calibration=quant_calib)
            return cand, refreshed(evaluate_task, force)(cand.manifest_sha256, cand.path, calib, preds,
                                                         config.eval_options(window, src.gated), work, reference)

        def exact_gate(method: str, settings: list[tuple[str, tuple[float, ...]]]):
            # gate rows (and the up sketch) resident, bundles of up + down; the main setting's densities
            # go into the manifest
            spec = EXACT_METHODS[method]
            cand = refreshed(bundle_task, force)(src, stats, exact_preds, config.order, config.dtype,
                                                 {"calibration": lineage["calibration"]}, None, None, work,
                                                 True, list(settings[0][1]), spec.selection,
                                                 quantize=config.quantization(), up_sketch=spec.up_sketch,
                                                 calibration=quant_calib)
            ev, plan = refreshed(exact_gate_task, force)(cand.manifest_sha256, cand.path, calib, settings,
                                                         config.eval_options(1), config.ffn_dram_fraction, work,
                                                         method, reference)
            return cand, ev, plan

        # Gated FFNs are evaluated at the window that fits the DRAM limit (their cached neurons change the
        # output); ReLU models at the configured one (5 by default: exact sparsity, their figures as before),
        # with the DRAM-limited window and bytes reported beside them.
        evaluated = {m: bundled_and_evaluated(m, predictors[m], plans[m].chosen.window if src.gated else None)
                     for m in methods
                     if m not in EXACT_METHODS}
        for method, allocs in exact_allocs.items():
            cand, ev, plans[method] = exact_gate(method, [(label, tuple(a.densities)) for label, a in allocs.items()])
            evaluated[method] = (cand, ev)
        stages.advance()

        # Gated FFNs trade density for accuracy along the threshold sweep too; a fixed threshold, or a
        # ReLU model (exact sparsity: its recall target is the user's accuracy knob), keeps its own.
        candidates = list_candidates({m: ev for m, (_, ev) in evaluated.items()}, plans, budget,
                                     sweep=src.gated and config.threshold is None)

        def on_every_row(c: Candidate):
            # a sweep point re-bundled (predictor thresholds) or re-evaluated (exact densities) on every
            # held-out row; the "chosen" settings were measured there already
            if c.method in EXACT_METHODS:
                preds = exact_preds
                cand, ev = evaluated[c.method] if c.label == "chosen" else \
                    exact_gate(c.method, [("chosen", tuple(exact_allocs[c.method][c.label].densities))])[:2]
            else:
                preds = predictors_at(predictors[c.method], c.recall_target)
                cand, ev = (evaluated[c.method] if c.recall_target is None
                            else bundled_and_evaluated(c.method, preds, c.window))
            return ev.main, (cand, ev, preds)

        # the cheapest within the budget on the sweep rows, confirmed on every held-out row; when it misses
        # there, the next cheapest that passed (tasks.selection.confirm_configuration)
        outcome = confirm_configuration(candidates, budget, on_every_row, limit=config.confirmations)
        for conf in outcome.confirmations:
            log.log(logging.INFO if conf.passes else logging.WARNING, "confirmation %s", conf.describe())
        selection = outcome.selection
        pick = selection.chosen or selection.closest
        candidate, ev, preds = outcome.result
        log.info("configuration: %s; %s", pick.measured(ev.main).describe(), selection.reason)
        violations = gate_task(ev, budget, config.budget.allow_loss)  # never raises: the report is written first
        publishable = not violations or config.budget.allow_loss
        stages.advance()

        choice = Choice(candidates=tuple(candidates), selection=selection,
                        ffn_dram_fraction=config.ffn_dram_fraction, frontier=frontier,
                        allocation=exact_allocs[pick.method][pick.label] if pick.method in EXACT_METHODS
                        else allocation)
        window = config.window if config.window is not None else (pick.window if src.gated else 5)
        report, report_files = report_task(stats, preds, ev, budget, violations, window,
                                           lineage["calibration"], work, choice, publishable)
        if not publishable:
            err = gate_failure(ev, budget, violations, pick, report_files)
            return Failed(message=str(err), data=err)  # Prefect logs the message; no traceback
        final = refreshed(finalize_task, force)(candidate, lineage, report, report_files, work)
        stages.advance()

        published = publish_task(final.path, config.registry, name, config.version, list(config.aliases),
                                 {"flow": "flashio-convert", LINEAGE_KEY: key}, config.registry_endpoint)
        stages.advance()

    sample = None
    if config.prompt:
        sample = sample_task(published.reference, config.registry, config.prompt, config.max_new_tokens,
                             max(1, window))
    create_markdown_artifact(markdown=render_markdown(report, title=f"{published.reference}: conversion report",
                                                      plot=None),
                             key="flashio-convert-report", description=f"conversion report of {published.reference}")
    create_table_artifact(table=layer_rows(report), key="flashio-convert-layers",
                          description=f"per-layer predictors of {published.reference}")
    for line in summary_lines(report):
        log.info(line)
    return ConvertResult(registry=config.registry, name=published.name, version=published.version,
                         created=published.created, artifact_dir=str(final.path), report=report, sample=sample,
                         lineage_key=key)


def gate_failure(ev: Evaluation, budget: AccuracyBudget, violations: list[str], closest: Candidate,
                 report_files: dict[str, Path]) -> AccuracyBudgetError:
    """The one-line error of a failed gate: what failed, the closest configuration, the flags that
    would publish it, and where the report is."""
    report = report_files.get(f"{REPORT_DIR}/report.md")
    m = ev.main  # the gate's own measurement (all held-out rows), not the sweep's few
    closest = replace(closest, top1_agreement=m.top1_agreement, perplexity_increase=m.perplexity_increase,
                      density=m.density, tokens=m.tokens)
    return AccuracyBudgetError(
        f"accuracy gate failed, nothing was published: {'; '.join(violations)} (measured on {ev.main.tokens} "
        f"held-out tokens at density {100 * ev.main.density:.1f}%). Closest configuration: {closest.describe()}; "
        f"publish it with `flashio convert ... {publish_flags(closest, budget)}`, or raise the predictor recall "
        f"target or rank. Report (frontier table and plot): {report.parent if report else '(none)'}", violations)


def task_runner(config: ConvertConfig):
    """Threads (default), or Dask: a local cluster of `workers` processes, or `dask_address`."""
    if not (config.dask or config.dask_address):
        return ThreadPoolTaskRunner(max_workers=config.workers)
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1, "processes": True})


def run_convert(config: ConvertConfig) -> ConvertResult:
    """Run the flow with the task runner the config asks for; raises what the flow raised."""
    return convert.with_options(task_runner=task_runner(config))(config)
