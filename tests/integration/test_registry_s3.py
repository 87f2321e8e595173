"""The registry against real servers: `rclone serve s3` and a local directory (same tests), moto for
conditional writes. Faults: a server killed mid-upload and mid-download, corrupt blobs, races.

    .venv/bin/python -m pytest tests/integration/test_registry_s3.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from flashio.registry import (
    IntegrityError,
    NotFoundError,
    NullProgress,
    RefError,
    Registry,
    RegistryConfig,
    TransferError,
    UnreachableError,
    UnsafePathError,
    VersionExistsError,
    open_registry,
    resolve_to_local,
)
from flashio.registry.commit import create_once
from flashio.registry.errors import RegistryError

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BUCKET = "flashio-test"  # created by the server fixtures in conftest.py
REPO = Path(__file__).resolve().parents[2]
# Small parts and chunks so that a few MiB exercise multipart uploads and parallel ranged GETs;
# short timeouts and few attempts so that fault tests fail fast.
CFG = RegistryConfig(
    part_size_bytes=5 * MiB, multipart_threshold_bytes=5 * MiB, download_chunk_bytes=1 * MiB, concurrency=4,
    connect_timeout_s=1.0, read_timeout_s=5.0, max_attempts=2, commit_timeout_s=20.0, claim_ttl_s=10.0,
    lock_timeout_s=60.0,
)
FILES = {
    "tokenizer.json": 3000,
    "resident.safetensors": 300_000,
    "ffn.safetensors": 7 * MiB + 123,  # two multipart parts, eight download chunks
    "predictors.safetensors": 50_000,
    "report/summary.json": 400,
    "report/plots/empty.png": 0,
}


def make_artifact(root: Path, files: dict[str, int], *, seed: int = 0) -> Path:
    """An artifact directory: random files and a manifest.json listing their size and sha256."""
    rng = random.Random(seed)
    table = {}
    for rel, size in files.items():
        data = rng.randbytes(size)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        table[rel] = {"bytes": size, "sha256": hashlib.sha256(data).hexdigest()}
    lineage = {"source_model": "facebook/opt-125m", "revision": f"rev{seed}", "calibration_fingerprint": "abc"}
    (root / "manifest.json").write_text(json.dumps({"format_version": 1, "files": table, "lineage": lineage}))
    return root


def tree_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Target:
    """A registry under test: where it is, how to open it, and where its objects lie on disk."""

    kind: str
    uri: str
    endpoint_url: str | None
    disk_root: Path | None  # the directory holding the registry's keys, for tampering
    server: object | None = None

    def open(self, config: RegistryConfig = CFG) -> Registry:
        return open_registry(self.uri, endpoint_url=self.endpoint_url, config=config)

    def full_uri(self, ref: str) -> str:
        return f"{self.uri}/{ref}" if self.kind != "local" else f"file://{self.uri}/{ref}"


def _target(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if kind == "local":
        root = tmp_path / "registry"
        return Target("local", str(root), None, root)
    if kind == "moto":  # one server per session: a fresh prefix per test
        moto = request.getfixturevalue("moto_s3")
        return Target("moto", f"s3://{BUCKET}/{uuid.uuid4().hex}", moto.endpoint, None)
    server = request.getfixturevalue("rclone_s3")
    return Target("rclone", f"s3://{BUCKET}/reg", server.endpoint, server.object_path("reg"), server)


@pytest.fixture(params=["local", "rclone"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return _target(request.param, request, tmp_path)


@pytest.fixture(params=["local", "rclone", "moto"])
def racing_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return _target(request.param, request, tmp_path)


def spy_reads(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the bytes each blob key delivers through read_range."""
    counts: dict[str, int] = {}
    original = reg.backend.read_range

    def spy(key: str, start: int, end: int):
        for piece in original(key, start, end):
            counts[key] = counts.get(key, 0) + len(piece)
            yield piece

    monkeypatch.setattr(reg.backend, "read_range", spy)
    return counts


# -- round trip --------------------------------------------------------------------------------
def test_publish_pull_round_trip_and_dedup(target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    art = make_artifact(tmp_path / "art", FILES)
    cache = tmp_path / "cache"
    with target.open() as reg:
        first = reg.publish(art, name="opt-tiny", version="1", aliases=["prod"])
        assert first.created and first.uploaded_blobs == len(FILES) + 1 and first.reused_blobs == 0
        second = reg.publish(art, name="opt-tiny", version="2")  # same bytes, new version
        assert second.created and second.uploaded_blobs == 0 and second.uploaded_bytes == 0
        assert second.reused_blobs == len(FILES) + 1
        assert [m.version for m in reg.versions("opt-tiny")] == ["1", "2"]
        assert reg.aliases("opt-tiny") == {"latest": "2", "prod": "1"}
        assert reg.names() == ["opt-tiny"]
        vm = reg.resolve("opt-tiny@prod").manifest
        assert vm.lineage["revision"] == "rev0" and vm.flashio_version

        reads = spy_reads(reg, monkeypatch)
        local = reg.pull("opt-tiny@prod", cache_dir=cache)
        assert tree_digests(local) == tree_digests(art)
        assert (local / "manifest.json").read_bytes() == (art / "manifest.json").read_bytes()
        downloaded = sum(reads.values())
        assert downloaded == sum(FILES.values()) + (art / "manifest.json").stat().st_size
        # version 2 has the same blobs: nothing is downloaded again; pulling 1 again is a no-op
        local2 = reg.pull("opt-tiny", cache_dir=cache)
        assert local2 != local and tree_digests(local2) == tree_digests(art)
        assert reg.pull("opt-tiny@1", cache_dir=cache) == local
        assert sum(reads.values()) == downloaded

    monkeypatch.setenv("FLASHIO_CACHE", str(cache))
    assert resolve_to_local(target.full_uri("opt-tiny@latest"), endpoint_url=target.endpoint_url) == local2
    assert resolve_to_local("opt-tiny@prod", registry=target.uri, endpoint_url=target.endpoint_url) == local


def test_endpoint_from_the_standard_aws_setting(rclone_s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", rclone_s3.endpoint)
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 1000})
    with open_registry(f"s3://{BUCKET}/reg", config=CFG) as reg:  # no endpoint_url: path-style, from env
        assert reg.backend.description.endswith(f"at {rclone_s3.endpoint}")
        reg.publish(art, name="m", version="1")
    local = resolve_to_local(f"s3://{BUCKET}/reg/m@latest", cache_dir=tmp_path / "cache")
    assert tree_digests(local) == tree_digests(art)


def test_versions_are_immutable(target: Target, tmp_path: Path):
    a = make_artifact(tmp_path / "a", {"ffn.safetensors": 1000}, seed=1)
    b = make_artifact(tmp_path / "b", {"ffn.safetensors": 1000}, seed=2)
    with target.open() as reg:
        reg.publish(a, name="m", version="1")
        again = reg.publish(a, name="m", version="1", aliases=["prod"])
        assert not again.created and again.uploaded_blobs == 0
        assert reg.aliases("m") == {"latest": "1", "prod": "1"}
        with pytest.raises(VersionExistsError, match=r"m@1 already exists .* new --version"):
            reg.publish(b, name="m", version="1")
        assert [m.version for m in reg.versions("m")] == ["1"]


# -- concurrency -------------------------------------------------------------------------------
def test_racing_publishes_of_one_version_exactly_one_wins(racing_target: Target, tmp_path: Path):
    arts = [make_artifact(tmp_path / f"art{i}", {"ffn.safetensors": 20_000, "tokenizer.json": 100}, seed=i)
            for i in range(2)]
    registries = [racing_target.open(), racing_target.open()]  # one client per publisher
    try:
        for round_ in range(3):
            version = f"1.{round_}"
            barrier = threading.Barrier(2)
            outcomes: list[object] = [None, None]

            def publish(i: int, version: str = version, barrier: threading.Barrier = barrier,
                        outcomes: list[object] = outcomes) -> None:
                barrier.wait(timeout=10)
                try:
                    outcomes[i] = registries[i].publish(arts[i], name="race", version=version)
                except RegistryError as exc:
                    outcomes[i] = exc

            threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            winners = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
            losers = [o for o in outcomes if isinstance(o, Exception)]
            assert len(winners) == 1, outcomes
            assert len(losers) == 1 and isinstance(losers[0], VersionExistsError), outcomes
            stored = registries[0].resolve(f"race@{version}").manifest
            want = json.loads((arts[winners[0]] / "manifest.json").read_bytes())["files"]
            assert {e.path: e.sha256 for e in stored.files} == {k: v["sha256"] for k, v in want.items()}
            assert not list(registries[0].backend.list(f"models/race/claims/{version}/"))
    finally:
        for reg in registries:
            reg.close()


def test_create_once_under_contention(racing_target: Target):
    n = 4
    barrier = threading.Barrier(n)
    results: list[tuple[bool, bytes] | Exception | None] = [None] * n

    def run(i: int) -> None:
        with racing_target.open() as reg:
            barrier.wait(timeout=10)
            try:
                results[i] = create_once(reg.backend, "models/x/versions/1/manifest.json", f"writer {i}".encode(),
                                         claims_prefix="models/x/claims/1/", config=CFG)
            except RegistryError as exc:
                results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(r, tuple) for r in results), results
    created = [i for i, r in enumerate(results) if r[0]]
    assert len(created) == 1
    contents = {r[1] for r in results}
    assert contents == {f"writer {created[0]}".encode()}


def test_conditional_writes_where_honoured(racing_target: Target):
    """moto (like AWS) refuses a second If-None-Match write; rclone ignores it, which is why commit.py exists."""
    with racing_target.open() as reg:
        assert reg.backend.put_bytes("probe", b"one", if_absent=True)
        second = reg.backend.put_bytes("probe", b"two", if_absent=True)
        assert second is (racing_target.kind == "rclone")
        assert reg.backend.get_bytes("probe") == (b"two" if racing_target.kind == "rclone" else b"one")


def test_two_processes_pull_the_same_version(rclone_s3, tmp_path: Path):
    art = make_artifact(tmp_path / "art", FILES)
    uri = f"s3://{BUCKET}/reg"
    with open_registry(uri, endpoint_url=rclone_s3.endpoint, config=CFG) as reg:
        reg.publish(art, name="m", version="1")
    code = ("import sys; from flashio.registry import resolve_to_local; "
            f"print(resolve_to_local(sys.argv[1], endpoint_url={rclone_s3.endpoint!r}, cache_dir=sys.argv[2]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{uri}/m@1", str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode() for o in outs]
    paths = {o[0].decode().strip() for o in outs}
    assert len(paths) == 1
    assert tree_digests(Path(paths.pop())) == tree_digests(art)


# -- faults ------------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


class _StopAfter(NullProgress):
    """A progress sink that raises (like Ctrl-C) once `limit` bytes of file `label` have moved."""

    def __init__(self, label: str, limit: int, action=None):
        self.label, self.limit, self.action = label, limit, action
        self.current, self.seen, self.fired = "", 0, False

    def begin(self, label: str, total_bytes: int) -> None:
        self.current, self.seen = label, 0

    def advance(self, n_bytes: int) -> None:
        self.seen += n_bytes
        if self.current == self.label and self.seen > self.limit and not self.fired:
            self.fired = True
            if self.action is None:
                raise _Interrupt
            self.action()


def test_interrupted_pull_resumes_and_verifies(target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    art = make_artifact(tmp_path / "art", FILES)
    cache = tmp_path / "cache"
    ffn_size = FILES["ffn.safetensors"]
    with target.open() as reg:
        reg.publish(art, name="m", version="1")
        ffn_key = "blobs/sha256/" + hashlib.sha256((art / "ffn.safetensors").read_bytes()).hexdigest()
        with pytest.raises(_Interrupt):
            reg.pull("m@1", cache_dir=cache, progress=_StopAfter("ffn.safetensors", 3 * MiB))
        assert not (cache / "models" / "m").exists() or not any((cache / "models" / "m").iterdir())
        assert list((cache / "blobs" / "sha256").glob("*.partial"))
        reads = spy_reads(reg, monkeypatch)
        local = reg.pull("m@1", cache_dir=cache)
    assert 0 < reads[ffn_key] <= ffn_size - 2 * MiB  # resumed: at least the finished chunks were kept
    assert tree_digests(local) == tree_digests(art)
    assert not list((cache / "blobs" / "sha256").glob("*.partial*"))


def test_corrupt_blob_on_server_is_never_exposed(target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", FILES)
    cache = tmp_path / "cache"
    digest = hashlib.sha256((art / "ffn.safetensors").read_bytes()).hexdigest()
    with target.open() as reg:
        reg.publish(art, name="m", version="1")
        stored = target.disk_root / "blobs" / "sha256" / digest
        with open(stored, "r+b") as f:  # flip bytes in the middle, same size
            f.seek(4 * MiB)
            f.write(b"\x00corrupt\x00")
        with pytest.raises(IntegrityError, match=f"sha256:{digest}.*corrupt and was not used"):
            reg.pull("m@1", cache_dir=cache)
    assert not (cache / "blobs" / "sha256" / digest).exists()
    assert not list((cache / "blobs" / "sha256").glob(f"{digest}.partial*"))
    assert not (cache / "models" / "m").exists() or not any((cache / "models" / "m").iterdir())


@pytest.mark.parametrize("size", [100_000, 12 * MiB])  # a single PUT, and a multipart upload
def test_file_changed_after_its_manifest_is_never_published(target: Target, tmp_path: Path, size: int):
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": size})
    with open(art / "ffn.safetensors", "r+b") as f:  # same size, different last byte
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(b"\x00" if last != b"\x00" else b"\x01")
    with target.open() as reg:
        with pytest.raises(IntegrityError, match=r"'ffn\.safetensors' .* has sha256 .* rebuild the artifact"):
            reg.publish(art, name="m", version="1")
        digest = json.loads((art / "manifest.json").read_text())["files"]["ffn.safetensors"]["sha256"]
        assert reg.backend.head(f"blobs/sha256/{digest}") is None
        assert reg.versions("m") == []
        assert list(reg.backend.incomplete_uploads("blobs/")) == []  # a multipart upload is aborted, not left


def test_server_killed_mid_multipart_upload_then_publish_resumes(rclone_s3, tmp_path: Path):
    files = {"tokenizer.json": 1000, "resident.safetensors": 200_000, "ffn.safetensors": 30 * MiB}
    art = make_artifact(tmp_path / "art", files)
    uri = f"s3://{BUCKET}/reg"
    t0 = time.monotonic()
    with open_registry(uri, endpoint_url=rclone_s3.endpoint, config=CFG) as reg:
        killer = _StopAfter("ffn.safetensors", 10 * MiB, action=rclone_s3.kill)
        with pytest.raises(TransferError, match=r"(cannot reach|failed).*127\.0\.0\.1"):
            reg.publish(art, name="m", version="1", progress=killer)
    assert killer.fired and time.monotonic() - t0 < 30
    rclone_s3.start()
    with open_registry(uri, endpoint_url=rclone_s3.endpoint, config=CFG) as reg:
        assert reg.names() == [] and reg.versions("m") == []
        with pytest.raises(NotFoundError):
            reg.resolve("m@1")
        result = reg.publish(art, name="m", version="1")
        assert result.created
        assert result.reused_blobs == 2 and result.reused_bytes == 201_000  # uploaded before the crash
        assert result.uploaded_blobs == 2  # ffn.safetensors and manifest.json
        local = reg.pull("m", cache_dir=tmp_path / "cache")
    assert tree_digests(local) == tree_digests(art)


def test_server_killed_mid_pull_then_pull_resumes(rclone_s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    art = make_artifact(tmp_path / "art", FILES)
    cache = tmp_path / "cache"
    with open_registry(f"s3://{BUCKET}/reg", endpoint_url=rclone_s3.endpoint, config=CFG) as reg:
        reg.publish(art, name="m", version="1")
        killer = _StopAfter("ffn.safetensors", 3 * MiB, action=rclone_s3.kill)
        with pytest.raises(TransferError):
            reg.pull("m@1", cache_dir=cache, progress=killer)
        rclone_s3.start()
        reads = spy_reads(reg, monkeypatch)
        local = reg.pull("m@1", cache_dir=cache)
    ffn_key = "blobs/sha256/" + hashlib.sha256((art / "ffn.safetensors").read_bytes()).hexdigest()
    assert reads[ffn_key] < FILES["ffn.safetensors"]
    assert tree_digests(local) == tree_digests(art)


# -- bad input ---------------------------------------------------------------------------------
def test_unknown_and_malformed_references(target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 100})
    with target.open() as reg:
        reg.publish(art, name="m", version="1", aliases=["prod"])
        with pytest.raises(NotFoundError, match=r"m@staging: no such version or alias .*versions: 1; aliases: latest, prod"):
            reg.resolve("m@staging")
        with pytest.raises(NotFoundError, match=r"model 'nope' is not in .*models there: m"):
            reg.resolve("nope@1")
        for bad in ("m@", "@1", "m@1@2", "../m", "m@../x", "m/x@1", ""):
            with pytest.raises(RefError):
                reg.resolve(bad)
        with pytest.raises(NotFoundError):
            reg.set_alias("m", "9", "prod")
        with pytest.raises(RefError, match="cannot shadow an alias"):
            reg.publish(art, name="m", version="prod")


def test_version_manifest_with_escaping_file_names_is_refused(target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 100})
    cache = tmp_path / "cache"
    with target.open() as reg:
        reg.publish(art, name="m", version="1")
        raw = json.loads(reg.backend.get_bytes("models/m/versions/1/manifest.json"))
        entry = raw["files"]["ffn.safetensors"]
        for evil in ("../../escape.bin", "/etc/passwd", "a/../../b"):
            raw["version"] = "2"
            raw["files"] = {evil: entry}
            reg.backend.put_bytes("models/m/versions/2/manifest.json", json.dumps(raw).encode())
            with pytest.raises(UnsafePathError, match="leave"):
                reg.pull("m@2", cache_dir=cache)
    assert not (tmp_path / "escape.bin").exists() and not (cache.parent / "escape.bin").exists()


def test_artifact_with_escaping_file_names_is_not_published(target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 100})
    (tmp_path / "outside.bin").write_bytes(b"secret")
    doc = json.loads((art / "manifest.json").read_text())
    doc["files"]["../outside.bin"] = {"bytes": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}
    (art / "manifest.json").write_text(json.dumps(doc))
    with target.open() as reg, pytest.raises(UnsafePathError, match=r"'\.\./outside\.bin' would leave"):
        reg.publish(art, name="m", version="1")


def test_unreachable_endpoint_fails_within_the_timeout(aws_env: None):
    cfg = RegistryConfig(connect_timeout_s=0.5, read_timeout_s=0.5, max_attempts=2, commit_timeout_s=20, claim_ttl_s=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    reg = open_registry(f"s3://{BUCKET}/reg", endpoint_url=f"http://127.0.0.1:{port}", config=cfg)
    sent: list[str] = []
    reg.backend._client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    with pytest.raises(UnreachableError, match=rf"cannot reach http://127\.0\.0\.1:{port} .* 2 attempts"):
        reg.resolve("m")
    assert time.monotonic() - t0 < 5
    assert len(sent) == 2  # a refused connection is transient: retried, up to max_attempts

    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(UnreachableError, match="ReadTimeoutError"):
            open_registry(f"s3://{BUCKET}/reg", endpoint_url=endpoint, config=cfg).resolve("m")
        assert time.monotonic() - t0 < 6


def test_non_transient_errors_fail_fast_and_say_why(rclone_s3, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(NotFoundError, match="bucket 'no-such-bucket' does not exist"):
        open_registry("s3://no-such-bucket/reg", endpoint_url=rclone_s3.endpoint, config=CFG).resolve("m")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-wrong-secret")
    reg = open_registry(f"s3://{BUCKET}/reg", endpoint_url=rclone_s3.endpoint, config=CFG)
    sent: list[str] = []
    reg.backend._client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    with pytest.raises(RegistryError, match=r"refused by .*check the AWS credentials") as info:
        reg.resolve("m")
    assert len(sent) == 1  # a 403 is not retried
    assert "wrong-secret" not in str(info.value) and "AKIA" not in str(info.value)


# -- gc ----------------------------------------------------------------------------------------
def test_gc_deletes_only_unreferenced_blobs_past_the_grace_period(target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", {"ffn.safetensors": 1000, "tokenizer.json": 10})
    with target.open() as reg:
        reg.publish(art, name="m", version="1")
        orphan = "blobs/sha256/" + "0" * 64  # as an interrupted publish leaves behind
        reg.backend.put_bytes(orphan, b"orphan bytes")
        young = reg.gc(grace_s=3600)
        assert not young.deletable and [o.key for o in young.young] == [orphan]
        dry = reg.gc(grace_s=0, dry_run=True)
        assert [o.key for o in dry.deletable] == [orphan] and not dry.deleted
        assert reg.backend.head(orphan) is not None
        done = reg.gc(grace_s=0)
        assert done.deleted and done.referenced_blobs == 3
        assert reg.backend.head(orphan) is None
        assert tree_digests(reg.pull("m@1", cache_dir=tmp_path / "cache")) == tree_digests(art)


# -- resumable multipart uploads ---------------------------------------------------------------
# Both servers list, resume and abort multipart uploads (rclone keeps them in memory only: they do
# not survive a restart of the server, so these tests interrupt the client, not the server).
PART_FILES = {"tokenizer.json": 100, "ffn.safetensors": 12 * MiB + 123}  # parts of 5, 5 and 2 MiB + 123


class _Crash(Exception):
    """Raised inside an UploadPart call, as a process that dies there would stop."""


@pytest.fixture(params=["rclone", "moto"])
def s3_target(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    monkeypatch.setattr("flashio.registry.s3._LIST_PAGE_SIZE", 1)  # every listing takes several pages
    return _target(request.param, request, tmp_path)


def on_call(reg: Registry, operation: str, hook) -> None:
    """Call hook(params) before each `operation` request of this registry's client (retries excluded)."""
    reg.backend._client.meta.events.register(f"before-parameter-build.s3.{operation}",
                                             lambda params, **_: hook(params))


def record_calls(reg: Registry, operation: str) -> list[dict]:
    """The parameters of every `operation` call; a Body is replaced by its length."""
    calls: list[dict] = []

    def hook(params: dict) -> None:
        body = params.get("Body")
        size = len(body) if isinstance(body, bytes) else body.getbuffer().nbytes if body is not None else None
        calls.append({**params, "Body": size})

    on_call(reg, operation, hook)
    return calls


def crash_at_part(reg: Registry, number: int) -> None:
    def hook(params: dict) -> None:
        if params["PartNumber"] == number:
            raise _Crash(f"part {number}")

    on_call(reg, "UploadPart", hook)


class _Recorder(NullProgress):
    def __init__(self) -> None:
        self.moved: dict[str, int] = {}
        self.current = ""

    def begin(self, label: str, total_bytes: int) -> None:
        self.current = label
        self.moved[label] = 0

    def advance(self, n_bytes: int) -> None:
        self.moved[self.current] += n_bytes


def unfinished(reg: Registry) -> list:
    return list(reg.backend.incomplete_uploads("blobs/"))


def test_interrupted_multipart_publish_sends_only_the_missing_parts(s3_target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", PART_FILES)
    size = PART_FILES["ffn.safetensors"]
    key = "blobs/sha256/" + hashlib.sha256((art / "ffn.safetensors").read_bytes()).hexdigest()
    with s3_target.open() as reg:
        crash_at_part(reg, 3)
        with pytest.raises(_Crash):
            reg.publish(art, name="m", version="1")
        assert reg.versions("m") == [] and reg.backend.head(key) is None
        [left] = unfinished(reg)  # the interrupted upload stays, with the parts sent before the crash
        assert left.key == key
        assert [(p.number, p.size_bytes) for p in reg.backend.upload_parts(left)] == [(1, 5 * MiB), (2, 5 * MiB)]

    with s3_target.open() as reg:
        parts = record_calls(reg, "UploadPart")
        creates = record_calls(reg, "CreateMultipartUpload")
        aborts = record_calls(reg, "AbortMultipartUpload")
        progress = _Recorder()
        result = reg.publish(art, name="m", version="1", progress=progress)
        assert result.created and result.resumed_bytes == 10 * MiB
        assert [(c["PartNumber"], c["Body"]) for c in parts] == [(3, size - 10 * MiB)]  # only the missing part
        assert creates == [] and aborts == []  # continued the same upload
        assert progress.moved["ffn.safetensors"] == size  # resumed bytes + bytes sent
        assert unfinished(reg) == []
        assert reg.backend.head(key).size_bytes == size
        local = reg.pull("m@1", cache_dir=tmp_path / "cache")
    assert tree_digests(local) == tree_digests(art)


def test_leftover_uploads_that_do_not_match_are_aborted_and_restarted(s3_target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", PART_FILES)
    key = "blobs/sha256/" + hashlib.sha256((art / "ffn.safetensors").read_bytes()).hexdigest()
    other_size = RegistryConfig(**{**CFG.__dict__, "part_size_bytes": 6 * MiB})
    with s3_target.open(other_size) as reg:  # a publish with another part size, interrupted at part 2
        crash_at_part(reg, 2)
        with pytest.raises(_Crash):
            reg.publish(art, name="m", version="1")
        [foreign_layout] = unfinished(reg)
        client, bucket, full_key = reg.backend._client, BUCKET, reg.backend._key(key)
        # and one with the right part size but other bytes (a file changed since, a damaged part...)
        wrong = client.create_multipart_upload(Bucket=bucket, Key=full_key)["UploadId"]
        client.upload_part(Bucket=bucket, Key=full_key, UploadId=wrong, PartNumber=1, Body=os.urandom(5 * MiB))
        assert {u.upload_id for u in unfinished(reg)} == {foreign_layout.upload_id, wrong}

    with s3_target.open() as reg:
        parts = record_calls(reg, "UploadPart")
        creates = record_calls(reg, "CreateMultipartUpload")
        aborts = record_calls(reg, "AbortMultipartUpload")
        result = reg.publish(art, name="m", version="1")
        assert result.created and result.resumed_bytes == 0
        assert {c["UploadId"] for c in aborts} == {foreign_layout.upload_id, wrong}
        assert len(creates) == 1 and sorted(c["PartNumber"] for c in parts) == [1, 2, 3]
        assert unfinished(reg) == []
        local = reg.pull("m@1", cache_dir=tmp_path / "cache")
    assert tree_digests(local) == tree_digests(art)


def test_upload_of_a_file_that_changed_is_aborted_not_left(s3_target: Target, tmp_path: Path):
    art = make_artifact(tmp_path / "art", PART_FILES)
    with s3_target.open() as reg:
        crash_at_part(reg, 3)
        with pytest.raises(_Crash):
            reg.publish(art, name="m", version="1")
    with open(art / "ffn.safetensors", "r+b") as f:  # now part 1 differs from what was sent
        f.write(b"\x00changed\x00")
    with s3_target.open() as reg:
        aborts = record_calls(reg, "AbortMultipartUpload")
        with pytest.raises(IntegrityError, match=r"'ffn\.safetensors' .* has sha256 .* rebuild the artifact"):
            reg.publish(art, name="m", version="1")
        assert len(aborts) == 2  # the leftover (part 1 no longer matches), then the new upload itself
        assert unfinished(reg) == [] and reg.versions("m") == []


def test_gc_aborts_uploads_idle_past_the_grace_period(rclone_s3, tmp_path: Path, capsys: pytest.CaptureFixture):
    """Only rclone here: moto reports a fixed 2010 start time for every multipart upload."""
    from flashio.cli import main as cli_main

    uri = f"s3://{BUCKET}/reg"
    with open_registry(uri, endpoint_url=rclone_s3.endpoint, config=CFG) as reg:
        client = reg.backend._client

        def start(key: str) -> str:
            return client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]

        def add_part(key: str, upload_id: str) -> None:
            client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * MiB)

        idle = start("reg/blobs/sha256/" + "1" * 64)
        add_part("reg/blobs/sha256/" + "1" * 64, idle)
        resumed = start("reg/blobs/sha256/" + "2" * 64)  # started as long ago, but a part arrives later
        outside = start("elsewhere/blobs/sha256/" + "3" * 64)  # not this registry's
        time.sleep(2.0)
        add_part("reg/blobs/sha256/" + "2" * 64, resumed)
        fresh = start("reg/blobs/sha256/" + "4" * 64)

        dry = reg.gc(grace_s=1.5, dry_run=True)
        assert [(u.upload_id, u.parts, u.size_bytes) for u in dry.abandoned_uploads] == [(idle, 1, MiB)]
        assert dry.active_uploads == 2 and not dry.deleted
        assert {u.upload_id for u in unfinished(reg)} == {idle, resumed, fresh}
        assert cli_main(["gc", "--registry", uri, "--endpoint-url", rclone_s3.endpoint, "--dry-run",
                         "--grace-hours", str(1.5 / 3600)]) == 0
        err = capsys.readouterr()
        assert f"would abort\tblobs/sha256/{'1' * 64}\tupload {idle}" in err.out
        assert "1 unfinished uploads idle for longer (1.0 MiB), 2 more recent kept" in err.err

        done = reg.gc(grace_s=1.5)
        assert [u.upload_id for u in done.abandoned_uploads] == [idle] and done.deleted
        assert {u.upload_id for u in unfinished(reg)} == {resumed, fresh}
        others = client.list_multipart_uploads(Bucket=BUCKET, Prefix="elsewhere/").get("Uploads", [])
        assert [u["UploadId"] for u in others] == [outside]


def test_completed_object_whose_etag_disagrees_with_its_parts_is_deleted(rclone_s3, tmp_path: Path):
    art = make_artifact(tmp_path / "art", PART_FILES)
    key = "blobs/sha256/" + hashlib.sha256((art / "ffn.safetensors").read_bytes()).hexdigest()
    with open_registry(f"s3://{BUCKET}/reg", endpoint_url=rclone_s3.endpoint, config=CFG) as reg:
        def garble(parsed: dict, **_) -> None:  # as if the server had assembled other bytes
            parsed["ETag"] = '"' + "0" * 32 + '-3"'

        reg.backend._client.meta.events.register("after-call.s3.CompleteMultipartUpload", garble)
        with pytest.raises(IntegrityError, match=r"completed object has ETag 0+-3, its parts imply [0-9a-f]{32}-3"):
            reg.publish(art, name="m", version="1")
        assert reg.backend.head(key) is None and reg.versions("m") == []
