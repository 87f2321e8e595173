"""`flashio bench device|model` and `flashio synth`: thin handlers over flashio.bench / flashio.synth.

    flashio bench device /data --out bench/device   # profile JSON + PNG + markdown; installs the profile
    flashio synth --shape opt-6.7b --out /data/opt-6.7b-synth
    flashio bench model /data/opt-6.7b-synth --out bench/opt   # the installed profile, as the runtime
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from flashio.sizes import parse_size


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="measure the device and the per-token latency of a model",
                           description="Benchmarks for your own device and model.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bsub.required = True

    p = bsub.add_parser("device", help="random/sequential read throughput of the device under DIR",
                        description="Random O_DIRECT read throughput (chunk sizes x thread counts) of the "
                                    "device under DIR with flashio's reader (and fio when installed), plus "
                                    "sequential throughput. Writes the device profile the cost model uses.")
    p.add_argument("directory", type=Path, help="a directory on the device (a test file is written there)")
    p.add_argument("--out", type=Path, default=Path("bench-device"), help="output directory (default bench-device)")
    p.add_argument("--size", default="4GiB", help="test file size (default 4GiB)")
    p.add_argument("--chunks", default="4KiB,8KiB,16KiB,32KiB,64KiB,128KiB,256KiB,512KiB,1MiB",
                   help="comma-separated chunk sizes")
    p.add_argument("--threads", default="1,2,4,8,16,32,64", help="comma-separated thread counts")
    p.add_argument("--seconds", type=float, default=0.5, help="seconds per point (flashio reader)")
    p.add_argument("--fio-seconds", type=float, default=1.0, help="seconds per point (fio)")
    p.add_argument("--no-fio", action="store_true", help="skip fio even when installed")
    p.add_argument("--keep-file", action="store_true", help="keep the test file for the next run")
    p.add_argument("--no-install", action="store_true",
                   help="do not install the profile as this user's default (see `flashio bench device` in "
                        "the README: $XDG_CONFIG_HOME/flashio/device-profile.json)")
    p.add_argument("--memory-threads", default=None,
                   help="comma-separated torch thread counts for DRAM and matrix-vector bandwidth "
                        "(default 1, 2, 4 .. the CPU count)")
    p.add_argument("--memory-size", default="512MiB",
                   help="buffer read for memory bandwidth; several times the last-level cache (default 512MiB)")
    p.add_argument("--memory-seconds", type=float, default=0.3, help="seconds per memory bandwidth point")
    p.add_argument("--no-memory", action="store_true",
                   help="skip memory bandwidth (the profile then answers with built-in defaults)")
    p.set_defaults(func=cmd_device)

    p = bsub.add_parser("model", help="per-token latency table: naive .. all techniques, mmap, dense",
                        description="The paper's per-token latency breakdown (I/O, memory management, "
                                    "compute) and bytes read per token for configurations added in turn, "
                                    "each in a child process under a cgroup DRAM limit.")
    p.add_argument("artifact", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench-model"), help="output directory (default bench-model)")
    p.add_argument("--profile", type=Path, default=None,
                   help="device profile from `flashio bench device` (default: the one the runtime finds: "
                        "$FLASHIO_DEVICE_PROFILE, else the installed one, else the built-in cost model)")
    p.add_argument("--trace", default="synthetic",
                   help="'synthetic' (default) or a trace file recorded with `flashio run --record-trace`")
    p.add_argument("--trace-preset", default="opt-6.7b", help="generator preset for --trace synthetic")
    p.add_argument("--configs", default=None, help="comma-separated subset of configurations")
    p.add_argument("--tokens", type=int, default=24, help="measured tokens per sparse configuration")
    p.add_argument("--baseline-tokens", type=int, default=4, help="measured tokens for naive/hybrid/mmap/dense")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--dram-limit", default=None,
                   help="e.g. 7.5GB (default: half the model plus the runtime's fixed overhead)")
    p.add_argument("--dram-fraction", type=float, default=0.5,
                   help="fraction of the model's weights the default limit allows (default 0.5, the paper's)")
    p.add_argument("--no-cgroup", action="store_true", help="do not enforce the limit with a cgroup")
    p.add_argument("--in-process", action="store_true",
                   help="run the configurations in this process (fast, no cgroup, no isolation)")
    p.add_argument("--compute-dtype", default="auto", help="auto (default), float16, bfloat16 or float32")
    p.add_argument("--floor-bandwidth", choices=("run", "profile"), default="run",
                   help="price each row's floor at the matrix-vector bandwidth measured right before and "
                        "after it ('run', default: the machine's bandwidth at that time; the "
                        "profile's floor is reported beside it) or at the device profile's ('profile')")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for every configuration (default: what `flashio run` "
                        "uses, one less than the CPUs, at least 1; 0: torch's own, one per core)")
    p.add_argument("--compute-threads", type=int, default=None,
                   help="threads of flashio's kernels in every configuration, and llama.cpp's with --peer "
                        "(default: what `flashio run` uses, every CPU up to 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookahead-recall", type=float, default=None,
                   help="+lookahead: the share of each step's set that the guess before the attention gets "
                        "right (default: the figure measured on real models, README 'Lookahead')")
    p.add_argument("--max-gap", type=int, default=None, metavar="ROWS",
                   help="the tuned configurations' gap reads: unneeded rows read through between two needed "
                        "ones (default: the cost model's choice for the artifact's rows)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: with CUDA the limit is GPU memory (resident weights, KV "
                        "and window caches on the GPU; flash reads through pinned staging)")
    p.add_argument("--peer", action="append", default=[], choices=["llama.cpp"],
                   help="also run llama.cpp (llama-cpp-python, the 'bench' extra) on an F16 GGUF of the same "
                        "weights, under the same limit: rows 'llama.cpp mmap (limit)' and 'llama.cpp, all in DRAM'")
    p.add_argument("--peer-gguf", type=Path, default=None,
                   help="where --peer llama.cpp writes (and reuses) its GGUF (default OUT/llama.cpp/ARTIFACT.f16.gguf)")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("synth", help="write a random-weight artifact with a real model's shapes",
                       description="Write an artifact with the shapes of a known model and random weights "
                                   "(plus random predictors of the paper's ranks), for benchmarks.")
    p.add_argument("--shape", required=True, help="opt-6.7b, opt-1.3b or llama-2-7b")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--scale", type=float, default=1.0, help="shrink widths, layers, vocabulary (smoke runs)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-predictors", action="store_true")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="bundle rows quantized (rounded to nearest; int8 one scale per part, int4 groups of 32 "
                        "with offsets) and the resident matrices int8, as `flashio pack --quantize`")
    p.add_argument("--quantize-resident", default=None, choices=["none", "int8", "int4"],
                   help="with --quantize: the resident matrices (default int8), as `flashio pack`")
    p.add_argument("--two-level-scales", action="store_true",
                   help="with --quantize int4: two-level scales (4.5 bits per weight), as `flashio pack`")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _list(text: str, conv) -> tuple:
    return tuple(conv(x.strip()) for x in text.split(",") if x.strip())


def cmd_device(args: argparse.Namespace) -> int:
    from flashio.bench.device import (
        DeviceBenchConfig,
        measure_device,
        memory_config,
        plot_profile,
        profile_markdown,
    )
    from flashio.costmodel import default_profile_path

    memory = None if args.no_memory else memory_config(
        threads=_list(args.memory_threads, int) if args.memory_threads else None,
        buffer_bytes=parse_size(args.memory_size), seconds=args.memory_seconds)
    cfg = DeviceBenchConfig(args.directory, chunks=_list(args.chunks, parse_size),
                            threads=_list(args.threads, int), file_bytes=parse_size(args.size),
                            seconds=args.seconds, fio=not args.no_fio, fio_seconds=args.fio_seconds,
                            keep_file=args.keep_file, memory=memory)
    profile = measure_device(cfg, progress=_say)
    args.out.mkdir(parents=True, exist_ok=True)
    path = profile.save(args.out / "device-profile.json")
    table = profile_markdown(profile)
    (args.out / "device-profile.md").write_text(table)
    png = plot_profile(profile, args.out / "device-profile.png")
    print(table)
    print(f"profile: {path}" + (f"\nplot: {png}" if png else ""))
    if args.no_install:
        print(f"not installed (--no-install): the runtime uses it with FLASHIO_DEVICE_PROFILE={path} "
              "(or open(..., device_profile=...))")
    else:
        installed = profile.save(default_profile_path())
        print(f"installed as this user's device profile: {installed}; flashio.open, run, chat, serve and "
              "bench model use it with no flags ($FLASHIO_DEVICE_PROFILE, when set, wins)")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from flashio.bench.model import (
        CONFIG_NAMES,
        LOOKAHEAD_RECALL,
        ModelBenchOptions,
        run_model_bench,
    )
    from flashio.bench.report import markdown
    from flashio.commands import torch_threads_option
    from flashio.costmodel import find_profile_path

    opts = ModelBenchOptions(
        args.artifact, args.out, configs=_list(args.configs, str) if args.configs else CONFIG_NAMES,
        tokens=args.tokens, baseline_tokens=args.baseline_tokens, window=args.window, trace=args.trace,
        trace_preset=args.trace_preset, dram_limit=parse_size(args.dram_limit) if args.dram_limit else None,
        weights_fraction=args.dram_fraction, use_cgroup=not args.no_cgroup, in_process=args.in_process,
        torch_threads=torch_threads_option(args.torch_threads), compute_threads=args.compute_threads,
        compute_dtype=args.compute_dtype, run_bandwidth=args.floor_bandwidth == "run",
        profile=args.profile if args.profile is not None else find_profile_path(), seed=args.seed,
        device=args.device, peers=tuple(dict.fromkeys(args.peer)), peer_gguf=args.peer_gguf,
        lookahead_recall=LOOKAHEAD_RECALL if args.lookahead_recall is None else args.lookahead_recall,
        max_gap=args.max_gap)
    signal.signal(signal.SIGTERM, _terminate)  # clean up the child and its cgroup on `kill`
    results = run_model_bench(opts, progress=_say)
    print(markdown(results))
    print(f"results: {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'latency.png'}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from flashio.synth import write_synthetic

    def progress(done: int, total: int) -> None:
        print(f"\rwriting layers {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    out = write_synthetic(args.shape, args.out, scale=args.scale, seed=args.seed, dtype=args.dtype,
                          predictors=not args.no_predictors, overwrite=args.overwrite, quantize=args.quantize,
                          quantize_resident=args.quantize_resident, two_level_scales=args.two_level_scales,
                          progress=progress)
    print(out)
    return 0
