"""What quantizing the token embeddings (and a tied head, which multiplies by them) costs, alone.

    .venv/bin/python tests/bench/embedding_ppl.py ARTIFACT TOKENS [--reference REF] [--variants int8:640 int8:32]

ARTIFACT holds float token embeddings (e.g. `quant_ppl.py`'s variants written with an older
flashio, or any unquantized artifact); each variant replaces them, in memory, by their values
rounded to nearest in groups (``BITS:GROUP``; int8 symmetric, int4 asymmetric as flashio's rows),
so everything else stays as the artifact has it. Each row of ``TOKENS`` (a safetensors file,
tensor ``--key``, int [n, L], the pipeline's calibration file) is scored as
tests/bench/quant_ppl.py scores it, against REF (default: ARTIFACT itself): perplexity, top-1
agreement and mean KL(REF || variant) per variant, and the embeddings' mean squared change.

This is a script, not a pytest module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import flashio
from flashio.quant import dequantize_rows, quantize_rows, row_quant
from tasks.scoring import NextTokenTally


def rounded(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """w [V, D] rounded to nearest in groups of `group` along D (int4: with offsets), stored as
    flashio stores one-part rows and read back."""
    q = row_quant(("w",), dim=w.shape[1], scheme=f"int{bits}", group_size=group, aligned=False,
                  offsets=bits == 4, embed_scales=False)
    return dequantize_rows(quantize_rows(w.float(), q), q, "w").to(w.dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path, help="artifact with float token embeddings")
    ap.add_argument("tokens", type=Path, help="safetensors file of token rows")
    ap.add_argument("--key", default="heldout")
    ap.add_argument("--reference", type=Path, help="artifact whose outputs are the reference (default: ARTIFACT)")
    ap.add_argument("--variants", nargs="+", default=["int8:0", "int8:32", "int8:64", "int4:32"],
                    help="BITS:GROUP, group 0 = one scale per row (default: int8:0 int8:32 int8:64 int4:32)")
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    ids = load_file(str(args.tokens))[args.key].long()
    with flashio.open(args.reference or args.artifact, mode="dense") as ref:
        refs = [ref.forward(row) for row in ids]
    with flashio.open(args.artifact, mode="dense") as model:
        tok = model.model.tok
        if not isinstance(tok, torch.Tensor):
            raise SystemExit(f"{args.artifact}: its token embeddings are not float; write it unquantized")
        tied = model.model.lm_head is tok
        print(f"{args.artifact}: embeddings {tuple(tok.shape)} {tok.dtype}, head {'tied' if tied else 'untied'}; "
              f"{len(ids)} rows x {ids.shape[1]} tokens of {args.tokens} [{args.key}]")
        for text in ["float:0", *args.variants]:
            kind, _, group = text.partition(":")
            g = int(group or 0) or tok.shape[1]
            w = tok if kind == "float" else rounded(tok, int(kind.removeprefix("int")), g)
            model.model.tok = w
            if tied:
                model.model.lm_head = w
            tally = NextTokenTally()
            for row, r in zip(ids, refs):
                tally.add(r, model.forward(row), row)
            print(f"{text:10s} perplexity {tally.perplexities()[1]:9.4f}  top-1 {tally.agree / tally.n_tok:.4f}  "
                  f"mean KL {tally.kl / tally.n_tok:.2e}  embeddings' mean squared change "
                  f"{float((w.float() - tok.float()).pow(2).mean()):.2e}", flush=True)
        model.model.tok = tok
        if tied:
            model.model.lm_head = tok
    return 0


if __name__ == "__main__":
    sys.exit(main())
