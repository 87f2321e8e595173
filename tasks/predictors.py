"""Per-layer low-rank activation predictors, trained on the pairs the activations step wrote.

    ranks = default_ranks(n_layers=32, dim=4096)                # 128 ..., 1024 for the last 4
    lp = train_layer_predictor(stats.shards, layer=3, options=PredictorOptions(ranks=ranks, max_rank=4096),
                               out_dir=Path("work/predictors"))
    lp.recall, lp.predicted_density, lp.threshold                 # measured on held-out pairs
    weights = load_layer_predictor(lp)                            # flashio.predictor.PredictorWeights

Training (after Deja Vu / LLM in a flash 3.1): `LowRankPredictor` (a torch module) on the FFN
input, binary cross-entropy with a per-neuron positive weight (negatives/positives, capped)
because positives are rare, Adam with a linearly decaying rate. Inputs are standardised while
training and the standardisation is folded back into A and the bias, so the exported predictor
takes the raw FFN input exactly as the runtime feeds it.

The last `validation_fraction` of the calibration sequences are held out from training. On them:
- the threshold is calibrated so that the predictor keeps `recall_target` of the truly active
  (token, neuron) pairs (or `threshold` is used as given);
- a layer *misses* when, restricted to a predicted density of `density_ratio` x the true density
  (the paper's predictors select about 3x the active set), its recall is below the target; its
  rank is then doubled (up to `max_rank`, at most `max_escalations` times) and it is retrained.
- recall, precision, true and predicted density are reported, plus thresholds for a sweep of
  recall targets (the evaluation's sparsity-accuracy curve).

What a predictor learns (`labels`): "active", the activations step's active sets (|act| above the
layer's threshold: exact for ReLU, the gate's magnitude for gated FFNs), or, for gated FFNs,
"contribution": per token the top neurons by |act(gate)·up| at the layer's label density. On
small gated models the gate's magnitude alone is a poor label (issue 16's measurements: top-1
0.79 vs 0.92 at half the neurons on Gemma 3 270M); contribution is what the output depends on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from prefect import get_run_logger, task
from safetensors.torch import load_file
from torch import nn

from flashio.hashing import sha256_file
from flashio.predictor import PredictorWeights
from tasks.activations import LABELS, ActivationStats, ShardResult, load_pairs
from tasks.caching import run_stage, stage_cache
from tasks.errors import InputError
from tasks.progress import StageProgress
from tasks.tensorfiles import save_tensors
from tasks.threads import torch_threads

log = logging.getLogger(__name__)

# Probability thresholds stay inside (0, 1) (PredictorWeights requires it) with room for float error.
MIN_PROB = 1e-12
DEFAULT_SWEEP = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
# Scores sampled to place a density quantile on large validation sets (torch.kthvalue is exact).
MAX_QUANTILE_VALUES = 8_000_000


def default_ranks(n_layers: int, dim: int, *, ffn_dim: int | None = None, rank: int | None = None,
                  rank_last: int | None = None, last_layers: int | None = None) -> tuple[int, ...]:
    """Paper-like ranks: d/32 (at least 32) for most layers and d/4 for the last n_layers/8 (at
    least one): OPT-6.7B gets 128 and 1024 for the last 4, as in the paper."""
    cap = min(dim, ffn_dim or dim)
    r = min(cap, rank if rank is not None else max(32, dim // 32))
    r_last = min(cap, rank_last if rank_last is not None else max(r, dim // 4))
    k = last_layers if last_layers is not None else max(1, n_layers // 8)
    if r < 1 or r_last < 1 or not 0 <= k <= n_layers:
        raise InputError(f"bad predictor ranks: rank {r}, rank_last {r_last}, last_layers {k} of {n_layers}")
    return tuple(r_last if i >= n_layers - k else r for i in range(n_layers))


@dataclass(frozen=True)
class PredictorOptions:
    ranks: tuple[int, ...]  # initial rank per layer (see default_ranks)
    max_rank: int  # escalation never goes above this
    recall_target: float = 0.99
    threshold: float | None = None  # a fixed probability threshold instead of calibration
    density_ratio: float = 3.0
    max_escalations: int = 2
    epochs: int = 8
    min_steps: int = 500  # small calibration sets get more epochs: the fit needs steps, not passes
    batch_tokens: int = 256
    lr: float = 1e-2
    max_pos_weight: float = 30.0
    validation_fraction: float = 0.1
    sweep_recalls: tuple[float, ...] = DEFAULT_SWEEP
    seed: int = 0
    torch_threads: int | None = 1  # small matrices: one thread is fastest (see tasks.threads)
    labels: str = "active"  # or "contribution" (gated FFNs; see tasks.activations.LABELS)

    def __post_init__(self) -> None:
        if not 0.0 < self.recall_target < 1.0:
            raise InputError(f"recall target must be in (0, 1); got {self.recall_target}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise InputError(f"predictor threshold must be a probability in (0, 1); got {self.threshold}")
        if self.max_escalations < 0 or self.epochs < 1 or self.batch_tokens < 1 or self.density_ratio <= 0:
            raise InputError("max_escalations >= 0, epochs >= 1, batch_tokens >= 1 and density_ratio > 0 are required")
        if not 0.0 < self.validation_fraction < 1.0:
            raise InputError(f"validation_fraction must be in (0, 1); got {self.validation_fraction}")
        if self.labels not in LABELS:
            raise InputError(f"predictor labels {self.labels!r} are not one of {', '.join(LABELS)}")


@dataclass(frozen=True)
class LayerPredictor:
    """A trained layer predictor on disk and what it achieved on held-out pairs."""

    layer: int
    path: Path
    sha256: str
    rank: int
    threshold: float  # probability
    true_density: float
    predicted_density: float
    recall: float
    precision: float
    recall_at_budget: float  # recall at density_ratio x true density (the escalation criterion)
    met_target: bool
    escalations: int
    validation_tokens: int
    sweep: tuple[tuple[float, float, float], ...]  # (recall target, threshold, predicted density)
    labels: str = "active"  # what it was trained on (PredictorOptions.labels)

    def threshold_for(self, recall: float) -> float:
        for r, t, _ in self.sweep:
            if math.isclose(r, recall):
                return t
        raise KeyError(f"layer {self.layer} has no sweep point for recall {recall}")


class LowRankPredictor(nn.Module):
    """Trainable form of a predictor: x -> down (no bias) -> up (+ bias) -> logits; exported as
    the runtime's PredictorWeights (A = down, B = up)."""

    def __init__(self, dim: int, n_neurons: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, n_neurons, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # [T, D] -> [T, N]

    def export(self, threshold: float) -> PredictorWeights:
        return PredictorWeights(self.down.weight.detach().clone(), self.up.weight.detach().clone(),
                                self.up.bias.detach().clone(), threshold)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def train_predictor(x: torch.Tensor, y: torch.Tensor, rank: int, options: PredictorOptions, *, seed: int,
                    progress: Callable[[int, int], None] | None = None) -> PredictorWeights:
    """Fit a rank-`rank` predictor of y [T, N] (bool) from x [T, D]; threshold 0.5 (set later).
    progress(epoch, epochs) after each epoch."""
    t, d = x.shape
    n = y.shape[1]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)  # [D]
    xs = (x - mu) / sd
    model = LowRankPredictor(d, n, rank)
    freq = y.float().mean(0).clamp(1e-4, 1 - 1e-4)  # [N]
    pos_weight = ((1 - freq) / freq).clamp(1.0, options.max_pos_weight)
    with torch.no_grad():
        model.up.bias.copy_(_logit(freq))
    opt = torch.optim.Adam(model.parameters(), lr=options.lr)
    batches = math.ceil(t / options.batch_tokens)
    epochs = max(options.epochs, math.ceil(options.min_steps / batches))
    steps = epochs * batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(1, steps))
    for epoch in range(epochs):
        perm = torch.randperm(t, generator=gen)
        for b in range(0, t, options.batch_tokens):
            idx = perm[b : b + options.batch_tokens]
            loss = F.binary_cross_entropy_with_logits(model(xs[idx]), y[idx].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch + 1, epochs)
    w = model.export(0.5)
    a = w.A / sd  # fold the standardisation: A (x - mu)/sd = (A/sd) x - (A/sd) mu
    bias = w.bias - w.B @ (a @ mu)
    return PredictorWeights(a.contiguous(), w.B.contiguous(), bias.contiguous(), 0.5)


def threshold_for_recall(logits: torch.Tensor, y: torch.Tensor, recall: float) -> float:
    """The largest probability threshold whose predictions keep >= `recall` of the positives."""
    pos = logits[y].double()
    if pos.numel() == 0:
        return 1.0 - MIN_PROB
    k = math.floor((1.0 - recall) * pos.numel() + 1e-9)  # positives allowed below the threshold
    v = float(torch.kthvalue(pos, k + 1).values)  # predicted active where logit > threshold
    z = math.nextafter(v, -math.inf) - 1e-6 * max(1.0, abs(v))
    p = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return min(max(p, MIN_PROB), 1.0 - MIN_PROB)


def _quantile_value(v: torch.Tensor, q: float, seed: int = 0) -> float:
    v = v.flatten()
    if v.numel() > MAX_QUANTILE_VALUES:
        gen = torch.Generator().manual_seed(seed)
        v = v[torch.randint(v.numel(), (MAX_QUANTILE_VALUES,), generator=gen)]
    k = min(v.numel(), max(1, math.ceil(q * v.numel())))
    return float(torch.kthvalue(v, k).values)


def recall_at_density(logits: torch.Tensor, y: torch.Tensor, density: float) -> float:
    """Recall when the highest-scoring `density` fraction of (token, neuron) pairs is predicted."""
    if density >= 1.0:
        return 1.0
    thr = _quantile_value(logits, 1.0 - density)
    pos = logits[y]
    return float((pos > thr).float().mean()) if pos.numel() else 1.0


def score(logits: torch.Tensor, y: torch.Tensor, threshold: float) -> dict[str, float]:
    """Predicted density, recall and precision at a probability threshold."""
    pred = logits > math.log(threshold / (1.0 - threshold))
    tp = float((pred & y).sum())
    n_pos, n_pred = float(y.sum()), float(pred.sum())
    return {"true_density": n_pos / y.numel(), "predicted_density": n_pred / y.numel(),
            "recall": tp / n_pos if n_pos else 1.0, "precision": tp / n_pred if n_pred else 1.0}


def escalation_density(true_density: float, ratio: float) -> float:
    """The predicted density at which a layer must reach its recall target: `ratio` x the true
    density (the paper's ~3x for sparse ReLU layers), but at most halfway between the true density
    and every neuron. Without the cap, labels that cover a third of the neurons or more (gated
    FFNs: 50% is usual) would always pass at 100% predicted and never escalate, however weak the
    predictor (a rank-32 predictor on Gemma 3 270M predicted 93-97% of its neurons). The cap
    applies only where ratio x density reaches every neuron, so layers below that (the ReLU demo's
    first layer is 26% dense) keep the paper's rule and their figures."""
    if ratio * true_density < 1.0:
        return ratio * true_density
    return (1.0 + true_density) / 2.0


def split_validation(seq_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean [T]: rows of the last `fraction` of the sequences (at least one)."""
    uniq = torch.unique(seq_ids)
    if len(uniq) < 2:
        raise InputError(f"predictor training needs at least 2 calibration sequences (one is held out to "
                         f"calibrate the threshold); got {len(uniq)}")
    n_val = min(len(uniq) - 1, max(1, round(fraction * len(uniq))))
    return seq_ids >= uniq[-n_val]


def train_layer_predictor(shards: Sequence[ShardResult], layer: int, options: PredictorOptions, *,
                          out_dir: Path, progress: Callable[[int, int], None] | None = None) -> LayerPredictor:
    """Train, escalate and calibrate the predictor of one layer; write it under `out_dir`."""
    with torch_threads(options.torch_threads):
        return _train_layer(shards, layer, options, out_dir, progress)


def _train_layer(shards: Sequence[ShardResult], layer: int, options: PredictorOptions, out_dir: Path,
                 progress: Callable[[int, int], None] | None) -> LayerPredictor:
    x, y, seq_ids = load_pairs(shards, layer, options.labels)
    val = split_validation(seq_ids, options.validation_fraction)
    x_tr, y_tr, x_val, y_val = x[~val], y[~val], x[val], y[val]
    true_density = float(y_val.float().mean())
    budget = escalation_density(true_density, options.density_ratio)
    rank = options.ranks[layer]
    best = None
    attempts = options.max_escalations + 1
    for attempt in range(attempts):
        def tick(epoch: int, epochs: int, base: int = attempt) -> None:  # in percent of all attempts
            if progress:
                progress(100 * base + (100 * epoch) // epochs, 100 * attempts)

        w = train_predictor(x_tr, y_tr, rank, options, seed=options.seed + 1000 * layer + attempt, progress=tick)
        with torch.no_grad():
            logits = w.logits(x_val)  # [T_val, N]
        rab = recall_at_density(logits, y_val, budget)
        log.info("layer %d rank %d: recall %.4f at %.3f predicted density (true %.3f)", layer, rank, rab,
                 budget, true_density)
        if best is None or rab > best[2]:
            best = (w, logits, rab, rank, attempt)
        if rab >= options.recall_target or rank >= options.max_rank:
            break
        rank = min(options.max_rank, 2 * rank)
    assert best is not None
    w, logits, rab, rank, escalations = best
    thr = options.threshold if options.threshold is not None else threshold_for_recall(logits, y_val,
                                                                                       options.recall_target)
    metrics = score(logits, y_val, thr)
    sweep = []
    for r in options.sweep_recalls:
        t = threshold_for_recall(logits, y_val, r)
        sweep.append((float(r), t, score(logits, y_val, t)["predicted_density"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"layer-{layer:03d}.safetensors"
    save_tensors({"A": w.A, "B": w.B, "bias": w.bias}, str(path), metadata={"threshold": repr(thr), "rank": str(rank)})
    return LayerPredictor(layer=layer, path=path, sha256=sha256_file(path), rank=rank, threshold=thr,
                          true_density=metrics["true_density"], predicted_density=metrics["predicted_density"],
                          recall=metrics["recall"], precision=metrics["precision"], recall_at_budget=rab,
                          met_target=rab >= options.recall_target, escalations=escalations,
                          validation_tokens=int(val.sum()), sweep=tuple(sweep), labels=options.labels)


def load_layer_predictor(lp: LayerPredictor, threshold: float | None = None) -> PredictorWeights:
    t = load_file(str(lp.path))
    return PredictorWeights(t["A"], t["B"], t["bias"], lp.threshold if threshold is None else threshold)


@task(name="predictor", cache_key_fn=stage_cache("predictor", __name__, "tasks.activations"))
def predictor_task(stats: ActivationStats, layer: int, options: PredictorOptions, work_dir: Path) -> LayerPredictor:
    def compute(out: Path) -> LayerPredictor:
        with StageProgress(f"predictor layer {layer + 1}/{stats.n_layers}", 100, unit="%") as p:
            # progress of every allowed attempt (rank escalations); the bar completes when one suffices
            return train_layer_predictor(stats.shards, layer, options, out_dir=out,
                                         progress=lambda done, total: p.update(100 * done // total))

    lp = run_stage("predictor", [__name__, "tasks.activations"], compute)
    get_run_logger().info(
        "layer %d (%s labels): rank %d%s, true density %.3f, predicted %.3f, recall %.4f, precision %.3f", layer, lp.labels, lp.rank,
        f" (escalated {lp.escalations}x)" if lp.escalations else "", lp.true_density, lp.predicted_density,
        lp.recall, lp.precision)
    return lp
