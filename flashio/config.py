"""How an artifact is opened: one frozen, validated, serialisable configuration.

    cfg = flashio.FlashConfig(mode="sparse", window=5, dram_budget="512MiB")
    with flashio.open("artifacts/demo", cfg) as model: ...
    with flashio.open("artifacts/demo", cfg, window=3) as model: ...   # fields overridden by keyword
    with flashio.open("artifacts/demo", mode="dense") as model: ...    # keywords alone: the defaults + those

Every option is checked once, in `FlashConfig.__post_init__`, and normalised (mode to a `Mode`,
sizes to bytes, dtypes to their manifest names, devices and paths to strings), so that the CLI, the
benchmark's worker (which receives it as JSON: `to_dict` / `from_dict`) and the pipeline's
evaluation open a model the same way. What is not an option but an object of the caller's process
(an active-set source, a registry URI to resolve the path against) is passed to `flashio.open` apart.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashio.costmodel import DeviceProfile
from flashio.device import parse_device
from flashio.dtypes import TORCH_DTYPES, dtype_name, torch_dtype
from flashio.errors import FlashError
from flashio.sizes import parse_size

if TYPE_CHECKING:
    from flashio.format import Manifest


class Mode(enum.StrEnum):
    """How the FFN is run (the same artifact in every mode); equal to its name ('sparse')."""

    DENSE = "dense"  # every FFN weight in memory: the reference
    NAIVE = "naive"  # each step reads every layer's whole FFN from flash: the paper's baseline
    SPARSE = "sparse"  # predictor + window cache + reads of the missing bundles: the product
    ORACLE = "oracle"  # as sparse, with the exact active set (tests; equals dense for ReLU models)
    MMAP = "mmap"  # the FFN file memory-mapped and paged by the OS (for comparison; CPU only)


MODES = tuple(m.value for m in Mode)
COMPUTE_ROWS = ("window", "active")  # FlashConfig.compute: which cached rows the FFN runs on


class Selection(enum.StrEnum):
    """How a windowed mode chooses each step's neurons (flashio.exact for the exact ones).

    The exact selections score every neuron from weights in DRAM: |act(gate)| (the activation's
    input projection: up for ReLU FFNs) or the contribution |act(gate) * (x @ up)|, and keep per
    token those above the layer's threshold (manifest active_threshold) or the top `density`
    fraction (FlashConfig.density, else the manifest's per-layer densities)."""

    PREDICTOR = "predictor"  # sparse: the low-rank predictor (sigmoid > threshold); bundles read whole
    GATE = "gate"  # sparse: exact gate from resident gate rows, up + down read (a gate-resident artifact)
    GATE_PREDICTOR = "gate+predictor"  # sparse: exact gate and the predictor (both, or ranked by their product)
    GATE_UP = "gate+up"  # sparse: exact gate ranked by contribution against the artifact's resident up sketch
    CONTRIBUTION = "contribution"  # oracle: |act(gate) * (x @ up)| computed densely (the report's lower bound)


# what each mode may be asked for; the first is the default when the artifact does not decide
MODE_SELECTIONS = {Mode.SPARSE: (Selection.PREDICTOR, Selection.GATE, Selection.GATE_PREDICTOR, Selection.GATE_UP),
                   Mode.ORACLE: (Selection.GATE, Selection.CONTRIBUTION)}


@dataclass(frozen=True)
class FlashConfig:
    """Every option of `flashio.open`. Invalid values raise FlashError when the config is built.

    mode: see `Mode` (a Mode or its name).
    window: tokens a neuron stays cached after it was last predicted active (>= 1).
    dram_budget: bytes, or a size such as '2GiB', for resident weights, KV cache, predictors and
      window caches in the memory of `device` (see flashio.budget); None: unbounded.
    threads, max_gap: flash reader threads, and unneeded rows worth reading through when
      coalescing neighbours. None: the cost model's choice for the bundle size, priced with
      `device_profile`, else $FLASHIO_DEVICE_PROFILE, else the profile `flashio bench device`
      installed (flashio.costmodel.default_profile_path()), else the built-in model of the
      developers' machine class (32 threads and gap reads of up to 1 row for 16 KiB bundles).
    device: 'cpu' or 'cuda[:N]': where resident weights, KV cache, predictors and window caches
      live and the model computes (flash reads then pass through pinned host staging).
    verify: check every file's sha256 when opening. max_context: KV cache length (None: the model's).
    direct: O_DIRECT reads (False: buffered, through the page cache).
    compute_dtype: dtype of weights in memory and of the matmuls ('float16', 'bfloat16', 'float32'
      or a torch dtype; None: the artifact's), e.g. 'bfloat16' for a float16 artifact on CPUs whose
      fp16 matmuls are slow. Rows are converted once when they arrive.
    device_profile: a device profile file (or a DeviceProfile) for the read plan (None: the one
      found as `threads` says).
    reuse: False disables the window (every step loads its whole active set).
    bundled: False reads a neuron's up and down parts as two requests (the unbundled baseline).
    overlap: compute the cached rows while the missing ones are read (default; False: read, then
      compute, the paper's step without this project's overlap).
    retain: rows of neurons that left the window stay in the window cache while it has room, and
      are not read again when those neurons return (default; they are not computed: see
      `compute`). False: they leave with the window, as in the paper.
    compute: which cached rows the FFN runs on. 'window' (default): every row of the window
      (neurons predicted active in any of the last `window` steps; the extra rows are exact
      contributions of neurons the step's prediction left out); 'active': the step's predicted
      set only (the paper's), about half the FFN's DRAM traffic, a little less accurate where the
      predictor misses neurons.
    lookahead: start each layer's reads before its attention, for the neurons its predictor (or
      exact gate, or active source) picks from the layer's input through the FFN's norm (the
      residual stream changes little across one attention block); neurons the FFN's own input
      then needs that were not read are read at the FFN. The step computes what it would without
      the lookahead (the wrong guesses only cost reads, and stay cached outside the window); a
      layer stops guessing where its guesses waste reads or cost more time than the reads they
      hide (measured as it runs, flashio.sparse.WASTE_LIMIT). With `overlap` and `retain`, on the
      CPU with rows kept as stored (elsewhere it is ignored). Default True.
    preload: with a dram_budget whose window caches hold every FFN row (and retain), read all of
      them when the model is opened, a layer at a time in large sequential reads, and keep them
      across sequences: no step reads from flash (default). False: read on demand, as without a
      budget.
    pinned_fraction: naive mode only: this fraction of every layer's rows stays in memory ("hybrid").
    record_trace: keep every step's active sets (`model.trace()` returns them).
    torch_threads: torch.set_num_threads(n) once when the model is opened. torch's thread count is
      process-wide: it then applies to every torch call of the process, not only this model's.
      None (default): flashio leaves it as it is.
    compute_threads: the threads flashio's native kernels split a token's matrix-vector products
      over (flashio.kernels.set_threads; process-wide, set when the model is opened). None
      (default): every CPU the process may run on, at most 8. torch's own ops stay on torch_threads.
    selection: modes 'sparse' and 'oracle': how each step's neurons are chosen (see `Selection`).
      None: the artifact decides (its manifest's selection; 'gate' when its gate rows are resident,
      else 'predictor'); 'oracle' defaults to 'gate'.
    density: with an exact selection: the fraction of each layer's neurons kept per token (top-k),
      one number or one per layer, instead of the manifest's per-layer densities or thresholds.
    """

    mode: Mode = Mode.SPARSE
    window: int = 5
    dram_budget: int | None = None
    threads: int | None = None
    max_gap: int | None = None
    device: str = "cpu"
    verify: bool = False
    max_context: int | None = None
    direct: bool = True
    compute_dtype: str | None = None
    device_profile: str | DeviceProfile | None = None
    reuse: bool = True
    bundled: bool = True
    overlap: bool = True
    retain: bool = True
    compute: str = "window"
    lookahead: bool = True
    preload: bool = True
    pinned_fraction: float = 0.0
    record_trace: bool = False
    torch_threads: int | None = None
    compute_threads: int | None = None
    selection: Selection | None = None
    density: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are stored once, here
        try:
            set_(self, "mode", Mode(self.mode))
        except (ValueError, TypeError):
            raise FlashError(f"mode {str(self.mode)!r} is not one of {', '.join(MODES)}") from None
        for name in ("window", "threads", "max_gap", "max_context", "torch_threads", "compute_threads"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool):
                    raise FlashError(f"{name} must be an integer, got {value!r}")
                try:
                    set_(self, name, operator.index(value))
                except TypeError:
                    raise FlashError(f"{name} must be an integer, got {value!r}") from None
        if self.window < 1:
            raise FlashError(f"window must be at least 1 token, got {self.window}")
        if (self.threads is not None and self.threads < 1) or (self.max_gap is not None and self.max_gap < 0):
            raise FlashError(f"threads={self.threads} must be >= 1 and max_gap={self.max_gap} >= 0")
        for name in ("max_context", "torch_threads", "compute_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise FlashError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dram_budget is not None:
            set_(self, "dram_budget", parse_size(self.dram_budget))
        try:
            set_(self, "pinned_fraction", float(self.pinned_fraction))
        except (TypeError, ValueError):
            raise FlashError(f"pinned_fraction must be a number in [0, 1], got {self.pinned_fraction!r}") from None
        if not 0.0 <= self.pinned_fraction <= 1.0 or (self.pinned_fraction and self.mode != Mode.NAIVE):
            raise FlashError(f"pinned_fraction={self.pinned_fraction} must be in [0, 1] and is for mode='naive' only")
        device = parse_device(self.device)
        set_(self, "device", str(device))
        if device.type != "cpu" and self.mode == Mode.MMAP:
            raise FlashError("mode='mmap' runs on the CPU only (the OS pages the FFN into host memory); "
                             "with device='cuda' use mode='sparse', 'naive', 'oracle' or 'dense'")
        if self.compute_dtype is not None:
            try:
                set_(self, "compute_dtype", dtype_name(torch_dtype(self.compute_dtype)))
            except FlashError:
                raise FlashError(f"compute_dtype {self.compute_dtype!r} is not one of {sorted(TORCH_DTYPES)}") from None
        if isinstance(self.device_profile, Path):
            set_(self, "device_profile", str(self.device_profile))
        elif self.device_profile is not None and not isinstance(self.device_profile, (str, DeviceProfile)):
            raise FlashError(f"device_profile must be a file path or a DeviceProfile, got "
                             f"{type(self.device_profile).__name__}")
        for name in ("verify", "direct", "reuse", "bundled", "overlap", "retain", "lookahead", "preload",
                     "record_trace"):
            if not isinstance(getattr(self, name), bool):
                raise FlashError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.compute not in COMPUTE_ROWS:
            raise FlashError(f"compute {self.compute!r} is not one of {', '.join(COMPUTE_ROWS)}")
        self._check_selection()

    def _check_selection(self) -> None:
        set_ = object.__setattr__
        allowed = MODE_SELECTIONS.get(self.mode, ())
        if self.selection is not None:
            try:
                set_(self, "selection", Selection(self.selection))
            except (ValueError, TypeError):
                raise FlashError(f"selection {str(self.selection)!r} is not one of "
                                 f"{', '.join(s.value for s in Selection)}") from None
            if self.selection not in allowed:
                raise FlashError(f"selection={self.selection.value!r} is not for mode={self.mode.value!r}; "
                                 + "; ".join(f"mode={m.value!r} takes {', '.join(s.value for s in v)}"
                                             for m, v in MODE_SELECTIONS.items()))
        if self.density is None:
            return
        raw = self.density if isinstance(self.density, (list, tuple)) else (self.density,)
        try:
            values = tuple(float(v) for v in raw)
        except (TypeError, ValueError):
            raise FlashError(f"density must be a fraction in (0, 1] or one per layer, got {self.density!r}") from None
        if not values or not all(0.0 < v <= 1.0 for v in values) or any(isinstance(v, bool) for v in raw):
            raise FlashError(f"density must be a fraction in (0, 1] or one per layer, got {self.density!r}")
        set_(self, "density", values if isinstance(self.density, (list, tuple)) else values[0])
        if not allowed or self.selection == Selection.PREDICTOR:
            raise FlashError(f"density applies to the exact selections (gate, gate+predictor, contribution) of "
                             f"modes 'sparse' and 'oracle', not to mode={self.mode.value!r} with "
                             f"selection={self.selection and self.selection.value!r}; use the predictor's "
                             "thresholds (FlashModel.set_predictor_thresholds) instead")

    def replace(self, **overrides: Any) -> FlashConfig:
        """A copy with some fields changed (validated again); FlashError names the valid fields
        when a keyword is not one of them."""
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise FlashError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(field_names())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: the mode's name, a device profile as its JSON."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mode"] = self.mode.value
        out["selection"] = self.selection and self.selection.value
        if isinstance(self.density, tuple):
            out["density"] = list(self.density)
        if isinstance(self.device_profile, DeviceProfile):
            out["device_profile"] = self.device_profile.to_json()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlashConfig:
        """The inverse of to_dict; unknown keys are an error (a misspelt option is not ignored)."""
        if not isinstance(d, dict):
            raise FlashError(f"a FlashConfig is read from a dict, got {type(d).__name__}")
        d = dict(d)
        if isinstance(d.get("device_profile"), dict):
            d["device_profile"] = DeviceProfile.from_json(d["device_profile"])
        return cls().replace(**d)


def field_names() -> tuple[str, ...]:
    """The options a FlashConfig has (the keywords `flashio.open` accepts besides its own)."""
    return tuple(f.name for f in fields(FlashConfig))


def resolve_selection(config: FlashConfig, manifest: Manifest) -> Selection | None:
    """The selection `config` runs on the artifact of `manifest` (None for the modes without one),
    checked against the artifact: FlashError names what is missing and the fix."""
    allowed = MODE_SELECTIONS.get(config.mode)
    if allowed is None:
        return None
    sel = config.selection
    if sel is None and config.mode == Mode.SPARSE:
        sel = Selection(manifest.selection or ("gate" if manifest.gate_resident else "predictor"))
    sel = sel or allowed[0]
    if config.mode == Mode.SPARSE and sel != Selection.PREDICTOR and not manifest.gate_resident:
        raise FlashError(f"selection={sel.value!r} computes the gate from resident gate rows and this artifact "
                         "keeps them in its flash bundles; pack it with `flashio pack --gate-resident` (or the "
                         "pipeline's gate_resident bundling), or use selection='predictor' / mode='oracle'")
    if sel == Selection.GATE_UP and manifest.up_sketch is None:
        raise FlashError("selection='gate+up' ranks neurons against an up sketch this artifact lacks; pack it with "
                         "`flashio pack --gate-resident --up-sketch int4`, or use selection='gate'")
    if sel == Selection.PREDICTOR and config.density is not None:
        raise FlashError("density applies to the exact selections; this artifact's mode='sparse' uses its "
                         "predictor (selection='predictor'): pass selection='gate' on a gate-resident artifact")
    densities = layer_densities(config, manifest)
    if sel == Selection.CONTRIBUTION and None in densities:
        raise FlashError("selection='contribution' keeps the top fraction of each layer's neurons by contribution: "
                         "give density=... (the manifest records no density for some layers)")
    return sel


def layer_densities(config: FlashConfig, manifest: Manifest) -> list[float | None]:
    """Per layer: the fraction of neurons an exact selection keeps per token (config.density, else
    the manifest's), or None where the layer's threshold decides."""
    n = manifest.n_layers
    if isinstance(config.density, tuple):
        if len(config.density) != n:
            raise FlashError(f"density has {len(config.density)} values for a model of {n} layers")
        return list(config.density)
    if config.density is not None:
        return [config.density] * n
    return [L.density for L in manifest.ffn_layers]
