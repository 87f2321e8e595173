"""Dense perplexity of a checkpoint's float and quantized artifacts on the same token rows.

    nice -n 15 .venv/bin/python tests/bench/quant_ppl.py /tmp/g3/hf \\
        /tmp/g3run/work/calibration/*/tokens.safetensors --out /tmp/q12
    .venv/bin/python tests/bench/quant_ppl.py CKPT TOKENS --variants float32:none bfloat16:none bfloat16:int8

(from the repository root, with flashio installed: ``pip install -e .``, or ``PYTHONPATH=.``)

Writes one artifact per ``--variants`` entry (``DTYPE:SCHEME``, scheme ``none``, ``int8`` or
``int4``, or ``int8+gptq`` / ``int4+gptq``: GPTQ on the token file's ``calibration`` rows, for the
FFN rows and the resident matrices, these rounded to nearest with ``--resident-rtn``) from the
Hugging Face checkpoint with flashio's writer into ``--out`` (an artifact whose
manifest is already there is reused), opens each with ``mode="dense"`` and scores the rows of
``TOKENS`` (a safetensors file, tensor ``--key``, int [n, L]: the pipeline's calibration file, whose
held-out rows start with bos) the way the conversion's evaluation does (tasks.evaluation): each row
on its own, its first token context only, the other L-1 scored, NLL summed over all rows and
averaged per token. The first variant is the reference: every line shows the perplexity change
against it, and top-1 agreement and mean KL(reference || variant) over all positions. The issue's
targets (issue 12): int8 within +0.5% and int4 within +3% of the float perplexity.

This is a script, not a pytest module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import flashio
from flashio.format import Artifact, write_artifact
from tasks.scoring import NextTokenTally

SCHEMES = ("none", "int8", "int4", "int8+gptq", "int4+gptq")  # +gptq: GPTQ on the token file's calibration rows


def parse_variant(text: str) -> tuple[str, str | None]:
    dtype, _, scheme = text.partition(":")
    scheme = scheme or "none"
    if dtype not in ("float32", "float16", "bfloat16") or scheme not in SCHEMES:
        raise SystemExit(f"variant {text!r}: expected DTYPE:SCHEME with DTYPE float32, float16 or bfloat16 and "
                         f"SCHEME one of {', '.join(SCHEMES)}")
    return dtype, None if scheme == "none" else scheme


def artifact_for(ckpt: Path, out: Path, dtype: str, scheme: str | None, group_size: int | None,
                 resident: str | None, calibration: torch.Tensor | None = None, resident_rtn: bool = False,
                 two_level: bool = False, scales_after: bool = False) -> Path:
    """The variant's artifact under `out`, written unless its manifest is already there (scheme
    'int4+gptq': GPTQ on the `calibration` rows, for the resident matrices too unless resident_rtn)."""
    name = f"{dtype}-{(scheme or 'float').replace('+', '-')}" + (f"-g{group_size}" if scheme and group_size else "") \
        + (f"-resident-{resident}" if scheme and resident else "") \
        + ("-resident-rtn" if scheme and scheme.endswith("+gptq") and resident_rtn else "") \
        + ("-two-level" if scheme and scheme.startswith("int4") and two_level else "") \
        + ("-scales-after" if scheme and scheme.startswith("int8") and scales_after else "")
    path = out / name
    if not (path / "manifest.json").is_file():
        t0 = time.perf_counter()
        hessians = None
        if scheme and scheme.endswith("+gptq"):
            from tasks.hessians import CalibrationHessians
            from tasks.source import inspect_source

            scheme = scheme.removesuffix("+gptq")
            hessians = CalibrationHessians(inspect_source(str(ckpt), hash_files=False), calibration)
        write_artifact(ckpt, path, dtype=dtype, quantize=scheme, group_size=group_size if scheme else None,
                       quantize_resident=resident if scheme else None, two_level_scales=two_level, hessians=hessians,
                       resident_hessians=None if hessians is None or resident_rtn else hessians.resident,
                       embed_scales=False if scales_after else None, overwrite=True)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def file_bytes(path: Path) -> dict[str, int]:
    m = Artifact(path).manifest
    return {"ffn_bytes": (path / m.ffn_file).stat().st_size, "resident_bytes": (path / m.resident_file).stat().st_size,
            "row_bytes": m.row_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory (config.json + safetensors)")
    ap.add_argument("tokens", type=Path, help="safetensors file of token rows (the pipeline's calibration file)")
    ap.add_argument("--key", default="heldout", help="tensor of the token file (default: heldout)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/q12"), help="where the artifacts are written")
    ap.add_argument("--variants", nargs="+", default=["float32:none", "float32:int8", "float32:int4"],
                    help="DTYPE:SCHEME per artifact; the first is the reference (default: float32 with none, int8, int4)")
    ap.add_argument("--group-size", type=int, help="elements per scale (default: the writer's, the whole row part)")
    ap.add_argument("--quantize-resident", choices=["none", "int8", "int4"], help="resident matrices (default: the writer's, int8)")
    ap.add_argument("--resident-rtn", action="store_true",
                    help="+gptq variants: round the resident matrices to nearest (default: GPTQ for them too)")
    ap.add_argument("--two-level", action="store_true",
                    help="int4 variants: two-level scales (6-bit multiples of fp16 steps per super-block)")
    ap.add_argument("--scales-after-codes", action="store_true",
                    help="int8 variants: each part's scale after its codes (default: in the first codes' parities)")
    ap.add_argument("--rows", type=int, help="score only the first ROWS rows")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    ids = load_file(str(args.tokens))[args.key].long()  # [n, L]
    ids = ids[: args.rows] if args.rows else ids
    variants = [parse_variant(v) for v in args.variants]
    args.out.mkdir(parents=True, exist_ok=True)
    calibration = load_file(str(args.tokens))["calibration"].long() if any(
        s and s.endswith("+gptq") for _, s in variants) else None
    paths = [artifact_for(args.checkpoint, args.out, d, s, args.group_size, args.quantize_resident, calibration,
                          args.resident_rtn, args.two_level, args.scales_after_codes) for d, s in variants]
    tallies = [NextTokenTally() for _ in paths]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        models = [stack.enter_context(flashio.open(p, mode="dense")) for p in paths]
        for k, row in enumerate(ids):
            ref = models[0].forward(row)  # [L, V]
            tallies[0].add(ref, ref, row)
            for model, tally in zip(models[1:], tallies[1:]):
                tally.add(ref, model.forward(row), row)
            print(f"row {k + 1}/{len(ids)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    ppl_ref = tallies[0].perplexities()[1]
    rows = []
    for (dtype, scheme), path, tally in zip(variants, paths, tallies):
        ppl = tally.perplexities()[1]
        rows.append({"artifact": path.name, "dtype": dtype, "rows": scheme or dtype,
                     "resident": Artifact(path).manifest.resident_quant.scheme
                     if Artifact(path).manifest.resident_quant else dtype,
                     "perplexity": ppl, "vs_reference": ppl / ppl_ref - 1, "top1": tally.agree / tally.n_tok,
                     "mean_kl": tally.kl / tally.n_tok, **file_bytes(path)})
    print(f"{len(ids)} rows x {ids.shape[1]} tokens of {args.tokens} [{args.key}], {tallies[0].n_pred} scored; "
          f"reference {rows[0]['artifact']}")
    print(f"{'artifact':28s} {'rows':>8s} {'resident':>9s} {'perplexity':>10s} {'vs ref':>8s} {'top-1':>7s} "
          f"{'mean KL':>9s} {'row B':>6s} {'ffn MB':>8s} {'resident MB':>11s}")
    for r in rows:
        print(f"{r['artifact']:28s} {r['rows']:>8s} {r['resident']:>9s} {r['perplexity']:10.4f} "
              f"{100 * r['vs_reference']:+7.2f}% {r['top1']:7.4f} {r['mean_kl']:9.2e} {r['row_bytes']:6d} "
              f"{r['ffn_bytes'] / 1e6:8.1f} {r['resident_bytes'] / 1e6:11.1f}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": str(args.tokens), "key": args.key, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
