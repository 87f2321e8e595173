"""The scheduled conversion flow (flows/scheduled.py) under the session's Prefect test server, on
a tiny OPT checkpoint: a plan's missing model is converted and published with its lineage key;
the same plan again converts nothing; a changed option makes the model stale; a run interrupted
half-way resumes from the cached stages; one failing model does not stop the others; and the
per-model conversion lock excludes a second holder."""

from __future__ import annotations

import time

import pytest
import yaml

pytest_plugins = ["tests.integration.prefect_harness"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_session")]
pytest.importorskip("transformers")
pytest.importorskip("prefect")

from flashio.registry import open_registry  # noqa: E402
from flows.locks import conversion_lock, limit_name  # noqa: E402
from flows.scheduled import convert_plan  # noqa: E402
from tasks.errors import PipelineError  # noqa: E402

# Small enough for seconds per conversion; the same sizes as tests/integration/test_pipeline.py,
# whose accuracy gate the fitted tiny model passes.
OPTIONS = {"samples": 24, "seq_len": 64, "heldout_samples": 4, "shard_samples": 8, "sweep": [0.9, 0.99],
           "sweep_samples": 2}


def write_plan(path, tiny, *, models=None, **top) -> str:
    doc = {"registry": "./registry", "work_dir": "./work", "defaults": OPTIONS,
           "models": models or [{"name": "tiny-opt", "source": str(tiny["opt"]), "calibration": str(tiny["text"]),
                                 "aliases": ["prod"]}], **top}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def task_runs(flow_run_id: str, timeout_s: float = 30.0) -> dict[str, set[str]]:
    """State names of a flow run's task runs, by task name, once all are final (the server
    records them from events, asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            out: dict[str, set[str]] = {}
            for r in runs:
                out.setdefault(r.name.rsplit("-", 1)[0], set()).add(r.state.name if r.state else "none")
            if (runs and all(r.state is not None and r.state.is_final() for r in runs)) or time.monotonic() > deadline:
                return out
            time.sleep(0.3)


HEAVY = ("activations", "merge-activations", "predictor", "bundle", "evaluate")


def test_plan_converts_what_is_missing_then_nothing(tiny, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", tiny)
    [first] = convert_plan(plan)
    assert first.status == "converted" and first.reference.startswith("tiny-opt@") and len(first.lineage_key) == 64
    reg = open_registry(str(tmp_path / "registry"))  # ./registry is relative to the plan file
    [vm] = reg.versions("tiny-opt")
    assert vm.lineage["lineage_key"] == first.lineage_key and vm.lineage["calibration"]["fingerprint"]
    assert reg.aliases("tiny-opt") == {"latest": vm.version, "prod": vm.version}

    # the schedule fires again: the cheap stages give the same key, nothing heavy runs
    t0 = time.monotonic()
    [again] = convert_plan(plan)
    assert (again.status, again.reference, again.lineage_key) == ("up to date", first.reference, first.lineage_key)
    ran = task_runs(again.flow_run_id)
    assert "find-published" in ran and not set(HEAVY) & set(ran), ran
    assert [v.version for v in reg.versions("tiny-opt")] == [vm.version]
    assert time.monotonic() - t0 < 30

    # a changed pipeline option makes the artifact stale: converted again (its early stages cached)
    plan = write_plan(tmp_path / "plan.yaml", tiny, defaults={**OPTIONS, "window": 4})
    time.sleep(1.1)  # versions are UTC timestamps with one-second resolution
    [stale] = convert_plan(plan)
    assert stale.status == "converted" and stale.lineage_key != first.lineage_key
    assert task_runs(stale.flow_run_id)["activations"] == {"Cached"}
    assert len(reg.versions("tiny-opt")) == 2 and reg.aliases("tiny-opt")["prod"] == stale.reference.split("@")[1]


def test_interrupted_run_resumes_and_failures_do_not_stop_other_models(tiny, tmp_path, monkeypatch):
    import tasks.evaluation

    real = tasks.evaluation.evaluate_artifact

    def machine_went_away(*args, **kwargs):
        raise RuntimeError("worker lost during evaluation")

    monkeypatch.setattr(tasks.evaluation, "evaluate_artifact", machine_went_away)
    models = [{"name": "tiny-opt", "source": str(tiny["opt"]), "calibration": str(tiny["text"])},
              {"name": "broken", "source": str(tmp_path / "no-such-model")},
              {"name": "disabled", "source": str(tmp_path / "no-such-model"), "enabled": False}]
    plan = write_plan(tmp_path / "plan.yaml", tiny, models=models)
    state = convert_plan(plan, return_state=True)
    assert state.is_failed()
    with pytest.raises(PipelineError, match=r"2 of 2 conversions .* failed: tiny-opt: .*worker lost.*; broken: .*"
                                            r"does not exist"):
        state.result()
    assert not (tmp_path / "registry").exists()

    # the next run (same plan) resumes: every stage before the evaluation comes from the cache
    monkeypatch.setattr(tasks.evaluation, "evaluate_artifact", real)
    [done] = convert_plan(plan, models=["tiny-opt"])
    assert done.status == "converted"
    states = task_runs(done.flow_run_id)
    for name in ("calibration", "activations", "merge-activations", "predictor", "bundle"):
        assert states.get(name) == {"Cached"}, (name, states)
    assert states["evaluate"] == {"Completed"}
    assert [v.lineage["lineage_key"] for v in open_registry(str(tmp_path / "registry")).versions("tiny-opt")] == \
        [done.lineage_key]


def test_conversion_lock_admits_one_holder_per_model():
    from prefect.client.orchestration import get_client

    with conversion_lock("lock-test"):
        with pytest.raises(TimeoutError), conversion_lock("lock-test", timeout_s=1):
            pass
        with conversion_lock("other-model", timeout_s=5):  # another model is not blocked
            pass
    with conversion_lock("lock-test", timeout_s=5):  # released on exit
        pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit_name("lock-test")).limit == 1
