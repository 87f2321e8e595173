"""One llama.cpp row of `flashio bench model --peer llama.cpp`, in its own process (and memory cgroup).

    python -m flashio.bench.peer_worker SPEC.json RESULT.json

SPEC names the GGUF, the load mode ("mmap": llama.cpp's default, pages the weights through the
page cache; "none": reads them into private memory first), the threads, the token ids to feed and
the cgroup to join. As flashio.bench.worker, the process joins the cgroup before importing
llama_cpp, so everything it allocates or maps is charged to the limit. It feeds the tokens one
llama_decode per token (generation: one new position per step) and writes every step's wall time,
the bytes the process read from storage (/proc/self/io read_bytes: page faults on the mapping
included) and its major page faults, plus llama.cpp's own lines about where the weights live.
Only the standard library is imported before the cgroup is joined.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time

LOAD_MODES = ("mmap", "none")
# llama.cpp log lines kept in the result: where each buffer lives (CPU_Mapped: the file's pages,
# mapped; CPU / CPU_REPACK / AMX: a private copy) and what the CPU backend was built with
_KEEP = ("buffer size", "load_mode", "system_info", "AMX", "REPACK", "mmap")


def _status_bytes(*keys: str) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in out:
                out[k] = int(v.split()[0]) * 1024
    return out


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def run(spec: dict) -> dict:
    import llama_cpp as L  # after the cgroup join: the library and everything it maps are charged there

    if spec["load_mode"] not in LOAD_MODES:
        raise ValueError(f"load_mode {spec['load_mode']!r} is not one of {LOAD_MODES}")
    kept: list[str] = []

    @L.llama_log_callback
    def _log(level, text, user_data):  # keep the few lines that say where the weights went
        line = text.decode(errors="replace").rstrip() if text else ""
        if line and any(k in line for k in _KEEP):
            kept.append(line)

    L.llama_log_set(_log, ctypes.c_void_p())
    L.llama_backend_init()
    tokens = [int(t) for t in spec["tokens"]]
    threads = int(spec["threads"])
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    fields = {f[0] for f in mp._fields_}  # a ctypes Structure takes unknown attributes silently
    mmap = spec["load_mode"] == "mmap"
    if "load_mode" in fields:  # llama-cpp-python >= 0.3.36
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if mmap else L.LLAMA_LOAD_MODE_NONE
    else:
        mp.use_mmap = mmap
    # no extra buffer types (weight repacking, AMX): they copy weights out of the mapping into
    # private memory, which under a DRAM limit is not the mmap this row measures
    if "use_extra_bufts" in fields:
        mp.use_extra_bufts = False
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(spec["gguf"].encode(), mp)
    if not model:
        _restore_log(L)
        raise RuntimeError(f"llama.cpp could not load {spec['gguf']}: " + " | ".join(kept[-5:]))
    cp = L.llama_context_default_params()
    cp.n_ctx = max(64, len(tokens) + 8)
    cp.n_batch = cp.n_ubatch = 8
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        _restore_log(L)
        raise RuntimeError("llama.cpp could not create a context: " + " | ".join(kept[-5:]))
    try:
        open_s = time.perf_counter() - t0
        mem_open = _status_bytes("RssAnon", "RssFile", "VmRSS")
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        keep_logits = bool(spec.get("logits"))
        steps, logits = [], []
        tok = (L.llama_token * 1)()
        for t in tokens:
            tok[0] = t
            rb, mf = _read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            s0 = time.perf_counter()
            rc = L.llama_decode(ctx, L.llama_batch_get_one(tok, 1))
            L.llama_synchronize(ctx)
            ms = (time.perf_counter() - s0) * 1e3
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at step {len(steps)}")
            steps.append({"total_ms": ms, "read_bytes": _read_bytes() - rb,
                          "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - mf})
            if keep_logits:
                ptr = L.llama_get_logits_ith(ctx, -1)
                logits.append([float(ptr[j]) for j in range(n_vocab)])
        out = {"ok": True, "open_s": open_s, "steps": steps, "threads": threads, "load_mode": spec["load_mode"],
               "memory_after_open": mem_open, "memory_after_run": _status_bytes("RssAnon", "RssFile", "VmRSS"),
               "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "llama_cpp_version": getattr(L, "__version__", "?"),
               "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
               "log": kept[-40:]}
        if keep_logits:
            out["logits"] = logits
        return out
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)
        _restore_log(L)


def _restore_log(L) -> None:
    """llama-cpp-python's own log callback again (ours dies with run's frame)."""
    from llama_cpp import _logger

    L.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p())


def main(argv: list[str]) -> int:
    from flashio.bench.worker import (
        main as child_main,  # the standard library only, until the cgroup is joined
    )

    return child_main(argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
