"""The DRAM bytes a token touches and the time floor they imply (`flashio bench model`'s floor columns).

    traffic = TokenTraffic.of(art, "sparse", "float16")
    terms = traffic.step_bytes(step, context=12)            # step: a StepStats as a dict
    floor = floor_ms(terms, profile, threads=2, io_ms=step["io_ms"])

Per generated token (one step, context c = the tokens the KV cache holds after it), every term
in the dtype its bytes are held in (resident weights, predictors and the KV cache are converted to
the compute dtype at open):

    dram_bytes = resident + ffn + predictors + oracle + kv
    resident   = every floating tensor of resident.safetensors read whole (attention's projections
                 and biases, norms, the FFN's down bias, resident gate rows), the head (lm_head, or
                 the tied embedding matrix: all of it) and one row of each embedding table (tokens,
                 learnt positions); integer tensors (the stored neuron order) are not read per token,
                 except the int8 codes of quantized resident matrices (1 byte per element, as held)
    ffn        = rows computed x (bundle width x itemsize + one entry per FFN bias vector [N]);
                 quantized rows (format version 3) are held as stored in every mode: row_bytes
                 each (codes + scales), counted under the compute dtype (the product dequantizes
                 a chunk of rows at a time into it)
                 dense:          neurons_active rows (all), compute dtype
                 naive / hybrid: neurons_loaded streamed rows in the storage dtype (the read buffer)
                                 + (neurons_active - neurons_loaded) pinned rows in the compute dtype
                 mmap:           neurons_active rows (all) in the storage dtype (the page cache)
                 sparse, oracle: rows_computed, the step's active rows or the window's rows
                                 (FlashConfig.compute; results written before that stat: cache_rows,
                                 the window's), in the window cache: the FFN runs on them (its padding
                                 to a BUCKET_ROWS multiple is overhead, not floor; other cached rows
                                 are masked out and not read); active rows alone are `ffn_active`
    predictors = A + B + bias of every layer (sparse, when the artifact has predictors: they run
                 even when a trace supplies the active set), and again for each layer whose
                 lookahead guessed (StepStats.guesses: a second selection on the layer's input)
    oracle     = the exact activation's rows (the up or gate part of every row), oracle mode only
    kv         = 2 x kv_heads x head_dim x compute itemsize x (sum over layers of the positions each
                 reads: c, or min(c, sliding_window) in a windowed layer: every layer of an
                 architecture with a window and no layer_types, else those typed "sliding_...")

    floor_ms       = sum over dtypes of bytes_in_dtype / matvec_GBps(dtype, threads: the kernels' or torch's, the more) + io_ms
    io_ms          = the I/O the step did not hide (StepStats.io_ms: overlapped reads count only
                     the time the step waited for them)
    achieved_gbps  = dram_bytes / (total_ms - io_ms)  (the bandwidth of the token's non-I/O time)
    total_vs_floor = total_ms / floor_ms

`flashio bench model` prices each row at the bandwidth it measures right before and after the row
(flashio.bench.model.RunBandwidth); otherwise the bandwidths come from the device profile
(`flashio bench device`), or, without one or with an
older profile, from the built-in defaults (flashio.costmodel.DEFAULT_MATVEC), marked "default".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flashio.costmodel import DeviceProfile
from flashio.dtypes import ITEMSIZE, SAFETENSORS_TORCH
from flashio.errors import FlashError
from flashio.format import Artifact
from flashio.format.ffnfile import TensorInfo, read_safetensors_header

WINDOWED_MODES = ("sparse", "oracle")
_TERMS = ("attention", "norms", "head", "embeddings", "other_resident", "ffn", "predictors", "oracle", "kv")


def tensor_infos(path) -> dict[str, TensorInfo]:
    """Name -> dtype and shape of every tensor of a safetensors file (its header only)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        return read_safetensors_header(f, size, str(path))


def _numel(info: TensorInfo) -> int:
    n = 1
    for s in info.shape:
        n *= s
    return n


def resident_terms(infos: Mapping[str, TensorInfo], itemsize: int, *, tied_head: bool,
                   quantized: frozenset[str] = frozenset()) -> tuple[dict[str, int], int]:
    """Bytes read per token from the resident weights, by term, and the FFN bias entries per row
    (elements), for tensors held at `itemsize` bytes per element; `quantized`: the matrices stored
    (and held) as they are stored, 1 byte per element of the stored tensor (int8 codes, whose
    scales are floating tensors of their own; int4 rows, codes and scales together)."""
    terms = dict.fromkeys(("attention", "norms", "head", "embeddings", "other_resident"), 0)
    per_row = 0
    for name, info in infos.items():
        codes = name in quantized
        if not codes and (not SAFETENSORS_TORCH.get(info.dtype, None)
                          or not SAFETENSORS_TORCH[info.dtype].is_floating_point):
            continue  # integer tensors (the stored neuron order) serve the open, not the token
        whole = _numel(info) * (1 if codes else itemsize)
        if name in ("tok_embeddings.weight", "pos_embeddings.weight"):
            terms["embeddings"] += info.shape[-1] * (1 if codes else itemsize)  # one row per token
            if name == "tok_embeddings.weight" and tied_head:
                terms["head"] += whole  # the head multiplies by the whole matrix
        elif name in ("lm_head.weight", "lm_head.scale"):  # an untied int8 head's codes and their scales
            terms["head"] += whole
        elif name.endswith((".ffn.up_bias", ".ffn.gate_bias")):
            per_row += 1  # indexed by the rows computed: counted with the FFN
        elif ".attn." in name or ".self_attn." in name:
            terms["attention"] += whole
        elif "norm" in name:
            terms["norms"] += whole
        else:
            terms["other_resident"] += whole
    return terms, per_row


@dataclass(frozen=True)
class TokenTraffic:
    """What one configuration's tokens read from DRAM, from the artifact's manifest and headers."""

    mode: str
    compute_dtype: str
    storage_dtype: str
    resident: Mapping[str, int]  # bytes per token by term (compute dtype)
    bias_entries_per_row: int  # FFN bias vectors indexed per computed row (summed over layers: per row)
    row_elements: int  # elements of a float bundle row (the bundle layout's end)
    predictor_bytes: int  # per token, compute dtype (0 when the mode runs none)
    oracle_bytes: int  # per token, compute dtype (oracle mode's exact-activation rows)
    kv_bytes_per_position: int  # keys + values of one layer for one position, compute dtype
    n_layers: int
    sliding_window: int | None = None
    windowed_layers: int = 0  # layers whose attention reads at most sliding_window positions
    quant_row_bytes: int | None = None  # quantized rows: bytes of a row as stored and held (Manifest.row_bytes)

    @classmethod
    def of(cls, art: Artifact, mode: str, compute_dtype: str) -> TokenTraffic:
        m, args = art.manifest, art.args
        if compute_dtype not in ITEMSIZE:
            raise FlashError(f"compute dtype {compute_dtype!r} is not one of {', '.join(ITEMSIZE)}")
        c_item = ITEMSIZE[compute_dtype]
        infos = tensor_infos(art.file(m.resident_file))
        tied = "lm_head.weight" not in infos and bool(getattr(args, "tie_embeddings", False))
        quantized = frozenset(m.resident_quant.matrices) if m.resident_quant is not None else frozenset()
        resident, per_row = resident_terms(infos, c_item, tied_head=tied, quantized=quantized)
        preds = 0
        if mode == "sparse" and m.predictors_file:
            pinfo = tensor_infos(art.file(m.predictors_file))
            preds = sum(_numel(i) for i in pinfo.values()
                        if SAFETENSORS_TORCH.get(i.dtype) is not None and SAFETENSORS_TORCH[i.dtype].is_floating_point)
            preds *= c_item
        width = m.bundle_layout[-1][2]  # elements; a quantized row's bundle_width is its bytes
        oracle = 0
        if mode == "oracle":
            part = m.bundle_layout[0][2] - m.bundle_layout[0][1]
            oracle = sum(L.n_neurons for L in m.ffn_layers) * part * c_item
        kv = 2 * args.n_kv_heads * args.head_dim * c_item
        window = getattr(args, "sliding_window", None)
        window = window if isinstance(window, int) and not isinstance(window, bool) else None
        types = tuple(getattr(args, "layer_types", ()) or ())
        windowed = 0 if window is None else (sum("sliding" in str(t) for t in types) if types else args.n_layers)
        # bias entries: one per layer's vector, counted per computed row of that layer (rows are
        # summed over layers in the step statistics, so entries per row = vectors per layer)
        return cls(mode, compute_dtype, m.dtype, resident, per_row // max(m.n_layers, 1), width, preds, oracle,
                   kv, args.n_layers, window, windowed, m.row_bytes if m.quant is not None else None)

    def ffn_rows(self, step: Mapping[str, float]) -> dict[str, float]:
        """Rows the FFN multiplies this step (all layers), by the dtype they are held in."""
        c, s = self.compute_dtype, self.storage_dtype
        active, loaded = float(step["neurons_active"]), float(step["neurons_loaded"])
        if self.mode in WINDOWED_MODES:
            return {c: float(step.get("rows_computed", step["cache_rows"]))}  # results before rows_computed: the window's
        if self.mode == "dense":
            return {c: active}
        if self.mode == "naive":
            out = {s: loaded}
            out[c] = out.get(c, 0.0) + active - loaded
            return out
        if self.mode == "mmap":
            return {s: active}
        raise FlashError(f"no DRAM traffic rule for mode {self.mode!r}; expected one of "
                         "dense, naive, sparse, oracle, mmap")

    def step_bytes(self, step: Mapping[str, float], context: int) -> dict:
        """{"terms": bytes by term, "by_dtype": bytes by dtype, "total": bytes, "ffn_active": bytes
        the FFN would read computing only the active rows} for one step at `context` positions."""
        c = self.compute_dtype
        windowed = min(context, self.sliding_window) if self.sliding_window else context
        positions = (self.n_layers - self.windowed_layers) * context + self.windowed_layers * windowed
        terms = dict.fromkeys(_TERMS, 0.0)
        terms.update({k: float(v) for k, v in self.resident.items()})
        by_dtype = {c: float(sum(self.resident.values()))}
        bias_bytes = self.bias_entries_per_row * ITEMSIZE[c]
        for dt, rows in self.ffn_rows(step).items():
            if self.quant_row_bytes:  # held as stored in every mode, dequantized into the compute dtype
                dt, b = c, rows * self.quant_row_bytes
            else:
                b = rows * self.row_elements * ITEMSIZE[dt]
            terms["ffn"] += b + rows * bias_bytes
            by_dtype[dt] = by_dtype.get(dt, 0.0) + b
            by_dtype[c] += rows * bias_bytes
        terms["predictors"] = float(self.predictor_bytes) * (1.0 + float(step.get("guesses", 0)) / max(self.n_layers, 1))
        terms["oracle"] = float(self.oracle_bytes)
        terms["kv"] = float(self.kv_bytes_per_position * positions)
        by_dtype[c] += terms["predictors"] + terms["oracle"] + terms["kv"]
        active = float(step["neurons_active"]) * ((self.quant_row_bytes or self.row_elements * ITEMSIZE[c]) + bias_bytes)
        return {"terms": terms, "by_dtype": by_dtype, "total": sum(terms.values()), "ffn_active": active}


def floor_ms(by_dtype: Mapping[str, float], profile: DeviceProfile, threads: int, io_ms: float) -> dict:
    """{"floor_ms", "compute_floor_ms", "io_ms", "bandwidth_gbps": {dtype: GB/s}, "source"}: the
    bytes of each dtype at that dtype's matrix-vector bandwidth with `threads`, plus io_ms."""
    gbps, sources = {}, set()
    compute = 0.0
    for dt, b in by_dtype.items():
        bw = profile.memory_bandwidth(threads, dt)
        gbps[dt] = round(bw.gbps, 3)
        sources.add(bw.source)
        compute += b / (bw.gbps * 1e9) * 1e3
    source = sources.pop() if len(sources) == 1 else "mixed"
    return {"floor_ms": compute + io_ms, "compute_floor_ms": compute, "io_ms": io_ms, "bandwidth_gbps": gbps,
            "threads": threads, "source": source}


def summarise_floor(traffic: TokenTraffic, steps: list[Mapping[str, float]], contexts: list[int],
                    profile: DeviceProfile, threads: int) -> dict:
    """Per-token means over the measured steps: dram_bytes_per_token (with its terms), floor_ms,
    achieved_gbps and total_vs_floor (see the module docstring)."""
    if not steps:
        raise FlashError("no measured steps to compute a floor from")
    per = [traffic.step_bytes(s, c) for s, c in zip(steps, contexts)]
    floors = [floor_ms(p["by_dtype"], profile, threads, float(s["io_ms"])) for p, s in zip(per, steps)]
    n = len(steps)
    mean = lambda xs: sum(xs) / n  # noqa: E731
    dram = mean([p["total"] for p in per])
    total = mean([float(s["total_ms"]) for s in steps])
    io = mean([float(s["io_ms"]) for s in steps])
    floor = mean([f["floor_ms"] for f in floors])
    busy = total - io
    return {"dram_bytes_per_token": dram, "floor_ms": floor,
            "compute_floor_ms": mean([f["compute_floor_ms"] for f in floors]), "io_not_hidden_ms": io,
            "achieved_gbps": dram / busy / 1e6 if busy > 0 else None,
            "total_vs_floor": total / floor if floor > 0 else None,
            "dram_terms": {k: mean([p["terms"][k] for p in per]) for k in _TERMS},
            "ffn_active_bytes_per_token": mean([p["ffn_active"] for p in per]),
            "bandwidth_gbps": floors[0]["bandwidth_gbps"], "bandwidth_threads": threads,
            "bandwidth_source": floors[0]["source"]}
