"""What `flashio serve` costs over calling the model directly: time to the first streamed token
against `flashio run`'s prefill, and the server's overhead per token against FlashModel.generate.

    python tests/bench/bench_serve.py                       # packs the demo model into a temporary dir
    python tests/bench/bench_serve.py ARTIFACT --mode sparse --prompt "def main():" --tokens 128

Both sides run the same artifact, mode, prompt and token count with one torch thread (greedy, so the
same tokens). The server runs as `flashio serve` in a subprocess and is read as a client reads it
(httpx, server-sent events); figures are medians of --repeats runs after one warm-up.
Targets (issue 13): first token within 1.2x of the prefill, overhead < 2 ms per token.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tasks" / "demo" / "opt-stdlib"


def _direct_once(model, prompt: str, n_tokens: int) -> tuple[float, float, float, int]:
    t0 = time.perf_counter()
    times = [time.perf_counter() for _ in model.stream(prompt, n_tokens, temperature=0.0)]
    return (model.stats[0].total_ms, 1e3 * (times[0] - t0), 1e3 * (times[-1] - times[0]) / (len(times) - 1),
            len(times))


def _served_once(http: httpx.Client, prompt: str, n_tokens: int) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    times = []
    with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"the server answered {resp.status_code}: {resp.read().decode()}")
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["text"]:
                    times.append(time.perf_counter())
    return 1e3 * (times[0] - t0), 1e3 * (times[-1] - times[0]) / (len(times) - 1), len(times)


def measure(artifact: Path, mode: str, prompt: str, n_tokens: int, repeats: int) -> tuple[dict, dict]:
    """Direct and served runs alternate (after one warm-up each), so that a busy moment of the
    machine weighs on both sides alike."""
    import flashio

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flashio.cli", "serve", str(artifact), "--mode", mode,
                             "--port", str(port), "--torch-threads", "1"], stderr=subprocess.DEVNULL)
    direct, served = [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http, \
                flashio.open(artifact, mode=mode, torch_threads=1) as model:
            for _ in range(600):
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            for r in range(repeats + 1):
                d, v = _direct_once(model, prompt, n_tokens), _served_once(http, prompt, n_tokens)
                if r:  # the first is a warm-up
                    direct.append(d)
                    served.append(v)
    finally:
        proc.terminate()
        proc.wait(10)
    med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
    return ({"prefill_ms": med(direct, 0), "first_token_ms": med(direct, 1), "per_token_ms": med(direct, 2),
             "tokens": med(direct, 3)},
            {"first_token_ms": med(served, 0), "per_token_ms": med(served, 1), "tokens": med(served, 2)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", help="artifact directory (default: the demo model, packed)")
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--prompt", default="def read_lines(path):\n    ")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(args.artifact) if args.artifact else None
        if artifact is None:
            from flashio.format import write_artifact

            artifact = write_artifact(DEMO, Path(tmp) / "opt-stdlib")
        direct, server = measure(artifact, args.mode, args.prompt, args.tokens, args.repeats)
    print(f"artifact {artifact.name}, mode {args.mode}, {args.tokens} tokens, median of {args.repeats}")
    print(f"  FlashModel.stream : prefill {direct['prefill_ms']:.2f} ms, first token {direct['first_token_ms']:.2f} ms, "
          f"{direct['per_token_ms']:.3f} ms/token ({direct['tokens']:.0f} tokens)")
    print(f"  flashio serve     : first token {server['first_token_ms']:.2f} ms, {server['per_token_ms']:.3f} ms/token "
          f"({server['tokens']:.0f} text chunks)")
    ratio = server["first_token_ms"] / direct["prefill_ms"]
    overhead = server["per_token_ms"] - direct["per_token_ms"]
    print(f"time to first streamed token / run's prefill: {ratio:.2f}x (target <= 1.2x)")
    print(f"server overhead per token: {overhead:.3f} ms (target < 2 ms)")


if __name__ == "__main__":
    main()
