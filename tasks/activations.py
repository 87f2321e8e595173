"""Activation statistics and predictor training pairs, from forward hooks on each FFN.

    shard = collect_shard(source, calib, 0, 32, thresholds, ActivationOptions(), out_dir=Path("w/s0"))
    stats = merge_shards([shard, ...], out_dir=Path("w/stats"))
    x, mask, seq_ids = load_pairs(stats.shards, layer=3)   # FFN inputs [T, D], active [T, N]

The source model runs through transformers (hub id or local directory, dtype option) with a
forward hook on the FFN's first projection, which sees exactly what the flashio runtime feeds the
predictor: its input is the FFN input (the normalised hidden state), its output decides which
neurons are active. Which module that is, and the activation, the family declares
(`flashio.models.<family>.FFN`, a FFNSpec); active = |act(output)| > the layer's threshold:
- ReLU families (OPT): hook on fc1, threshold 0, i.e. fc1 output > 0 (exact sparsity).
- Gated SiLU families (Llama, Mistral): hook on gate_proj; the threshold is calibrated beforehand
  by `calibrate_gate_thresholds` to a target density (CATS-style).
Gated families can also be labelled by each neuron's contribution |act(gate)·up| (the down
projection's input h, read by a pre-hook on the Linear of the hooked module's parent that maps
N -> D: no recomputation): with `ActivationOptions.label_densities`, the pairs also hold, per
token, the top round(d N) neurons by |h| at the layer's density d (`layers.{i}.contrib_mask`).

Per layer and neuron a shard records the activation count, the summed activation magnitude and,
on every `coactivation_stride`-th position, co-activation counts; counts are integers, so the
statistics of shards merged by `merge_shards` equal those of one pass over all sequences. The
pairs (FFN input in float16, active mask bit-packed) go to a safetensors file per shard. Only
the decoder runs (the LM head's logits are not needed).

The cost of collection against a plain forward pass is measured by tasks.activation_cost.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from safetensors import safe_open

from flashio.dtypes import TORCH_DTYPES
from flashio.hashing import sha256_file
from flashio.models.base import FFNSpec
from tasks.caching import run_stage, stage_cache
from tasks.calibration import CalibrationData, load_tokens
from tasks.errors import InputError
from tasks.hooks import ffn_spec, load_model, run_hooked
from tasks.progress import StageProgress
from tasks.source import SourceModel
from tasks.tensorfiles import save_tensors

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
PAIRS_FILE = "pairs.safetensors"
# Values sampled per layer to place a gated layer's threshold (a quantile; 2M keeps it < 1 s).
GATE_SAMPLE_VALUES = 2_000_000


@dataclass(frozen=True)
class ActivationOptions:
    dtype: str = "float32"  # the source model's compute dtype here (CPU: float32 is fastest)
    batch_sequences: int = 8
    coactivation_stride: int = 16  # co-activation on every k-th position; 0 = not collected
    pair_stride: int = 1  # keep predictor pairs of every k-th position
    pairs: bool = True  # False: statistics only, no pairs file content (nothing trains predictors on them)
    pairs_dtype: str = "float16"
    torch_threads: int | None = None  # None: torch's default (see tasks.threads)
    # gated FFNs: per layer, the density of the contribution labels (top-k by |act(gate)·up|); () = none
    label_densities: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if any(not 0.0 < d <= 1.0 for d in self.label_densities):
            raise InputError(f"label densities must be in (0, 1]; got {self.label_densities}")
        if self.dtype not in TORCH_DTYPES or self.pairs_dtype not in TORCH_DTYPES:
            raise InputError(f"dtype must be one of {sorted(TORCH_DTYPES)}; got {self.dtype!r} / {self.pairs_dtype!r}")
        if self.batch_sequences < 1 or self.coactivation_stride < 0 or self.pair_stride < 1:
            raise InputError("batch_sequences >= 1, coactivation_stride >= 0 and pair_stride >= 1 are required")


@dataclass(frozen=True)
class ShardResult:
    index: int
    start: int  # calibration sequences [start, stop)
    stop: int
    stats_path: Path
    pairs_path: Path
    tokens: int
    stats_sha256: str
    pairs_sha256: str


@dataclass(frozen=True)
class ActivationStats:
    """Merged statistics (`path`) and the shards whose pairs the predictors train on."""

    path: Path
    shards: tuple[ShardResult, ...]
    tokens: int
    n_layers: int
    n_neurons: int
    active_thresholds: tuple[float, ...]
    density: tuple[float, ...]  # per layer: active neurons per token / n_neurons
    coactivation_tokens: int
    sha256: str


def shard_ranges(n_sequences: int, shard_sequences: int) -> list[tuple[int, int]]:
    step = max(1, shard_sequences)
    return [(s, min(s + step, n_sequences)) for s in range(0, n_sequences, step)]


class _Collector:
    """Per-layer accumulators filled by the FFN hooks of one batch after another."""

    def __init__(self, n_layers: int, n: int, *, ffn: FFNSpec, thresholds: Sequence[float],
                 options: ActivationOptions, keep_pairs: bool = True):
        self.n, self.ffn, self.thresholds, self.opt = n, ffn, list(thresholds), options
        self.count = [torch.zeros(n, dtype=torch.int64) for _ in range(n_layers)]
        self.abs_sum = [torch.zeros(n, dtype=torch.float64) for _ in range(n_layers)]
        s = options.coactivation_stride
        self.coact = [torch.zeros(n, n, dtype=torch.int64) for _ in range(n_layers)] if s else None
        self.keep_pairs = keep_pairs
        self.xs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.masks: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self.label_densities = tuple(options.label_densities) if ffn.gated else ()
        if self.label_densities and len(self.label_densities) != n_layers:
            raise InputError(f"{len(self.label_densities)} label densities for {n_layers} layers")
        self.contrib: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self.tokens = self.coact_tokens = 0

    def begin_batch(self, batch: torch.Tensor) -> None:
        """Rows (of the flattened [B*L] tokens) kept for co-activation and for pairs."""
        b, length = batch.shape
        pos = torch.arange(length).repeat(b)  # [B*L] position of each row in its sequence
        s = self.opt.coactivation_stride
        self.coact_rows = torch.nonzero(pos % s == 0).flatten() if s else None
        self.pair_rows = torch.nonzero(pos % self.opt.pair_stride == 0).flatten()
        self.tokens += b * length
        if self.coact_rows is not None:
            self.coact_tokens += len(self.coact_rows)

    def hook(self, i: int):
        def fn(_module, inputs, output) -> None:
            # Some models flatten [B, L, D] to [B*L, D] around the FFN (OPT does): work on rows.
            x = inputs[0].reshape(-1, inputs[0].shape[-1])  # [B*L, D] FFN input
            out = output.reshape(-1, self.n)  # [B*L, N] pre-activation (fc1) or gate projection
            mag = self.ffn.magnitude(out)  # |act(out)|: relu(out) for ReLU, |silu(gate)| when gated
            active = mag > self.thresholds[i]  # ReLU: threshold 0, i.e. out > 0
            af = active.float()  # [B*L, N]; float sums are exact below 2^24 rows per batch
            self.count[i] += af.sum(dim=0).long()  # (summing a bool tensor is ~3x slower)
            self.abs_sum[i] += mag.sum(dim=0).double()
            if self.coact is not None:
                m = af[self.coact_rows]  # [Ts, N]
                self.coact[i] += (m.T @ m).long()  # exact: counts < 2^24 per batch
            if self.keep_pairs:
                rows = self.pair_rows
                self.xs[i].append(x[rows].to(TORCH_DTYPES[self.opt.pairs_dtype]))
                self.masks[i].append(np.packbits(active[rows].numpy(), axis=1))

        return fn

    def down_hook(self, i: int):
        """Pre-hook on the down projection: contribution labels of the pair rows."""
        def fn(_module, inputs) -> None:
            if self.keep_pairs:
                h = inputs[0].reshape(-1, self.n)[self.pair_rows]  # [T, N] act(gate)·up
                k = min(self.n, max(1, round(self.label_densities[i] * self.n)))
                top = torch.zeros(h.shape, dtype=torch.bool).scatter_(-1, torch.topk(h.abs(), k).indices, True)
                self.contrib[i].append(np.packbits(top.numpy(), axis=1))

        return fn


def _run(source: SourceModel, ids: torch.Tensor, collector: _Collector | None, options: ActivationOptions,
         progress: Callable[[int, int], None] | None = None) -> None:
    model = load_model(str(source.path), options.dtype, source.fingerprint)
    down = collector.down_hook if collector is not None and collector.label_densities else None
    run_hooked(model, source, ids, batch_sequences=options.batch_sequences, threads=options.torch_threads,
               gate=collector.hook if collector is not None else None, down=down,
               before_batch=collector.begin_batch if collector is not None else None, progress=progress)


def calibrate_gate_thresholds(source: SourceModel, calib: CalibrationData, *, density: float,
                              n_sequences: int, options: ActivationOptions, seed: int = 0) -> tuple[float, ...]:
    """Per gated layer, the |silu(gate)| value exceeded by a fraction `density` of (token, neuron)
    pairs on the first `n_sequences` calibration sequences. ReLU models: 0 for every layer."""
    ffn = ffn_spec(source)
    if ffn.exactly_sparse:
        return (0.0,) * source.n_layers
    if not 0.0 < density < 1.0:
        raise InputError(f"gated density target must be in (0, 1); got {density}")
    ids = load_tokens(calib, "calibration")[:n_sequences]
    gen = torch.Generator().manual_seed(seed)
    samples: list[list[torch.Tensor]] = [[] for _ in range(source.n_layers)]
    per_batch = max(1, GATE_SAMPLE_VALUES // max(1, -(-len(ids) // options.batch_sequences)))

    def hook(i: int):
        def fn(_module, _inputs, output) -> None:
            v = ffn.magnitude(output).flatten().float()
            if v.numel() > per_batch:
                v = v[torch.randint(v.numel(), (per_batch,), generator=gen)]
            samples[i].append(v)

        return fn

    model = load_model(str(source.path), options.dtype, source.fingerprint)
    run_hooked(model, source, ids, batch_sequences=options.batch_sequences, threads=options.torch_threads, gate=hook)
    return tuple(float(np.quantile(torch.cat(s).numpy(), 1.0 - density)) for s in samples)


def collect_shard(source: SourceModel, calib: CalibrationData, start: int, stop: int,
                  thresholds: Sequence[float], options: ActivationOptions, *, out_dir: Path, index: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> ShardResult:
    """Statistics and pairs of calibration sequences [start, stop), written under `out_dir`."""
    ids = load_tokens(calib, "calibration")
    if not 0 <= start < stop <= len(ids):
        raise InputError(f"shard [{start}, {stop}) is outside the {len(ids)} calibration sequences")
    ids = ids[start:stop]
    col = _Collector(source.n_layers, source.ffn_dim, ffn=ffn_spec(source), thresholds=thresholds,
                     options=options, keep_pairs=options.pairs)
    _run(source, ids, col, options, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for i in range(source.n_layers):
        stats[f"layers.{i}.count"] = col.count[i]
        stats[f"layers.{i}.abs_sum"] = col.abs_sum[i]
        if col.coact is not None:
            stats[f"layers.{i}.coact"] = col.coact[i]
    meta = {"tokens": str(col.tokens), "coactivation_tokens": str(col.coact_tokens),
            "thresholds": json.dumps(list(thresholds))}
    save_tensors(stats, str(out_dir / STATS_FILE), metadata=meta)
    length = ids.shape[1]
    positions = len(range(0, length, options.pair_stride))
    seq_ids = torch.arange(start, stop, dtype=torch.int32).repeat_interleave(positions)
    pairs = {"seq_ids": seq_ids}
    for i in range(source.n_layers if col.keep_pairs else 0):
        pairs[f"layers.{i}.x"] = torch.cat(col.xs[i])
        pairs[f"layers.{i}.mask"] = torch.from_numpy(np.concatenate(col.masks[i]))
        if col.contrib[i]:
            pairs[f"layers.{i}.contrib_mask"] = torch.from_numpy(np.concatenate(col.contrib[i]))
    save_tensors(pairs, str(out_dir / PAIRS_FILE), metadata={"n_neurons": str(source.ffn_dim)})
    return ShardResult(index=index, start=start, stop=stop, stats_path=out_dir / STATS_FILE,
                       pairs_path=out_dir / PAIRS_FILE, tokens=col.tokens,
                       stats_sha256=sha256_file(out_dir / STATS_FILE), pairs_sha256=sha256_file(out_dir / PAIRS_FILE))


def read_stats(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def merge_shards(shards: Sequence[ShardResult], *, out_dir: Path) -> ActivationStats:
    """Sum the shards' statistics (exact for every count) into one stats file."""
    if not shards:
        raise InputError("no activation shards to merge")
    total: dict[str, torch.Tensor] = {}
    tokens = coact_tokens = 0
    thresholds = None
    for s in shards:
        t, meta = read_stats(s.stats_path)
        for k, v in t.items():
            total[k] = total[k] + v if k in total else v.clone()
        tokens += int(meta["tokens"])
        coact_tokens += int(meta["coactivation_tokens"])
        th = json.loads(meta["thresholds"])
        if thresholds is not None and th != thresholds:
            raise AssertionError(f"shards were collected with different thresholds: {thresholds} vs {th}")
        thresholds = th
    n_layers = sum(1 for k in total if k.endswith(".count"))
    n = total["layers.0.count"].numel()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / STATS_FILE
    save_tensors(total, str(path), metadata={"tokens": str(tokens), "coactivation_tokens": str(coact_tokens),
                                             "thresholds": json.dumps(thresholds)})
    density = tuple(float(total[f"layers.{i}.count"].sum()) / (tokens * n) for i in range(n_layers))
    return ActivationStats(path=path, shards=tuple(sorted(shards, key=lambda s: s.start)), tokens=tokens,
                           n_layers=n_layers, n_neurons=n, active_thresholds=tuple(thresholds), density=density,
                           coactivation_tokens=coact_tokens, sha256=sha256_file(path))


LABELS = {"active": "mask", "contribution": "contrib_mask"}


def load_pairs(shards: Sequence[ShardResult], layer: int, labels: str = "active",
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's pairs from every shard: x [T, D] float32, labels [T, N] bool, seq_ids [T].
    labels: "active" (|act| above the layer's threshold) or "contribution" (top-k by |act(gate)·up|)."""
    if labels not in LABELS:
        raise InputError(f"predictor labels {labels!r} are not one of {', '.join(LABELS)}")
    xs, masks, seqs = [], [], []
    for s in sorted(shards, key=lambda s: s.start):
        with safe_open(str(s.pairs_path), framework="pt") as f:
            n = int(f.metadata()["n_neurons"])
            key = f"layers.{layer}.{LABELS[labels]}"
            if f"layers.{layer}.x" not in f.keys():  # noqa: SIM118
                raise InputError(f"the activation shard {s.pairs_path} holds no predictor pairs (collected with "
                                 "ActivationOptions(pairs=False)); collect them with pairs=True")
            if key not in f.keys():  # noqa: SIM118
                raise InputError(f"the activation shard {s.pairs_path} has no {labels} labels; collect them with "
                                 "ActivationOptions.label_densities (gated FFNs only)")
            xs.append(f.get_tensor(f"layers.{layer}.x").float())
            packed = f.get_tensor(key).numpy()
            masks.append(torch.from_numpy(np.unpackbits(packed, axis=1, count=n).astype(bool)))
            seqs.append(f.get_tensor("seq_ids"))
    return torch.cat(xs), torch.cat(masks), torch.cat(seqs)


# -- Prefect tasks --------------------------------------------------------------------------------

@task(name="gate-thresholds", cache_key_fn=stage_cache("gate-thresholds", __name__, "tasks.hooks"))
def gate_thresholds_task(source: SourceModel, calib: CalibrationData, density: float, n_sequences: int,
                         options: ActivationOptions, work_dir: Path) -> tuple[float, ...]:
    th = run_stage("gate-thresholds", [__name__, "tasks.hooks"], lambda _out: calibrate_gate_thresholds(
        source, calib, density=density, n_sequences=n_sequences, options=options))
    if any(th):
        get_run_logger().info("gated activity thresholds (density %.2f): %s", density,
                              ", ".join(f"{t:.4g}" for t in th))
    return th


@task(name="activations", cache_key_fn=stage_cache("activations", __name__, "tasks.hooks"))
def activations_task(source: SourceModel, calib: CalibrationData, index: int, start: int, stop: int,
                     n_shards: int, thresholds: tuple[float, ...], options: ActivationOptions,
                     work_dir: Path) -> ShardResult:
    t0 = time.perf_counter()

    def compute(out: Path) -> ShardResult:
        with StageProgress(f"activations shard {index + 1}/{n_shards}", stop - start, unit="seq") as p:
            return collect_shard(source, calib, start, stop, thresholds, options, out_dir=out, index=index,
                                 progress=p.update)

    shard = run_stage("activations", [__name__, "tasks.hooks"], compute)
    get_run_logger().info("shard %d/%d: %d tokens in %.1f s", index + 1, n_shards, shard.tokens,
                          time.perf_counter() - t0)
    return shard


@task(name="merge-activations", cache_key_fn=stage_cache("merge-activations", __name__))
def merge_task(shards: list[ShardResult], work_dir: Path) -> ActivationStats:
    stats = run_stage("merge-activations", [__name__], lambda out: merge_shards(shards, out_dir=out))
    load_model.cache_clear()  # every shard is in: free the source model before the next stages
    get_run_logger().info("activation density per layer: %s",
                          ", ".join(f"{d:.3f}" for d in stats.density))
    return stats
