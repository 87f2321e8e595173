"""The cost of activation collection against a plain forward pass (the issue's 25% bound).

    PYTHONPATH=. python -m tasks.activation_cost [MODEL] [--sequences 64] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tasks.activations import ActivationOptions, _Collector, _run
from tasks.calibration import CalibrationData, load_tokens, prepare_calibration, resolve_spec
from tasks.demo import DEMO_CHECKPOINT_DIR
from tasks.hooks import ffn_spec, load_model
from tasks.source import SourceModel, inspect_source
from tasks.threads import torch_threads


def measure_overhead(source: SourceModel, calib: CalibrationData, options: ActivationOptions,
                     *, repeats: int = 3) -> dict:
    """Seconds for a plain forward pass (full model and decoder only) vs collection, same tokens;
    best of `repeats` (the machine is shared)."""
    ids = load_tokens(calib, "calibration")
    model = load_model(str(source.path), options.dtype, source.fingerprint)
    thresholds = (0.0,) * source.n_layers

    def plain_full() -> None:
        with torch.inference_mode(), torch_threads(options.torch_threads):
            for b in range(0, len(ids), options.batch_sequences):
                model(input_ids=ids[b : b + options.batch_sequences], use_cache=False)

    def plain_decoder() -> None:
        _run(source, ids, None, options)

    def collect() -> None:
        col = _Collector(source.n_layers, source.ffn_dim, ffn=ffn_spec(source), thresholds=thresholds,
                         options=options)
        _run(source, ids, col, options)

    times = {}
    for name, fn in (("plain_full_s", plain_full), ("plain_decoder_s", plain_decoder), ("collect_s", collect)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    times["tokens"] = int(ids.numel())
    times["overhead_vs_full"] = times["collect_s"] / times["plain_full_s"] - 1.0
    times["overhead_vs_decoder"] = times["collect_s"] / times["plain_decoder_s"] - 1.0
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure activation collection against a plain forward pass.")
    ap.add_argument("--measure", action="store_true", help="(the only mode; accepted for older scripts)")
    ap.add_argument("model", nargs="?", default=str(DEMO_CHECKPOINT_DIR))
    ap.add_argument("--calibration", default="stdlib:train")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--coactivation-stride", type=int, default=ActivationOptions.coactivation_stride)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    source = inspect_source(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        calib = prepare_calibration(source, resolve_spec(args.calibration), n_sequences=args.sequences,
                                    seq_len=args.seq_len, n_heldout=0, seed=0, out_dir=Path(tmp))
        options = ActivationOptions(batch_sequences=args.batch, coactivation_stride=args.coactivation_stride,
                                    torch_threads=args.threads)
        r = measure_overhead(source, calib, options)
    print(json.dumps(r, indent=1))
    print(f"collection costs {100 * r['overhead_vs_decoder']:+.1f}% vs a plain forward pass of the decoder "
          f"(the same layers), {100 * r['overhead_vs_full']:+.1f}% vs the full model with its LM head, over "
          f"{r['tokens']} tokens, {args.threads or torch.get_num_threads()} torch threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
