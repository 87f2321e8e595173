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
from typing import Any

from flashio.costmodel import DeviceProfile
from flashio.device import parse_device
from flashio.dtypes import TORCH_DTYPES, dtype_name, torch_dtype
from flashio.errors import FlashError
from flashio.sizes import parse_size


class Mode(enum.StrEnum):
    """How the FFN is run (the same artifact in every mode); equal to its name ('sparse')."""

    DENSE = "dense"  # every FFN weight in memory: the reference
    NAIVE = "naive"  # each step reads every layer's whole FFN from flash: the paper's baseline
    SPARSE = "sparse"  # predictor + window cache + reads of the missing bundles: the product
    ORACLE = "oracle"  # as sparse, with the exact active set (tests; equals dense for ReLU models)
    MMAP = "mmap"  # the FFN file memory-mapped and paged by the OS (for comparison; CPU only)


MODES = tuple(m.value for m in Mode)


@dataclass(frozen=True)
class FlashConfig:
    """Every option of `flashio.open`. Invalid values raise FlashError when the config is built.

    mode: see `Mode` (a Mode or its name).
    window: tokens a neuron stays cached after it was last predicted active (>= 1).
    dram_budget: bytes, or a size such as '2GiB', for resident weights, KV cache, predictors and
      window caches in the memory of `device` (see flashio.budget); None: unbounded.
    threads, max_gap: flash reader threads, and unneeded rows worth reading through when
      coalescing neighbours. None: chosen by the cost model of `device_profile` (a file from
      `flashio bench device`, or $FLASHIO_DEVICE_PROFILE); without a profile 16 and 0.
    device: 'cpu' or 'cuda[:N]': where resident weights, KV cache, predictors and window caches
      live and the model computes (flash reads then pass through pinned host staging).
    verify: check every file's sha256 when opening. max_context: KV cache length (None: the model's).
    direct: O_DIRECT reads (False: buffered, through the page cache).
    compute_dtype: dtype of weights in memory and of the matmuls ('float16', 'bfloat16', 'float32'
      or a torch dtype; None: the artifact's), e.g. 'bfloat16' for a float16 artifact on CPUs whose
      fp16 matmuls are slow. Rows are converted once when they arrive.
    device_profile: a device profile file (or a DeviceProfile) for the read plan.
    reuse: False disables the window (every step loads its whole active set).
    bundled: False reads a neuron's up and down parts as two requests (the unbundled baseline).
    overlap: compute the cached rows while the missing ones are read.
    pinned_fraction: naive mode only: this fraction of every layer's rows stays in memory ("hybrid").
    record_trace: keep every step's active sets (`model.trace()` returns them).
    torch_threads: torch.set_num_threads(n) once when the model is opened. torch's thread count is
      process-wide: it then applies to every torch call of the process, not only this model's.
      None (default): flashio leaves it as it is.
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
    overlap: bool = False
    pinned_fraction: float = 0.0
    record_trace: bool = False
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are stored once, here
        try:
            set_(self, "mode", Mode(self.mode))
        except (ValueError, TypeError):
            raise FlashError(f"mode {str(self.mode)!r} is not one of {', '.join(MODES)}") from None
        for name in ("window", "threads", "max_gap", "max_context", "torch_threads"):
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
        for name in ("max_context", "torch_threads"):
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
        for name in ("verify", "direct", "reuse", "bundled", "overlap", "record_trace"):
            if not isinstance(getattr(self, name), bool):
                raise FlashError(f"{name} must be True or False, got {getattr(self, name)!r}")

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
