"""The local-directory backend, create-once commits, the cache, gc and the CLI, without any server."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flashio.errors import MissingExtraError, RegistryError
from flashio.registry import (
    IntegrityError,
    NotFoundError,
    RefError,
    RegistryConfig,
    TerminalProgress,
    TransferError,
    UnreachableError,
    VersionExistsError,
    commit,
    default_cache_dir,
    open_registry,
    resolve_to_local,
)
from flashio.registry.cache import Cache
from flashio.registry.cli import add_commands
from flashio.registry.commit import create_once
from flashio.registry.local import LocalBackend

CFG = RegistryConfig(download_chunk_bytes=64 * 1024, concurrency=4, commit_timeout_s=3.0, claim_ttl_s=1.0,
                     lock_timeout_s=0.5)


def make_artifact(root: Path, files: dict[str, int], *, seed: int = 0) -> Path:
    """An artifact directory: random files and a manifest.json listing their size and sha256."""
    rng = __import__("random").Random(seed)
    table = {}
    for rel, size in files.items():
        data = rng.randbytes(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        table[rel] = {"bytes": size, "sha256": hashlib.sha256(data).hexdigest()}
    (root / "manifest.json").write_text(json.dumps({"format_version": 1, "files": table}))
    return root


# -- backend -----------------------------------------------------------------------------------
def test_local_backend_objects(tmp_path: Path):
    b = LocalBackend(tmp_path / "reg")
    assert b.head("a/b") is None and b.get_bytes("a/b") is None
    with pytest.raises(NotFoundError, match="no registry at"):
        list(b.list(""))
    assert b.put_bytes("a/b", b"1", if_absent=True)
    assert not b.put_bytes("a/b", b"2", if_absent=True)  # the local backend honours create-if-absent
    assert b.get_bytes("a/b") == b"1"
    assert b.put_bytes("a/b", b"22")
    b.put_bytes("a/c/d", b"333")
    assert sorted((o.key, o.size_bytes) for o in b.list("a/")) == [("a/b", 2), ("a/c/d", 3)]
    assert [o.key for o in b.list("a/c")] == ["a/c/d"]
    assert b"".join(b.read_range("a/c/d", 1, 3)) == b"33"
    b.delete("a/b")
    b.delete("a/b")
    assert b.head("a/b") is None
    assert not [p for p in (tmp_path / "reg").rglob(".tmp-*")]


def test_failed_upload_leaves_nothing(tmp_path: Path):
    class ChangedFile:  # what hashing.VerifyingReader does when the bytes do not match
        def read(self, size: int = -1) -> bytes:
            raise IntegrityError("changed")

    b = LocalBackend(tmp_path)
    with pytest.raises(IntegrityError):
        b.upload("blobs/x", ChangedFile(), 10)
    assert b.head("blobs/x") is None and not list(tmp_path.rglob(".tmp-*"))


def test_s3_without_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'flashio\[s3\]'"):
        open_registry("s3://bucket/prefix")


# -- create-once -------------------------------------------------------------------------------
def test_create_once_threads_exactly_one_wins(tmp_path: Path):
    backend = LocalBackend(tmp_path)
    n = 6
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait(timeout=5)
        results[i] = create_once(backend, "k", f"{i}".encode(), claims_prefix="claims/", config=CFG)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(created for created, _ in results) == 1
    assert len({content for _, content in results}) == 1
    assert not list(backend.list("claims/"))


FAST = RegistryConfig(commit_timeout_s=5.0, claim_ttl_s=0.5)


class CountingBackend(LocalBackend):
    """A local backend that counts the claim listings create_once makes (one per look at its rivals)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.lists = 0

    def list(self, prefix: str):
        self.lists += 1
        return super().list(prefix)


def test_create_once_outwaits_a_crashed_publishers_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    backend = CountingBackend(tmp_path)
    backend.put_bytes("claims/crashed", b"{}")
    t0 = time.monotonic()
    created, _ = create_once(backend, "k", b"mine", claims_prefix="claims/", config=FAST)
    assert created and FAST.claim_ttl_s <= time.monotonic() - t0 < FAST.commit_timeout_s
    assert backend.lists > 1  # it looked again and again until the young claim expired
    # a claim from an hour ago is ignored at once: one look at the claims, no pause, no retry
    # (counted, not timed: a wall-clock bound flakes on a busy machine)
    old = time.time() - 3600
    os.utime(tmp_path / "claims" / "crashed", (old, old))
    pauses: list[float] = []
    monkeypatch.setattr(commit, "time", SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append))
    backend.lists = 0
    assert create_once(backend, "k2", b"mine", claims_prefix="claims/", config=FAST) == (True, b"mine")
    assert backend.lists == 1 and pauses == []


def test_create_once_gives_up_while_a_live_claim_persists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    backend = LocalBackend(tmp_path)
    stop = threading.Event()

    def keep_claim_fresh() -> None:  # a rival that never finishes, but keeps its claim young
        while not stop.is_set():
            backend.put_bytes("claims/rival-0", b"{}")
            time.sleep(0.05)

    backend.put_bytes("claims/rival-0", b"{}")
    rival = threading.Thread(target=keep_claim_fresh)
    rival.start()
    try:
        with pytest.raises(TransferError, match=r"another publish holds a claim .*claims/rival-0"):
            create_once(backend, "k", b"mine", claims_prefix="claims/",
                        config=RegistryConfig(commit_timeout_s=1.0, claim_ttl_s=0.3))
    finally:
        stop.set()
        rival.join(timeout=5)
    assert backend.head("k") is None


# -- publish / pull / gc on a directory ----------------------------------------------------------
def test_publish_pull_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 300_000, "report/x.json": 10, "e": 0})
    with open_registry(str(tmp_path / "reg"), config=CFG) as reg:
        r = reg.publish(art, name="m", lineage={"pipeline_config": {"rank": 8}})
        assert r.version.endswith("Z") and r.created
        vm = reg.resolve("m").manifest
        assert vm.lineage == {"pipeline_config": {"rank": 8}}
        monkeypatch.setenv("FLASHIO_CACHE", str(tmp_path / "cache"))
        local = reg.pull("m")
        assert local.parent.parent == tmp_path / "cache" / "models"
        assert (local / "ffn.safetensors").read_bytes() == (art / "ffn.safetensors").read_bytes()
        assert not os.access(local / "ffn.safetensors", os.W_OK) or os.geteuid() == 0
        with pytest.raises(RefError, match="reserved"):
            reg.publish(art, name="m", version="latest")
        with pytest.raises(RefError, match="cannot shadow a version"):
            reg.set_alias("m", r.version, r.version)


def test_pull_lock_times_out_with_a_clear_error(tmp_path: Path):
    cache = Cache(tmp_path)
    with (cache.lock("x", timeout_s=1), pytest.raises(TransferError, match="held by another process"),
          cache.lock("x", timeout_s=0.2)):
        pass


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("FLASHIO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "flashio"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "flashio"
    monkeypatch.setenv("FLASHIO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


def test_progress_printer():
    out = io.StringIO()
    p = TerminalProgress(out)
    p.begin("ffn.safetensors", 4 * 1024 * 1024)
    p.advance(2 * 1024 * 1024)
    p.advance(2 * 1024 * 1024)
    p.end()
    line = out.getvalue()
    assert line.startswith("ffn.safetensors") and "4.0/4.0 MiB" in line and "MiB/s" in line


# -- CLI -----------------------------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="flashio")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_publish_list_alias_pull_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLASHIO_CACHE", str(tmp_path / "cache"))
    a = make_artifact(tmp_path / "a", {"ffn.safetensors": 5000}, seed=1)
    b = make_artifact(tmp_path / "b", {"ffn.safetensors": 5000}, seed=2)
    reg = ["--registry", str(tmp_path / "reg")]
    assert run_cli("publish", str(a), *reg, "--name", "m", "--version", "1", "--alias", "prod") == 0
    assert "published m@1: 2 blobs uploaded" in capsys.readouterr().out
    assert run_cli("publish", str(b), *reg, "--name", "m", "--version", "2", "-q") == 0
    with pytest.raises(VersionExistsError):
        run_cli("publish", str(b), *reg, "--name", "m", "--version", "1")
    capsys.readouterr()
    assert run_cli("list", *reg) == 0
    assert capsys.readouterr().out.strip() == "m\tlatest=2"
    assert run_cli("list", "m", *reg) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("VERSION") and rows[1].startswith("1\t") and rows[1].endswith("prod")
    assert rows[2].startswith("2\t") and rows[2].endswith("latest")
    assert run_cli("alias", "m@2", "prod", *reg) == 0
    assert capsys.readouterr().out.strip() == "m@prod -> 2"
    assert run_cli("pull", "m@prod", *reg, "-q") == 0
    path = Path(capsys.readouterr().out.strip())
    assert (path / "ffn.safetensors").read_bytes() == (b / "ffn.safetensors").read_bytes()
    (tmp_path / "reg" / "blobs" / "sha256" / ("f" * 64)).write_bytes(b"orphan")
    assert run_cli("gc", *reg, "--dry-run", "--grace-hours", "0") == 0
    captured = capsys.readouterr()
    assert f"would delete\tblobs/sha256/{'f' * 64}\t6" in captured.out and "would free" in captured.err
    assert (tmp_path / "reg" / "blobs" / "sha256" / ("f" * 64)).exists()
    assert run_cli("gc", *reg, "--grace-hours", "0") == 0
    assert not (tmp_path / "reg" / "blobs" / "sha256" / ("f" * 64)).exists()
    with pytest.raises(RefError, match="expected NAME@VERSION"):
        run_cli("alias", "m", "prod", *reg)


def test_cli_without_registry_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FLASHIO_REGISTRY", raising=False)
    with pytest.raises(RefError, match="pass --registry"):
        run_cli("list")


# -- offline use of the cache ----------------------------------------------------------------------
def test_pull_records_resolutions_and_falls_back_only_when_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture):
    monkeypatch.delenv("FLASHIO_OFFLINE", raising=False)
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 200_000, "x.json": 10})
    reg_dir, cache = str(tmp_path / "reg"), tmp_path / "cache"
    with open_registry(reg_dir, config=CFG) as reg:
        reg.publish(art, name="m", version="1", aliases=["prod"])
    p1 = resolve_to_local("m@prod", registry=reg_dir, cache_dir=cache)
    [alias_record] = cache.glob("refs/*/m/aliases/prod.json")
    doc = json.loads(alias_record.read_text())
    assert doc["version"] == "1" and doc["registry"] == str(tmp_path / "reg") and doc["resolved_at"].endswith("Z")
    [version_record] = cache.glob("refs/*/m/versions/1.json")
    assert p1.name == "1-" + json.loads(version_record.read_text())["manifest_sha256"][:12]
    assert not list(cache.glob("refs/*/m/aliases/.tmp-*"))

    calls = []

    def unreachable(self, *args, **kwargs):
        calls.append(args)
        raise UnreachableError(f"cannot reach {self.description} (test)")

    for method in ("head", "get_bytes", "list", "read_range"):
        monkeypatch.setattr(LocalBackend, method, unreachable)
    assert resolve_to_local("m@1", registry=reg_dir, cache_dir=cache) == p1  # explicit version: no request
    assert calls == []
    with caplog.at_level("WARNING", logger="flashio.registry"):
        assert resolve_to_local("m@prod", registry=reg_dir, cache_dir=cache) == p1
    assert calls and "m@prod as version 1" in caplog.text and "resolved at" in caplog.text
    with pytest.raises(UnreachableError, match=r"Nothing to fall back to: m@latest .*never resolved"):
        resolve_to_local("m", registry=reg_dir, cache_dir=cache)
    with pytest.raises(UnreachableError, match=r"Nothing to fall back to: m@2 .*never pulled"):
        resolve_to_local("m@2", registry=reg_dir, cache_dir=cache)
    with pytest.raises(UnreachableError, match="test"):
        resolve_to_local("m@prod", registry=reg_dir, cache_dir=cache, offline=False)
    # records belong to one registry: another directory with the same model name has none
    with pytest.raises(NotFoundError, match="offline"):
        resolve_to_local("m@prod", registry=str(tmp_path / "other"), cache_dir=cache, offline=True)

    # a tampered cache entry is refused: a file of another size, then a modified manifest.json
    ffn = p1 / "ffn.safetensors"
    ffn.unlink()
    ffn.write_bytes(b"x" * 10)
    with pytest.raises(NotFoundError, match=r"damaged or incomplete.*has 10 bytes"):
        resolve_to_local("m@prod", registry=reg_dir, cache_dir=cache, offline=True)
    ffn.unlink()
    os.link(cache / "blobs" / "sha256" / json.loads((p1 / "manifest.json").read_text())["files"]
            ["ffn.safetensors"]["sha256"], ffn)
    assert resolve_to_local("m@prod", registry=reg_dir, cache_dir=cache, offline=True) == p1
    manifest = (p1 / "manifest.json").read_text()
    (p1 / "manifest.json").unlink()
    (p1 / "manifest.json").write_text(manifest + " ")
    with pytest.raises(NotFoundError, match=r"its manifest\.json has sha256"):
        resolve_to_local("m@1", registry=reg_dir, cache_dir=cache, offline=True)


def test_offline_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    art = make_artifact(tmp_path / "art", {"w": 1000})
    reg_dir, cache = str(tmp_path / "reg"), tmp_path / "cache"
    with open_registry(reg_dir, config=CFG) as reg:
        reg.publish(art, name="m", version="1")
        path = reg.pull("m", cache_dir=cache)  # Registry.pull records too (m@latest -> 1)
        reg.publish(make_artifact(tmp_path / "art2", {"w": 1001}), name="m", version="2")
    monkeypatch.setenv("FLASHIO_OFFLINE", "1")
    assert resolve_to_local("m", registry=reg_dir, cache_dir=cache) == path  # latest moved to 2: not asked
    with pytest.raises(NotFoundError, match=r"FLASHIO_OFFLINE=1.*m@2 is not usable.*never pulled"):
        resolve_to_local("m@2", registry=reg_dir, cache_dir=cache)
    assert resolve_to_local("m@2", registry=reg_dir, cache_dir=cache, offline=False).name.startswith("2-")
    monkeypatch.setenv("FLASHIO_OFFLINE", "0")
    assert resolve_to_local("m", registry=reg_dir, cache_dir=cache).name.startswith("2-")
    monkeypatch.setenv("FLASHIO_OFFLINE", "maybe")
    with pytest.raises(RegistryError, match="FLASHIO_OFFLINE='maybe'"):
        resolve_to_local("m", registry=reg_dir, cache_dir=cache)
