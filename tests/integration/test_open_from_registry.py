"""flashio.open on registry references: a real artifact published to a real S3 server
(rclone serve s3) and to a local registry, pulled, verified and run."""

from __future__ import annotations

import logging

import pytest
import torch

import flashio
from flashio.errors import FlashError, RegistryError
from flashio.registry import (
    NotFoundError,
    RegistryConfig,
    UnreachableError,
    open_registry,
    resolve_to_local,
)
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


# -- opening from the cache while the registry is down -------------------------------------------

def _s3_env(monkeypatch, rclone_s3, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", rclone_s3.endpoint)
    monkeypatch.setenv("FLASHIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLASHIO_OFFLINE", raising=False)


def _published(monkeypatch, rclone_s3, tmp_path, artifact, version: str = "1", aliases=("prod",)) -> str:
    """The URI of a registry on the rclone server holding `artifact` as opt-tiny@`version` (and `aliases`)."""
    _s3_env(monkeypatch, rclone_s3, tmp_path)
    uri = f"s3://{BUCKET}/reg"
    with open_registry(uri) as reg:
        reg.publish(artifact, name="opt-tiny", version=version, aliases=list(aliases))
    return uri


FAST = RegistryConfig(max_attempts=2, connect_timeout_s=1.0, read_timeout_s=5.0)


def _no_requests(monkeypatch):
    """Make every request of the S3 backend fail the test: proves nothing contacts the server."""
    from flashio.registry.s3 import S3Backend

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"the registry was contacted: {args}")

    for method in ("head", "get_bytes", "put_bytes", "read_range", "list", "upload"):
        monkeypatch.setattr(S3Backend, method, refuse)


@pytest.mark.integration
def test_restart_with_s3_down_opens_the_cached_alias_with_a_warning(rclone_s3, opt_artifact, tmp_path,
                                                                     monkeypatch, caplog):
    uri = _published(monkeypatch, rclone_s3, tmp_path, opt_artifact)
    with flashio.open("opt-tiny@prod", registry=uri, mode="oracle") as m:
        want = m.forward(PROMPT)
        cached = m.artifact.path
    rclone_s3.kill()  # the application restarts while S3 is unreachable

    with caplog.at_level(logging.WARNING, logger="flashio.registry"):
        assert resolve_to_local("opt-tiny@prod", registry=uri, config=FAST) == cached
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "unreachable" in warning and "opt-tiny@prod as version 1" in warning and "resolved at" in warning
    assert rclone_s3.endpoint in warning

    # flashio.open (default config: botocore retries with backoff) falls back the same way
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flashio.registry"), \
            flashio.open("opt-tiny@prod", registry=uri, mode="oracle") as m:
        assert m.artifact.path == cached
        assert torch.equal(m.forward(PROMPT), want)
    assert any("as version 1" in r.getMessage() for r in caplog.records)

    # an alias never resolved here cannot fall back: the registry error, saying nothing is cached
    with pytest.raises(UnreachableError, match=r"(?s)cannot reach.*Nothing to fall back to: opt-tiny@beta"):
        resolve_to_local("opt-tiny@beta", registry=uri, config=FAST)
    # offline=False: never fall back
    with pytest.raises(UnreachableError, match="cannot reach") as exc:
        resolve_to_local("opt-tiny@prod", registry=uri, config=FAST, offline=False)
    assert "fall back" not in str(exc.value)


@pytest.mark.integration
def test_explicit_cached_version_needs_no_registry(rclone_s3, opt_artifact, tmp_path, monkeypatch, caplog):
    uri = _published(monkeypatch, rclone_s3, tmp_path, opt_artifact, version="3", aliases=())
    cached = resolve_to_local(f"{uri}/opt-tiny@3")
    rclone_s3.kill()
    _no_requests(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="flashio.registry"):
        assert resolve_to_local(f"{uri}/opt-tiny@3") == cached
        with flashio.open(f"{uri}/opt-tiny@3", mode="naive") as m:
            assert m.artifact.path == cached
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # a version this cache never pulled: offline it is a clear error, without any request
    with pytest.raises(NotFoundError, match=r"offline.*opt-tiny@4 is not usable from the local cache.*never pulled"):
        resolve_to_local(f"{uri}/opt-tiny@4", offline=True)


@pytest.mark.integration
def test_offline_never_contacts_the_registry(rclone_s3, opt_artifact, tmp_path, monkeypatch):
    _s3_env(monkeypatch, rclone_s3, tmp_path)
    uri = f"s3://{BUCKET}/reg"
    with open_registry(uri) as reg:
        reg.publish(opt_artifact, name="opt-tiny", version="1", aliases=["prod"])
        v1 = resolve_to_local("opt-tiny@prod", registry=uri)
        reg.publish(opt_artifact, name="opt-tiny", version="2", lineage={"note": "v2"}, aliases=["prod"])

    # the server is up and prod moved to 2, but offline the cache's last resolution (1) is used
    monkeypatch.setenv("FLASHIO_OFFLINE", "1")
    with monkeypatch.context() as patched:
        _no_requests(patched)
        assert resolve_to_local("opt-tiny@prod", registry=uri) == v1
        with flashio.open("opt-tiny@prod", registry=uri, mode="naive") as m:
            assert m.artifact.path == v1
        with pytest.raises(NotFoundError, match=r"FLASHIO_OFFLINE=1.*opt-tiny@latest is not usable"):
            flashio.open("opt-tiny", registry=uri)
    # online again: the registry wins while it is reachable, and the record follows it
    monkeypatch.delenv("FLASHIO_OFFLINE")
    v2 = resolve_to_local("opt-tiny@prod", registry=uri)
    assert v2 != v1 and v2.name.startswith("2-")
    assert resolve_to_local("opt-tiny@prod", registry=uri, offline=True) == v2


@pytest.mark.integration
def test_refused_credentials_and_missing_aliases_are_never_masked(rclone_s3, opt_artifact, tmp_path, monkeypatch):
    uri = _published(monkeypatch, rclone_s3, tmp_path, opt_artifact)
    resolve_to_local("opt-tiny@prod", registry=uri)
    with open_registry(uri) as reg:  # the alias is deleted on the server: that is not "unreachable"
        reg.backend.delete("models/opt-tiny/aliases/prod")
    with pytest.raises(NotFoundError, match="no such version or alias"):
        resolve_to_local("opt-tiny@prod", registry=uri)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-0000000000")
    with pytest.raises(RegistryError, match="refused by") as exc:
        resolve_to_local("opt-tiny@latest", registry=uri)
    assert not isinstance(exc.value, UnreachableError)


@pytest.mark.integration
def test_damaged_cache_entry_is_not_opened_offline(rclone_s3, opt_artifact, tmp_path, monkeypatch):
    uri = _published(monkeypatch, rclone_s3, tmp_path, opt_artifact)
    cached = resolve_to_local("opt-tiny@prod", registry=uri)
    victim = next(p for p in sorted(cached.iterdir()) if p.name != "manifest.json" and p.is_file())
    victim.unlink()
    rclone_s3.kill()
    with pytest.raises(UnreachableError, match=rf"(?s)Nothing to fall back to.*damaged or incomplete.*{victim.name}"):
        resolve_to_local("opt-tiny@prod", registry=uri, config=FAST)
    with pytest.raises(NotFoundError, match="damaged or incomplete"):
        resolve_to_local("opt-tiny@1", registry=uri, offline=True)
