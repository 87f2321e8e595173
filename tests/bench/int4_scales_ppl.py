"""What int4 FFN rows lose with fewer scales: group sizes, and channel scales held in DRAM.

    .venv/bin/python tests/bench/int4_scales_ppl.py CKPT TOKENS --variants 32:none 640:none 640:max 64:max

(from the repository root; TOKENS: the pipeline's calibration file, tensors ``calibration`` and
``heldout``.) Each variant ``GROUP:CHANNELS`` quantizes every FFN matrix of the Hugging Face
checkpoint (gate/up/down or fc1/fc2) to int4 with flashio's GPTQ (``flashio.gptq``: asymmetric
groups of GROUP along d_model, fp16 scales and offsets, importance-weighted ranges), on Hessians
accumulated over ``--calibration-rows`` of the calibration tokens, puts the dequantized weights
back into the transformers model and prints its held-out perplexity against the float model's.
Everything else stays float: the figure is the FFN rows' own loss.

CHANNELS ``none``: rows as flashio's writer quantizes them. ``max`` / ``rms``: each row part is
first divided by a per-channel scale along d_model (the column's max |w| or root mean square over
the layer's neurons) and the scale multiplied back after: such a vector (d_model values per layer
and part) would live in DRAM, folded into the layer's input for up and gate and into its output
for down, so it costs no row bytes and no per-row work. The question it answers (issue 12): a
4096-wide int4 row part is exactly 2048 bytes, so a row reads a quarter of fp16's bytes only
without scale bytes in it (512-byte reads round any extra up to a block); one scale per part
could hide in the codes as int8's does (flashio.quant.RowQuant.embedded). GROUP = d_model is that
case.

This is a script, not a pytest module.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashio.gptq import gptq_neurons, gptq_rows
from flashio.quant import GroupCodes
from tasks.scoring import next_token_nll

CHANNELS = ("none", "max", "rms")


def ffn_matrices(layer: torch.nn.Module) -> tuple[list[torch.nn.Linear], torch.nn.Linear]:
    """(the matrices reading the FFN's input, the one reading its activations)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "down_proj"):
        ins = [m for m in (getattr(mlp, "gate_proj", None), mlp.up_proj) if m is not None]
        return ins, mlp.down_proj
    if hasattr(layer, "fc1"):  # OPT
        return [layer.fc1], layer.fc2
    raise SystemExit(f"no FFN matrices found in {type(layer).__name__} (gate/up/down_proj or fc1/fc2)")


def dequantize(gc: GroupCodes, g: int) -> torch.Tensor:
    n, d = gc.codes.shape
    c = gc.codes.float().view(n, d // g, g)
    o = 0.0 if gc.offsets is None else gc.offsets.float()[..., None]
    return (c * gc.scales.float()[..., None] + o).view(n, d)


def channel_scales(w: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-column scale of rows w [N, D] (1 for 'none'), kept away from zero."""
    if kind == "none":
        return torch.ones(w.shape[1])
    c = w.abs().amax(0) if kind == "max" else w.square().mean(0).sqrt()
    return c.clamp_min(float(c.mean()) * 1e-3)


def perplexity(model, rows: torch.Tensor) -> float:
    with torch.no_grad():
        nll = [next_token_nll(model(r[None]).logits[0], r) for r in rows]
    return math.exp(float(torch.cat(nll).mean()))


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("tokens", type=Path, help="safetensors with int 'calibration' and 'heldout' rows [n, L]")
    ap.add_argument("--variants", nargs="+", default=["32:none", "32:max"], help="GROUP:CHANNELS (channels: "
                    + ", ".join(CHANNELS) + "; GROUP must divide d_model)")
    ap.add_argument("--calibration-rows", type=int, default=64)
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    variants = []
    for v in args.variants:
        g, _, kind = v.partition(":")
        if not g.isdigit() or kind not in CHANNELS:
            raise SystemExit(f"variant {v!r}: expected GROUP:CHANNELS with CHANNELS one of {', '.join(CHANNELS)}")
        variants.append((int(g), kind))
    tokens = load_file(str(args.tokens))
    calibration, heldout = tokens["calibration"][: args.calibration_rows].long(), tokens["heldout"].long()
    model = AutoModelForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.float32).eval()
    decoder = getattr(model, "model", model)
    layers = list(getattr(decoder, "layers", None) or decoder.decoder.layers)
    mats = [ffn_matrices(layer) for layer in layers]
    originals = [[m.weight.data.clone() for m in (*ins, down)] for ins, down in mats]

    # the inputs' second moments: the FFN's input (shared by its input matrices) and its activations
    hess: list[list[torch.Tensor | float]] = [[0.0, 0.0] for _ in layers]

    def hook(i: int, k: int):
        def add(_mod, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hess[i][k] = hess[i][k] + x.T @ x
        return add

    handles = [m.register_forward_pre_hook(hook(i, k)) for i, (ins, down) in enumerate(mats)
               for k, m in ((0, ins[0]), (1, down))]
    with torch.no_grad():
        for r in calibration:
            model(r[None])
    for h in handles:
        h.remove()
    base = perplexity(model, heldout)
    print(f"{len(heldout)} held-out rows x {heldout.shape[1]} tokens, {len(calibration)} calibration rows; "
          f"float perplexity {base:.4f}", flush=True)
    for g, kind in variants:
        t0 = time.perf_counter()
        for (ins, down), (h_in, h_act) in zip(mats, hess, strict=True):
            h_in, h_act = h_in.float(), h_act.float()
            for m in ins:  # rows over the inputs: x . (q * c) = (x * c) . q
                w = m.weight.data
                c = channel_scales(w, kind)
                q = gptq_rows(w / c, h_in * c[:, None] * c[None, :], bits=4, group_size=g, offsets=True)
                m.weight.data = dequantize(q, g) * c
            rows = down.weight.data.t().contiguous()  # [N, D]: a neuron's row over the outputs
            c = channel_scales(rows, kind)
            q = gptq_neurons(rows / c, h_act, bits=4, group_size=g, offsets=True)
            down.weight.data = (dequantize(q, g) * c).t().contiguous()
        ppl = perplexity(model, heldout)
        for (ins, down), orig in zip(mats, originals, strict=True):
            for m, w in zip((*ins, down), orig, strict=True):
                m.weight.data = w
        print(f"groups of {g:5d}, channel scales {kind:4s}: perplexity {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%) "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
