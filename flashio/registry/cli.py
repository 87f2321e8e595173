"""`flashio publish | pull | list | alias | gc`: the registry's subcommands.

    flashio publish out/opt-125m --registry s3://bucket/models --name opt-125m --version 1 --alias prod
    flashio pull opt-125m@prod --registry s3://bucket/models        # prints the local directory
    flashio list [opt-125m] --registry s3://bucket/models
    flashio alias opt-125m@1 prod --registry s3://bucket/models
    flashio gc --registry s3://bucket/models --dry-run

`--registry` defaults to $FLASHIO_REGISTRY. S3 endpoint and credentials come from the usual AWS
settings (AWS_PROFILE, AWS_ENDPOINT_URL_S3, ...) or --endpoint-url. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from flashio.registry.config import MiB, RegistryConfig
from flashio.registry.errors import RefError
from flashio.registry.progress import NullProgress, Progress, TerminalProgress
from flashio.registry.refs import parse_ref
from flashio.registry.registry import Registry, open_registry
from flashio.registry.resolver import REGISTRY_ENV


def add_commands(subparsers: Any) -> None:
    """Add the publish, pull, list, alias and gc subcommands to the `flashio` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="URI", default=os.environ.get(REGISTRY_ENV),
                        help=f"a directory, file:///path or s3://bucket/prefix (default: ${REGISTRY_ENV})")
    common.add_argument("--endpoint-url", metavar="URL", default=None,
                        help="S3 endpoint (default: AWS settings such as AWS_ENDPOINT_URL_S3)")
    common.add_argument("--concurrency", type=int, default=None, help="parallel parts / ranged GETs (default 8)")
    common.add_argument("--part-size-mib", type=int, default=None, help="multipart part and download chunk size (default 16)")
    common.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="connect timeout (default 5)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    p = subparsers.add_parser("publish", parents=[common], help="upload an artifact directory as a new version",
                              description="Upload an artifact directory as NAME@VERSION (versions are immutable).")
    p.add_argument("artifact_dir", metavar="ARTIFACT_DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--version", default=None, help="default: a UTC timestamp such as 20240611T142233Z")
    p.add_argument("--alias", action="append", default=[], help="also point this alias at the version (repeatable)")
    p.set_defaults(func=_publish)

    p = subparsers.add_parser("pull", parents=[common], help="download a version into the local cache",
                              description="Download NAME[@VERSION|@ALIAS] into the cache and print its directory.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--cache-dir", default=None, help="default: $FLASHIO_CACHE or ~/.cache/flashio")
    p.set_defaults(func=_pull)

    p = subparsers.add_parser("list", parents=[common], help="list models, or the versions of one model")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.set_defaults(func=_list)

    p = subparsers.add_parser("alias", parents=[common], help="point an alias (prod, staging...) at a version")
    p.add_argument("target", metavar="NAME@VERSION")
    p.add_argument("alias", metavar="ALIAS")
    p.set_defaults(func=_alias)

    p = subparsers.add_parser("gc", parents=[common],
                              help="delete blobs that no version references, abort abandoned uploads")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.add_argument("--grace-hours", type=float, default=24.0,
                   help="keep unreferenced blobs younger than this, and unfinished uploads active within it "
                        "(a publish may be under way; default 24)")
    p.set_defaults(func=_gc)


def _open(args: argparse.Namespace) -> Registry:
    # botocore's debug log prints request headers (the access key id among them): even at -vv,
    # keep the AWS libraries at INFO.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)
    if not args.registry:
        raise RefError(f"no registry given: pass --registry URI (a directory or s3://bucket/prefix) or set ${REGISTRY_ENV}")
    overrides: dict[str, Any] = {}
    if args.concurrency is not None:
        overrides["concurrency"] = args.concurrency
    if args.part_size_mib is not None:
        size = args.part_size_mib * MiB
        overrides.update(part_size_bytes=size, multipart_threshold_bytes=size, download_chunk_bytes=size)
    if args.timeout is not None:
        overrides["connect_timeout_s"] = args.timeout
    return open_registry(args.registry, endpoint_url=args.endpoint_url, config=RegistryConfig(**overrides))


def _progress(args: argparse.Namespace) -> Progress:
    return NullProgress() if args.quiet else TerminalProgress(sys.stderr)


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def _publish(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        r = reg.publish(args.artifact_dir, name=args.name, version=args.version, aliases=args.alias,
                        progress=_progress(args))
    if r.created:
        resumed = f", {_mib(r.resumed_bytes)} of it resumed from an interrupted upload" if r.resumed_bytes else ""
        print(f"published {r.name}@{r.version}: {r.uploaded_blobs} blobs uploaded ({_mib(r.uploaded_bytes)}{resumed}), "
              f"{r.reused_blobs} already there ({_mib(r.reused_bytes)}); aliases: {', '.join(('latest', *r.aliases))}")
    else:
        print(f"{r.name}@{r.version} was already published with this content; aliases set: {', '.join(r.aliases) or 'none'}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        path = reg.pull(parse_ref(args.ref), cache_dir=args.cache_dir, progress=_progress(args))
    print(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        if not args.name:
            for name in reg.names():
                aliases = reg.aliases(name)
                print(f"{name}\tlatest={aliases.get('latest', '-')}")
            return 0
        versions = reg.versions(args.name)
        by_version: dict[str, list[str]] = {}
        for alias, version in reg.aliases(args.name).items():
            by_version.setdefault(version, []).append(alias)
    if not versions:
        print(f"no versions of {args.name!r}", file=sys.stderr)
        return 1
    print("VERSION\tCREATED\tSIZE\tALIASES")
    for m in versions:
        print(f"{m.version}\t{m.created_at}\t{_mib(m.total_bytes)}\t{','.join(by_version.get(m.version, []))}")
    return 0


def _alias(args: argparse.Namespace) -> int:
    ref = parse_ref(args.target)
    if not ref.tag:
        raise RefError(f"{args.target!r}: expected NAME@VERSION, e.g. opt-125m@1")
    with _open(args) as reg:
        version = reg.resolve(ref).manifest.version
        reg.set_alias(ref.name, version, args.alias)
    print(f"{ref.name}@{args.alias} -> {version}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        report = reg.gc(grace_s=args.grace_hours * 3600.0, dry_run=args.dry_run)
    now = time.time()
    for obj in report.deletable:
        print(f"{'would delete' if args.dry_run else 'deleted'}\t{obj.key}\t{obj.size_bytes}\t"
              f"{(now - obj.modified_s) / 3600:.1f}h old")
    for up in report.abandoned_uploads:
        print(f"{'would abort' if args.dry_run else 'aborted'}\t{up.key}\tupload {up.upload_id}\t{up.size_bytes}\t"
              f"{(now - up.last_activity_s) / 3600:.1f}h idle")
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(report.deletable)} unreferenced blobs, {verb} {_mib(report.deletable_bytes)}; "
          f"{len(report.young)} younger than {args.grace_hours:g}h kept; {len(report.stale_claims)} stale claims; "
          f"{report.referenced_blobs} blobs referenced; {len(report.abandoned_uploads)} unfinished uploads idle "
          f"for longer ({_mib(report.abandoned_upload_bytes)}), {report.active_uploads} more recent kept",
          file=sys.stderr)
    return 0
