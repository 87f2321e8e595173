"""One token's FFN over bundle rows: torch's products against flashio's kernels, float and quantized.

    python tests/bench/ffn_kernels.py [--rows 4096] [--dim 4096] [--gated] [--threads 1] [--seconds 1]

Prints, side by side in one run, the milliseconds and GB/s of flashio.ffn.ffn_compute (float rows)
and flashio.quant.quant_ffn_compute (quantized rows) for one token, with the kernels
(flashio.kernels) and without them (torch's products, the path taken when no C compiler is
there), and each row's time relative to fp16 through the kernels. Rows are random; the figures
are rows x row bytes over the time (the bytes a token touches); rows sit on huge pages, as the
runtime keeps them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from flashio import kernels
from flashio.arena import private_tensor
from flashio.ffn import ffn_compute
from flashio.quant import RowScratch, quant_ffn_compute, quantize_rows, row_quant


def timed(fn, seconds: float) -> float:
    """Median milliseconds of fn over ~`seconds` (after one warm-up call)."""
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def resident(t: torch.Tensor) -> torch.Tensor:
    """t copied to memory as the runtime keeps weights (huge pages, flashio.arena)."""
    out = private_tensor(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192, help="rows (default 8192: more bytes than a last-level cache holds)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--gated", action="store_true", help="gate, up and down parts (SwiGLU) instead of up and down")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = ("gate", "up", "down") if args.gated else ("up", "down")
    D, R = args.dim, args.rows
    gen = torch.Generator().manual_seed(0)
    bundles = torch.randn(R, len(names) * D, generator=gen) * 0.02
    h = torch.randn(1, D, generator=gen)
    parts = {p: slice(k * D, (k + 1) * D) for k, p in enumerate(names)}
    act = "silu" if args.gated else "relu"
    if not kernels.available():
        print(f"kernels unavailable ({kernels.why_not()}): only torch's products are timed")
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        rows = resident(bundles.to(dtype))
        x = h.to(dtype)
        cases.append((str(dtype).replace("torch.", ""), rows.shape[1] * rows.element_size(),
                      lambda rows=rows, x=x: ffn_compute(x, rows, parts, None, None, activation=act)))
    # int8: its one scale per part in the first codes' parities (the default) or after the codes (before)
    for scheme, group, two_level, embed in (("int8", None, False, None), ("int8", None, False, False),
                                            ("int4", None, False, None), ("int4", None, True, None),
                                            ("int4", 128, False, None), ("int4", D, False, None)):
        if two_level and D % 128:
            continue
        q = row_quant(names, dim=D, scheme=scheme, group_size=group, two_level=two_level, embed_scales=embed)
        rows = resident(quantize_rows(bundles, q))
        scratch = RowScratch(q)
        cases.append((f"{scheme} groups of {q.group_size}" + (", 2-level" if two_level else "")
                      + (", scales after codes" if embed is False else ""), q.row_bytes,
                      lambda rows=rows, q=q, scratch=scratch: quant_ffn_compute(h, rows, q, scratch, None, None,
                                                                             act_fn=getattr(F, act))))
    results = {}
    for name, row_bytes, fn in cases:
        with_k = timed(fn, args.seconds) if kernels.available() else None
        saved = kernels.available
        kernels.available = lambda: False  # torch's products (flashio.ffn checks through kernels.supports)
        try:
            without = timed(fn, args.seconds)
        finally:
            kernels.available = saved
        results[name] = (row_bytes, with_k, without)
    base = results["float16"][1] or results["float16"][2]
    print(f"one token, {R} rows x {'+'.join(names)} of {D}, {args.threads} thread(s)")
    print(f"{'rows':30s} {'bytes/row':>9s} {'kernels ms':>11s} {'GB/s':>6s} {'torch ms':>9s} {'GB/s':>6s} {'vs fp16 (kernels)':>18s}")
    for name, (row_bytes, with_k, without) in results.items():
        nb = R * row_bytes / 1e6
        k = f"{with_k:11.2f} {nb / with_k:6.1f}" if with_k else f"{'-':>11s} {'-':>6s}"
        rel = f"{with_k / base:17.2f}x" if with_k else f"{without / base:17.2f}x"
        print(f"{name:30s} {row_bytes:9d} {k} {without:9.2f} {nb / without:6.1f} {rel}")


if __name__ == "__main__":
    main()
