"""The `convert` flow's parameters: one validated pydantic model, also written into the
artifact's lineage.

    cfg = ConvertConfig(model="facebook/opt-125m", calibration="allenai/c4:en:validation",
                        samples=512, registry="s3://bucket/models", name="opt-125m")

Defaults convert the bundled demo model on the Python standard library's sources.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_REGISTRY = "./flashio-registry"
DEFAULT_PROMPT = "def fibonacci(n):"
WORK_DIR_ENV = "FLASHIO_WORK_DIR"
# Fields that decide how and where a conversion runs and is published, not what it produces:
# left out of the lineage (and so of the idempotence key of scheduled runs).
EXECUTION_FIELDS = frozenset({"work_dir", "workers", "torch_threads", "dask", "dask_address", "skip_published",
                              "force", "registry", "registry_endpoint", "name", "version", "aliases", "prompt",
                              "max_new_tokens"})


def default_model() -> str:
    from tasks.demo import DEMO_CHECKPOINT_DIR  # standard library only: cheap

    return str(DEMO_CHECKPOINT_DIR)


def default_work_dir() -> Path:
    """$FLASHIO_WORK_DIR, else $XDG_CACHE_HOME/flashio/convert, else ~/.cache/flashio/convert."""
    if env := os.environ.get(WORK_DIR_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flashio" / "convert"


class AccuracyBudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_perplexity_increase: float = Field(0.02, ge=0.0, description="relative: 0.02 = sparse perplexity at most +2%")
    min_top1_agreement: float = Field(0.97, ge=0.0, le=1.0, description="next-token arg-max agreement with dense")
    allow_loss: bool = Field(False, description="publish even when the budget is exceeded (recorded in the report)")


class ConvertConfig(BaseModel):
    """Everything a conversion depends on. Changing a field re-runs the stages it feeds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # source
    model: str = Field(default_factory=default_model, description="HF hub id or checkpoint directory")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    source_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the source model runs in while collecting activations")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="artifact storage dtype (default: the checkpoint's)")
    # calibration
    calibration: str = Field("stdlib:train", description="local files/dir/glob, hub 'name[:config][:split]', "
                                                         "or stdlib:train")
    heldout: str | None = Field(None, description="evaluation text (default: stdlib:heldout for stdlib "
                                                  "calibration, else the documents after the calibration part)")
    text_field: str | None = None
    samples: int = Field(128, ge=2, description="calibration sequences (at least 2: one is held out to "
                                                "calibrate predictor thresholds)")
    seq_len: int = Field(256, ge=2, description="tokens per sequence")
    heldout_samples: int = Field(16, ge=1, description="held-out evaluation sequences")
    seed: int = 0
    shard_samples: int = Field(32, ge=1, description="calibration sequences per activation shard")
    batch_samples: int = Field(8, ge=1, description="sequences per forward pass")
    coactivation_stride: int | None = Field(
        None, ge=0, description="co-activation on every k-th position (0: off; default 16 when the order "
                                "needs it or the FFN has <= 4096 neurons, else off)")
    torch_threads: int | None = Field(None, ge=1, description="torch threads while collecting activations "
                                                              "(default: torch's); predictors and evaluation use 1")
    gated_density: float = Field(0.5, gt=0.0, lt=1.0, description="gated FFNs (Llama): target fraction of "
                                                                  "active neurons, sets |silu(gate)| thresholds")
    # predictors
    rank: int | None = Field(None, ge=1, description="predictor rank (default d/32, at least 32)")
    rank_last: int | None = Field(None, ge=1, description="rank of the last layers (default d/4)")
    last_layers: int | None = Field(None, ge=0, description="how many last layers get rank_last "
                                                            "(default n_layers/8, at least 1)")
    max_rank: int | None = Field(None, ge=1, description="escalation cap (default min(d, n_neurons))")
    max_escalations: int = Field(2, ge=0, description="rank doublings for layers that miss the recall target")
    recall: float = Field(0.99, gt=0.0, lt=1.0, description="predictor recall target on held-out pairs")
    threshold: float | None = Field(None, gt=0.0, lt=1.0, description="fixed predictor threshold instead "
                                                                     "of calibrating to the recall target")
    density_ratio: float = Field(3.0, gt=0.0, description="escalate when recall at ratio x true density "
                                                          "misses the target")
    epochs: int = Field(8, ge=1)
    sweep: tuple[float, ...] = Field((0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
                                     description="recall targets of the sparsity-accuracy sweep")
    gated_sweep: tuple[float, ...] = Field((0.7, 0.8), description="gated FFNs: recall targets added to the sweep "
                                                                   "(their labels cover half the neurons or more: "
                                                                   "recall 0.99 predicts nearly all of them)")
    # bundling and runtime
    order: Literal["frequency", "coactivation", "identity"] = "frequency"
    quantize: Literal["int8", "int4"] | None = Field(None, description="FFN bundle rows quantized group-wise "
                                                                      "(int8 symmetric, int4 with offsets; scales "
                                                                      "inside each row); the accuracy gate judges "
                                                                      "the quantized artifact")
    quantize_method: Literal["gptq", "rtn"] = Field("gptq", description="with quantize: 'gptq' compensates each "
                                                    "row's rounding on the calibration rows (flashio.gptq), 'rtn' "
                                                    "rounds each weight to nearest")
    group_size: int | None = Field(None, ge=1, description="elements per scale along d_model (default: int8 the "
                                                           "whole part of the row, int4 32 where it divides "
                                                           "d_model)")
    quantize_resident: Literal["none", "int8", "int4"] | None = Field(None, description="resident matrices (attention, "
                                                                                "head, token embeddings): int8 "
                                                                                "with quantize unless "
                                                                                "'none'")
    two_level_scales: bool = Field(False, description="int4 rows and int4 resident matrices with two-level scales: "
                                                      "each group's scale and offset a 6-bit multiple of its "
                                                      "super-block's fp16 steps (4.5 bits per weight against 5)")
    window: int | None = Field(None, ge=1, description="sliding window (tokens) for evaluation and generation "
                                                         "(default: chosen per model from the calibration trace, "
                                                         "the fewest bytes read that fit ffn_dram_fraction)")
    ffn_dram_fraction: float = Field(0.5, gt=0.0, le=1.0, description="DRAM the FFN may hold (window caches), as a "
                                                                      "fraction of its bytes: limits the window")
    methods: tuple[Literal["active", "contribution", "exact-gate", "exact-gate-up"], ...] | None = Field(
        None, description="what to try: predictors on 'active' labels (|act| above the threshold: gate magnitude "
                          "when gated) and, gated FFNs only, on 'contribution' labels (top-k by |act(gate)·up|), "
                          "'exact-gate' (gate rows resident, the gate computed densely, up + down read) and "
                          "'exact-gate-up' (the same ranked by |act(gate)·up| against a resident int4 copy of "
                          "the up rows); default all four when gated, else active; the cheapest within the "
                          "budget is published")
    per_layer_density: bool = Field(True, description="gated FFNs: per-layer densities of the contribution labels "
                                                      "(greedy, as accurate as gated_density everywhere, fewer bytes)")
    frontier_samples: int = Field(4, ge=0, description="held-out sequences of the exact-oracle frontier (gated "
                                                       "FFNs; 0: not measured)")
    # evaluation
    budget: AccuracyBudgetConfig = Field(default_factory=AccuracyBudgetConfig)
    sweep_samples: int = Field(4, ge=1, description="held-out sequences per sweep point")
    confirmations: int = Field(3, ge=1, description="configurations measured on every held-out row before "
                                                    "publishing: the sweep's cheapest passing one, and when it "
                                                    "misses the budget there, the next cheapest, up to this many")
    zero_shot: tuple[str, ...] = Field((), description="multiple-choice task specs '[name=]data'")
    zero_shot_limit: int = Field(100, ge=1)
    # publishing
    registry: str = Field(DEFAULT_REGISTRY, description="registry URI: a directory, file:// or s3://")
    registry_endpoint: str | None = None
    name: str | None = Field(None, description="registry model name (default: the source's)")
    version: str | None = Field(None, description="registry version (default: a UTC timestamp)")
    aliases: tuple[str, ...] = ()
    prompt: str | None = Field(None, description="generate a continuation with the published artifact")
    max_new_tokens: int = Field(32, ge=1)
    # execution
    work_dir: Path = Field(default_factory=default_work_dir, description="stage outputs (content-addressed)")
    workers: int = Field(1, ge=1, description="parallel tasks (threads; or Dask workers with dask=True)")
    dask: bool = Field(False, description="run the tasks on a local Dask cluster (prefect-dask)")
    dask_address: str | None = Field(None, description="an existing Dask scheduler instead of a local cluster")
    skip_published: bool = Field(False, description="convert only when the registry holds no version with this "
                                                    "conversion's lineage key (source files, calibration, "
                                                    "pipeline config, package version)")
    force: bool = Field(False, description="recompute every stage, ignoring (and overwriting) cached results: "
                                           "the stage directories in work_dir and Prefect's result cache")

    @model_validator(mode="after")
    def _check(self) -> ConvertConfig:
        if any(not 0.0 < r < 1.0 for r in (*self.sweep, *self.gated_sweep)):
            raise ValueError(f"sweep recall targets must be in (0, 1): {self.sweep} {self.gated_sweep}")
        if self.rank is not None and self.max_rank is not None and self.rank > self.max_rank:
            raise ValueError(f"rank {self.rank} exceeds max_rank {self.max_rank}")
        return self

    def methods_for(self, gated: bool) -> tuple[str, ...]:
        """The predictor labels this conversion tries on a model (contribution needs a gated FFN)."""
        if self.methods is None:
            return ("active", "contribution", "exact-gate", "exact-gate-up") if gated else ("active",)
        if not gated and {"contribution", "exact-gate", "exact-gate-up"} & set(self.methods):
            from tasks.errors import InputError

            raise InputError("methods: 'contribution', 'exact-gate' and 'exact-gate-up' need a gated FFN (act(gate)·up); this "
                             "model's FFN is not gated: use --methods active")
        return tuple(dict.fromkeys(self.methods))

    def heldout_spec(self) -> str | None:
        if self.heldout is not None:
            return self.heldout
        if self.calibration == "stdlib" or self.calibration.startswith("stdlib:"):
            return "stdlib:heldout"
        return None

    def lineage(self) -> dict:
        """The pipeline config as it goes into the manifest: what decides the artifact's content
        (no machine-local paths, nothing about where it is published)."""
        return self.model_dump(mode="json", exclude=EXECUTION_FIELDS)

    # -- the typed options of each step (frozen dataclasses of tasks/) ---------------------------
    def activation_options(self, ffn_dim: int):
        from tasks.activations import ActivationOptions

        stride = self.coactivation_stride
        if stride is None:  # co-activation counts are N x N per layer: only when cheap or needed
            stride = 16 if self.order == "coactivation" or ffn_dim <= 4096 else 0
        return ActivationOptions(dtype=self.source_dtype, batch_sequences=self.batch_samples,
                                 coactivation_stride=stride, torch_threads=self.torch_threads)

    def sweep_for(self, gated: bool) -> tuple[float, ...]:
        """The recall targets of the sweep: `sweep`, and `gated_sweep` too on gated FFNs."""
        return tuple(sorted({*self.sweep, *self.gated_sweep})) if gated else tuple(self.sweep)

    def predictor_options(self, n_layers: int, dim: int, ffn_dim: int, labels: str = "active", gated: bool = False):
        from tasks.predictors import PredictorOptions, default_ranks

        ranks = default_ranks(n_layers, dim, ffn_dim=ffn_dim, rank=self.rank, rank_last=self.rank_last,
                              last_layers=self.last_layers)
        return PredictorOptions(ranks=ranks, max_rank=self.max_rank or min(dim, ffn_dim), recall_target=self.recall,
                                threshold=self.threshold, density_ratio=self.density_ratio,
                                max_escalations=self.max_escalations, epochs=self.epochs,
                                sweep_recalls=self.sweep_for(gated), seed=self.seed, labels=labels)

    def quantization(self) -> dict[str, Any] | None:
        """The writer's quantization options (None: the artifact keeps the storage dtype)."""
        if self.quantize is None:
            return None
        return {"quantize": self.quantize, "group_size": self.group_size, "quantize_resident": self.quantize_resident,
                "method": self.quantize_method, "two_level_scales": self.two_level_scales}

    def eval_options(self, window: int | None = None, gated: bool = False):
        """`window`: the one chosen from the trace (0: caching off), unless the config fixes one."""
        from tasks.evaluation import EvalOptions

        w = self.window if self.window is not None else (5 if window is None else window)
        return EvalOptions(window=max(1, w), reuse=w > 0, sweep_recalls=self.sweep_for(gated), sweep_sequences=self.sweep_samples,
                           zero_shot=tuple(self.zero_shot), zero_shot_limit=self.zero_shot_limit)

    def accuracy_budget(self):
        from tasks.evaluation import AccuracyBudget

        return AccuracyBudget(max_perplexity_increase=self.budget.max_perplexity_increase,
                              min_top1_agreement=self.budget.min_top1_agreement)
