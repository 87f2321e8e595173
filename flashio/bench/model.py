"""`flashio bench model ARTIFACT`: the paper's per-token latency table for one model on this machine.

    results = run_model_bench(ModelBenchOptions(Path("art"), Path("out"), profile=Path("dev.json")))
    # out/results.json, out/table.md, out/latency.png

Configurations, each adding one technique to the previous (CONFIGS): naive, hybrid, +predictor,
+windowing, +bundling, then this project's +coalescing, +reordering, +overlap; plus mmap and dense
for reference. Each runs in a child process (flashio.bench.worker) inside a cgroup v1 memory
limit (default: half the model plus the runtime's fixed overhead, the paper's setting), after the
artifact's files were evicted from the page cache. Sparse configurations replay one activation
trace (synthetic, calibrated to the paper's OPT-6.7B statistics, or a recorded one), so every
row sees the same active sets and the ratios are comparable.

Every row also carries the DRAM bytes its tokens touch and the floor they imply at the
matrix-vector bandwidth measured right before and after the row (RunBandwidthProbe; the device
profile's figures with `run_bandwidth=False`, and beside the row's own as `floor_ms_profile`,
`total_vs_floor_profile`): `dram_bytes_per_token`, `floor_ms`, `achieved_gbps`, `total_vs_floor`;
the formula is in flashio.bench.floor. On CUDA the bytes are reported, the floor is not (the
profile measures host DRAM, not GPU memory).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flashio import kernels
from flashio.bench import memplan
from flashio.bench.bandwidth import MATVEC_DTYPES, MatvecProbe, MemoryBenchConfig
from flashio.bench.cgroup import MemoryCgroup, memory_cgroup_support
from flashio.bench.device import machine_info
from flashio.bench.floor import TokenTraffic, summarise_floor
from flashio.cli import ONEDNN_CACHE_ENV
from flashio.config import FlashConfig
from flashio.costmodel import Bandwidth, CostModel, DeviceProfile
from flashio.device import resolve_device
from flashio.errors import FlashError
from flashio.format import Artifact
from flashio.sizes import format_size
from flashio.storage import DEFAULT_THREADS, evict_from_page_cache
from flashio.threads import torch_threads
from flashio.trace import Trace, TraceParams, load_order, synthesize

RUN_BANDWIDTH_BYTES = 256 << 20  # RunBandwidthProbe's matrices: far past a CPU's last-level cache
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """One row of the table: how the runtime is opened."""

    name: str
    mode: str
    what: str
    reuse: bool = True
    bundled: bool = True
    overlap: bool = False
    retain: bool = False  # rows past the window kept while the cache has room (the product's default)
    ordered: bool = False  # the trace in the calibrated neuron order
    tuned: bool = False  # threads and coalescing gap from the device cost model
    pinned: bool = False  # naive with DRAM filled by pinned rows ("hybrid")
    compute: str = "window"  # FlashConfig.compute: which cached rows the FFN runs on
    lookahead: bool = False  # FlashConfig.lookahead: reads started before each layer's attention

    @property
    def sparse(self) -> bool:
        return self.mode == "sparse"


CONFIGS = (
    Config("naive", "naive", "whole FFN read from flash every token (attention resident)"),
    Config("hybrid", "naive", "naive, with as many FFN rows pinned in DRAM as the limit allows", pinned=True),
    Config("+predictor", "sparse", "only the active neurons, loaded every token, unbundled", reuse=False,
           bundled=False),
    Config("+windowing", "sparse", "window cache: only neurons new to the window are read", bundled=False),
    Config("+bundling", "sparse", "a neuron's up and down rows in one read"),
    Config("+coalescing", "sparse", "threads and gap reads chosen by the device cost model", tuned=True),
    Config("+reordering", "sparse", "neurons ordered by calibrated load frequency", tuned=True, ordered=True),
    Config("+overlap", "sparse", "reads in flight while the cached rows are computed; rows past the window kept "
           "while the cache has room", tuned=True, ordered=True, overlap=True, retain=True),
    Config("active-compute", "sparse", "+overlap, the FFN on the step's active set only instead of the window's rows "
           "(compute='active', the paper's)", tuned=True, ordered=True, overlap=True, retain=True, compute="active"),
    Config("+lookahead", "sparse", "+overlap, each layer's reads started before its attention from a guess of "
           "its set (FlashConfig.lookahead; the trace's set at --lookahead-recall): flashio run's defaults", tuned=True, ordered=True,
           overlap=True, retain=True, lookahead=True),
    Config("mmap", "mmap", "FFN memory-mapped, paged by the OS (as llama.cpp)"),
    Config("dense", "dense", "everything in DRAM (reference; only when it fits)"),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)
LOOKAHEAD_RECALL = 0.75  # +lookahead's default (ModelBenchOptions.lookahead_recall): measured, README "Lookahead"


@dataclass(frozen=True)
class ModelBenchOptions:
    artifact: Path
    out_dir: Path
    configs: tuple[str, ...] = CONFIG_NAMES
    tokens: int = 24  # measured tokens per sparse configuration (after the warm-up)
    baseline_tokens: int = 4  # measured tokens for naive, hybrid, mmap, dense (slow)
    window: int = 5
    trace: str = "synthetic"  # "synthetic" or a trace file (recorded with --record-trace)
    trace_preset: str = "opt-6.7b"
    dram_limit: int | None = None  # None: weights_fraction of the model + the runtime's fixed overhead
    weights_fraction: float = 0.5  # the paper: about half of the model in DRAM
    use_cgroup: bool = True  # False: only the runtime's dram_budget limits memory
    in_process: bool = False  # run configurations in this process (quick looks, tests): no cgroup
    process_baseline_bytes: int | None = None  # interpreter + torch RSS (None: measured in a child)
    torch_threads: int | None = None  # torch's threads in every configuration (None: torch's default)
    compute_threads: int | None = None  # the kernels' threads (None: flashio's default, every CPU up to 8)
    compute_dtype: str = "auto"
    profile: Path | None = None  # device profile for the cost model (None: built-in defaults)
    seed: int = 0
    lookahead_recall: float = LOOKAHEAD_RECALL  # +lookahead: the share of each set the guess gets right
    max_gap: int | None = None  # the tuned configurations' gap reads in rows (None: the cost model's)
    timeout_s: float = 3600.0
    device: str = "cpu"  # 'cuda[:N]': resident weights, KV and window caches in GPU memory
    peers: tuple[str, ...] = ()  # ("llama.cpp",): its rows beside flashio's (flashio.bench.peer)
    peer_gguf: Path | None = None  # where the peer's GGUF is written (None: OUT/llama.cpp/<artifact>.f16.gguf)
    # price each row's floor at the matrix-vector bandwidth measured right before and after it
    # (RunBandwidthProbe, ~1 s a row); False: at the device profile's
    run_bandwidth: bool = True

    @property
    def cuda(self) -> bool:
        return self.device != "cpu"

    def product_threads(self) -> int:
        """The threads the configurations' products run on: the kernels', or torch's where those
        are more (the floor's bandwidth is taken at this count; llama.cpp's rows get as many)."""
        return max(kernels.threads_for(self.compute_threads), self.torch_threads or torch.get_num_threads())

    def __post_init__(self) -> None:
        unknown = [c for c in self.configs if c not in CONFIG_NAMES]
        if unknown:
            raise FlashError(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIG_NAMES)}")
        if self.tokens < 1 or self.baseline_tokens < 1 or self.window < 1:
            raise FlashError("tokens, baseline_tokens and window must be >= 1")
        if not 0.0 <= self.lookahead_recall <= 1.0:
            raise FlashError(f"lookahead recall must be in [0, 1], got {self.lookahead_recall}")
        if self.max_gap is not None and self.max_gap < 0:
            raise FlashError(f"max_gap must be >= 0, got {self.max_gap}")


@dataclass
class _Traces:
    description: dict
    unordered: Path | None = None
    ordered: Path | None = None
    trace: Trace | None = None  # the measured trace (unordered layout)
    order_note: str = ""
    files: list[Path] = field(default_factory=list)


def _warmup(cfg: Config, window: int) -> int:
    return window + 3 if cfg.sparse else 1


def _measured(cfg: Config, opts: ModelBenchOptions) -> int:
    return opts.tokens if cfg.sparse else opts.baseline_tokens


def prepare_traces(art: Artifact, opts: ModelBenchOptions, steps: int, work: Path) -> _Traces:
    """The measured trace in two layouts (random order / calibrated order) and a calibration
    trace that the order is learnt from (never the measured steps)."""
    m = art.manifest
    n_layers, n_neurons = m.n_layers, m.ffn_layers[0].n_neurons
    rng = np.random.default_rng(opts.seed + 99)
    if opts.trace == "synthetic":
        params = TraceParams.preset(opts.trace_preset)
        measured = synthesize(n_layers, n_neurons, steps, params, seed=opts.seed + 1, model_seed=opts.seed)
        calib = synthesize(n_layers, n_neurons, 64, params, seed=opts.seed + 2, model_seed=opts.seed)
        desc = {"kind": "synthetic", "preset": opts.trace_preset, "generator": asdict(params),
                "expected": params.expected(opts.window), "calibration_steps": 64}
    else:
        full = Trace.load(opts.trace)
        if (full.n_layers, full.n_neurons) != (n_layers, n_neurons):
            raise FlashError(f"trace {opts.trace} is for {full.n_layers} layers x {full.n_neurons} neurons, "
                             f"the artifact has {n_layers} x {n_neurons}: record it on this artifact")
        n_calib = min(32, full.steps // 3)
        if full.steps - n_calib < steps:
            raise FlashError(f"trace {opts.trace} has {full.steps} steps; this run needs {steps} plus "
                             f"{n_calib} for calibration: record more tokens or lower --tokens")
        calib, measured = full.slice(0, n_calib), full.slice(n_calib, n_calib + steps)
        desc = {"kind": "recorded", "file": str(opts.trace), "meta": full.meta, "calibration_steps": n_calib}
    desc["measured"] = measured.summary(opts.window, skip=opts.window)
    # rows before +reordering: a random layout; +reordering: neurons sorted by calibrated loads
    shuffle = [rng.permutation(n_neurons) for _ in range(n_layers)]
    unordered = measured.permuted(shuffle, "random")
    ordered = measured.permuted(load_order(calib, opts.window), "load-frequency (calibration trace)")
    paths = [opts.out_dir / "trace.npz", work / "trace-ordered.npz"]  # the first is kept
    unordered.save(paths[0])
    ordered.save(paths[1])
    return _Traces(desc, paths[0], paths[1], unordered, "load frequency on the calibration trace", paths)


def _run_worker(spec: dict, work: Path, name: str, limit: int | None, timeout_s: float,
                module: str = "flashio.bench.worker") -> dict:
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    out_path.unlink(missing_ok=True)
    cg = None
    try:
        if limit is not None:
            cg = MemoryCgroup(f"flashio-bench-{name.strip('+')}", limit)
            spec = {**spec, "cgroup": str(cg.path)}
        spec_path.write_text(json.dumps(spec))
        # the child runs as `flashio` would: oneDNN's caches bounded unless this environment says otherwise
        proc = subprocess.Popen([sys.executable, "-m", module, str(spec_path), str(out_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**ONEDNN_CACHE_ENV, **os.environ})
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except BaseException:  # timeout, Ctrl-C, SIGTERM: never leave the child running
            proc.kill()
            proc.communicate()
            raise
        usage = cg.usage() if cg is not None else None
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    finally:
        if cg is not None:
            cg.close()
    if out_path.exists():
        result = json.loads(out_path.read_text())
    elif proc.returncode < 0 or (usage and usage["oom_kills"]):
        result = {"ok": False, "error": f"killed (signal {-proc.returncode}): out of memory under the "
                                        f"{limit / 1e9:.2f} GB limit" if limit else f"killed (signal {-proc.returncode})"}
    else:
        result = {"ok": False, "error": f"worker exited {proc.returncode}: {stderr.strip()[-500:]}"}
    result["cgroup"] = usage
    return result


def _run_here(spec: dict) -> dict:
    from flashio.bench.worker import run

    try:
        return run(spec)
    except FlashError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _floor(result: dict, steps: list[dict], warmup: int, traffic: TokenTraffic,
           profile: DeviceProfile | None) -> dict:
    """The floor columns of one row (flashio.bench.floor); profile None: bytes only (CUDA)."""
    contexts = np.cumsum([s["tokens"] for s in result["steps"]])[warmup : warmup + len(steps)].tolist()
    # the products run on the kernels' threads (flashio.kernels), or torch's where the kernels are not used
    threads = int(max(result.get("compute_threads") or 1, result.get("torch_threads") or torch.get_num_threads()))
    if profile is None:
        from flashio.costmodel import default_profile

        out = summarise_floor(traffic, steps, contexts, default_profile(), threads)
        out.update(floor_ms=None, compute_floor_ms=None, total_vs_floor=None, achieved_gbps=None,
                   bandwidth_gbps=None, bandwidth_source="none: the profile measures host DRAM, not the GPU")
        return out
    run = result.get("matvec")
    if not run or run["threads"] != threads:
        return summarise_floor(traffic, steps, contexts, profile, threads)
    # the floor at the bandwidth measured around this row; the profile's beside it
    out = summarise_floor(traffic, steps, contexts, RunBandwidth(profile, run["gbps"], threads), threads)
    by_profile = summarise_floor(traffic, steps, contexts, profile, threads)
    out.update(floor_ms_profile=by_profile["floor_ms"], total_vs_floor_profile=by_profile["total_vs_floor"],
               bandwidth_gbps_profile=by_profile["bandwidth_gbps"], bandwidth_source_profile=by_profile["bandwidth_source"],
               matvec_run=run)
    return out


class RunBandwidthProbe:
    """The matrix-vector bandwidth of each dtype at `threads`, measured in this process (outside
    the rows' cgroups) right before a row starts and right after it ends: the machine's memory
    bandwidth at the time the row ran, which on a shared machine moves with its neighbours' load
    (20-30% within an hour here). A shorter point than `flashio bench device`'s (~1 s a row)."""

    def __init__(self, dtypes: list[str], threads: int):
        cfg = MemoryBenchConfig(threads=(threads,), buffer_bytes=RUN_BANDWIDTH_BYTES, seconds=0.25)
        self.threads = threads
        self.probes = [MatvecProbe(cfg, d) for d in dtypes]

    def measure(self) -> dict[str, float]:
        return {p.name: p.measure()[0].gbps for p in self.probes}


@dataclass(frozen=True)
class RunBandwidth:
    """A device profile whose matrix-vector bandwidths at `threads` are those measured around one
    row (RunBandwidthProbe, the mean of before and after: `gbps`, by dtype); other dtypes and
    thread counts, and the DRAM read, are the profile's."""

    profile: DeviceProfile
    gbps: dict[str, float]
    threads: int

    def memory_bandwidth(self, threads: int, dtype: str | None = None) -> Bandwidth:
        if dtype is not None and threads == self.threads and dtype in self.gbps:
            return Bandwidth(float(self.gbps[dtype]), "this run", threads, dtype)
        return self.profile.memory_bandwidth(threads, dtype)


def _summarise(cfg: Config, result: dict, warmup: int, required_rows: np.ndarray | None,
               row_bytes: int, traffic: TokenTraffic | None = None, profile: DeviceProfile | None = None) -> dict:
    out = {"name": cfg.name, "what": cfg.what, "mode": cfg.mode, "ok": result.get("ok", False)}
    if not out["ok"]:
        out["error"] = result.get("error")
        out["cgroup"] = result.get("cgroup")
        return out
    steps = result["steps"][warmup:]
    n = len(steps)
    keys = ("io_ms", "mem_ms", "compute_ms", "total_ms", "io_busy_ms", "io_predicted_ms", "bytes_read",
            "reads", "neurons_active", "neurons_loaded", "cache_hits", "cache_rows", "rows_computed", "truncated",
            "upload_ms", "device_mem_ms")
    per = {k: float(np.mean([s[k] for s in steps])) for k in keys}
    mem = result["memory"]
    series = {k: [round(s[k], 3) for s in result["steps"]] for k in ("total_ms", "io_ms", "mem_ms", "bytes_read")}
    out.update(per_token=per, tokens=n, warmup=warmup, per_step=series,
               total_ms_std=float(np.std([s["total_ms"] for s in steps])),
               dram_bytes=int(sum(mem.values())), memory=mem, cgroup=result.get("cgroup"),
               threads=result["threads"], max_gap=result["max_gap"], capacity=result["capacity"],
               open_s=result["open_s"], preload_bytes=result.get("preload_bytes", 0), compute_dtype=result["compute_dtype"],
               rss_peak_bytes=result["rss_peak_bytes"], staging_bytes=result.get("staging_bytes", 0),
               device_peak_bytes=result.get("device_peak_bytes"), lookahead=result.get("lookahead"))
    if traffic is not None:
        out.update(_floor(result, steps, warmup, traffic, profile))
    if required_rows is not None:
        out["required_bytes_per_token"] = float(required_rows[warmup : warmup + n].sum(axis=1).mean() * row_bytes)
    return out


def run_model_bench(opts: ModelBenchOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Run every configuration; write results.json, table.md and latency.png to opts.out_dir.
    opts.torch_threads applies to the configurations and to this process while it runs (restored)."""
    # torch's thread count while the benchmark works in this process (the compute dtype's timing,
    # --in-process configurations); 0 or None leaves torch's own
    with torch_threads(opts.torch_threads or None):
        return _run_model_bench(opts, progress)


def _run_model_bench(opts: ModelBenchOptions, progress: Callable[[str], None] | None) -> dict:
    say = progress or (lambda msg: log.info("%s", msg))
    load_start = os.getloadavg()
    art = Artifact(opts.artifact)
    if opts.peers:  # before any row runs: a missing llama_cpp is one line, not an error after an hour
        from flashio.bench.peer import check_peers

        check_peers(opts.peers, art)
    m = art.manifest
    configs = [c for c in CONFIGS if c.name in opts.configs]
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    if opts.cuda:
        resolve_device(opts.device)  # one clear error without CUDA, before any work
    compute = memplan.choose_compute_dtype(art, opts.compute_dtype, device=opts.device)
    say(f"compute dtype {compute['chosen']} ({compute['reason']})")
    steps = max(_warmup(c, opts.window) + _measured(c, opts) for c in configs)
    # on CUDA the limit is GPU memory: the interpreter's host memory is not part of it
    plan = memplan.plan_memory(art, compute["chosen"], max_context=steps + 8, window=opts.window,
                               limit_bytes=opts.dram_limit, weights_fraction=opts.weights_fraction,
                               baseline_bytes=0 if opts.cuda else opts.process_baseline_bytes,
                               device=opts.device)
    if opts.in_process:
        ok, why = False, "configurations run in this process (--in-process)"
    elif opts.cuda:
        ok, why = False, "the limit is GPU memory, bounded by the runtime's dram_budget (a host cgroup does not apply)"
    elif opts.use_cgroup:
        ok, why = memory_cgroup_support()
    else:
        ok, why = False, "disabled (--no-cgroup)"
    plan["cgroup"], plan["cgroup_reason"] = ok, why
    say(f"DRAM limit {format_size(plan['limit_bytes'])} (model {format_size(plan['model_bytes'])}, runtime "
        f"budget {format_size(plan['budget_bytes'])}); "
        + ("enforced by a cgroup v1 memory limit" if ok else f"NOT enforced by a cgroup ({why}): "
           "the runtime's dram_budget is the only limit"))
    profile = DeviceProfile.load(opts.profile) if opts.profile else None
    cm = CostModel(profile)
    row_bytes = m.row_bytes  # as stored: a quantized row is bundle_width bytes
    tuned_threads = cm.best_threads(row_bytes)
    tuned_gap = cm.best_max_gap(row_bytes, tuned_threads) if opts.max_gap is None else opts.max_gap
    cost = {"profile": str(opts.profile) if opts.profile else None, "source": cm.profile.source,
            "device": cm.profile.device, "tuned_threads": tuned_threads, "tuned_max_gap": tuned_gap,
            "max_gap_source": "cost model" if opts.max_gap is None else "--max-gap",
            "default_threads": DEFAULT_THREADS, "torch_threads": torch.get_num_threads(),
            "compute_threads": kernels.threads_for(opts.compute_threads),
            "memory_source": cm.profile.memory_source}
    say(f"cost model ({cm.profile.source}): {tuned_threads} threads, gap reads up to {tuned_gap} rows")
    with tempfile.TemporaryDirectory(prefix="flashio-bench-", dir=opts.out_dir) as tmp:
        work = Path(tmp)
        if any(c.sparse for c in configs):
            traces = prepare_traces(art, opts, steps, work)
            say(f"trace: {traces.description['kind']} {json.dumps(traces.description['measured'])}")
        else:
            traces = _Traces({"kind": "none (no sparse configuration)"})
        rng = np.random.default_rng(opts.seed)
        tokens = rng.integers(3, art.args.vocab_size, size=steps).tolist()
        files = [art.file(n) for n in m.files if n.endswith(".safetensors")]
        rows = {}
        probe = None
        if opts.run_bandwidth and not opts.cuda:
            probe = RunBandwidthProbe(sorted({d for d in (compute["chosen"], m.dtype) if d in MATVEC_DTYPES}),
                                      opts.product_threads())
        for cfg in configs:
            warm, n_tok = _warmup(cfg, opts.window), _measured(cfg, opts)
            if cfg.mode == "mmap" and opts.cuda:
                rows[cfg.name] = {"name": cfg.name, "what": cfg.what, "mode": cfg.mode, "ok": False,
                                  "error": "skipped: mmap runs on the CPU only"}
                say(f"{cfg.name:12s} {rows[cfg.name]['error']}")
                continue
            config = FlashConfig(mode=cfg.mode, window=opts.window, device=opts.device, max_context=steps + 8,
                                 compute_dtype=compute["chosen"],
                                 device_profile=str(opts.profile) if opts.profile else None,
                                 threads=tuned_threads if cfg.tuned else DEFAULT_THREADS,
                                 max_gap=tuned_gap if cfg.tuned else 0, torch_threads=opts.torch_threads,
                                 compute_threads=opts.compute_threads)
            spec = {"artifact": str(art.path), "tokens": tokens[: warm + n_tok]}
            limit = plan["limit_bytes"] if ok else None
            if cfg.mode == "dense":
                limit = None
                if not plan["dense_fits"]:
                    rows[cfg.name] = {"name": cfg.name, "what": cfg.what, "mode": cfg.mode, "ok": False,
                                      "error": f"skipped: needs {plan['dense_bytes'] / 1e9:.1f} GB, "
                                               f"{plan['available_bytes'] / 1e9:.1f} GB available"}
                    say(f"{cfg.name:12s} {rows[cfg.name]['error']}")
                    continue
            else:
                config = config.replace(dram_budget=plan["budget_bytes"])
            if cfg.pinned:
                config = config.replace(pinned_fraction=plan["hybrid_pinned_fraction"])
            if cfg.sparse:
                config = config.replace(reuse=cfg.reuse, bundled=cfg.bundled, overlap=cfg.overlap, retain=cfg.retain,
                                        compute=cfg.compute, lookahead=cfg.lookahead)
                spec["trace"] = str(traces.ordered if cfg.ordered else traces.unordered)
                spec["lookahead_recall"] = opts.lookahead_recall
            spec["config"] = config.to_dict()
            for f in files:
                evict_from_page_cache(f)
            t0 = time.perf_counter()
            before = probe.measure() if probe is not None else None
            if opts.in_process:
                result = _run_here(spec)
            else:
                result = _run_worker(spec, work, cfg.name, limit, opts.timeout_s)
            if probe is not None and result.get("ok"):
                after = probe.measure()
                result["matvec"] = {"threads": probe.threads, "before": before, "after": after,
                                    "gbps": {d: (before[d] + after[d]) / 2 for d in before}}
            required = None
            if cfg.sparse and traces.trace is not None:
                required = traces.trace.required_rows(opts.window if cfg.reuse else None)
            traffic = TokenTraffic.of(art, cfg.mode, compute["chosen"])
            rows[cfg.name] = _summarise(cfg, result, warm, required, row_bytes, traffic,
                                        None if opts.cuda else cm.profile)
            rows[cfg.name]["wall_s"] = time.perf_counter() - t0
            say(memplan.row_line(rows[cfg.name]))
        peer_rows, peer_info = [], None
        if opts.peers:
            from flashio.bench.peer import run_peers

            peer_rows, peer_info = run_peers(art, opts, plan, (ok, why), tokens, say, _run_worker, work)
    from flashio.bench.report import evaluate_targets, write_outputs

    results = {"created_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": machine_info(opts.device), "device": opts.device,
               "artifact": art.summary(), "options": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in asdict(opts).items()},
               "trace": traces.description, "memory": plan, "compute_dtype": compute, "cost_model": cost,
               "configs": [rows[c.name] for c in configs if c.name in rows] + peer_rows, "peer": peer_info,
               "load_average": {"start": load_start, "end": os.getloadavg()}}
    results["targets"] = evaluate_targets(results)
    if opts.peers:
        from flashio.bench.peer import peer_targets

        results["targets"].update(peer_targets(results["configs"]))
    write_outputs(results, opts.out_dir)
    return results
