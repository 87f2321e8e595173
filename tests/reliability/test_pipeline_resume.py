"""A conversion killed mid-way (SIGKILL during predictor training) resumes from the cached
results of the stages that finished: nothing before the kill is computed twice. A repeated
conversion reuses every stage; `--force` recomputes every one. A conversion stopped by SIGTERM
takes its temporary Prefect server with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus

pytestmark = pytest.mark.integration


def _convert(model: Path, text: Path, tmp: Path, home: str, *extra: str, version: str = "1") -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": home, "FLASHIO_WORK_DIR": str(tmp / "work"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           # the temporary server of each run takes 9-17 s to start, more on a loaded machine (20 s default)
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    cmd = [sys.executable, "-m", "flashio.cli", "-v", "convert", str(model), "--calibration", str(text),
           "--samples", "24", "--seq-len", "64", "--heldout-samples", "4", "--registry", str(tmp / "registry"),
           "--name", "tiny", "--version", version, "--allow-accuracy-loss", "--no-sample", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _completed(work: Path) -> dict[str, dict[str, int]]:
    """stage -> {stage directory: mtime of its completion marker}."""
    out: dict[str, dict[str, int]] = {}
    for marker in work.glob("*/*/_complete.json"):
        out.setdefault(marker.parent.parent.name, {})[marker.parent.name] = marker.stat().st_mtime_ns
    return out


def test_killed_conversion_resumes_from_cached_stages(tmp_path):
    files = write_corpus(tmp_path / "text", n_files=6)
    tok = build_tokenizer(files, tmp_path / "tok")
    model = build_tiny_model("opt", tmp_path / "opt", tok)
    home = str(tmp_path / "prefect-home")

    first = _convert(model, tmp_path / "text", tmp_path, home)
    stage_dir = tmp_path / "work" / "predictor"  # <work>/<stage>/<key>/: exists once training starts
    deadline = time.monotonic() + 240
    try:  # wait until predictor training has started, then kill the whole process group
        while time.monotonic() < deadline and first.poll() is None:
            if stage_dir.is_dir() and any(stage_dir.iterdir()):
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the conversion ended before it could be killed:\n{first.stdout.read()}"
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert not (tmp_path / "registry" / "models").exists() or not any((tmp_path / "registry" / "models").rglob("manifest.json"))

    done_before = _completed(tmp_path / "work")
    assert {"calibration", "activations", "merge-activations"} <= set(done_before), done_before
    assert "predictor" not in done_before or len(done_before["predictor"]) < 2  # killed mid-training

    second = _convert(model, tmp_path / "text", tmp_path, home)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-4000:]
    done_after = _completed(tmp_path / "work")
    for stage in ("calibration", "activations", "merge-activations"):
        assert done_after[stage] == done_before[stage], stage  # reused, not recomputed
    assert len(done_after["predictor"]) == 2  # both layers trained in the end
    # Reuse is shown by the stage directories above: the same keys, and completion markers never
    # rewritten (a recomputed stage empties its directory and writes a new marker). Whether Prefect's
    # result cache or the stage's own completed directory answered depends on when the kill came
    # relative to Prefect persisting its records, and the lines each leaves in the log differ (on a
    # loaded machine neither Prefect's "Cached" state nor a "reusing" line was printed once): the
    # directories are the evidence, not the log.
    assert "tiny@1" in out
    assert any((tmp_path / "registry").rglob("manifest.json"))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_ends_the_conversion_and_its_temporary_server(tmp_path):
    files = write_corpus(tmp_path / "text", n_files=2)
    model = build_tiny_model("opt", tmp_path / "opt", build_tokenizer(files, tmp_path / "tok"))
    run = _convert(model, tmp_path / "text", tmp_path, str(tmp_path / "prefect-home"))
    try:  # the flow runs once the temporary server is up: wait for its first stage directory
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None and not (tmp_path / "work" / "calibration").is_dir():
            time.sleep(0.05)
        assert run.poll() is None, f"the conversion ended before it could be stopped:\n{run.stdout.read()}"
        os.kill(run.pid, signal.SIGTERM)  # the command's process only, as `kill PID` or a service manager sends it
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 128 + signal.SIGTERM, out[-3000:]
        deadline = time.monotonic() + 60  # the server (a child in the command's process group) stops at exit
        while time.monotonic() < deadline and _group_alive(run.pid):
            time.sleep(0.1)
        assert not _group_alive(run.pid), "a process of the stopped conversion (its Prefect server) still runs"
    finally:
        if _group_alive(run.pid):
            os.killpg(run.pid, signal.SIGKILL)


def test_repeated_conversion_reuses_every_stage_and_force_recomputes_them(tmp_path):
    files = write_corpus(tmp_path / "text", n_files=4)
    tok = build_tokenizer(files, tmp_path / "tok")
    model = build_tiny_model("opt", tmp_path / "opt", tok)
    home = str(tmp_path / "prefect-home")

    def convert(version: str, *extra: str) -> str:
        proc = _convert(model, tmp_path / "text", tmp_path, home, "--samples", "8", "--seq-len", "32", *extra,
                        version=version)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        assert f"tiny@{version}" in out
        return out

    convert("1")
    first = _completed(tmp_path / "work")
    assert {"calibration", "activations", "merge-activations", "predictor", "bundle", "evaluate",
            "finalize"} <= set(first), first
    convert("2")
    assert _completed(tmp_path / "work") == first  # every stage reused: not one completion marker rewritten

    out = convert("3", "--force")
    forced = _completed(tmp_path / "work")
    newest_before = max(m for dirs in first.values() for m in dirs.values())
    assert all(max(forced[stage].values()) > newest_before for stage in first), forced  # every stage ran again
    # The stages before the bundle have the same inputs: the same directories, each rewritten. The
    # bundle's manifest records when it was written, so the stages after it get new keys.
    for stage in ("calibration", "activations", "merge-activations", "predictor", "bundle"):
        assert forced[stage].keys() == first[stage].keys(), stage
        assert all(forced[stage][key] > first[stage][key] for key in first[stage]), stage
    assert "Cached(type=COMPLETED)" not in out
    assert not list((tmp_path / "work").rglob("*.pickle"))  # results are JSON (+ safetensors)
