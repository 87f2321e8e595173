"""Registry under faults: a server restarted at random moments, and secrets that never leak."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from flashio.errors import FlashError
from flashio.registry import RegistryConfig, open_registry
from tests.integration.conftest import BUCKET, SECRET_KEY
from tests.integration.test_registry_s3 import make_artifact, tree_digests

FAST = RegistryConfig(part_size_bytes=5 << 20, multipart_threshold_bytes=5 << 20, concurrency=4,
                      connect_timeout_s=1.0, read_timeout_s=3.0, max_attempts=2)


def _restarter(server, stop: threading.Event, rng: random.Random, restarts: list[float]) -> None:
    while not stop.wait(rng.uniform(0.2, 0.8)):
        server.kill()
        time.sleep(rng.uniform(0.0, 0.3))
        server.start()
        restarts.append(time.monotonic())


@pytest.mark.parametrize("seconds", [pytest.param(8, id="short"), pytest.param(120, id="soak", marks=pytest.mark.slow)])
def test_publish_pull_loop_while_server_restarts(rclone_s3, tmp_path: Path, seconds: int):
    """Every version visible in `list` pulls and verifies, whatever moment the server died at."""
    rng = random.Random(7)
    arts = [make_artifact(tmp_path / f"a{i}", {"ffn.safetensors": rng.choice([100_000, 6 << 20]),
                                               "resident.safetensors": 50_000}, seed=i) for i in range(6)]
    stop, restarts = threading.Event(), []
    t = threading.Thread(target=_restarter, args=(rclone_s3, stop, rng, restarts), daemon=True)
    published, failures, i = {}, 0, 0
    deadline = time.monotonic() + seconds
    t.start()
    try:
        while time.monotonic() < deadline and i < 500:
            art = arts[i % len(arts)]
            version = f"v{i}"
            try:
                with open_registry(f"s3://{BUCKET}/soak", endpoint_url=rclone_s3.endpoint, config=FAST) as reg:
                    reg.publish(art, name="m", version=version)
                published[version] = art
            except FlashError:
                failures += 1
            i += 1
    finally:
        stop.set()
        t.join(10)
    if rclone_s3.proc is None or rclone_s3.proc.poll() is not None:
        rclone_s3.start()
    with open_registry(f"s3://{BUCKET}/soak", endpoint_url=rclone_s3.endpoint, config=FAST) as reg:
        visible = reg.versions("m") if "m" in reg.names() else []
        for v in visible:  # a version is visible only if complete: it must pull and verify
            name = v if isinstance(v, str) else v.version
            local = reg.pull(f"m@{name}", cache_dir=tmp_path / "cache")
            src = published.get(name)
            if src is not None:
                assert tree_digests(local) == tree_digests(src)
    print(f"\nsoak: {i} publishes, {failures} failed cleanly, {len(visible)} visible, {len(restarts)} restarts")
    assert restarts, "the server was never restarted"
    assert set(published) <= {v if isinstance(v, str) else v.version for v in visible}


def test_secrets_never_appear_in_errors_logs_or_manifests(rclone_s3, tmp_path: Path, monkeypatch, caplog):
    """A wrong secret, and a secret embedded in the endpoint URL: no message, log line or file
    written by flashio contains either."""
    fake = "FAKE-SECRET-do-not-print-9f8e7d"
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 1000})
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fake)
    def publish(endpoint_url: str) -> None:
        with open_registry(f"s3://{BUCKET}/reg", endpoint_url=endpoint_url, config=FAST) as reg:
            reg.publish(art, name="m", version="1")

    with pytest.raises(FlashError) as bad_secret:
        publish(rclone_s3.endpoint)
    with pytest.raises(FlashError) as bad_url:
        publish(f"http://user:{fake}@127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)  # now publish for real and check the files
    with open_registry(f"s3://{BUCKET}/reg", endpoint_url=rclone_s3.endpoint, config=FAST) as reg:
        reg.publish(art, name="m", version="1", lineage={"note": "lineage is user data"})
        local = reg.pull("m@1", cache_dir=tmp_path / "cache")
    assert "carries credentials" in str(bad_url.value)
    for exc in (bad_secret.value, bad_url.value):
        text = f"{exc!s} {exc!r}" + "".join(traceback.format_exception(exc))  # what a user could see
        assert fake not in text and SECRET_KEY not in text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert fake not in logged and SECRET_KEY not in logged
    stored = [p for p in rclone_s3.data_dir.rglob("*") if p.is_file()] + [p for p in local.rglob("*") if p.is_file()]
    for p in stored:
        data = p.read_bytes()
        assert fake.encode() not in data and SECRET_KEY.encode() not in data, p
    manifest = json.loads((local / "manifest.json").read_text())
    assert SECRET_KEY not in json.dumps(manifest) and os.environ["AWS_ACCESS_KEY_ID"]


_KILLED_PUBLISH = """
import os, signal, sys
from flashio.registry import NullProgress, RegistryConfig, open_registry

class KillAfter(NullProgress):  # SIGKILL this process once `limit` bytes of the FFN file were sent
    def __init__(self, limit):
        self.limit, self.label, self.sent = limit, "", 0
    def begin(self, label, total_bytes):
        self.label, self.sent = label, 0
    def advance(self, n_bytes):
        self.sent += n_bytes
        if self.label == "ffn.safetensors" and self.sent >= self.limit:
            os.kill(os.getpid(), signal.SIGKILL)

uri, endpoint, art = sys.argv[1:4]
cfg = RegistryConfig(part_size_bytes=5 << 20, multipart_threshold_bytes=5 << 20, concurrency=2)
with open_registry(uri, endpoint_url=endpoint, config=cfg) as reg:
    reg.publish(art, name="m", version="1", progress=KillAfter(10 << 20))
"""


def test_publisher_killed_mid_blob_resumes_with_the_missing_parts(rclone_s3, tmp_path: Path):
    """A publishing process SIGKILLed in the middle of a multipart upload (parts in flight cut off):
    the next publish sends only the parts the server lacks, and the result verifies."""
    size = 25 * (1 << 20) + 7  # six parts
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": size, "tokenizer.json": 100})
    uri = f"s3://{BUCKET}/reg"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_PUBLISH, uri, rclone_s3.endpoint, str(art)],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with open_registry(uri, endpoint_url=rclone_s3.endpoint, config=FAST) as reg:
        [left] = list(reg.backend.incomplete_uploads("blobs/"))
        held = {p.number: p.size_bytes for p in reg.backend.upload_parts(left)}
        assert len(held) >= 2 and all(n <= 6 for n in held)
        sent: list[int] = []
        reg.backend._client.meta.events.register("before-parameter-build.s3.UploadPart",
                                                 lambda params, **_: sent.append(params["PartNumber"]))
        result = reg.publish(art, name="m", version="1")
        assert result.created and result.resumed_bytes == sum(held.values())
        assert sorted(sent) == sorted(set(range(1, 7)) - set(held))
        assert list(reg.backend.incomplete_uploads("blobs/")) == []
        local = reg.pull("m@1", cache_dir=tmp_path / "cache")
    assert tree_digests(local) == tree_digests(art)
