"""The deployments against a real Prefect server: `prefect server start` on 127.0.0.1 (SQLite, a
free port), started and stopped here.

- `flashio schedule --plan PLAN` (a subprocess) registers the scheduled flow with the plan's cron
  schedule; a run triggered through the API is executed by that process and publishes the tiny
  model; a second triggered run completes without converting anything (the registry already
  holds the lineage).
- `prefect deploy --all --prefect-file infra/prefect.yaml` registers every deployment of the
  file, on its work pools (the Kubernetes pool made from infra/k8s/base-job-template.json), with
  its schedules, parameters, concurrency settings and job variables.

Every wait is bounded; the subprocesses are killed (their whole process groups) at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
pytest.importorskip("prefect")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FLASHIO_PROGRESS": "none"}
RUN_TIMEOUT_S = 150.0


@dataclass
class Server:
    api_url: str
    root: Path

    def env(self, home: str) -> dict[str, str]:
        """The environment of a client process: this server, its own PREFECT_HOME, offline HF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(OFFLINE, PREFECT_HOME=str(self.root / home), PREFECT_API_URL=self.api_url,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_RUNNER_POLL_FREQUENCY="1",
                   FLASHIO_CACHE=str(self.root / "flashio-cache"))
        return env

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)


def start(cmd: list[str], *, env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the server's workers, a runner's flow-run subprocesses),
    SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "server-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
               PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem")
    log = root / "server.log"
    proc = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 env=env, log=log)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 120 s:\n{tail(log)}")
            time.sleep(0.25)
        yield Server(api_url=api, root=root)
    finally:
        stop(proc)


def wait_for(what: str, fn, *, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        if (value := fn()) is not None:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout_s:.0f} s" + (f"\n{tail(log)}" if log else ""))
        time.sleep(0.5)


def run_deployment(server: Server, deployment_id, *, proc: subprocess.Popen, log: Path):
    """Trigger a run through the API; wait until it is final; return it."""
    with server.client() as client:
        run = client.create_flow_run_from_deployment(deployment_id)

        def final():
            r = client.read_flow_run(run.id)
            return r if r.state is not None and r.state.is_final() else None

        return wait_for(f"flow run {run.id}", final, timeout_s=RUN_TIMEOUT_S, proc=proc, log=log)


def plan_table(server: Server, flow_run_id) -> list[dict]:
    """The flashio-plan table artifact the scheduled flow run created."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with server.client() as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["flashio-plan"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert len(arts) == 1, arts
    data = arts[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_served_plan_runs_on_trigger_and_skips_the_second_time(prefect_server, tiny, tmp_path):
    from flashio.registry import open_registry

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "registry": "./registry", "work_dir": "./work", "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
        "defaults": {"samples": 24, "seq_len": 64, "heldout_samples": 4, "shard_samples": 8,
                     "sweep": [0.9, 0.99], "sweep_samples": 2},
        "models": [{"name": "tiny-opt", "source": str(tiny["opt"]), "calibration": str(tiny["text"])}]}))
    log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "flashio.cli", "schedule", "--plan", str(plan)],
                  env=prefect_server.env("serve-home"), log=log)
    try:
        def deployment():
            from prefect.exceptions import ObjectNotFound

            with prefect_server.client() as client:
                try:
                    return client.read_deployment_by_name("flashio-convert-plan/served")
                except ObjectNotFound:
                    return None

        dep = wait_for("the served deployment", deployment, timeout_s=90, proc=serve, log=log)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [("0 3 * * *", "UTC", True)]
        assert dep.parameters == {"plan": str(plan.resolve())}
        assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert dep.global_concurrency_limit.limit == 1

        first = run_deployment(prefect_server, dep.id, proc=serve, log=log)
        assert first.state.is_completed(), (first.state, tail(log))
        [row] = plan_table(prefect_server, first.id)
        assert row["status"] == "converted" and row["reference"].startswith("tiny-opt@")
        reg = open_registry(str(tmp_path / "registry"))
        [vm] = reg.versions("tiny-opt")
        assert vm.lineage["lineage_key"] == row["lineage_key"] and row["reference"] == f"tiny-opt@{vm.version}"

        second = run_deployment(prefect_server, dep.id, proc=serve, log=log)
        assert second.state.is_completed(), (second.state, tail(log))
        [again] = plan_table(prefect_server, second.id)
        assert (again["status"], again["reference"]) == ("up to date", row["reference"])
        assert [v.version for v in reg.versions("tiny-opt")] == [vm.version]
        with prefect_server.client() as client:  # both runs held the model's conversion slot, and freed it
            lock = client.read_global_concurrency_limit_by_name("flashio-convert-tiny-opt")
        assert (lock.limit, lock.active_slots) == (1, 0)
        # the cron schedule is live on the server: its scheduler booked the next runs at 03:00 UTC
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        def upcoming():
            with prefect_server.client() as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
            return runs or None

        runs = wait_for("the scheduler's runs", upcoming, timeout_s=30, proc=serve, log=log)
        assert {(r.expected_start_time.hour, r.expected_start_time.minute) for r in runs} == {(3, 0)}
    finally:
        stop(serve)


def test_prefect_yaml_deploys_to_its_work_pools(prefect_server, tmp_path):
    env = prefect_server.env("deploy-home")
    prefect = [sys.executable, "-m", "prefect"]
    log = tmp_path / "deploy.log"
    for cmd in (["work-pool", "create", "flashio-cpu", "--type", "process", "--overwrite"],
                ["work-pool", "create", "flashio-k8s", "--type", "kubernetes", "--overwrite",
                 "--base-job-template", str(ROOT / "infra/k8s/base-job-template.json")],
                ["--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"]):
        proc = start([*prefect, *cmd], env=env, log=log)
        try:
            assert proc.wait(timeout=120) == 0, tail(log)
        finally:
            stop(proc)
    spec = {d["name"]: d for d in yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]}
    flows = {"flows/scheduled.py:convert_plan": "flashio-convert-plan", "flows/convert.py:convert": "flashio-convert"}
    with prefect_server.client() as client:
        for name, d in spec.items():
            dep = client.read_deployment_by_name(f"{flows[d['entrypoint']]}/{name}")
            assert dep.entrypoint == d["entrypoint"] and dep.work_pool_name == d["work_pool"]["name"]
            assert dep.parameters == d.get("parameters", {})
            assert dep.job_variables == d["work_pool"].get("job_variables", {})
            assert [(s.schedule.cron, s.active) for s in dep.schedules] == \
                [(s["cron"], s.get("active", True)) for s in d.get("schedules", [])]
            if "concurrency_limit" in d:
                assert dep.global_concurrency_limit.limit == d["concurrency_limit"]["limit"]
                assert dep.concurrency_options.collision_strategy.value == d["concurrency_limit"]["collision_strategy"]
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/flashio"}}]
