"""`flashio schedule`: run the conversion flows on this machine, on their schedules, no work pool.

    prefect server start &                                   # or a server elsewhere:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    flashio schedule --plan infra/plan.example.yaml             # the plan on its cron schedule
    prefect deployment run flashio-convert-plan/served       # a run now (or from the UI)
    prefect deployment run flashio-convert/served --param config='{"model": "facebook/opt-125m"}'

Registers two deployments with the Prefect server and executes their runs here, each in a
subprocess, until interrupted (Prefect's `serve`):
- `flashio-convert-plan/<name>`: the scheduled flow (flows/scheduled.py) on the plan, with the
  plan's cron schedule (or --cron); one run at a time, a run that comes due while another is
  running waits (deployment concurrency limit, ENQUEUE);
- `flashio-convert/served`: the convert flow, no schedule, for conversions triggered by hand.
At most --limit runs execute at once (default 1: conversions are heavy); two conversions of the
same model never run at once anywhere (flows/locks.py). For a cluster, deploy infra/prefect.yaml
to a work pool instead and start workers (README, "Deployment").

Contributed to the `flashio` CLI through the `flashio.commands` entry point group
(`schedule = "flows.schedule:add_schedule_command"`); Prefect loads when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Not the names of infra/prefect.yaml's work-pool deployments, so that both can live on one server.
PLAN_DEPLOYMENT = "served"
CONVERT_DEPLOYMENT = "served"
TAGS = ["flashio"]
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def add_schedule_command(sub) -> None:
    p = sub.add_parser(
        "schedule", help="serve the conversion flows (scheduled plan + on-demand convert) on this machine",
        description="Register the conversion deployments with the Prefect server (PREFECT_API_URL) and run "
                    "their flow runs here on their schedules, without a work pool, until interrupted.")
    p.add_argument("--plan", help="conversion plan (YAML, see infra/plan.example.yaml): served on its schedule")
    p.add_argument("--cron", help="cron schedule of the plan (default: the plan's `schedule`)")
    p.add_argument("--timezone", help="timezone of --cron (default: the plan's, else UTC)")
    p.add_argument("--no-schedule", action="store_true", help="serve the plan without a schedule (runs by hand)")
    p.add_argument("--name", default=PLAN_DEPLOYMENT, help=f"the plan deployment's name (default {PLAN_DEPLOYMENT})")
    p.add_argument("--limit", type=int, default=1, help="flow runs executing at once (default 1)")
    p.set_defaults(func=cmd_schedule)


def plan_schedule(plan, *, cron: str | None, timezone: str | None, no_schedule: bool):
    """The plan deployment's schedules: --cron, else the plan's; none with --no-schedule."""
    from prefect.schedules import Cron

    if no_schedule:
        return []
    if cron:
        return [Cron(cron, timezone=timezone or (plan.schedule.timezone if plan.schedule else "UTC"))]
    if plan.schedule:
        return [Cron(plan.schedule.cron, timezone=timezone or plan.schedule.timezone)]
    return []


def build_deployments(plan_path: str | None, *, cron: str | None = None, timezone: str | None = None,
                      no_schedule: bool = False, name: str = PLAN_DEPLOYMENT) -> list:
    """The RunnerDeployments `flashio schedule` serves (module entry points: the flow runs import
    `flows.*` from the installed package, whatever the working directory)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from flows.convert import convert
    from flows.plan import load_plan
    from flows.scheduled import convert_plan

    deployments = [convert.to_deployment(
        name=CONVERT_DEPLOYMENT, tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH,
        description="Convert one model (parameters: a ConvertConfig); triggered by hand")]
    if plan_path:
        path = Path(plan_path).expanduser().resolve()
        plan = load_plan(path)  # a bad plan fails here, not at its first scheduled run
        deployments.append(convert_plan.to_deployment(
            name=name, tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH, parameters={"plan": str(path)},
            schedules=plan_schedule(plan, cron=cron, timezone=timezone, no_schedule=no_schedule),
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description=f"Convert what is missing or stale among the {len(plan.models)} models of {path}"))
    return deployments


def cmd_schedule(args: argparse.Namespace) -> int:
    from tasks.errors import InputError

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLASHIO_PROGRESS", "none")  # flow runs are subprocesses: no terminal bars
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # plans with runner: dask
    # A temporary server (no PREFECT_API_URL) is started by this process: keep the leases of held
    # conversion slots on disk so that a restart does not leave a model locked (flows/locks.py).
    os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)
    if args.limit < 1:
        raise InputError(f"--limit must be >= 1; got {args.limit}")
    from prefect import serve
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        log.warning("PREFECT_API_URL is not set: serving on a temporary Prefect server that only this process "
                    "reaches (schedules run, but no UI or CLI can see or trigger runs); start `prefect server "
                    "start` and export PREFECT_API_URL=http://127.0.0.1:4200/api")

    deployments = build_deployments(args.plan, cron=args.cron, timezone=args.timezone,
                                    no_schedule=args.no_schedule, name=args.name)
    serve(*deployments, limit=args.limit)
    return 0
