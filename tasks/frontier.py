"""The exact oracles of a gated FFN: the density-accuracy frontier no predictor can beat.

    fr = measure_oracle_frontier(source, calib, densities=(0.5, 0.7, 0.9), n_sequences=4,
                                 options=ActivationOptions(), per_layer=alloc.densities)
    [(p.method, p.density, p.top1_agreement) for p in fr.points]

Per token and layer the oracle keeps the top round(d N) neurons and zeroes the others before the
down projection, all layers at once, computed densely on the source model through transformers
(a pre-hook on the down projection masks its input h = act(gate)·up): "oracle: gate" ranks by
|act(gate)| (what a gate-magnitude threshold keeps), "oracle: contribution" by |h| (what the
output depends on), and "oracle: contribution per layer" by |h| at the per-layer densities of
the allocation (tasks.allocation). Metrics as the evaluation's (tasks.evaluation.compare): top-1
agreement with dense over every position, mean KL(dense || oracle) per token, and the relative
perplexity of the held-out next tokens, on the first `n_sequences` held-out rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from prefect import get_run_logger, task

from tasks.activations import ActivationOptions
from tasks.allocation import topk_mask
from tasks.caching import run_stage, stage_cache
from tasks.calibration import CalibrationData, load_tokens
from tasks.errors import InputError
from tasks.hooks import ffn_hooks, ffn_spec, load_model
from tasks.source import SourceModel

DENSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORACLE_GATE = "oracle: gate"
ORACLE_CONTRIBUTION = "oracle: contribution"
ORACLE_PER_LAYER = "oracle: contribution per layer"


@dataclass(frozen=True)
class FrontierPoint:
    """One configuration's accuracy against dense (an oracle's, or a predictor's in the runtime)."""

    method: str
    density: float  # mean kept fraction of the FFN's neurons per token
    top1_agreement: float
    mean_kl: float
    perplexity_increase: float  # relative
    tokens: int


@dataclass(frozen=True)
class OracleFrontier:
    points: tuple[FrontierPoint, ...]
    perplexity_dense: float
    tokens: int


def measure_oracle_frontier(source: SourceModel, calib: CalibrationData, *, densities: Sequence[float],
                            n_sequences: int, options: ActivationOptions,
                            per_layer: Sequence[float] | None = None) -> OracleFrontier:
    ffn = ffn_spec(source)
    if not ffn.gated:
        raise InputError(f"{source.ref}: the oracle frontier is for gated FFNs (ReLU's oracle is exact)")
    ids = load_tokens(calib, "heldout")[: max(1, n_sequences)]
    if len(ids) == 0:
        raise InputError("the oracle frontier needs held-out sequences")
    model = load_model(str(source.path), options.dtype, source.fingerprint)
    n_layers = source.n_layers
    state: dict = {"rank": None, "dens": None}
    gate_mag: list[torch.Tensor | None] = [None] * n_layers

    def gate_hook(i: int):
        def fn(_m, _inputs, output) -> None:
            if state["rank"] == "gate":
                gate_mag[i] = ffn.magnitude(output)
        return fn

    def down_hook(i: int):
        def fn(_m, inputs):
            if state["rank"] is None:
                return None
            h = inputs[0]
            score = h.abs() if state["rank"] == "contribution" else gate_mag[i].reshape(h.shape)
            return (h * topk_mask(score, state["dens"][i]).to(h.dtype),)
        return fn

    def logits_of(rank: str | None, dens: Sequence[float] | None) -> list[torch.Tensor]:
        state["rank"], state["dens"] = rank, dens
        return [model(input_ids=ids[b : b + options.batch_sequences], use_cache=False).logits.float()
                for b in range(0, len(ids), options.batch_sequences)]

    configs = [(ORACLE_GATE, "gate", d, [d] * n_layers) for d in densities]
    configs += [(ORACLE_CONTRIBUTION, "contribution", d, [d] * n_layers) for d in densities]
    if per_layer is not None:
        if len(per_layer) != n_layers:
            raise InputError(f"{len(per_layer)} per-layer densities for {n_layers} layers")
        configs.append((ORACLE_PER_LAYER, "contribution", sum(per_layer) / n_layers, list(per_layer)))
    points = []
    with ffn_hooks(model, source, gate=gate_hook, down=down_hook, threads=options.torch_threads):
        dense = logits_of(None, None)
        ppl_dense = math.exp(_nll(dense, ids) / (ids.numel() - len(ids)))
        for method, rank, d, dens in configs:
            out = logits_of(rank, dens)
            points.append(_point(method, d, dense, out, ids, ppl_dense))
    return OracleFrontier(points=tuple(points), perplexity_dense=ppl_dense, tokens=int(ids.numel()))


def _nll(logits: Sequence[torch.Tensor], ids: torch.Tensor) -> float:
    flat = torch.cat(list(logits))  # [S, L, V]
    return float(F.cross_entropy(flat[:, :-1].reshape(-1, flat.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def _point(method: str, density: float, dense: Sequence[torch.Tensor], out: Sequence[torch.Tensor],
           ids: torch.Tensor, ppl_dense: float) -> FrontierPoint:
    d, s = torch.cat(list(dense)), torch.cat(list(out))  # [S, L, V]
    lp_d, lp_s = F.log_softmax(d, -1), F.log_softmax(s, -1)
    kl = float((lp_d.exp() * (lp_d - lp_s)).sum(-1).mean())
    top1 = float((d.argmax(-1) == s.argmax(-1)).float().mean())
    ppl = math.exp(_nll(out, ids) / (ids.numel() - len(ids)))
    return FrontierPoint(method=method, density=float(density), top1_agreement=top1, mean_kl=kl,
                         perplexity_increase=ppl / ppl_dense - 1.0, tokens=int(ids.numel()))


@task(name="oracle-frontier", cache_key_fn=stage_cache("oracle-frontier", __name__, "tasks.activations",
                                                        "tasks.allocation", "tasks.hooks"))
def frontier_task(source: SourceModel, calib: CalibrationData, densities: tuple[float, ...], n_sequences: int,
                  per_layer: tuple[float, ...] | None, options: ActivationOptions, work_dir) -> OracleFrontier:
    fr = run_stage("oracle-frontier", [__name__, "tasks.activations", "tasks.allocation", "tasks.hooks"],
                   lambda _out: measure_oracle_frontier(source, calib, densities=densities, n_sequences=n_sequences,
                                                        options=options, per_layer=per_layer))
    get_run_logger().info("oracle top-1 by density: %s", "; ".join(
        f"{p.method} {p.density:.2f}: {p.top1_agreement:.3f}" for p in fr.points))
    return fr
