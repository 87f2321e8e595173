"""The convert flow on Dask (prefect-dask's DaskTaskRunner, a 2-worker local cluster of processes)
gives the same results as the sequential runner with the same seed: activation statistics of
every shard and merged, predictor files, and every file of the published artifact, byte for byte
(sha256); and the activation shards and predictor layers did run on the cluster's workers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest_plugins = ["tests.integration.prefect_harness"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_session")]
pytest.importorskip("transformers")
distributed = pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")

from flows.config import ConvertConfig  # noqa: E402
from flows.convert import run_convert, task_runner  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes, as `flashio convert --runner dask --workers 2` makes."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        client.wait_for_workers(2, timeout=60)
        yield c


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_files(work: Path, stage: str, pattern: str) -> list[str]:
    """sha256 of a stage's output files (stage directories are named by keys that include the
    work directory, so compare contents, not names)."""
    return sorted(sha(p) for p in (work / stage).glob(f"*/{pattern}"))


def artifact_files(artifact: Path) -> dict[str, str]:
    """name -> sha256 of every file the manifest lists (the manifest itself differs only in created_at)."""
    files = json.loads((artifact / "manifest.json").read_text())["files"]
    assert files, "the manifest lists no files"
    return {name: sha(artifact / name) for name in files}


def test_dask_runner_matches_the_sequential_runner(tiny, cluster, tmp_path):
    base = {"model": str(tiny["opt"]), "calibration": str(tiny["text"]), "samples": 24, "seq_len": 64,
            "heldout_samples": 4, "shard_samples": 8, "sweep": (0.9, 0.99), "sweep_samples": 2, "seed": 3,
            "version": "1"}
    seq = ConvertConfig(**base, registry=str(tmp_path / "reg-seq"), work_dir=tmp_path / "work-seq")
    par = ConvertConfig(**base, registry=str(tmp_path / "reg-dask"), work_dir=tmp_path / "work-dask",
                        dask=True, dask_address=cluster.scheduler_address, workers=2)
    assert type(task_runner(par)).__name__ == "DaskTaskRunner"

    a = run_convert(seq)
    with distributed.Client(cluster.scheduler_address) as client, distributed.get_task_stream(client) as stream:
        b = run_convert(par)
    ran = [t for t in stream.data if t["key"].startswith(("activations", "predictor"))]
    assert len(ran) == 3 + 2 and len({t["worker"] for t in ran}) == 2, ran  # 3 shards, 2 layers, both workers

    work_a, work_b = seq.work_dir, par.work_dir
    assert stage_files(work_a, "activations", "*.safetensors") == stage_files(work_b, "activations", "*.safetensors")
    assert stage_files(work_a, "merge-activations", "stats.safetensors") == \
        stage_files(work_b, "merge-activations", "stats.safetensors")
    assert stage_files(work_a, "predictor", "layer-*.safetensors") == \
        stage_files(work_b, "predictor", "layer-*.safetensors")
    files_a, files_b = artifact_files(Path(a.artifact_dir)), artifact_files(Path(b.artifact_dir))
    assert {"ffn.safetensors", "resident.safetensors", "predictors.safetensors"} <= set(files_a)
    assert files_a == files_b
    assert a.lineage_key == b.lineage_key  # the runner is not part of what the artifact is
    assert a.report["summary"] == b.report["summary"]
