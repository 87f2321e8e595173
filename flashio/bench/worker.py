"""One configuration of `flashio bench model`, in its own process (and memory cgroup).

    python -m flashio.bench.worker SPEC.json RESULT.json

SPEC names the artifact, the FlashConfig to open it with (as `FlashConfig.to_dict()`; its
torch_threads, when set, is applied at open, in this process only), the trace to replay, the
token ids to feed and the cgroup to join. The process joins the cgroup before importing torch, so everything it ever
allocates is charged to the limit; it then opens the model, feeds the tokens one step per token with each step's
head, as generation runs them (`forward(..., token_by_token=True, head_per_step=True)`), and writes every step's
statistics to RESULT.json.
Only the standard library is imported before the cgroup is joined.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(spec: dict) -> dict:
    import torch  # after the cgroup join: its memory is charged there

    from flashio import kernels
    from flashio.config import FlashConfig
    from flashio.runtime import open_model
    from flashio.storage import evict_from_page_cache
    from flashio.trace import Trace, TraceReplay

    config = FlashConfig.from_dict(spec["config"])
    source = None
    if spec.get("trace"):
        source = TraceReplay(Trace.load(spec["trace"]), lookahead_recall=spec.get("lookahead_recall", 1.0))
        if config.lookahead:
            source.prepare(len(spec["tokens"]))
    t0 = time.perf_counter()
    with open_model(spec["artifact"], config, active_source=source) as model:
        open_s = time.perf_counter() - t0
        # the resident weights were read through the page cache: drop those pages so that the
        # limit is spent on what the configuration itself keeps
        m = model.artifact.manifest
        for name in (m.resident_file, m.predictors_file):
            if name:
                evict_from_page_cache(model.artifact.file(name))
        rss_open = _rss_bytes()
        t1 = time.perf_counter()
        model.forward(spec["tokens"], token_by_token=True, head_per_step=True)  # per-token latency: head in each step
        run_s = time.perf_counter() - t1
        steps = [asdict(s) for s in model.stats]
        cuda = model.device.type == "cuda"
        return {"ok": True, "device": str(model.device), "staging_bytes": model.staging_bytes,
                "device_peak_bytes": torch.cuda.max_memory_allocated(model.device) if cuda else None, "steps": steps, "open_s": open_s, "run_s": run_s,
                "preload_bytes": model.preload_bytes,
                "lookahead": getattr(model.engine, "lookahead_state", lambda: None)(),
                "capacity": model.capacity, "threads": model.plan.threads, "max_gap": model.plan.max_gap,
                "compute_dtype": str(model.compute_dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads(), "compute_threads": kernels.threads(),
                "memory": model.memory_bytes(), "rss_after_open_bytes": rss_open,
                "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "trace": source.description if source is not None else None}


def main(argv: list[str], run_spec: Callable[[dict], dict] | None = None) -> int:
    """The child's body: read the spec, join its cgroup, `run_spec(spec)` (default: flashio's
    run; the llama.cpp peer passes its own), write the result for the parent."""
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        if spec.get("cgroup"):
            from flashio.bench.cgroup import join

            join(spec["cgroup"])
        result = (run_spec or run)(spec)
    except Exception as exc:  # reported to the parent, which prints it in the table
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
