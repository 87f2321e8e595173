"""Runtime subcommands: run, inspect, pack. Each is a library call plus a thin handler."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from flashio.sizes import format_size

if TYPE_CHECKING:  # imported on use: `flashio --help` does not load torch
    from flashio.config import FlashConfig


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="generate text with an artifact",
                       description="Generate text from an artifact, printing it as it comes, then a summary line.")
    p.add_argument("artifact", help="artifact directory or registry reference (with --registry)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mode", default="sparse", choices=["sparse", "dense", "naive", "oracle"])
    p.add_argument("--window", type=int, default=5, help="tokens a neuron stays cached (default 5)")
    p.add_argument("--dram-budget", default=None, help="e.g. 2GiB: resident + caches must fit")
    p.add_argument("--threads", type=int, default=None, help="flash reader threads (default 16)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch's compute threads for this process (default: torch's, one per core; "
                        "1 can be faster on a small machine that other processes share)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the model computes")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of weights in memory and of the matmuls (default: the artifact's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--registry", default=None, help="registry URI for name@version references")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a line")
    p.add_argument("--record-trace", metavar="FILE", default=None,
                   help="save every token's active neurons per layer (a trace for `flashio bench model`)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="print an artifact's manifest summary",
                       description="Validate an artifact (manifest, names, sizes, offsets) and summarise it.")
    p.add_argument("artifact")
    p.add_argument("--verify", action="store_true", help="also check the sha256 of every file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pack", help="write an artifact from a Hugging Face checkpoint directory",
                       description="Write a flash-ready artifact with the identity neuron order and no "
                                   "predictors (for dense, naive and oracle modes). `flashio convert` adds "
                                   "predictors and a tuned order.")
    p.add_argument("checkpoint", help="directory with config.json and *.safetensors")
    p.add_argument("out", help="artifact directory to create")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="storage dtype (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_pack)


def run_config(args: argparse.Namespace) -> FlashConfig:
    """The FlashConfig that `flashio run`'s options describe."""
    from flashio.config import FlashConfig

    return FlashConfig(mode=args.mode, window=args.window, dram_budget=args.dram_budget, threads=args.threads,
                       device=args.device, compute_dtype=args.compute_dtype,
                       record_trace=getattr(args, "record_trace", None) is not None,
                       torch_threads=getattr(args, "torch_threads", None))


def cmd_run(args: argparse.Namespace) -> int:
    import flashio

    config = run_config(args)
    with flashio.open(args.artifact, config, registry=args.registry) as model:
        out = sys.stdout
        if not args.json:
            out.write(args.prompt)
            out.flush()
        ids = []
        for tok in model.stream(args.prompt, args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed):
            ids.append(tok.token_id)
            if not args.json:
                out.write(tok.text)
                out.flush()
        from flashio.runtime import Generation

        steps = model.stats
        gen = Generation(model.codec.decode(ids) if model.codec else "", ids, steps[0].tokens, steps[0], steps[1:])
        if args.json:
            n = max(len(gen.decode), 1)
            print(json.dumps({"text": gen.text, "tokens": len(ids), "tokens_per_s": gen.tokens_per_s(),
                              "per_token": gen.decode_total.per_token(n), "mode": args.mode,
                              "device": str(model.device)}, indent=1))
        else:
            print(f"\n[{args.mode}, {model.device}] {gen.summary()}", file=sys.stderr)
        if config.record_trace:
            trace = model.trace()
            path = trace.save(args.record_trace)
            print(f"trace: {trace.steps} tokens x {trace.n_layers} layers -> {path}", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from flashio.format import Artifact

    art = Artifact(args.artifact)
    if args.verify:
        art.verify()
    s = art.summary()
    s["verified"] = bool(args.verify)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    m = art.manifest
    print(f"{s['path']}: {s['architecture']} {s['dtype']}, {s['layers']} layers, d_model {s['dim']}, "
          f"{s['ffn_neurons']} FFN neurons/layer")
    print(f"  FFN on flash : {format_size(s['ffn_bytes'])} ({format_size(s['bundle_bytes'])} per bundle: "
          f"{' + '.join(p for p, _, _ in m.bundle_layout)})")
    print(f"  resident     : {format_size(s['resident_bytes'])}")
    print(f"  predictors   : {'none' if s['predictors'] is None else 'ranks ' + str(sorted(set(s['predictors'])))}")
    print(f"  tokenizer    : {'yes' if s['tokenizer'] else 'no (token ids only)'}")
    src = m.lineage.get("source", {})
    print(f"  source       : {src.get('id') or src.get('path', '?')}  created {m.lineage.get('created_at', '?')}")
    if m.report:
        print(f"  report       : {json.dumps(m.report.get('summary', m.report))[:300]}")
    print(f"  files        : {s['files']}, sha256 {'verified' if args.verify else 'not checked (use --verify)'}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from flashio.format import write_artifact

    def progress(done: int, total: int) -> None:
        print(f"\rpacking layers {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    out = write_artifact(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=progress)
    print(out)
    return 0
