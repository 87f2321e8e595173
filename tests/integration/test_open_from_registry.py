"""flashio.open on registry references: a real artifact published to a real S3 server
(rclone serve s3) and to a local registry, pulled, verified and run."""

from __future__ import annotations

import pytest
import torch

import flashio
from flashio.errors import FlashError
from flashio.registry import open_registry
from tests.integration.conftest import BUCKET

PROMPT = [2, 17, 101, 55, 9]


@pytest.mark.integration
def test_open_s3_uri_and_alias(rclone_s3, opt_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", rclone_s3.endpoint)
    monkeypatch.setenv("FLASHIO_CACHE", str(tmp_path / "cache"))
    with open_registry(f"s3://{BUCKET}/reg") as reg:
        reg.publish(opt_artifact, name="opt-tiny", version="1", aliases=["prod"])
    with flashio.open(opt_artifact, mode="oracle") as local:
        want = local.forward(PROMPT)
    with flashio.open(f"s3://{BUCKET}/reg/opt-tiny@latest", mode="oracle") as m:
        assert torch.equal(m.forward(PROMPT), want)
        assert str(m.artifact.path).startswith(str(tmp_path / "cache"))
    with flashio.open("opt-tiny@prod", registry=f"s3://{BUCKET}/reg", mode="oracle") as m:
        assert torch.equal(m.forward(PROMPT), want)


@pytest.mark.integration
def test_open_from_local_registry(opt_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHIO_CACHE", str(tmp_path / "cache"))
    reg_dir = tmp_path / "registry"
    with open_registry(str(reg_dir)) as reg:
        reg.publish(opt_artifact, name="opt-tiny", version="1")
    with flashio.open("opt-tiny", registry=str(reg_dir), mode="naive") as m:
        assert m.forward(PROMPT).shape == (5, 320)
    with pytest.raises(FlashError, match="nope"):
        flashio.open("nope@latest", registry=str(reg_dir))
