"""Top-1 and perplexity of the exact selections at uniform densities, against dense, on token rows.

    nice -n 15 .venv/bin/python tests/bench/exact_sweep.py ARTIFACT TOKENS \\
        [--selections gate gate+up] [--densities 0.75 0.8 0.85 0.9]

(from the repository root, with flashio installed, or ``PYTHONPATH=.``)

ARTIFACT is gate-resident (``flashio pack --gate-resident --up-sketch int4``, or the conversion's
exact-gate-up bundle); TOKENS a safetensors file whose tensor ``--key`` holds int rows [n, L] (the
pipeline's calibration file: held-out rows that start with bos). Each row runs as one prompt step
(the exact engines keep per token exactly what they select, so this equals token by token; see
flashio.exact), every position but the last is compared with the dense model's: top-1 agreement,
and the perplexity change of the next tokens. Bytes: an exact selection reads the kept neurons' up +
down rows, two thirds of a whole neuron, so d x 2/3 of the naive FFN bytes with caching off.

Measured on Gemma 3 270M (8 rows x 128 tokens): see README's "Converting gated models".
This is a script, not a pytest module.
"""

from __future__ import annotations

import argparse
import math

import torch
from safetensors.torch import load_file

import flashio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("tokens")
    ap.add_argument("--key", default="heldout")
    ap.add_argument("--selections", nargs="+", default=["gate", "gate+up"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.75, 0.8, 0.85, 0.9])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = load_file(args.tokens)[args.key].long()
    with flashio.open(args.artifact, mode="dense") as dense:
        ref = [dense.forward(r) for r in rows]
    print(f"{len(rows)} rows x {rows.shape[1]} tokens; dense perplexity {_ppl(ref, rows):.3f}")
    for d in args.densities:
        for sel in args.selections:
            with flashio.open(args.artifact, selection=sel, density=d) as model:
                out = [model.forward(r) for r in rows]
            agree = sum((o[:-1].argmax(-1) == g[:-1].argmax(-1)).sum().item() for o, g in zip(out, ref))
            n = sum(len(r) - 1 for r in rows)
            change = _ppl(out, rows) / _ppl(ref, rows) - 1
            print(f"density {d:.2f} {sel:9s} top-1 {agree / n:.4f}  perplexity {100 * change:+.2f}%  "
                  f"FFN bytes read {2 / 3 * d:.3f} of naive", flush=True)


def _ppl(logits: list[torch.Tensor], rows: torch.Tensor) -> float:
    nll = sum(torch.nn.functional.cross_entropy(lg[:-1].float(), r[1:], reduction="sum").item()
              for lg, r in zip(logits, rows))
    return math.exp(nll / sum(len(r) - 1 for r in rows))


if __name__ == "__main__":
    main()
