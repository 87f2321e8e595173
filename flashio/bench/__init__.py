"""Benchmarks a user runs on their own device and model (`flashio bench ...`, `flashio synth`).

- `flashio.bench.device`: random/sequential read throughput of the device under a directory, with
  the runtime's reader and fio: the device profile the cost model (flashio.costmodel) is built on.
- `flashio.bench.model`: the paper's per-token latency table (naive, hybrid, +predictor,
  +windowing, +bundling, the project's additions, mmap, dense), each configuration in a child
  process under a real DRAM limit (flashio.bench.cgroup), driven by an activation trace.

Nothing here is imported by the runtime.
"""
