"""What `flashio bench model` gives each configuration: DRAM limit, runtime budget, compute dtype.

The paper runs with about half of the model in DRAM. Here the limit is half of the model's
weights (resident + FFN, as stored) plus the runtime's fixed overhead, which is not weights: the
interpreter with torch loaded (measured in a child process), the KV cache of the run, the
predictors, the staging rows of a dtype conversion and a slack for allocator and thread stacks.
The runtime's own `dram_budget` is the limit minus the interpreter and the slack, so that what
the runtime counts (resident + predictors + KV + caches) is what the cgroup has room for.
Every term the runtime holds comes from flashio.budget.MemoryBudget (the formula `dram_budget`
is checked against), estimated from the artifact's file sizes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from flashio.bench.floor import tensor_infos
from flashio.budget import MemoryBudget
from flashio.config import Mode
from flashio.dtypes import TORCH_DTYPES
from flashio.errors import FlashError
from flashio.ffn import ffn_compute
from flashio.format import Artifact
from flashio.quant import linear
from flashio.sizes import format_size

SLACK_BYTES = 256 << 20  # allocator caches, thread stacks, activations, reader scratch
_BASELINE_PROBE = (
    "import torch, numpy, flashio.runtime, flashio.bench.worker\n"
    "torch.ones(64, 64) @ torch.ones(64, 64)\n"
    "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS')][0])\n"
)


def process_baseline_bytes() -> int:
    """RSS of a fresh interpreter with torch and the runtime imported (what every worker pays)."""
    try:
        out = subprocess.run([sys.executable, "-c", _BASELINE_PROBE], capture_output=True, text=True,
                             check=True, timeout=300)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        raise FlashError(f"could not measure the interpreter's baseline memory: {exc}") from None


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def plan_memory(art: Artifact, compute_dtype: str, *, max_context: int, window: int,
                limit_bytes: int | None = None, weights_fraction: float = 0.5,
                baseline_bytes: int | None = None, device: str = "cpu") -> dict:
    """Limit, runtime budget, hybrid's pinned fraction and whether dense fits (all in bytes).
    device 'cuda[:N]': the limit is GPU memory, and dense fits if the GPU has room for it."""
    m = art.manifest
    cdt = TORCH_DTYPES[compute_dtype]
    resident = m.files[m.resident_file].size_bytes
    ffn = m.files[m.ffn_file].size_bytes
    preds = m.files[m.predictors_file].size_bytes if m.predictors_file else 0
    model = resident + ffn
    sparse = MemoryBudget.estimate(art, Mode.SPARSE, cdt, max_context)
    dense = MemoryBudget.estimate(art, Mode.DENSE, cdt, max_context)
    naive = [MemoryBudget.estimate(art, Mode.NAIVE, cdt, max_context, pinned_fraction=f) for f in (0.0, 1.0)]
    # the window cache rows that the weights' share pays for, and where those rows land before
    # their dtype conversion (the sparse engine's staging: not weights, so part of the overhead)
    cache_rows = min(sparse.n_neurons, max(0, int(weights_fraction * model) - sparse.resident_bytes)
                     // sparse.engine.row_bytes)
    staging = cache_rows * sparse.engine.staging_row_bytes
    baseline = process_baseline_bytes() if baseline_bytes is None else baseline_bytes
    overhead = baseline + SLACK_BYTES + sparse.kv_bytes + sparse.predictor_bytes + staging
    limit = limit_bytes if limit_bytes is not None else int(weights_fraction * model) + overhead
    budget = limit - baseline - SLACK_BYTES
    floor = sparse.minimum_bytes()  # the runtime's own minimum (resident, KV, predictors, smallest cache)
    if budget < floor:
        raise FlashError(f"a DRAM limit of {format_size(limit)} leaves {format_size(budget)} for the runtime, "
                         f"less than the {format_size(floor)} it needs (resident weights, KV cache, predictors "
                         "and a 5% window cache): raise --dram-limit or --dram-fraction")
    # hybrid: naive's need grows linearly with the pinned fraction, from one streamed layer to the whole FFN
    low, high = (b.minimum_bytes() for b in naive)
    pinned = (budget - low) / max(high - low, 1)
    dense_bytes = dense.minimum_bytes() + baseline + SLACK_BYTES
    available = _available_bytes() if device == "cpu" else _free_device_bytes(device)
    capacity = sparse.capacity(budget)
    return {"model_bytes": model, "resident_bytes": resident, "ffn_bytes": ffn, "predictor_bytes": preds,
            "kv_bytes": sparse.kv_bytes, "process_baseline_bytes": baseline, "slack_bytes": SLACK_BYTES,
            "staging_bytes": staging, "overhead_bytes": overhead, "limit_bytes": int(limit),
            "limit_rule": "given" if limit_bytes is not None else f"{weights_fraction:g} x model + fixed overhead",
            "budget_bytes": int(budget), "window_cache_rows": capacity,
            "window_cache_fraction": capacity / sparse.n_neurons,
            "hybrid_pinned_fraction": round(min(max(0.98 * pinned, 0.0), 1.0), 4),
            "dense_bytes": dense_bytes, "available_bytes": available,
            "dense_fits": dense_bytes + (1 << 30) < available, "window": window}


def _free_device_bytes(device: str) -> int:
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


CONVERSION_MARGIN = 0.15  # bfloat16's lead over the float16 storage that pays for converting its reads


def choose_compute_dtype(art: Artifact, requested: str = "auto", *, device: str = "cpu") -> dict:
    """The dtype of weights in memory and of the matmuls. 'auto': the storage dtype, except for
    float16 storage on the CPU, where one layer's one-token work is timed in float16 and bfloat16
    (pick_dtype; float32 would double the DRAM): the FFN on a cache-sized block of bundle rows
    (flashio.ffn.ffn_compute) plus the attention's projections (the runtime's linear on matrices
    of the artifact's q/k/v/o shapes). Both count: on CPUs whose bfloat16 matmuls are slow the
    FFN products can be even while the projections differ 2x."""
    m = art.manifest
    if requested != "auto":
        if requested not in TORCH_DTYPES:
            raise FlashError(f"compute dtype {requested!r} is not one of auto, {', '.join(TORCH_DTYPES)}")
        return {"chosen": requested, "reason": "given"}
    if device != "cpu":
        return {"chosen": m.dtype, "reason": f"the artifact's dtype ({m.dtype}) on {device}"}
    if m.dtype != "float16":
        return {"chosen": m.dtype, "reason": f"the artifact's dtype ({m.dtype})"}
    L = m.ffn_layers[0]
    rows = min(L.n_neurons, 4096)
    parts = {name: slice(a, b) for name, a, b in m.bundle_layout}
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, m.bundle_layout[-1][2], generator=gen) * 0.02  # a float row's elements
    h = torch.randn(1, art.args.dim, generator=gen)
    proj = [torch.randn(*shape, generator=gen) * 0.02 for shape in _projection_shapes(art)]
    inputs = {}
    for name in ("float16", "bfloat16"):
        dt = TORCH_DTYPES[name]
        x, w, ps = inputs[name] = (h.to(dt), base.to(dt), [p.to(dt) for p in proj])
        _layer(x, w, parts, ps)  # warm-up
    # the two timed in turn and each by its fastest run: timed one after the other, a burst of
    # other work on a shared machine fell on one of them and flipped the choice between runs
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(9):
        for name, (x, w, ps) in inputs.items():
            t0 = time.perf_counter()
            _layer(x, w, parts, ps)
            times[name].append(time.perf_counter() - t0)
    ms = {name: round(1e3 * min(t), 3) for name, t in times.items()}
    chosen = pick_dtype(ms)
    what = f"one layer (FFN on {rows} rows + {len(proj)} attention projections)"
    return {"chosen": chosen, "reason": f"{what}: " + ", ".join(f"{k} {v} ms" for k, v in ms.items())
            + f" (bfloat16 needs a {CONVERSION_MARGIN:.0%} lead: its reads are converted)", "layer_ms": ms}


def pick_dtype(layer_ms: dict[str, float]) -> str:
    """float16 (the storage's) unless bfloat16's layer is faster by more than CONVERSION_MARGIN:
    bfloat16 rows are read into a staging buffer and converted into the cache, where float16 ones
    land in it directly (Llama-2-7B shape, half DRAM: memory management 6 -> 60-80 ms of a
    ~450 ms token, while the two layer times were within 5%)."""
    return "bfloat16" if layer_ms["bfloat16"] * (1 + CONVERSION_MARGIN) < layer_ms["float16"] else "float16"


def _layer(x: torch.Tensor, rows: torch.Tensor, parts: dict[str, slice], projections: list[torch.Tensor]) -> None:
    ffn_compute(x, rows, parts, None, None)
    for p in projections:
        linear(x.new_ones(1, p.shape[1]), p)


def _projection_shapes(art: Artifact) -> list[tuple[int, ...]]:
    """Shapes of layer 0's 2-D attention matrices (q, k, v, o; those present)."""
    infos = tensor_infos(art.file(art.manifest.resident_file))
    return [tuple(info.shape) for key, info in sorted(infos.items())
            if key.startswith("layers.0.attn.") and key.endswith(".weight") and len(info.shape) == 2]


def row_line(row: dict) -> str:
    """One line of progress for a finished configuration."""
    if not row.get("ok"):
        return f"{row['name']:12s} FAILED: {row.get('error')}"
    p = row["per_token"]
    return (f"{row['name']:12s} {p['total_ms']:8.1f} ms/token (I/O {p['io_ms']:.1f}, mem {p['mem_ms']:.1f}, "
            f"compute {p['compute_ms']:.1f}), {p['bytes_read'] / 1e6:.1f} MB/token, "
            f"{p['reads']:.0f} reads/token, {row['tokens']} tokens"
            + (f"; DRAM {row['dram_bytes_per_token'] / 1e9:.3f} GB/token, floor {row['floor_ms']:.1f} ms "
               f"(x{row['total_vs_floor']:.2f})" if row.get("floor_ms") else ""))
