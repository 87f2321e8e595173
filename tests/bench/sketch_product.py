"""The exact gate's up-sketch product x @ up.T per layer, ms, one thread: quant_project on the stored
rows against flashio.sketch's layout and the alternatives it was chosen over; then, given a
gate+up artifact, per-token ms of a token-by-token sparse forward with either product.

    nice -n 15 .venv/bin/python tests/bench/sketch_product.py [--artifact ART] [--tokens 32]

(from the repository root, with flashio installed, or ``PYTHONPATH=.``). Shapes: Gemma 3 270M's
2048 x 640 and a 7B's 11008 x 4096 FFN, symmetric int4 in groups of 32 (the writer's sketch),
T = 1 and 16 positions. Rows: 'stored' = quant_project (the path before flashio.sketch);
'sketch' = UpSketch.project; 'int4pack' = torch's _weight_int4pack_mm_for_cpu with fp32
activations (its fp32 scale-and-zero pairs: +33% bytes); 'int8 codes' = one byte per code (twice
the code bytes), a copy, the scale multiply and a matmul; 'kernels' = flashio.kernels' quantized
dot products on the stored rows, a position at a time, on one kernel thread (int8 activations on
VNNI CPUs: its diff is that rounding). Each figure: the best of `--reps` runs
after two warm-ups, with the largest |difference| from 'stored' relative to its largest value.
This is a script, not a pytest module.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from flashio.quant import RowScratch, dequantize_rows, quant_project, quantize_rows, row_quant
from flashio.sketch import SketchScratch, UpSketch

SHAPES = ((2048, 640), (11008, 4096))


def best_ms(fn, reps: int) -> float:
    fn(), fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def int4pack(rows: torch.Tensor, q) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout of the stored sketch: codes 0..15 (value (code - 8) * scale + zero)
    packed by torch, fp32 scale-and-zero pairs [D/g, N, 2]."""
    p = q.parts[0]
    c = rows[:, p.codes_start : p.codes_end]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat([c & 15, c >> 4], 1).int(), 1)
    s = rows[:, p.scales_start : p.scales_end].view(torch.float16).float().t()
    return packed, torch.stack([s, torch.zeros_like(s)], -1).contiguous()


def int8_product(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ up.T from one byte per code: codes [N, D] int8, scales [N, D/32] float32, m the chunk scratch."""
    n, d, c = codes.shape[0], codes.shape[1], m.shape[0]
    out = torch.empty(x.shape[0], n)
    for a in range(0, n, c):
        b = min(n, a + c)
        mc = m[: b - a]
        mc.copy_(codes[a:b])
        mc.view(b - a, d // 32, 32).mul_(scales[a:b, :, None])
        torch.mm(x, mc.t(), out=out[:, a:b])
    return out


def kernel_product(x: torch.Tensor, rows: torch.Tensor, q) -> torch.Tensor:
    """x @ up.T through flashio.kernels' quantized dot products on the stored rows, a position at a
    time (the runtime's path on the CPU for up to flashio.exact.SKETCH_KERNEL_TOKENS positions)."""
    from flashio import kernels
    k, layout = kernels.kernels(), q.layout("up")
    return torch.stack([k.qdot(rows, layout, x[t]) for t in range(x.shape[0])])


def micro_shape(n: int, d: int, reps: int) -> None:
    torch.manual_seed(0)
    q = row_quant(("up",), dim=d, scheme="int4", group_size=32, aligned=False, offsets=False)
    rows = quantize_rows(torch.randn(n, d) * 0.05, q)
    packed, sz = int4pack(rows, q)
    deq = dequantize_rows(rows, q, "up").view(n, d // 32, 32)
    scales = deq.abs().amax(-1, keepdim=True) / 7
    codes8 = torch.round(deq / scales).to(torch.int8).view(n, d)  # the same codes, a byte each
    sketch = UpSketch.pack(rows.clone(), q)
    sk_scratch, scratch = SketchScratch(q, sketch.chunk_rows), RowScratch(q)
    m = torch.empty(sketch.chunk_rows, d)
    for t in (1, 16):
        x = torch.randn(t, d)
        want = quant_project(x, rows, q, "up", scratch)
        diff = (sketch.project(x, sk_scratch) - want).abs().max().item() / want.abs().max().item()
        products = (partial(quant_project, x, rows, q, "up", scratch), partial(sketch.project, x, sk_scratch),
                    partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, 32, sz),
                    partial(int8_product, x, codes8, scales[..., 0], m), partial(kernel_product, x, rows, q))
        kdiff = (kernel_product(x, rows, q) - want).abs().max().item() / want.abs().max().item()
        ms = [best_ms(f, reps if n * t < 100_000 else max(2, reps // 4)) for f in products]
        print(f"| {n} x {d} | {t} | " + " | ".join(f"{v:.2f}" for v in ms) + f" | {diff:.1e} | {kdiff:.1e} |",
              flush=True)


def micro(reps: int) -> None:
    print("| N x D | T | stored ms | sketch ms | int4pack ms | int8 codes ms | kernels ms | sketch diff | kernels diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, d in SHAPES:
        micro_shape(n, d, reps)


def timed_sketch(eng) -> list[float]:
    """Wrap the engine's sketch product to add its seconds to the returned one-element list."""
    spent, product = [0.0], eng.sketch_up

    def sketch_up(i, h):
        t = time.perf_counter()
        out = product(i, h)
        spent[0] += time.perf_counter() - t
        return out

    eng.sketch_up = sketch_up
    return spent


def per_token(art: str, tokens: int, runs: int) -> None:
    """ms per token of a token-by-token sparse forward (head once at the end), and of its sketch
    products, with 'stored' (quant_project on the resident file's rows, the old path) and 'sketch'
    (as opened: on the CPU the kernels' products on the stored rows, else UpSketch) alternating run
    by run, each model opened once."""
    from safetensors.torch import load_file

    import flashio
    from flashio.exact import GateUpEngine
    from flashio.format.manifest import UP_SKETCH_TENSOR

    ids = torch.randint(3, 1000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    models, times = {}, {}
    try:
        for product in ("stored", "sketch"):
            model = models[product] = flashio.open(art, mode="sparse", torch_threads=1)
            eng, m = model.engine, model.artifact.manifest
            assert isinstance(eng, GateUpEngine), type(eng)
            if product == "stored":
                stored = load_file(str(model.artifact.file(m.resident_file)))
                eng.sketch = [stored[UP_SKETCH_TENSOR.format(i)] for i in range(m.n_layers)]
                eng.packed, eng.sketch_scratch, eng.kernel_tokens = [], RowScratch(m.up_sketch), 0
            times[product] = ([], [], timed_sketch(eng))
        for _ in range(runs):
            for product, model in models.items():
                total, in_sketch, spent = times[product]
                spent[0], t = 0.0, time.perf_counter()
                model.forward(ids, token_by_token=True)
                total.append((time.perf_counter() - t) * 1e3 / tokens)
                in_sketch.append(spent[0] * 1e3 / tokens)
    finally:
        for model in models.values():
            model.close()
    for product, (total, in_sketch, _) in times.items():
        print(f"{product}: forward {statistics.median(total):.1f} ms/token, sketch products "
              f"{statistics.median(in_sketch):.1f} ms/token (medians of {runs}; forward "
              + ", ".join(f"{v:.1f}" for v in total) + ")", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="a gate+up artifact: also time its token-by-token sparse forward")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.skip_micro:
        micro(args.reps)
    if args.artifact:
        per_token(args.artifact, args.tokens, args.runs)


if __name__ == "__main__":
    main()
