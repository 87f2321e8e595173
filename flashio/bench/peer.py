"""llama.cpp beside flashio in one `flashio bench model` run (`--peer llama.cpp`).

    flashio bench model ART --peer llama.cpp       # adds two rows to the table and results.json

The artifact's own weights are written as an F16 GGUF (flashio.bench.peer_gguf; reused while the
artifact is unchanged) and run through llama-cpp-python, one child process per row
(flashio.bench.peer_worker), fed the same token ids one step per token with as many threads as
torch has in flashio's rows, after the same page-cache eviction:

- "llama.cpp mmap (limit)": llama.cpp's default load (the GGUF memory-mapped) under the same
  cgroup v1 memory limit as flashio's rows; page cache is charged to it, as it is to theirs.
- "llama.cpp, all in DRAM": the weights read into private memory first (no mmap), no limit; only
  when the GGUF fits in the memory available, as flashio's dense row.

llama-cpp-python is an optional extra (`flashio[bench]`), never a runtime dependency, built from
its source distribution for the CPU without AMX (BUILD_CMAKE_ARGS): on a CPU with AMX a native
build (GGML_NATIVE=ON compiles with -march=native, which turns AMX on whatever GGML_AMX_* say) puts
F16 weights in AMX's extra buffer type, a private copy: the mapping is then not what is computed
on, the copy counts against the limit, and the "mmap" row measures something else. The worker
also turns extra buffer types off at load (use_extra_bufts = false), and records llama.cpp's own
lines about where each buffer lives (CPU_Mapped = the mapping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flashio.errors import FlashError
from flashio.format import Artifact
from flashio.storage import evict_from_page_cache

log = logging.getLogger(__name__)

PEERS = ("llama.cpp",)
ROW_LIMIT = "llama.cpp mmap (limit)"
ROW_DRAM = "llama.cpp, all in DRAM"
# CPU only, AVX2-class x86 without AMX (see the module docstring). On a CPU with AVX-512, add
# -DGGML_AVX512=ON (and _VNNI/_BF16 where the CPU has them) for llama.cpp's fastest kernels.
BUILD_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
INSTALL_COMMAND = (f'CMAKE_ARGS="{BUILD_CMAKE_ARGS}" pip install --no-cache-dir --no-binary llama-cpp-python '
                   "'flashio[bench]'")


class PeerUnavailableError(FlashError):
    """The peer's package is not installed (or does not load)."""


def check_peers(peers: tuple[str, ...], art: Artifact) -> None:
    """Before any row runs: the peers are known, llama_cpp imports, the artifact can be written
    as a Llama GGUF; otherwise one FlashError saying what to do."""
    from flashio.bench.peer_gguf import check_llama_artifact

    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise FlashError(f"unknown --peer {', '.join(unknown)}; supported: {', '.join(PEERS)}")
    if not peers:
        return
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        raise PeerUnavailableError(f"--peer llama.cpp needs llama-cpp-python ({type(exc).__name__}: "
                                   f"{str(exc)[:120]}); install it from source, CPU only, without AMX: "
                                   f"{INSTALL_COMMAND}") from None
    check_llama_artifact(art)


def _summarise(name: str, what: str, result: dict, warm: int, *, limited: bool) -> dict:
    out = {"name": name, "what": what, "mode": "llama.cpp", "peer": "llama.cpp", "ok": bool(result.get("ok")),
           "cgroup": result.get("cgroup"), "limit_enforced": limited}
    if not out["ok"]:
        out["error"] = result.get("error")
        return out
    steps = result["steps"][warm:]
    total = float(np.mean([s["total_ms"] for s in steps]))
    # llama.cpp's I/O is page faults inside its compute (as flashio's mmap row): not separable
    out["per_token"] = {"io_ms": 0.0, "mem_ms": 0.0, "compute_ms": total, "total_ms": total,
                        "io_busy_ms": 0.0, "io_predicted_ms": 0.0,
                        "bytes_read": float(np.mean([s["read_bytes"] for s in steps])),
                        "reads": float(np.mean([s["major_faults"] for s in steps])), "truncated": 0.0}
    mem = result["memory_after_run"]
    out.update(tokens=len(steps), warmup=warm, total_ms_std=float(np.std([s["total_ms"] for s in steps])),
               per_step={"total_ms": [round(s["total_ms"], 3) for s in result["steps"]],
                         "bytes_read": [s["read_bytes"] for s in result["steps"]]},
               dram_bytes=int(mem["VmRSS"]), memory={"after_open": result["memory_after_open"], "after_run": mem},
               rss_peak_bytes=result["rss_peak_bytes"], open_s=result["open_s"], threads=result["threads"],
               load_mode=result["load_mode"], compute_dtype="float16 weights (GGUF F16)")
    return out


RunChild = Callable[[dict, str, "int | None"], dict]


def run_peer_rows(art: Artifact, *, tokens: list[int], threads: int, limit_bytes: int | None,
                  no_limit_why: str, available_bytes: int, gguf_path: Path, run_child: RunChild | None,
                  say: Callable[[str], None], baseline_tokens: int) -> tuple[list[dict], dict]:
    """The two llama.cpp rows and a description of the peer for results.json.

    tokens: the ids flashio's rows were fed (the first 1 + baseline_tokens are used: one warm-up
    step, as flashio's mmap and dense rows); limit_bytes: the cgroup limit of flashio's rows (None:
    not enforced, no_limit_why says why); run_child(spec, slug, limit) runs flashio.bench.peer_worker
    in a child under that limit (None: in this process, for tests and --in-process)."""
    from flashio.bench.peer_gguf import write_llama_gguf
    from flashio.bench.peer_worker import run as run_here

    write_llama_gguf(art, gguf_path, progress=say)
    gguf_bytes = gguf_path.stat().st_size
    warm, feed = 1, tokens[: 1 + baseline_tokens]
    files = [gguf_path] + [art.file(n) for n in art.manifest.files if n.endswith(".safetensors")]
    rows, info = [], {"gguf": str(gguf_path), "gguf_bytes": gguf_bytes, "threads": threads,
                      "build_cmake_args": BUILD_CMAKE_ARGS}
    plan = ((ROW_LIMIT, "mmap", True, "GGUF memory-mapped by llama.cpp (its default), under the DRAM limit"),
            (ROW_DRAM, "none", False, "GGUF read into private memory (no mmap), no limit"))
    for name, load_mode, limited, what in plan:
        if limited and limit_bytes is None:
            what += f" (NOT enforced: {no_limit_why})"
        if not limited and gguf_bytes + (1 << 30) > available_bytes:
            rows.append({"name": name, "what": what, "mode": "llama.cpp", "peer": "llama.cpp", "ok": False,
                         "error": f"skipped: needs {gguf_bytes / 1e9:.1f} GB, {available_bytes / 1e9:.1f} GB available"})
            say(f"{name}: {rows[-1]['error']}")
            continue
        for f in files:
            evict_from_page_cache(f)
        spec = {"gguf": str(gguf_path), "load_mode": load_mode, "threads": threads, "tokens": feed}
        slug = "llama.cpp-" + load_mode
        if run_child is None:
            try:
                result = run_here(spec)
            except (RuntimeError, ValueError, OSError) as exc:
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            result = run_child(spec, slug, limit_bytes if limited else None)
        for k in ("llama_cpp_version", "system_info"):
            if k in result:
                info[k] = result[k]
        if "log" in result:
            info.setdefault("log", {})[name] = result["log"]
        rows.append(_summarise(name, what, result, warm, limited=limited and limit_bytes is not None))
        say(_line(rows[-1]))
    return rows, info


def _line(row: dict) -> str:
    if not row.get("ok"):
        return f"{row['name']}: FAILED: {row.get('error')}"
    p = row["per_token"]
    return (f"{row['name']}: {p['total_ms']:8.1f} ms/token, {p['bytes_read'] / 1e6:.1f} MB/token read from storage, "
            f"{p['reads']:.0f} major faults/token, RSS {row['dram_bytes'] / 1e9:.2f} GB, {row['tokens']} tokens")


def peer_targets(configs: list[dict]) -> dict:
    """The issue's targets against llama.cpp, where both sides ran: the full configuration faster
    than llama.cpp all in DRAM, >= 20x faster than llama.cpp's mmap under the same limit, and
    flashio's dense within 1.2x of llama.cpp all in DRAM (value: flashio dense / llama.cpp)."""
    from flashio.bench.report import FULL_CONFIGS

    rows = {r["name"]: r for r in configs if r.get("ok")}
    full = next((rows[n] for n in FULL_CONFIGS if n in rows), None)
    ms = {n: r["per_token"]["total_ms"] for n, r in rows.items()}
    out = {}
    if full is not None and ROW_DRAM in rows:
        v = ms[ROW_DRAM] / ms[full["name"]]
        out["speedup_vs_llama_cpp_dram"] = {"value": v, "target": 1.0, "met": v > 1.0}
    if full is not None and ROW_LIMIT in rows:
        v = ms[ROW_LIMIT] / ms[full["name"]]
        out["speedup_vs_llama_cpp_mmap_limit"] = {"value": v, "target": 20.0, "met": v >= 20.0}
    if "dense" in rows and ROW_DRAM in rows:
        v = ms["dense"] / ms[ROW_DRAM]
        out["dense_vs_llama_cpp_dram"] = {"value": v, "target": 1.2, "met": v <= 1.2}
    return out


def run_peers(art: Artifact, opts, plan: dict, cgroup: tuple[bool, str], tokens: list[int],
              say: Callable[[str], None], run_worker: Callable[..., dict], work: Path) -> tuple[list[dict], dict]:
    """run_peer_rows wired to flashio.bench.model's run: opts (ModelBenchOptions: peers, peer_gguf,
    torch_threads, compute_threads, baseline_tokens, in_process, timeout_s, out_dir), its memory plan and cgroup
    verdict, and its child runner run_worker(spec, work, name, limit, timeout_s, module=...)."""

    if opts.cuda:
        rows = [{"name": n, "what": "", "mode": "llama.cpp", "peer": "llama.cpp", "ok": False,
                 "error": "skipped: the llama.cpp peer runs on the CPU only"} for n in (ROW_LIMIT, ROW_DRAM)]
        return rows, {"skipped": "CUDA run"}
    need = 1 + opts.baseline_tokens
    feed = (tokens * (need // max(1, len(tokens)) + 1))[:need]  # the same ids flashio's rows were fed
    ok, why = cgroup

    def child(spec: dict, slug: str, limit: int | None) -> dict:
        return run_worker(spec, work, slug, limit, opts.timeout_s, module="flashio.bench.peer_worker")

    gguf = opts.peer_gguf or opts.out_dir / "llama.cpp" / f"{art.path.name}.f16.gguf"
    return run_peer_rows(art, tokens=feed, threads=opts.product_threads(),
                         limit_bytes=plan["limit_bytes"] if ok else None, no_limit_why=why,
                         available_bytes=plan["available_bytes"], gguf_path=gguf,
                         run_child=None if opts.in_process else child, say=say,
                         baseline_tokens=opts.baseline_tokens)
