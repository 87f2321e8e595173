"""Runtime subcommands: run, inspect, pack (and chat, serve: flashio.chat, flashio.server.command).
Each is a library call plus a thin handler."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import TYPE_CHECKING

from flashio.sizes import format_size

if TYPE_CHECKING:  # imported on use: `flashio --help` does not load torch
    from flashio.config import FlashConfig


def default_torch_threads(cpus: int | None = None) -> int:
    """torch's compute threads when the command line does not say: one less than the CPUs this
    process may run on, at least 1. The flash reader threads, the tokenizer and the Python side of
    each step need a core, and torch's OpenMP threads spin-wait for one another: on a 2-vCPU
    machine that others share, a second torch thread made a token's compute 10-50x slower, in
    every mode (README, "Threads"). The library itself changes no thread count unless
    FlashConfig.torch_threads is set; the commands set this once, at open."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def torch_threads_option(value: int | None) -> int | None:
    """--torch-threads as FlashConfig.torch_threads: None (not given) -> default_torch_threads(),
    0 -> None (leave torch's own default: one thread per core)."""
    if value is None:
        return default_torch_threads()
    return None if value == 0 else value


def add_open_options(p: argparse.ArgumentParser) -> None:
    """How the artifact is opened (FlashConfig): shared by run, chat and serve."""
    p.add_argument("artifact", help="artifact directory or registry reference (with --registry)")
    p.add_argument("--mode", default="sparse", choices=["sparse", "dense", "naive", "oracle"])
    p.add_argument("--window", type=int, default=5, help="tokens a neuron stays cached (default 5)")
    p.add_argument("--dram-budget", default=None, help="e.g. 2GiB: resident + caches must fit")
    p.add_argument("--threads", type=int, default=None,
                   help="flash reader threads (default: the cost model's choice from the device profile "
                        "`flashio bench device` installed, else from the built-in model)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch's compute threads for this process (default: one less than the CPUs, at "
                        "least 1, leaving a core to the flash readers; 0: torch's own, one per core)")
    p.add_argument("--compute-threads", type=int, default=None,
                   help="threads flashio's native kernels split each matrix-vector product over (default: "
                        "every CPU, at most 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the model computes")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of weights in memory and of the matmuls (default: the artifact's)")
    p.add_argument("--compute", default="window", choices=["window", "active"],
                   help="cached rows the FFN runs on: every row of the window (default), or only each token's "
                        "predicted neurons (the paper's: about half the FFN's memory traffic, a little less accurate)")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="start each layer's flash reads before its attention, from its predictor run on the "
                        "layer's input (what it misses is read at the FFN; the output does not change; layers "
                        "whose guesses do not pay stop guessing). Default on; --no-lookahead turns it off")
    p.add_argument("--no-preload", action="store_true",
                   help="with a --dram-budget that holds the whole FFN, read rows on demand instead of all at open")
    p.add_argument("--registry", default=None, help="registry URI for name@version references")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """Generation options; each one left out takes the artifact's generation_config.json value."""
    g = p.add_argument_group("generation (default: the artifact's generation_config.json, else greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 256)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 penalises repeats (1 = off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the output at this text (repeatable; not included)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler (repeatable samples)")


def generation_options(args: argparse.Namespace) -> dict:
    """The generation options given on the command line (GenerationConfig fields)."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "stop", None):
        out["stop"] = tuple(args.stop)
    return out


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="generate text with an artifact",
                       description="Generate text from an artifact, printing it as it comes, then a summary line.")
    add_open_options(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    add_generation_options(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a line")
    p.add_argument("--record-trace", metavar="FILE", default=None,
                   help="save every token's active neurons per layer (a trace for `flashio bench model`)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="chat with an artifact (its chat template)",
                       description="An interactive chat through the artifact's chat template: the history is "
                                   "kept within the context window (oldest turns dropped first); /reset forgets "
                                   "it, /exit (or Ctrl-D) ends. Each reply ends with a stats line on stderr. "
                                   "When stdin is not a terminal, all of it is one message: the reply is printed "
                                   "and the command ends.")
    add_open_options(p)
    p.add_argument("--system", default=None, help="system prompt (kept through /reset)")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a jinja2 chat template to use instead of the artifact's (e.g. for a base model)")
    add_generation_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API",
                       description="Serve /v1/models, /v1/completions and /v1/chat/completions (streaming and "
                                   "not) for one artifact, one request at a time behind a bounded queue. "
                                   "Needs the serve extra: pip install 'flashio[serve]'. Generation options "
                                   "given here replace the artifact's defaults; requests override them.")
    add_open_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                     "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("FLASHIO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $FLASHIO_API_KEY, else none)")
    p.add_argument("--max-waiting", type=int, default=8,
                   help="requests that may wait for the model; past that, 429 with Retry-After (default 8)")
    p.add_argument("--model-id", default=None, help="the model name the API lists (default: the artifact's)")
    add_generation_options(p)
    p.set_defaults(func=cmd_serve)

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
    p.add_argument("--gate-resident", action="store_true",
                   help="gated FFNs: keep the gate rows in DRAM and put only up + down on flash (the exact-gate "
                        "layout: mode 'sparse' then computes the gate densely and reads the selected neurons)")
    p.add_argument("--up-sketch", choices=["int4", "int8"], default=None,
                   help="with --gate-resident: also keep a 4- or 8-bit copy of the up rows in DRAM, and rank "
                        "neurons by contribution |act(gate) * (x @ up)| against it (selection 'gate+up'; "
                        "int4 holds ~0.28x the up rows' fp16 bytes)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="bundle rows quantized group-wise, rounded to nearest (int8 symmetric, int4 with an "
                        "offset per group; fp16 scales inside each row, int8's one per part in its first codes' "
                        "parities): 1/2 (int8) or about 0.3 (int4) of the fp16 bytes read and cached per neuron; "
                        "`flashio convert --quantize` uses GPTQ on its calibration rows instead (more accurate "
                        "at int4)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="elements per scale along d_model (default: int8 d_model, one scale per part of a "
                        "row; int4 32 where it divides d_model)")
    p.add_argument("--quantize-resident", choices=["none", "int8", "int4"], default=None,
                   help="attention, the head, the token embeddings and resident gate rows: int8 per output "
                        "channel, or int4 in groups of 32 along the input (default: int8 with --quantize, else none)")
    p.add_argument("--two-level-scales", action="store_true",
                   help="with --quantize int4: each group's scale and offset a 6-bit multiple of its super-block's "
                        "fp16 steps (4.5 bits per weight against 5, as llama.cpp's Q4_K), where d_model is a "
                        "multiple of 128")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_pack)


def run_config(args: argparse.Namespace) -> FlashConfig:
    """The FlashConfig that `flashio run`'s options describe."""
    from flashio.config import FlashConfig

    return FlashConfig(mode=args.mode, window=args.window, dram_budget=args.dram_budget, threads=args.threads,
                       device=args.device, compute_dtype=args.compute_dtype,
                       compute=getattr(args, "compute", "window"), lookahead=getattr(args, "lookahead", True),
                       preload=not getattr(args, "no_preload", False),
                       record_trace=getattr(args, "record_trace", None) is not None,
                       torch_threads=torch_threads_option(getattr(args, "torch_threads", None)),
                       compute_threads=getattr(args, "compute_threads", None))


def cmd_run(args: argparse.Namespace) -> int:
    import flashio

    config = run_config(args)
    with flashio.open(args.artifact, config, registry=args.registry) as model:
        out = sys.stdout
        if not args.json:
            out.write(args.prompt)
            out.flush()
        ids, pieces, finish = [], [], None
        for tok in model.stream(args.prompt, **generation_options(args)):
            ids.append(tok.token_id)
            pieces.append(tok.text)
            finish = tok.finish_reason
            if not args.json:
                out.write(tok.text)
                out.flush()
        from flashio.generation import Generation

        gen = Generation.of_steps("".join(pieces), ids, model.stats, finish)
        if args.json:
            n = max(len(gen.decode), 1)
            print(json.dumps({"text": gen.text, "tokens": len(ids), "finish_reason": finish, "tokens_per_s": gen.tokens_per_s(),
                              "per_token": gen.decode_total.per_token(n), "mode": args.mode,
                              "device": str(model.device)}, indent=1))
        else:
            print(f"\n[{args.mode}, {model.device}] {gen.summary()}", file=sys.stderr)
        if config.record_trace:
            trace = model.trace()
            path = trace.save(args.record_trace)
            print(f"trace: {trace.steps} tokens x {trace.n_layers} layers -> {path}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import flashio
    from flashio.chat import chat, load_template

    template = load_template(args.chat_template) if args.chat_template else None
    with flashio.open(args.artifact, run_config(args), registry=args.registry) as model:
        return chat(model, system=args.system, template=template, options=generation_options(args),
                    stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from flashio.errors import MissingExtraError

    for module in ("starlette", "uvicorn"):  # before the model loads: a one-line error naming the extra
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            raise MissingExtraError("`flashio serve`", "serve", module) from None
    import flashio
    from flashio.server import serve
    from flashio.server.session import FlashSession

    with flashio.open(args.artifact, run_config(args), registry=args.registry) as model:
        session = FlashSession(model, model_id=args.model_id, options=generation_options(args))
        print(f"flashio serve: {session.model_id} ({args.mode}, {model.device}, context {session.context_tokens} "
              f"tokens) on http://{args.host}:{args.port}/v1" + (" (API key required)" if args.api_key else ""),
              file=sys.stderr, flush=True)
        serve(session, host=args.host, port=args.port, api_key=args.api_key, max_waiting=args.max_waiting,
              log_level="warning" if args.verbose == 0 else "info")
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
    if s["quantization"] or s["resident_quantization"]:
        rows = f"{s['quantization']} (groups of {s['quantization_group_size']})" if s["quantization"] else "float"
        print(f"  quantized    : FFN rows {rows}, resident matrices {s['resident_quantization'] or 'float'}, "
              f"token embeddings {s['embedding_quantization'] or 'float'}")
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

    out = write_artifact(args.checkpoint, args.out, dtype=args.dtype, gate_resident=args.gate_resident,
                         quantize=args.quantize, group_size=args.group_size,
                         quantize_resident=args.quantize_resident, two_level_scales=args.two_level_scales,
                         up_sketch=args.up_sketch,
                         selection="gate+up" if args.up_sketch else None, overwrite=args.overwrite,
                         progress=progress)
    print(out)
    return 0
