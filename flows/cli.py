"""`flashio convert`: run the conversion flow from the command line.

    flashio convert                                   # the bundled demo model, end to end
    flashio convert facebook/opt-125m --calibration allenai/c4:en:validation --samples 512 \\
        --registry s3://bucket/models --name opt-125m --version 1
    flashio convert ./my-llama --calibration 'data/*.jsonl' --recall 0.995 --allow-accuracy-loss
    flashio convert facebook/opt-125m --runner dask --workers 4          # a local Dask cluster
    flashio convert facebook/opt-125m --runner dask --dask-address tcp://scheduler:8786
    flashio convert ./my-llama --force                                    # recompute every stage

Contributed to the `flashio` CLI through the `flashio.commands` entry point group
(`convert = "flows.cli:add_convert_command"`). Importing this module imports only argparse and
the standard library, so `flashio --help` stays fast and works without the pipeline extra; the
flow and its dependencies load when the command runs.

With no MODEL it converts the demo model (tasks/demo/opt-stdlib) on the standard library's
sources, publishes to ./flashio-registry and generates a short continuation with the published
artifact. Any bad input (missing model, unsupported architecture, calibration spec matching no
files) is reported before the Prefect server starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_convert_command(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint into a checked, published artifact",
        description="Run the conversion flow (Prefect): calibration -> activations -> predictors -> "
                    "bundling -> evaluation (accuracy gate) -> publish. With no MODEL: the bundled demo model.")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id or checkpoint directory (default: the bundled demo model)")
    p.add_argument("--config", default=None, help="YAML or JSON file of ConvertConfig fields (flags override it)")
    g = p.add_argument_group("source")
    g.add_argument("--revision", help="hub revision")
    g.add_argument("--source-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype the source model runs in while collecting activations (default float32)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="artifact storage dtype (default: the checkpoint's)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", metavar="SPEC",
                   help="files/dir/glob (.txt .py .md .jsonl .parquet .csv), hub 'name[:config][:split]', or "
                        "stdlib:train (default)")
    g.add_argument("--heldout", metavar="SPEC", help="evaluation text (default: split from the calibration data)")
    g.add_argument("--text-field", help="column holding the text (default: text, content, or the first string)")
    g.add_argument("--samples", type=int, help="calibration sequences (default 128)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (default 256)")
    g.add_argument("--heldout-samples", type=int, help="held-out sequences (default 16)")
    g.add_argument("--seed", type=int)
    g.add_argument("--shard-samples", type=int, help="sequences per activation shard (default 32)")
    g.add_argument("--batch-samples", type=int, help="sequences per forward pass (default 8)")
    g.add_argument("--gated-density", type=float, help="gated FFNs: target active fraction (default 0.5)")
    g = p.add_argument_group("predictors")
    g.add_argument("--rank", type=int, help="predictor rank (default d/32, at least 32)")
    g.add_argument("--rank-last", type=int, help="rank of the last layers (default d/4)")
    g.add_argument("--last-layers", type=int, help="layers that get --rank-last (default n_layers/8)")
    g.add_argument("--max-rank", type=int, help="rank escalation cap")
    g.add_argument("--max-escalations", type=int, help="rank doublings per layer (default 2)")
    g.add_argument("--recall", type=float, help="recall target on held-out pairs (default 0.99)")
    g.add_argument("--threshold", type=float, help="fixed predictor threshold instead of calibration")
    g.add_argument("--epochs", type=int)
    g.add_argument("--order", choices=["frequency", "coactivation", "identity"], help="neuron order (default frequency)")
    g.add_argument("--quantize", choices=["int8", "int4"], help="quantize the FFN bundle rows (scales inside each "
                                                              "row); the accuracy gate judges the quantized artifact")
    g.add_argument("--group-size", type=int, help="with --quantize: elements per scale (default: int8 the whole row part, "
                        "int4 32)")
    g.add_argument("--quantize-method", choices=["gptq", "rtn"],
                   help="with --quantize: gptq (default) compensates rounding errors on the calibration rows; rtn "
                        "rounds to nearest")
    g.add_argument("--quantize-resident", choices=["none", "int8", "int4"],
                   help="with --quantize: resident attention/head matrices and token embeddings (default int8)")
    g.add_argument("--two-level-scales", action="store_true", default=None,
                   help="with --quantize int4: each group's scale and offset a 6-bit multiple of its super-block's "
                        "fp16 steps (4.5 bits per weight against 5: 10%% fewer bytes read and cached; the one-token "
                        "products decode them per row)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--window", type=int, help="sliding window in tokens (default: chosen per model from the "
                                               "calibration trace: the fewest bytes read that fit the DRAM limit)")
    g.add_argument("--ffn-dram-fraction", type=float,
                   help="DRAM the FFN's window caches may hold, as a fraction of its bytes (default 0.5)")
    g.add_argument("--methods", help="comma-separated methods to try: active (predictors on the gate's magnitude "
                                     "when gated), contribution (gated: predictors on |act(gate)·up|), exact-gate "
                                     "(gated: gate rows resident, the gate computed densely), exact-gate-up (the same ranked "
                                     "by |act(gate)·up| against a resident int4 copy of the up rows); default all "
                                     "four when gated. The cheapest configuration within the budget is published")
    g.add_argument("--no-per-layer-density", action="store_true",
                   help="gated FFNs: one label density for every layer instead of the greedy per-layer allocation")
    g.add_argument("--frontier-samples", type=int,
                   help="held-out sequences for the exact-oracle frontier of gated FFNs (default 4; 0: off)")
    g.add_argument("--sweep", help="comma-separated recall targets for the sparsity-accuracy curve")
    g.add_argument("--max-ppl-increase", type=float, help="accuracy budget: relative perplexity increase (default 0.02)")
    g.add_argument("--min-top1", type=float, help="accuracy budget: top-1 agreement (default 0.97)")
    g.add_argument("--allow-accuracy-loss", action="store_true", help="publish even if the budget is exceeded")
    g.add_argument("--zero-shot", action="append", metavar="SPEC",
                   help="multiple-choice task '[name=]data' (ARC/HellaSwag/PIQA format); repeatable")
    g.add_argument("--zero-shot-limit", type=int, help="examples per zero-shot task (default 100)")
    g = p.add_argument_group("publishing")
    g.add_argument("--registry", metavar="URI", help="directory, file:// or s3:// (default ./flashio-registry)")
    g.add_argument("--registry-endpoint", metavar="URL", help="S3 endpoint URL")
    g.add_argument("--name", help="registry model name (default: the source's name)")
    g.add_argument("--version", help="registry version (default: a UTC timestamp)")
    g.add_argument("--alias", action="append", dest="aliases", help="alias to point at the version; repeatable")
    g.add_argument("--prompt", help="generate a continuation with the published artifact "
                                    "(default for the demo model: 'def fibonacci(n):')")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--no-sample", action="store_true", help="do not generate a continuation")
    g = p.add_argument_group("execution")
    g.add_argument("--work-dir", help="stage outputs and caches (default ~/.cache/flashio/convert)")
    g.add_argument("--runner", choices=["threads", "dask"],
                   help="task runner: threads in this process (default), or Dask (prefect-dask): activation "
                        "shards and predictor layers run on the cluster's workers, with results identical to "
                        "threads")
    g.add_argument("--workers", type=int, help="parallel tasks: threads, or the local Dask cluster's worker "
                                               "processes (each loads the source model; default 1)")
    g.add_argument("--dask-address", metavar="URL", help="an existing Dask scheduler (tcp://host:8786) instead of "
                                                         "a local cluster; implies --runner dask. Its workers "
                                                         "must see --work-dir at the same path")
    g.add_argument("--dask", action="store_true", help=argparse.SUPPRESS)  # = --runner dask (older spelling)
    g.add_argument("--torch-threads", type=int, help="torch threads for activation collection (default: torch's)")
    g.add_argument("--skip-published", action="store_true",
                   help="convert only if the registry holds no version with this conversion's lineage (source "
                        "files, calibration data, options, package version); decided after the cheap stages")
    g.add_argument("--force", action="store_true",
                   help="recompute every stage even when the work directory or Prefect's cache holds its result "
                        "(after an environment change the content keys cannot see; the new results replace "
                        "the cached ones)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_convert)


_FLAG_FIELDS = ("revision", "source_dtype", "dtype", "calibration", "heldout", "text_field", "samples", "seq_len",
                "heldout_samples", "seed", "shard_samples", "batch_samples", "gated_density", "rank", "rank_last",
                "last_layers", "max_rank", "max_escalations", "recall", "threshold", "epochs", "order", "quantize", "group_size", "quantize_resident", "quantize_method", "two_level_scales",
                "window",
                "zero_shot_limit", "ffn_dram_fraction", "frontier_samples", "registry", "registry_endpoint", "name", "version", "prompt", "max_new_tokens",
                "work_dir", "workers", "torch_threads", "dask_address")


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """ConvertConfig fields from a config file and the flags given (flags win)."""
    fields: dict[str, Any] = {}
    if args.config:
        fields.update(_read_config_file(args.config))
    if args.model is not None:
        fields["model"] = args.model
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.sweep:
        fields["sweep"] = tuple(float(x) for x in args.sweep.split(",") if x.strip())
    if args.zero_shot:
        fields["zero_shot"] = tuple(args.zero_shot)
    if args.methods:
        fields["methods"] = tuple(x.strip() for x in args.methods.split(",") if x.strip())
    if args.no_per_layer_density:
        fields["per_layer_density"] = False
    if args.aliases:
        fields["aliases"] = tuple(args.aliases)
    if args.dask or args.runner == "dask":
        fields["dask"] = True
    elif args.runner == "threads":
        if args.dask_address:
            from tasks.errors import InputError

            raise InputError("--dask-address needs --runner dask (it names the Dask scheduler to run on)")
        fields["dask"] = False
    if args.skip_published:
        fields["skip_published"] = True
    if args.force:
        fields["force"] = True
    budget = dict(fields.get("budget") or {})
    for flag, key in (("max_ppl_increase", "max_perplexity_increase"), ("min_top1", "min_top1_agreement")):
        if getattr(args, flag) is not None:
            budget[key] = getattr(args, flag)
    if args.allow_accuracy_loss:
        budget["allow_loss"] = True
    if budget:
        fields["budget"] = budget
    demo = "model" not in fields
    if args.no_sample:
        fields["prompt"] = None
    elif demo and "prompt" not in fields:
        from flows.config import DEFAULT_PROMPT

        fields["prompt"] = DEFAULT_PROMPT
    return fields


def _read_config_file(path: str) -> dict[str, Any]:
    from tasks.errors import InputError

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of ConvertConfig fields")
    return data


def build_config(fields: dict[str, Any]):
    from pydantic import ValidationError

    from flows.config import ConvertConfig
    from tasks.errors import InputError

    try:
        return ConvertConfig(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid options: {problems}") from None


def preflight(config) -> None:
    """The cheap checks, before the Prefect server starts: the model can be found and converted,
    the data specs match something."""
    from pathlib import Path

    from flows.config import default_model
    from tasks.calibration import resolve_spec
    from tasks.errors import InputError
    from tasks.source import inspect_source

    if config.model == default_model() and not (Path(config.model) / "config.json").is_file():
        raise InputError(f"the bundled demo checkpoint is missing from {config.model}; train it with "
                         "`python -m tasks.demo.train`, or give a MODEL")
    inspect_source(config.model, revision=config.revision, hash_files=False)
    resolve_spec(config.calibration)
    if held := config.heldout_spec():
        resolve_spec(held)


def _quiet_defaults(verbose: int) -> None:
    """Terminal-friendly defaults for a CLI run (set before Prefect is imported; the user's own
    environment wins)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("FLASHIO_PROGRESS", "bar" if sys.stderr.isatty() else "none")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose else "warning")  # --runner dask


def cmd_convert(args: argparse.Namespace) -> int:
    _quiet_defaults(getattr(args, "verbose", 0))
    config = build_config(config_fields(args))
    preflight(config)
    from flows.convert import run_convert
    from tasks.errors import AccuracyBudgetError

    try:
        result = run_convert(config)
    except AccuracyBudgetError as exc:  # the report is written; one line says what to do, no traceback
        print(f"flashio convert: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"reference": result.reference, "registry": result.registry, "created": result.created,
                          "skipped": result.skipped, "lineage_key": result.lineage_key,
                          "artifact_dir": result.artifact_dir, "report": result.report, "sample": result.sample},
                         indent=1))
        return 0
    if result.skipped:
        print(f"up to date: {result.reference} in {result.registry} already holds this conversion "
              f"(lineage {result.lineage_key[:16]}); nothing converted")
        return 0
    state = "published" if result.created else "already published (same content)"
    print(f"{state}: {result.reference} in {result.registry}")
    for line in result.summary_lines():
        print(f"  {line}")
    if result.sample:
        s = result.sample
        print(f"\n{s['prompt']}{s['text']}")
        print(f"[sparse, window {result.report['summary']['window']}] {s['summary']}")
    print(f"\nrun it: flashio run {result.reference} --registry {result.registry} --prompt '...'")
    return 0
