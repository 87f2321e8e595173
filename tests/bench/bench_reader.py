"""Random-row read throughput of BundleReader against fio, same file, same pattern.

    .venv/bin/python tests/bench/bench_reader.py                       # 4 GiB file, 16 KiB rows
    .venv/bin/python tests/bench/bench_reader.py --size 8GiB --threads 16 32 --chunk 65536
    .venv/bin/python tests/bench/bench_reader.py --fio-engine io_uring --keep

(from the repository root, with flashio installed: ``pip install -e .``, or ``PYTHONPATH=.``)

Creates (or reuses, when its size matches) a file of ``--size`` bytes on a disk-backed filesystem
(``--path``; not tmpfs, which refuses O_DIRECT), evicts it from the page cache, then for each
thread count reads ``--reads`` random rows of ``--chunk`` bytes with ``BundleReader.read_rows`` in
batches of ``--batch`` ids, and prints MB/s and IOPS. Rows are drawn without replacement from the
even row ids, so no two ids of a batch are adjacent: every read is exactly one chunk, as in fio's
randread (coalescing would otherwise make our reads larger than fio's).

If ``fio`` is on PATH (``apt-get install -y fio``) it runs the same pattern on the same file:
``--rw=randread --direct=1 --bs=CHUNK`` with either ``--ioengine=psync --numjobs=THREADS``
(default: THREADS threads each issuing one synchronous pread at a time, which is exactly what the
reader's pool does) or ``--ioengine=io_uring --iodepth=THREADS --numjobs=1`` (the same number of
reads in flight from one thread), and prints both figures side by side with their ratio. The
target is >= 0.75 of fio at the same chunk size and thread count (DESIGN.md section 7).

The file is deleted at the end unless ``--keep``. This is a script, not a pytest module.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flashio.bench.device import ensure_test_file
from flashio.storage import AlignedArena, BundleReader, LayerExtent, evict_from_page_cache

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4GiB', '4G', '512m', '16384' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4GiB, 512M, 16384)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def ensure_file(path: Path, size_bytes: int) -> None:
    """Write ``size_bytes`` of incompressible, non-sparse data (reused when the size matches)."""
    if path.exists() and path.stat().st_size == size_bytes:
        print(f"reusing {path} ({size_bytes / 2**30:.2f} GiB)")
        return
    print(f"writing {path} ({size_bytes / 2**30:.2f} GiB)...", flush=True)
    t0 = time.perf_counter()
    ensure_test_file(path, size_bytes)  # the device profile's writer: checks free space, fsyncs
    print(f"  written in {time.perf_counter() - t0:.1f} s")


def bench_reader(path: Path, size_bytes: int, chunk: int, threads: int, n_reads: int,
                 batch: int, seed: int) -> dict[str, float]:
    """Cold random reads of ``n_reads`` rows of ``chunk`` bytes: MB/s, IOPS, CPU (user+sys) per read."""
    n_rows = size_bytes // chunk
    rng = np.random.default_rng(seed)
    # even rows only: no two chosen rows are adjacent, so every read is one chunk (as in fio)
    ids_all = rng.choice(n_rows // 2, size=n_reads, replace=False).astype(np.int64) * 2
    batches = [np.sort(ids_all[i : i + batch]) for i in range(0, n_reads, batch)]
    evict_from_page_cache(path)
    total_bytes = reads = 0
    with (BundleReader(path, [LayerExtent(0, n_rows, chunk)], threads=threads) as reader,
          AlignedArena(batch * chunk) as arena):
        if not reader.direct:
            print("  warning: O_DIRECT refused on this filesystem, reading through the page cache")
        t0, cpu0 = time.perf_counter(), time.process_time()
        for ids in batches:
            out = arena.tensor(torch.uint8, (len(ids), chunk))
            result = reader.read_rows(0, ids, out)
            total_bytes += result.bytes_read
            reads += result.reads
        elapsed_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        del out
    assert reads == n_reads and total_bytes == n_reads * chunk, (reads, total_bytes)
    return {"mbps": total_bytes / elapsed_s / 1e6, "iops": reads / elapsed_s,
            "cpu_us_per_read": cpu_s / reads * 1e6}


def bench_fio(path: Path, size_bytes: int, chunk: int, threads: int, engine: str,
              runtime_s: float) -> dict[str, float] | None:
    """fio randread, direct=1, same file/chunk/concurrency; None when fio is not installed."""
    fio = shutil.which("fio")
    if fio is None:
        return None
    if engine == "psync":
        concurrency = ["--ioengine=psync", f"--numjobs={threads}", "--thread"]
    else:
        concurrency = [f"--ioengine={engine}", f"--iodepth={threads}", "--numjobs=1"]
    cmd = [
        fio, "--name=randread", f"--filename={path}", "--rw=randread", "--direct=1",
        f"--bs={chunk}", f"--size={size_bytes}", *concurrency, "--group_reporting",
        f"--runtime={max(runtime_s, 3.0):.0f}", "--time_based", "--output-format=json",
    ]
    evict_from_page_cache(path)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"  fio failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
        return None
    read = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
    return {"mbps": read["bw_bytes"] / 1e6, "iops": read["iops"], "cmd": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=Path("/var/tmp/flashio-bench-reader.bin"),
                        help="file to create or reuse (a disk-backed filesystem, not tmpfs)")
    parser.add_argument("--size", type=parse_bytes, default=parse_bytes("4GiB"))
    parser.add_argument("--chunk", type=parse_bytes, default=16384, help="row bytes (fio's bs)")
    parser.add_argument("--threads", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--reads", type=int, default=131072, help="random rows per thread count")
    parser.add_argument("--batch", type=int, default=2048, help="ids per read_rows call")
    parser.add_argument("--fio-engine", choices=["psync", "io_uring", "libaio"], default="psync")
    parser.add_argument("--fio-runtime", type=float, default=8.0, help="seconds per fio run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the file for the next run")
    args = parser.parse_args(argv)

    if args.chunk % 512 or args.size < 4 * args.chunk:
        parser.error("--chunk must be a multiple of 512 and --size at least 4 chunks")
    size_bytes = args.size // args.chunk * args.chunk
    n_reads = min(args.reads, size_bytes // args.chunk // 2)
    ensure_file(args.path, size_bytes)
    print(f"{n_reads} random {args.chunk}-byte rows, batches of {args.batch}, "
          f"fio engine {args.fio_engine if shutil.which('fio') else '(fio not on PATH)'}")
    print(f"{'threads':>7} {'ours MB/s':>10} {'ours IOPS':>10} {'CPU us/read':>11} {'fio MB/s':>9} "
          f"{'fio IOPS':>9} {'ratio':>6}")
    try:
        for threads in args.threads:
            ours = bench_reader(args.path, size_bytes, args.chunk, threads, n_reads, args.batch,
                                args.seed)
            ref = bench_fio(args.path, size_bytes, args.chunk, threads, args.fio_engine,
                            args.fio_runtime)
            fio_cols = (f"{ref['mbps']:9.0f} {ref['iops']:9.0f} {ours['mbps'] / ref['mbps']:6.2f}"
                        if ref else f"{'-':>9} {'-':>9} {'-':>6}")
            print(f"{threads:7d} {ours['mbps']:10.0f} {ours['iops']:10.0f} "
                  f"{ours['cpu_us_per_read']:11.1f} {fio_cols}", flush=True)
            if ref:
                print(f"        fio: {ref['cmd']}")
    finally:
        if not args.keep:
            args.path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
