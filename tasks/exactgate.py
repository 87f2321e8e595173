"""The exact-gate configurations of a gated FFN, evaluated in the runtime and costed by their window.

    ev, plan = evaluate_exact_gate(art.path, calib, [("chosen", alloc.densities), ("density 0.9", dens_09)],
                                   EvalOptions(), ffn_dram_fraction=0.5, out_dir=Path("work/exact"),
                                   method=EXACT_GATE_UP)

The artifact is gate-resident (tasks.bundling's gate_resident: the gate rows stay in DRAM, the
flash bundles hold up + down) and the runtime runs the method's selection (tasks.selection's
EXACT_METHODS): 'gate' (flashio.exact.GateEngine: per token the gate is computed densely and the
top `density` of each layer's neurons by |act(gate)| are kept) or 'gate+up' (GateUpEngine: the
same ranked by |act(gate) * (x @ up)| against the artifact's resident 4-bit up sketch); only the
kept neurons' up + down rows are read. Each setting ((label, per-layer
densities); the first is the main one, on every held-out row, the others on the sweep rows) is
compared with dense as tasks.evaluation.compare does, a row per step: an exact engine keeps per
token exactly what it selects, so a row in one step gives the token-by-token logits up to the order
of float sums (a neuron at the top-k boundary can change sides) at ~1/40 of the time on Gemma 3
270M. The reads per token are measured token by token on the first `EvalOptions.bytes_tokens`
tokens (a row's step reads the row's union). Its active sets are recorded per token
(record_trace): the exact engines compute exactly what they select whatever the window holds,
so the window is chosen afterwards, by tasks.windowing on those sets, with the resident gate rows
(a third of a SwiGLU/GeGLU FFN's bytes) and up sketch (int4: ~0.09) counted in the FFN's DRAM and
reads of two thirds of a full bundle per neuron. With `reference` (the unquantized artifact of the
same source, when the evaluated one is quantized) the main setting's rows are also scored on the
reference's dense model, and the report separates the loss from quantization from the loss from
sparsity (`Evaluation.quantization`), as tasks.evaluation does for the predictor methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task

import flashio
from tasks.caching import run_stage, stage_cache
from tasks.calibration import CalibrationData, load_tokens
from tasks.evaluation import (
    Comparison,
    EvalOptions,
    Evaluation,
    HeldoutSample,
    _compare,
    _sum_stats,
    log_quantization,
)
from tasks.progress import StageProgress
from tasks.scoring import check_reference, quantization_loss
from tasks.selection import EXACT_GATE, EXACT_METHODS
from tasks.threads import torch_threads
from tasks.windowing import WindowPlan, WindowPoint, WindowSim, choose_window, simulate_windows

# A gated neuron's gate, up and down rows are each D wide: the gate is a third of a full bundle
# (resident here, read from flash by the other layouts); a token reads the other two thirds.
GATE_SHARE = 1.0 / 3.0


def trace_masks(trace, n_layers: int, n_neurons: int, row_lengths: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer [T, N] bool masks of a token-by-token trace of rows of `row_lengths`, and [T] row ids."""
    steps = trace.steps
    if steps != sum(row_lengths):
        raise AssertionError(f"trace of {steps} steps for rows of {sum(row_lengths)} tokens")
    masks = [torch.zeros(steps, n_neurons, dtype=torch.bool) for _ in range(n_layers)]
    for s in range(steps):
        for layer in range(n_layers):
            masks[layer][s, torch.from_numpy(trace.active(s, layer).astype(np.int64))] = True
    seq = torch.repeat_interleave(torch.arange(len(row_lengths)), torch.tensor(list(row_lengths)))
    return masks, seq


def evaluate_exact_gate(artifact: Path, calib: CalibrationData, settings: Sequence[tuple[str, tuple[float, ...]]],
                        options: EvalOptions, *, ffn_dram_fraction: float, out_dir: Path,
                        progress: Callable[[int], None] | None = None,
                        method: str = EXACT_GATE, reference: Path | None = None) -> tuple[Evaluation, WindowPlan]:
    ids = load_tokens(calib, "heldout")
    sweep_ids = ids[: max(1, min(options.sweep_sequences, len(ids)))]
    with torch_threads(options.torch_threads):
        return _evaluate(artifact, calib, ids, sweep_ids, settings, options, ffn_dram_fraction, out_dir, progress,
                         method, reference)


def resident_share(manifest) -> float:
    """The FFN's resident rows (gate rows, up sketch) as a fraction of the FFN's float bytes."""
    per_neuron = 3 * (manifest.bundle_layout[0][2] - manifest.bundle_layout[0][1]) * manifest.itemsize
    sketch = manifest.up_sketch.row_bytes / per_neuron if manifest.up_sketch is not None else 0.0
    return GATE_SHARE + sketch


def _evaluate(artifact, calib, ids, sweep_ids, settings, options, ffn_dram_fraction, out_dir, progress, method,
              reference=None):
    base = dataclasses.replace(options.flash_config(), window=1, reuse=True)
    with flashio.open(artifact, base, mode="naive") as naive:
        row = ids[0][: max(1, options.naive_tokens)]
        naive.forward(row, token_by_token=True)
        naive_bpt = _sum_stats(naive.stats).bytes_read / len(row)
    comps: list[Comparison] = []
    points: list[WindowPoint] = []
    quant = None
    with contextlib.ExitStack() as stack:
        dense = stack.enter_context(flashio.open(artifact, base, mode="dense"))
        m = dense.artifact.manifest
        float_dense = None
        # the float reference, held in DRAM beside the quantized model while the main rows run (only they
        # are scored on it) and closed before the sweep settings
        reference_stack = stack.enter_context(contextlib.ExitStack())
        if reference is not None:
            float_dense = reference_stack.enter_context(flashio.open(reference, base, mode="dense"))
            check_reference(m, float_dense.artifact.manifest)
        n_layers, n = m.n_layers, m.ffn_layers[0].n_neurons
        total_neurons = sum(L.n_neurons for L in m.ffn_layers)
        # the whole FFN: its flash bundles (up + down) and the resident gate rows; naive reads all of it per
        # token (as it does an artifact whose bundles hold the gate), so the gate rows are added to its reads
        gate_bytes = dense.artifact.resident_tensor_bytes([L.gate_tensor for L in m.ffn_layers])
        ffn_bytes = sum(L.length_bytes for L in m.ffn_layers) + gate_bytes
        naive_bpt += gate_bytes
        resident = resident_share(m)
        dense_rows: dict[int, torch.Tensor] = {}

        def dense_logits(k: int) -> torch.Tensor:
            if k not in dense_rows:
                dense_rows[k] = dense.forward(ids[k])
            return dense_rows[k]

        # the float reference's dense logits of a main row (the main setting runs on every held-out row: ids)
        float_logits = (lambda k: float_dense.forward(ids[k])) if float_dense is not None else None
        for j, (label, dens) in enumerate(settings):
            rows = ids if j == 0 else sweep_ids
            cfg = dataclasses.replace(base, selection=EXACT_METHODS[method].selection, density=tuple(dens))
            with flashio.open(artifact, cfg, mode="sparse") as sparse:  # reads per token, as generation reads
                sparse.forward(ids[0][: max(1, options.bytes_tokens)], token_by_token=True)
                per_token = _sum_stats(sparse.stats)
            with flashio.open(artifact, dataclasses.replace(cfg, record_trace=True), mode="sparse") as sparse:
                c, vs_float = _compare(dense_logits, sparse, rows, label=label, recall_target=None, thresholds=(),
                                       n_neurons_total=total_neurons, progress=progress, token_by_token=False,
                                       float_logits=float_logits if j == 0 else None)
                if vs_float:
                    quant = quantization_loss(m, vs_float)
                reference_stack.close()
                masks, seq = trace_masks(sparse.trace(), n_layers, n, [len(r) for r in rows])
            kept = sum(int(mk.sum()) for mk in masks)
            steps = max(per_token.tokens, 1)
            comps.append(dataclasses.replace(
                c, density=kept / (len(seq) * total_neurons), bytes_per_token=per_token.bytes_read / steps,
                reads_per_token=per_token.reads / steps, cache_rows_per_token=per_token.cache_rows / steps))
            sims: list[list[WindowSim]] = [simulate_windows(mk, seq) for mk in masks]
            choice = choose_window(sims, row_bytes=[1.0 - GATE_SHARE] * n_layers, n_neurons=[n] * n_layers,
                                   ffn_dram_fraction=ffn_dram_fraction, resident_fraction=resident,
                                   ffn_bytes=float(n * n_layers))
            points.append(WindowPoint(label, None, choice))
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout = HeldoutSample.of(calib, len(ids))
    ev = Evaluation(main=comps[0], sweep=tuple(comps[1:]), naive_bytes_per_token=naive_bpt, ffn_bytes=ffn_bytes,
                    zero_shot=(), json_path=out_dir / "evaluation.json", curve_json_path=out_dir / "curve.json",
                    curve_png_path=None, heldout=heldout, quantization=quant)
    plan = WindowPlan(labels=method, tokens=int(ids.numel()), points=tuple(points))
    ev.curve_json_path.write_text(json.dumps({"points": [dataclasses.asdict(c) for c in comps]}, indent=1))
    ev.json_path.write_text(json.dumps({**dataclasses.asdict(ev), "windows": dataclasses.asdict(plan)}, indent=1,
                                       default=str))
    return ev, plan


@task(name="evaluate-exact-gate", cache_key_fn=stage_cache("evaluate-exact-gate", __name__, "tasks.evaluation",
                                                            "tasks.windowing"))
def exact_gate_task(artifact_sha256: str, artifact: Path, calib: CalibrationData,
                    settings: list[tuple[str, tuple[float, ...]]], options: EvalOptions, ffn_dram_fraction: float,
                    work_dir: Path, method: str = EXACT_GATE,
                    reference: Path | None = None) -> tuple[Evaluation, WindowPlan]:
    """reference: the unquantized artifact of the same source when `artifact` is quantized."""
    def compute(out: Path) -> tuple[Evaluation, WindowPlan]:
        total = calib.n_heldout + (len(settings) - 1) * min(options.sweep_sequences, calib.n_heldout)
        with StageProgress(f"evaluating the {EXACT_METHODS[method].title}", total, unit="seq") as p:
            done = [0]

            def tick(_k: int) -> None:
                done[0] += 1
                p.update(done[0])

            return evaluate_exact_gate(artifact, calib, settings, options, ffn_dram_fraction=ffn_dram_fraction,
                                       out_dir=out, progress=tick, method=method, reference=reference)

    ev, plan = run_stage("evaluate-exact-gate", [__name__, "tasks.evaluation", "tasks.windowing"], compute)
    get_run_logger().info("%s: top-1 %.4f, perplexity %+.2f%% at density %.3f; %s", method, ev.main.top1_agreement,
                          100 * ev.main.perplexity_increase, ev.main.density, plan.chosen.describe())
    log_quantization(ev)
    return ev, plan
