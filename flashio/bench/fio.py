"""fio as the independent reference for device throughput (when it is installed).

    if fio_available():
        mbps = fio_randread(path, file_bytes, chunk_bytes=16384, threads=16, seconds=1.0)

Random reads use the same concurrency model as the runtime's reader: `threads` threads, each with
one synchronous O_DIRECT read in flight (`--ioengine=psync --numjobs=T --thread`).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

from flashio.storage import evict_from_page_cache

log = logging.getLogger(__name__)


def fio_available() -> bool:
    return shutil.which("fio") is not None


def _run(cmd: list[str], timeout_s: float) -> dict | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("fio did not finish: %s", exc)
        return None
    if proc.returncode != 0 or "{" not in proc.stdout:
        log.warning("fio failed (exit %d): %s", proc.returncode, proc.stderr.strip()[:300])
        return None
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
    except (ValueError, KeyError, IndexError) as exc:
        log.warning("cannot parse fio's JSON output: %s", exc)
        return None


def fio_randread(path: Path, file_bytes: int, *, chunk_bytes: int, threads: int,
                 seconds: float = 1.0) -> float | None:
    """MB/s of O_DIRECT random reads of chunk_bytes by `threads` psync threads; None on failure."""
    fio = shutil.which("fio")
    if fio is None:
        return None
    cmd = [fio, "--name=randread", f"--filename={path}", "--rw=randread", "--direct=1",
           f"--bs={chunk_bytes}", f"--size={file_bytes}", "--ioengine=psync", f"--numjobs={threads}",
           "--thread", "--group_reporting", "--norandommap", "--randrepeat=0",
           f"--runtime={max(1, round(seconds))}", "--time_based", "--output-format=json"]
    evict_from_page_cache(path)
    read = _run(cmd, timeout_s=60 + 4 * seconds)
    return None if read is None else read["bw_bytes"] / 1e6


def fio_sequential(path: Path, file_bytes: int, *, seconds: float = 2.0) -> float | None:
    """MB/s of O_DIRECT sequential 1 MiB reads with 16 in flight (libaio); None on failure."""
    fio = shutil.which("fio")
    if fio is None:
        return None
    cmd = [fio, "--name=seqread", f"--filename={path}", "--rw=read", "--direct=1", "--bs=1M",
           f"--size={file_bytes}", "--ioengine=libaio", "--iodepth=16", "--numjobs=1",
           f"--runtime={max(1, round(seconds))}", "--time_based", "--output-format=json"]
    evict_from_page_cache(path)
    read = _run(cmd, timeout_s=60 + 4 * seconds)
    return None if read is None else read["bw_bytes"] / 1e6
