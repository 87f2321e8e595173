"""Neuron order per layer, then the artifact through flashio's one writer.

    orders = choose_orders(stats, "frequency")          # hottest neurons first
    art = bundle_artifact(source, stats, predictors, order="coactivation", out_dir=Path("work/bundle"))

Orders (stored row j of layer i holds source neuron orders[i][j]):
- "frequency" (default): by activation count, hottest first; neurons that fire often sit together
  at the front, so a token's reads cluster there.
- "coactivation": a greedy chain from the hottest neuron, each next neuron the unplaced one that
  fires most often with the last placed (counts normalised by both frequencies), so that neurons
  that fire together are adjacent and the reader coalesces their reads (Ripple-style placement;
  the paper's co-activation *bundling* duplicated hot neurons and was rejected, this does not).
- "identity": the checkpoint's order (for comparisons).
The predictors stay in source order here; `write_artifact` permutes their output rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from flashio.format import finalize_artifact, sha256_file, source_from_checkpoint, write_artifact
from tasks.activations import ActivationStats, read_stats
from tasks.caching import run_stage, stage_cache
from tasks.calibration import CalibrationData, load_tokens
from tasks.errors import InputError
from tasks.hessians import CalibrationHessians
from tasks.predictors import LayerPredictor, load_layer_predictor
from tasks.progress import StageProgress
from tasks.source import SourceModel

log = logging.getLogger(__name__)

ORDERS = ("frequency", "coactivation", "identity")
ARTIFACT_DIR = "artifact"


@dataclass(frozen=True)
class BundledArtifact:
    path: Path  # the artifact directory
    manifest_sha256: str
    order: str
    dtype: str


def frequency_order(count: np.ndarray) -> np.ndarray:
    """Hottest first; ties keep the source order (stable)."""
    return np.argsort(-np.asarray(count, dtype=np.int64), kind="stable")


def coactivation_order(count: np.ndarray, coact: np.ndarray) -> np.ndarray:
    """Greedy chain: start at the hottest neuron, append the unplaced neuron with the highest
    normalised co-activation with the last one (hottest unplaced when none co-fires)."""
    n = len(count)
    c = np.asarray(coact, dtype=np.float64)
    diag = np.sqrt(np.maximum(np.diag(c), 1.0))
    hot = frequency_order(count)
    placed = np.zeros(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    cur = int(hot[0])
    hot_ptr = 0
    for j in range(n):
        order[j] = cur
        placed[cur] = True
        if j == n - 1:
            break
        aff = c[cur] / (diag[cur] * diag)  # [N]
        aff[placed] = -1.0
        nxt = int(np.argmax(aff))
        if aff[nxt] <= 0.0:  # nothing co-fires with cur: continue with the hottest unplaced neuron
            while placed[hot[hot_ptr]]:
                hot_ptr += 1
            nxt = int(hot[hot_ptr])
        cur = nxt
    return order


def choose_orders(stats: ActivationStats, method: str) -> list[np.ndarray]:
    if method not in ORDERS:
        raise InputError(f"neuron order {method!r} is not one of {', '.join(ORDERS)}")
    t, _ = read_stats(stats.path)
    orders = []
    for i in range(stats.n_layers):
        count = t[f"layers.{i}.count"].numpy()
        if method == "identity":
            orders.append(np.arange(len(count)))
        elif method == "frequency":
            orders.append(frequency_order(count))
        else:
            key = f"layers.{i}.coact"
            if key not in t:
                raise InputError("order 'coactivation' needs co-activation statistics; collect them with "
                                 "coactivation_stride > 0")
            orders.append(coactivation_order(count, t[key].numpy()))
    return orders


def bundle_artifact(source: SourceModel, stats: ActivationStats, predictors: Sequence[LayerPredictor], *,
                    order: str, out_dir: Path, dtype: str | None = None, lineage: dict[str, Any] | None = None,
                    report: dict[str, Any] | None = None, report_files: dict[str, Path] | None = None,
                    progress=None, gate_resident: bool = False, densities: Sequence[float | None] | None = None,
                    selection: str | None = None, quantize: dict[str, Any] | None = None,
                    up_sketch: str | None = None, calibration: CalibrationData | None = None) -> BundledArtifact:
    """Write the artifact (weights in the chosen order, predictors, active thresholds, lineage
    and report) into `out_dir/artifact` with flashio's writer.

    gate_resident: gated FFNs: gate rows kept in DRAM, bundles of up + down (the exact-gate layout,
    flashio.exact); densities[i]: the fraction of layer i's neurons an exact selection keeps per
    token (None: its active threshold); selection: mode='sparse''s default ('predictor', 'gate' or
    'gate+predictor'; None: 'gate' when gate_resident, else 'predictor'); quantize: the writer's
    quantization options (quantize, group_size, quantize_resident) and its method ('gptq', the
    default, on the `calibration` rows, or 'rtn'), None for none; up_sketch: with
    gate_resident, the scheme of the up rows' resident copy that selection 'gate+up' ranks by.
    No predictors (an empty list): an artifact for the exact selections only (gate_resident)."""
    if predictors and len(predictors) != source.n_layers:
        raise InputError(f"{len(predictors)} predictors for {source.n_layers} layers")
    if not predictors and not gate_resident:
        raise InputError("an artifact without predictors needs the gate-resident layout of the exact selections "
                         "(gate_resident=True); train predictors for the predictor selection")
    orders = choose_orders(stats, order)
    preds = [load_layer_predictor(p) for p in sorted(predictors, key=lambda p: p.layer)] if predictors else None
    model_source = source_from_checkpoint(source.path, hash_files=False)
    quantize = dict(quantize or {})
    hessians = None
    if quantize.pop("method", "gptq") == "gptq" and quantize.get("quantize"):
        if calibration is None:
            raise InputError("GPTQ quantization needs the calibration rows; pass calibration or method 'rtn'")
        hessians = CalibrationHessians(source, load_tokens(calibration, "calibration"))
    dtype = dtype or (source.config_dtype if source.config_dtype in ("float32", "float16", "bfloat16") else "float32")
    path = write_artifact(model_source, out_dir / ARTIFACT_DIR, dtype=dtype, orders=orders, predictors=preds,
                          active_thresholds=list(stats.active_thresholds), gate_resident=gate_resident,
                          densities=None if densities is None else list(densities), selection=selection,
                          up_sketch=up_sketch, hessians=hessians,
                          resident_hessians=None if hessians is None else hessians.resident, **quantize,
                          lineage={"source": source.lineage(), **(lineage or {}), "neuron_order": order},
                          report=report, report_files=report_files, name=source.name, progress=progress)
    return BundledArtifact(path=path, manifest_sha256=sha256_file(path / "manifest.json"), order=order, dtype=dtype)


# besides this module, the code whose changes change a bundle's bytes (quantized rows: GPTQ on the
# calibration matrices)
BUNDLE_CODE = ("tasks.hessians", "tasks.hooks", "flashio.quant", "flashio.gptq")


@task(name="bundle", cache_key_fn=stage_cache("bundle", __name__, *BUNDLE_CODE))
def bundle_task(source: SourceModel, stats: ActivationStats, predictors: list[LayerPredictor], order: str,
                dtype: str | None, lineage: dict[str, Any], report: dict[str, Any] | None,
                report_files: dict[str, Path] | None, work_dir: Path, gate_resident: bool = False,
                densities: list[float | None] | None = None, selection: str | None = None,
                quantize: dict[str, Any] | None = None, up_sketch: str | None = None,
                calibration: CalibrationData | None = None) -> BundledArtifact:
    def compute(out: Path) -> BundledArtifact:
        label = "writing artifact" + (" (with report)" if report else "")
        with StageProgress(label, source.n_layers, unit="layer") as p:
            return bundle_artifact(source, stats, predictors, order=order, out_dir=out, dtype=dtype, lineage=lineage,
                                   report=report, report_files=report_files, progress=p.update,
                                   gate_resident=gate_resident, densities=densities, selection=selection,
                                   quantize=quantize, up_sketch=up_sketch, calibration=calibration)

    art = run_stage("bundle", [__name__, *BUNDLE_CODE], compute)
    get_run_logger().info("artifact %s (%s, order %s)", art.path, art.dtype, order)
    return art


def finalize_bundle(candidate: BundledArtifact, *, out_dir: Path, lineage: dict[str, Any],
                    report: dict[str, Any], report_files: dict[str, Path] | None) -> BundledArtifact:
    """The evaluated candidate plus full lineage and the report: the weights are hard-linked,
    not rewritten (what is published is byte for byte what was evaluated)."""
    path = finalize_artifact(candidate.path, out_dir / ARTIFACT_DIR, lineage=lineage, report=report,
                             report_files=report_files)
    return BundledArtifact(path=path, manifest_sha256=sha256_file(path / "manifest.json"),
                           order=candidate.order, dtype=candidate.dtype)


@task(name="finalize", cache_key_fn=stage_cache("finalize", __name__))
def finalize_task(candidate: BundledArtifact, lineage: dict[str, Any], report: dict[str, Any],
                  report_files: dict[str, Path] | None, work_dir: Path) -> BundledArtifact:
    art = run_stage("finalize", [__name__], lambda out: finalize_bundle(
        candidate, out_dir=out, lineage=lineage, report=report, report_files=report_files))
    get_run_logger().info("final artifact %s", art.path)
    return art
