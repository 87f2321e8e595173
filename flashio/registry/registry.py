"""The registry: versioned, content-addressed model artifacts on a local directory or S3.

    with open_registry("s3://bucket/models", endpoint_url="http://127.0.0.1:9000") as reg:
        result = reg.publish("out/opt-125m", name="opt-125m", aliases=["prod"])
        local_dir = reg.pull("opt-125m@prod")          # verified copy in the local cache
        for v in reg.versions("opt-125m"): print(v.version, v.created_at)
        reg.gc(grace_s=24 * 3600, dry_run=True)

Blobs are content-addressed and shared by versions, version manifests are immutable and written
last, aliases move (`latest` on every publish that creates a version). See layout.py for the
keys and commit.py for how a version is created exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from flashio.registry import layout
from flashio.registry.backend import Backend
from flashio.registry.config import RegistryConfig
from flashio.registry.errors import BadArtifactError, NotFoundError, RefError
from flashio.registry.gc import GcReport, collect_garbage
from flashio.registry.local import LocalBackend
from flashio.registry.manifest import VersionManifest, utc_now
from flashio.registry.progress import Progress
from flashio.registry.publish import PublishResult, publish_artifact
from flashio.registry.pull import pull_version
from flashio.registry.refs import LATEST, Ref, check_token, parse_location, parse_ref
from flashio.registry.s3 import S3Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedVersion:
    """A version manifest as read from the registry, with the sha256 of its bytes."""

    manifest: VersionManifest
    sha256: str


class Registry:
    """One registry (local directory or S3 prefix). Use `open_registry(uri)` to make one."""

    def __init__(self, backend: Backend, *, uri: str, config: RegistryConfig | None = None):
        self.backend = backend
        self.uri = uri
        self.config = config or RegistryConfig()

    def __repr__(self) -> str:
        return f"Registry({self.backend.description!r})"

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every model name that has at least one published version."""
        found = set()
        for obj in self.backend.list(layout.MODELS_PREFIX):
            parsed = layout.parse_model_key(obj.key)
            if parsed and parsed[1] == "versions" and parsed[2].endswith("/" + layout.VERSION_MANIFEST):
                found.add(parsed[0])
        return sorted(found)

    def read_version(self, name: str, version: str) -> ResolvedVersion | None:
        """The version manifest of name@version, or None if that version is not published."""
        key = layout.version_key(check_token(name, "model name"), check_token(version, "version"))
        raw = self.backend.get_bytes(key)
        if raw is None:
            return None
        vm = VersionManifest.from_json(raw, where=f"{self.backend.description}/{key}")
        if (vm.name, vm.version) != (name, version):
            raise BadArtifactError(f"{key} in {self.backend.description} describes {vm.name}@{vm.version}: the registry is damaged")
        return ResolvedVersion(manifest=vm, sha256=hashlib.sha256(raw).hexdigest())

    def versions(self, name: str) -> list[VersionManifest]:
        """Every published version of `name`, oldest first."""
        prefix = layout.versions_prefix(check_token(name, "model name"))
        out = []
        for obj in self.backend.list(prefix):
            version, _, rest = obj.key[len(prefix):].partition("/")
            if rest != layout.VERSION_MANIFEST:
                continue
            try:
                rv = self.read_version(name, version)
            except RefError:
                log.warning("ignoring %s in %s: not a valid version name", obj.key, self.backend.description)
                continue
            if rv is not None:
                out.append(rv.manifest)
        return sorted(out, key=lambda m: (m.created_at, m.version))

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version for `name`."""
        prefix = layout.aliases_prefix(check_token(name, "model name"))
        out = {}
        for obj in self.backend.list(prefix):
            alias = obj.key[len(prefix):]
            with contextlib.suppress(RefError):  # not an alias we wrote: skip it
                if version := self.alias_target(name, alias):
                    out[alias] = version
        return dict(sorted(out.items()))

    def alias_target(self, name: str, alias: str) -> str | None:
        """The version `name@alias` points to, or None if there is no such alias."""
        key = layout.alias_key(check_token(name, "model name"), check_token(alias, "alias"))
        raw = self.backend.get_bytes(key)
        if raw is None:
            return None
        try:
            version = json.loads(raw)["version"]
            return check_token(version, "version")
        except (ValueError, KeyError, TypeError, RefError):
            raise BadArtifactError(
                f"alias {name}@{alias} in {self.backend.description} is not a valid alias document; "
                f"set it again with `flashio alias {name}@VERSION {alias}`"
            ) from None

    def resolve(self, ref: str | Ref) -> ResolvedVersion:
        """Find the version a reference names (`name` means `name@latest`); versions win over aliases."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        tag = ref.tag or LATEST
        if tag != LATEST and (rv := self.read_version(ref.name, tag)):
            return rv
        version = self.alias_target(ref.name, tag)
        if version is None:
            raise self._not_found(ref.name, tag)
        rv = self.read_version(ref.name, version)
        if rv is None:
            raise NotFoundError(
                f"alias {ref.name}@{tag} points to version {version!r}, which is not in {self.backend.description}; "
                f"move the alias with `flashio alias {ref.name}@VERSION {tag}`"
            )
        return rv

    def _not_found(self, name: str, tag: str) -> NotFoundError:
        versions = [m.version for m in self.versions(name)]
        if not versions:
            names = self.names()
            shown = ", ".join(names[:20]) or "none"
            return NotFoundError(f"model {name!r} is not in {self.backend.description} (models there: {shown}); check the name and --registry")
        aliases = ", ".join(self.aliases(name)) or "none"
        return NotFoundError(
            f"{name}@{tag}: no such version or alias in {self.backend.description}; versions: "
            f"{', '.join(versions[-20:])}; aliases: {aliases}"
        )

    # -- writing ---------------------------------------------------------------------------
    def set_alias(self, name: str, version: str, alias: str) -> None:
        """Point `name@alias` at an existing version (aliases move; versions do not)."""
        check_token(alias, "alias")
        if self.read_version(name, version) is None:
            raise self._not_found(name, version)
        if self.read_version(name, alias) is not None:
            raise RefError(f"{alias!r} is a version of {name}: an alias cannot shadow a version; pick another alias")
        doc = {"name": name, "alias": alias, "version": version, "updated_at": utc_now()}
        self.backend.put_bytes(layout.alias_key(name, alias), json.dumps(doc, indent=2).encode())
        log.info("%s@%s -> %s", name, alias, version)

    def publish(self, artifact_dir: str | Path, *, name: str, version: str | None = None,
                aliases: Iterable[str] = (), lineage: Mapping[str, Any] | None = None,
                progress: Progress | None = None) -> PublishResult:
        """Upload an artifact directory as name@version; see publish.publish_artifact."""
        return publish_artifact(self, Path(artifact_dir), name=name, version=version, aliases=tuple(aliases),
                                lineage=lineage, progress=progress)

    def pull(self, ref: str | Ref, *, cache_dir: str | Path | None = None, progress: Progress | None = None) -> Path:
        """Resolve `ref`, download and verify what the cache lacks, return the local artifact directory."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        return pull_version(self, self.resolve(ref), cache_dir=cache_dir, progress=progress, ref=ref)

    def gc(self, *, grace_s: float = 24 * 3600.0, dry_run: bool = False) -> GcReport:
        """Delete blobs that no version references and that are older than `grace_s`; see gc.py."""
        return collect_garbage(self, grace_s=grace_s, dry_run=dry_run)


def open_registry(uri: str, *, endpoint_url: str | None = None, config: RegistryConfig | None = None,
                  profile: str | None = None) -> Registry:
    """Open a registry: a directory, `file:///path` or `s3://bucket/prefix` (boto3 needed for S3)."""
    location = parse_location(uri)
    config = config or RegistryConfig()
    if location.scheme == "s3":  # boto3 is imported here, by S3Backend, and only here
        backend: Backend = S3Backend(location, config, endpoint_url=endpoint_url, profile=profile)
    else:
        assert location.path is not None
        backend = LocalBackend(location.path)
    return Registry(backend, uri=str(location), config=config)
