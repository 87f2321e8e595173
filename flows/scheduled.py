"""The scheduled conversion flow: keep every model of a plan converted.

    from flows.scheduled import convert_plan
    convert_plan("infra/plan.example.yaml")                  # once, here
    flashio schedule --plan infra/plan.example.yaml             # on the plan's cron schedule
    prefect deploy --all --prefect-file infra/prefect.yaml   # on a work pool (see the README)

Each enabled model of the plan runs the `convert` flow as a subflow, one after the other, with
`skip_published`: its cheap stages (source file hashes, calibration fingerprint) give the lineage
key of what it would produce, and when the registry already holds that key the model is up to
date and nothing heavy runs. So a schedule that fires twice does no duplicate work, a model whose
upstream revision or calibration data changed is converted again, and a conversion that was
interrupted half-way (a crash, a killed worker) resumes from the content-keyed stage outputs in
the plan's work_dir. A model that fails does not stop the others; the run fails at the end and
names them. The outcome of every model goes into a Prefect table artifact (`flashio-plan`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.convert import ConvertResult, convert, task_runner
from flows.plan import load_plan
from tasks.errors import PipelineError

Status = Literal["converted", "up to date", "failed"]


@dataclass(frozen=True)
class ModelOutcome:
    """What a plan run did for one model."""

    name: str
    status: Status
    reference: str | None  # name@version in the registry (None when it failed)
    registry: str
    lineage_key: str
    flow_run_id: str | None  # the model's `flashio-convert` subflow run
    error: str | None = None


@flow(name="flashio-convert-plan")
def convert_plan(plan: str, models: list[str] | None = None) -> list[ModelOutcome]:
    """Convert what is missing or stale among the plan's models (`models`: only those, by name).

    plan: path of the plan's YAML file, as the flow run sees it."""
    log = get_run_logger()
    p = load_plan(plan)
    outcomes: list[ModelOutcome] = []
    for entry in p.enabled_models(models):
        config = p.convert_config(entry)
        run = convert.with_options(task_runner=task_runner(config), flow_run_name=f"convert-{entry.name}")
        state = run(config, return_state=True)
        run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
        if state.is_completed():
            result: ConvertResult = state.result()
            status: Status = "up to date" if result.skipped else "converted"
            outcomes.append(ModelOutcome(entry.name, status, result.reference, config.registry, result.lineage_key,
                                         run_id))
            log.info("%s: %s (%s)", entry.name, status, result.reference)
        else:
            error = state.message or state.name
            outcomes.append(ModelOutcome(entry.name, "failed", None, config.registry, "", run_id, error))
            log.error("%s: conversion failed: %s", entry.name, error)
    create_table_artifact(table=[asdict(o) for o in outcomes], key="flashio-plan",
                          description=f"conversion plan {plan}: what each model's conversion did")
    if failed := [o for o in outcomes if o.status == "failed"]:
        raise PipelineError(f"{len(failed)} of {len(outcomes)} conversions of plan {plan} failed: "
                            + "; ".join(f"{o.name}: {o.error}" for o in failed))
    return outcomes
