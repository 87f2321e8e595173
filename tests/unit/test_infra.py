"""infra/ checked as far as this machine allows without Docker or Kubernetes: every file parses;
the compose file's references resolve; the Dockerfile copies what exists and what its ignore file
keeps; prefect.yaml's entrypoints are real flows whose parameters validate, its plans load, its
pools exist in the other files and its job variables are the pool template's; the Kubernetes
manifests have kinds and refer to each other consistently. (The deployments are also registered
on a real Prefect server in tests/integration/test_scheduled_server.py.)"""

from __future__ import annotations

import fnmatch
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "prefect-worker-values.yaml" for d in load_yaml(p)]


def prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_every_yaml_and_json_file_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {p.name for p in files} >= {"compose.yaml", "prefect.yaml", "plan.example.yaml", "namespace.yaml",
                                       "dask-cluster.yaml", "prefect-worker-values.yaml"}
    for p in files:
        assert load_yaml(p), f"{p} is empty"
    for p in INFRA.rglob("*.json"):
        json.loads(p.read_text())
    assert not list(INFRA.rglob("*.py")), "infra/ holds no importable Python (DESIGN.md section 1)"


# -- compose ------------------------------------------------------------------------------------

def test_compose_references_resolve():
    doc = compose()
    services = doc["services"]
    assert {"postgres", "prefect-server", "s3", "worker"} <= set(services)
    declared = set(doc.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on missing service {dep}"
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
        if build := svc.get("build"):
            context = (INFRA / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
    # the worker serves the work pool that prefect.yaml deploys to, against the compose server
    worker = services["worker"]
    assert "--pool flashio-cpu" in worker["command"] and "--type process" in worker["command"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    server_port = services["prefect-server"]["ports"][0].rsplit(":", 1)[1]
    assert server_port == "4200"
    # the plan in the image publishes to the bucket the compose stack creates
    bucket = re.search(r"mc mb --ignore-existing local/([\w.-]+)", services["s3-bucket"]["entrypoint"]).group(1)
    assert yaml.safe_load((INFRA / "plan.example.yaml").read_text())["registry"].startswith(f"s3://{bucket}/")


def test_compose_config_resolves_with_the_docker_client():
    """`docker compose config` resolves the file without an engine where the plugin exists."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker client has no compose plugin here")
    r = subprocess.run([docker, "compose", "-f", str(INFRA / "compose.yaml"), "--profile", "dask", "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# -- Dockerfile -------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def ignored(path: str) -> bool:
    patterns = [p.strip() for p in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or path.split("/")[0] == p for p in patterns)


def test_dockerfile_copies_what_exists_and_is_not_ignored():
    copies = [rest.split() for op, rest in dockerfile_instructions() if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            assert not src.startswith("--"), "no COPY --from/--chown expected"
            assert (ROOT / src).exists(), f"COPY source {src} does not exist (context: the repository root)"
            assert not ignored(src), f"COPY source {src} is excluded by infra/Dockerfile.dockerignore"
    assert ignored(".venv") and ignored(".git")
    args = dict(rest.split("=", 1) for op, rest in dockerfile_instructions() if op == "ARG" and "=" in rest)
    assert args["TORCH_VARIANT"] == "cpu" and args["TORCH_VERSION"] in (ROOT / "constraints.txt").read_text()


def test_dockerfile_matches_the_deployments():
    ins = dockerfile_instructions()
    workdir = [rest for op, rest in ins if op == "WORKDIR"][-1]
    [pull] = prefect_yaml()["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
    for d in prefect_yaml()["deployments"]:  # entrypoints and ./-plans are copied into the image
        assert d["entrypoint"].split(":")[0].split("/")[0] in {rest.split()[-1].strip("./") for op, rest in ins
                                                               if op == "COPY"}
    cmd = json.loads([rest for op, rest in ins if op == "CMD"][-1])
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == "flashio-cpu"


# -- prefect.yaml -----------------------------------------------------------------------------------

def test_prefect_yaml_is_what_prefect_deploy_reads():
    prefect_models = pytest.importorskip("prefect.cli.deploy._models")  # the CLI's own schema
    model = prefect_models.PrefectYamlModel.model_validate(prefect_yaml())
    assert {d.name for d in model.deployments} == {"scheduled", "on-demand", "scheduled-k8s"}


def test_prefect_yaml_entrypoints_are_flows_and_parameters_validate(monkeypatch):
    pytest.importorskip("prefect")
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow, load_flow_from_entrypoint

    from flows.plan import load_plan, parse_plan

    monkeypatch.chdir(ROOT)  # the image's /opt/flashio is this checkout
    config_map = next(d for d in k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "flashio-plan")
    for d in prefect_yaml()["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert isinstance(flow, Flow), d["entrypoint"]
        params = d.get("parameters", {})
        signature = inspect.signature(flow.fn).parameters
        assert set(params) <= set(signature), (d["name"], params)
        if {n for n, p in signature.items() if p.default is p.empty} <= set(params):
            flow.validate_parameters(params)  # raises on an invalid parameter
        else:
            assert d["name"] == "on-demand", f"{d['name']}: runs would lack required parameters"
        if "plan" in params:
            if params["plan"] == "/etc/flashio/plan.yaml":  # the ConfigMap mounted by the k8s job template
                plan = parse_plan(yaml.safe_load(config_map["data"]["plan.yaml"]), base_dir=Path("/etc/flashio"))
                assert plan.runner == "dask" and "flashio-dask-scheduler" in plan.dask_address
            else:
                assert load_plan(ROOT / params["plan"]).models
        for s in d.get("schedules", []):
            CronSchedule(cron=s["cron"], timezone=s.get("timezone"))
        if (limit := d.get("concurrency_limit")) is not None:
            assert limit["limit"] >= 1 and limit["collision_strategy"] in ("ENQUEUE", "CANCEL_NEW")
    on_demand = next(d for d in prefect_yaml()["deployments"] if d["name"] == "on-demand")
    flow = load_flow_from_entrypoint(on_demand["entrypoint"])
    flow.validate_parameters({"config": {"model": "facebook/opt-125m", "samples": 64}})
    with pytest.raises(Exception, match="samples"):
        flow.validate_parameters({"config": {"model": "facebook/opt-125m", "samples": 1}})


def test_work_pools_and_job_variables_match_the_other_files():
    template = json.loads((K8S / "base-job-template.json").read_text())
    variables = set(template["variables"]["properties"])
    values = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in prefect_yaml()["deployments"]}
    assert pools == {"flashio-cpu", "flashio-k8s"}
    assert values["worker"]["config"]["workPool"] == "flashio-k8s" and values["worker"]["config"]["type"] == "kubernetes"
    for d in prefect_yaml()["deployments"]:
        if d["work_pool"]["name"] == "flashio-k8s":
            assert set(d["work_pool"].get("job_variables", {})) <= variables


# -- Kubernetes ---------------------------------------------------------------------------------------

def test_k8s_manifests_have_kinds_and_consistent_references():
    docs = k8s_docs()
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "flashio", d["metadata"]
    by_kind: dict[str, set[str]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    cluster = next(d for d in docs if d["kind"] == "DaskCluster")
    worker_pod = cluster["spec"]["worker"]["spec"]
    [worker] = worker_pod["containers"]
    [scheduler] = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert worker["args"][:2] == ["dask", "worker"] and scheduler["args"][:2] == ["dask", "scheduler"]
    assert shutil.which("dask", path=str(Path(__import__("sys").executable).parent)) or shutil.which("dask")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in worker_pod["volumes"] if "persistentVolumeClaim" in v}
    secrets = {e["secretRef"]["name"] for e in worker.get("envFrom", [])}
    assert claims <= by_kind["PersistentVolumeClaim"] and secrets <= by_kind["Secret"]
    # the flow-run Jobs (work pool template) mount the same volume and secret, the plan ConfigMap,
    # and use only variables the template declares
    template = json.loads((K8S / "base-job-template.json").read_text())
    job = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v} == claims
    assert {v["configMap"]["name"] for v in job["volumes"] if "configMap" in v} <= by_kind["ConfigMap"]
    assert {e["secretRef"]["name"] for e in job["containers"][0]["envFrom"]} == secrets
    mounts = {m["name"]: m["mountPath"] for m in job["containers"][0]["volumeMounts"]}
    assert set(mounts) == {v["name"] for v in job["volumes"]}
    assert mounts["work"] == worker["volumeMounts"][0]["mountPath"]  # same paths on both sides
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"])
    env = {e["name"]: e["value"] for e in worker.get("env", [])}
    assert env["HF_HOME"] == template["variables"]["properties"]["env"]["default"]["HF_HOME"]
